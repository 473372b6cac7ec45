"""Benchmark: the StreamDiT streaming student (one call per emitted chunk) vs the StreamDiT
teacher it was distilled from (s calls per chunk) vs the base video teacher (Euler on the
whole clip), on the default ``video-streamdit`` recipe.

    uv run --package fewstep-video python benchmarks/video_streamdit.py [--seeds 5]

Runs ``fewstep distill video-streamdit`` with its defaults once (trains and caches the
default teacher and video classifier first when they are missing), then evaluates the three
samplers with ``--seeds`` sampling seeds (noise and labels; the same for all three) and
reports mean ± sd of: video FD and per-frame FD to the training clips (features of
fewstep's own video classifier), digit accuracy of the conditioned label, warp error (the
flow-free temporal-consistency proxy of ``fewstep.video.evaluate``), NFE per frame, frames
per second and time to the first output (batch 1). Times are ratios measured side by side on
this machine; absolute seconds only mean something on the machine that printed them.

Writes benchmarks/results/video_streamdit.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report_io import machine

SAMPLERS = ("student", "stream_teacher", "teacher")
FIELDS = ("video_fd", "frame_fd", "digit_accuracy", "warp_error", "nfe_per_frame",
          "frames_per_second")  # fmt: skip


def _latency(m: dict, who: str) -> float:
    key = "teacher_first_frame_latency" if who == "teacher" else f"{who}_first_chunk_latency"
    return m[key]


def run(seeds: int, out: Path) -> dict:
    from fewstep.core import cli
    from fewstep.video.evaluate import frame_fd, load_classifier, video_fd
    from fewstep.video.recipes.streamdit import STREAMDIT
    from fewstep.video.teacher import load_clips

    t0 = time.perf_counter()
    reused = (out / "student.safetensors").exists()  # --keep of an earlier run: evaluate it
    if not reused and cli.main(["distill", "video-streamdit", "--out", str(out)]) != 0:
        raise RuntimeError("video-streamdit failed")
    train_metrics = json.loads((out / "metrics.json").read_text())
    if not reused:
        train_metrics["wall_seconds"] = time.perf_counter() - t0
    cfg, teacher, stream_teacher, student = STREAMDIT.load(out)
    clips, labels = load_clips(cfg.teacher.data)
    # the floor: held-out real clips against the same reference, as many as the samples
    data = cfg.teacher.data
    clf, _ = load_classifier(
        dataclasses.replace(cfg.eval.classifier, frames=data.frames, size=data.size)
    )
    n_ref, n = min(len(clips) // 2, 256), cfg.eval.samples
    floor = {"video_fd": video_fd(clf, clips[n_ref : n_ref + n], clips[:n_ref]),
             "frame_fd": frame_fd(clf, clips[n_ref : n_ref + n], clips[:n_ref])}  # fmt: skip
    per_seed = []
    for s in range(seeds):
        c = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, seed=s))
        per_seed.append(STREAMDIT._evaluate(c, teacher, stream_teacher, student, clips, labels,
                                            out))  # fmt: skip
    rows = []
    for who in SAMPLERS:
        row = {"sampler": who}
        for f in (*FIELDS, "first_output_seconds"):
            vals = [_latency(m, who) if f == "first_output_seconds" else m[f"{who}_{f}"]
                    for m in per_seed]  # fmt: skip
            row[f] = statistics.mean(vals)
            row[f + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    ref = {k: statistics.mean(m[f"student_{k}"] for m in per_seed)
           for k in ("reference_warp_error", "reference_digit_accuracy")}  # fmt: skip
    ref.update({f"real_vs_real_{k}": v for k, v in floor.items()})
    keep = ("buffer_seconds", "distill_seconds", "buffer_loss_first", "buffer_loss_last",
            "distill_loss_first", "distill_loss_last", "wall_seconds", "classifier",
            "chunks_in_buffer", "teacher_micro_steps", "guidance", "samples")  # fmt: skip
    return {"rows": rows, "reference": ref, "seeds": seeds, "reused_run": reused,
            "samples_per_seed": cfg.eval.samples,
            "training": {k: train_metrics.get(k) for k in keep}}  # fmt: skip


def table(rows: list[dict]) -> str:
    cols = ["sampler", *FIELDS, "first_output_seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["sampler"]]
        for c in cols[1:]:
            cells.append(f"{r[c]:.4g} ± {r[c + '_sd']:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--keep",
        type=str,
        default="",
        help="run folder to keep; one holding a finished run is evaluated again",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"machine": machine()}
    if args.keep:
        result.update(run(args.seeds, Path(args.keep)))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(run(args.seeds, Path(tmp) / "run"))
    out = Path(__file__).parent / "results" / "video_streamdit.json"
    out.write_text(json.dumps(result, indent=2))
    print(table(result["rows"]))
    print(f"real clips: {result['reference']}")
    print(json.dumps(result["training"], indent=1))


if __name__ == "__main__":
    main()
