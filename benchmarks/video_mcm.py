"""Benchmark: MCM (motion consistency distillation on frame differences + high-quality frame
discriminator + mixed trajectories) vs plain consistency distillation (motion "raw", no
discriminator, no mixing) from the same low-quality video teacher, at 1 / 2 / 4 student steps.

    uv run --package fewstep-video python benchmarks/video_mcm.py [--seeds 5]

Runs ``fewstep distill video-mcm`` once per method with identical settings except the MCM
knobs (the teacher, trained on LOW-quality moving digits, and the video classifier are trained
once and cached), then evaluates every student with ``--seeds`` sampling seeds (noise and
labels) and reports mean ± sd of: video FD and per-frame FD to held-out HIGH-quality clips
(fewstep's own video classifier), warp error (temporal consistency proxy) and the sharpness
ratio (Laplacian energy / that of the high-quality clips). The teacher (50 Euler steps) and
the low-quality training clips are scored the same way for reference. Small CPU settings
(``SETTINGS``); these are one-run figures, not a tuned comparison.

Writes benchmarks/results/video_mcm.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report_io import machine, markdown_table, write_json  # noqa: E402

SETTINGS = [
    "--teacher.data.videos", "600", "--teacher.data.frames", "8", "--teacher.data.size", "16",
    "--teacher.dim", "64", "--teacher.depth", "3", "--teacher.heads", "4",
    "--teacher.steps", "3000", "--teacher.batch_size", "32",
    "--hq_videos", "300",
    "--train.steps", "500", "--train.batch_size", "16", "--train.progress", "false",
    "--eval.samples", "256", "--eval.reference_videos", "256", "--eval.teacher_steps", "50",
]  # fmt: skip
METHODS = {
    "consistency (raw, no GAN)": [
        "--mcm.motion",
        "raw",
        "--mcm.adv_weight",
        "0",
        "--mcm.mix_ratio",
        "0",
    ],  # fmt: skip
    "MCM (diff + GAN + mix 0.5)": [],  # the recipe's MCM defaults
}
FIELDS = ("video_fd", "frame_fd", "warp_error", "sharpness_ratio")


def _rows(label: str, per_seed: list[dict], keys: list[str]) -> list[dict]:
    rows = []
    for key in keys:
        row = {"method": label, "sampler": key}
        for f in FIELDS:
            vals = [m["samplers"][key][f] for m in per_seed]
            row[f] = statistics.mean(vals)
            row[f + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def run(seeds: int, root: Path, extra: list[str]) -> dict:
    from fewstep.core import cli
    from fewstep.video.recipes.mcm import MCM
    from fewstep.video.teacher import load_clips

    rows, training, refs_done = [], {}, False
    for label, flags in METHODS.items():
        out = root / label.split()[0].lower()
        t0 = time.perf_counter()
        if cli.main(["distill", "video-mcm", "--out", str(out), *SETTINGS, *extra, *flags]):
            raise RuntimeError(f"video-mcm failed for {label}")
        m = json.loads((out / "metrics.json").read_text())
        training[label] = {
            "wall_seconds": time.perf_counter() - t0,
            **{k: m.get(k) for k in ("teacher_train_seconds", "distill_seconds",
                                     "motion_loss_first", "motion_loss_last", "disc_loss_last",
                                     "motion", "adv_weight", "mix_ratio", "gan_loss")},
        }  # fmt: skip
        cfg, teacher, student = MCM.load(out)
        clips, _ = load_clips(cfg.teacher.data)
        per_seed = []
        for s in range(seeds):
            # the teacher and the data are the same for every method: scored once
            ev = dataclasses.replace(cfg.eval, seed=s, teacher_steps=0 if refs_done else 50)
            c = dataclasses.replace(cfg, eval=ev)
            per_seed.append(MCM._evaluate(c, teacher, student, clips, out))
        keys = [f"student_{k}" for k in cfg.eval.steps]
        if not refs_done:
            keys += ["teacher", "low_quality_data"]
            refs_done = True
        rows += _rows(label, per_seed, keys)
    return {"rows": rows, "training": training, "seeds": seeds}


def table(rows: list[dict]) -> str:
    shown = [
        {"method": r["method"], "sampler": r["sampler"],
         **{f: f"{r[f]:.4g} ± {r[f + '_sd']:.2g}" for f in FIELDS}}
        for r in rows
    ]  # fmt: skip
    return markdown_table(shown, ["method", "sampler", *FIELDS])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=str, default="", help="folder to keep the run folders in")
    ap.add_argument("overrides", nargs="*", help="extra --key value pairs for both runs")
    args, unknown = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    extra = [*args.overrides, *unknown, "--threads", str(args.threads)]
    t0 = time.perf_counter()
    result = {"machine": machine(), "settings": SETTINGS, "extra": extra}
    if args.keep:
        result.update(run(args.seeds, Path(args.keep), extra))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(run(args.seeds, Path(tmp), extra))
    result["total_seconds"] = time.perf_counter() - t0
    write_json(Path(__file__).parent / "results" / "video_mcm.json", result)
    print(table(result["rows"]))
    print(json.dumps(result["training"], indent=1))
    print(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
