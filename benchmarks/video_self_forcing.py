"""Benchmark: the video teacher's 50-step Euler sampler (CFG) vs the Self Forcing streaming
student (block-causal, KV cache), on the default ``video-self-forcing`` architecture.

    uv run --package fewstep-video python benchmarks/video_self_forcing.py [--distill]

Speed (default): NFE per frame, frames per second and time to the first output, teacher vs
streaming student with K = 1, 2, 4 steps per chunk (and K = 4 with First-Frame Enhancement,
8 steps on chunk 0), at batch 1 and batch 16, plus the per-chunk time of a 24-chunk stream
(3x the training length) with a rolling window of 3 chunks. These figures depend only on the
architecture and the sampler, so the networks here carry the teacher's initial weights (the
student is the causal copy of the teacher, as the recipe builds it); the median of
``--repeats`` timings is reported. ``--distill`` also runs ``fewstep distill
video-self-forcing`` with its defaults (trains and caches the default teacher first: about
3000 x 0.7 s on two CPU cores) and adds its metrics.json (sample quality included).

Writes benchmarks/results/video_self_forcing.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report_io import machine


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed(repeats: int, batches: tuple[int, ...]) -> dict:
    from fewstep.core.models import GuidedDenoiser
    from fewstep.core.samplers import EulerSampler
    from fewstep.video.causal import causal_student
    from fewstep.video.recipes.self_forcing import SelfForcingRecipeConfig
    from fewstep.video.self_forcing import StreamStats, stream
    from fewstep.video.teacher import build_teacher, null_labels

    cfg = SelfForcingRecipeConfig()
    teacher = build_teacher(cfg.teacher).eval()
    real = GuidedDenoiser(teacher, cfg.guidance, null_labels)
    student = causal_student(teacher, cfg.chunk_frames).eval()
    frames, n_chunks = cfg.teacher.data.frames, student.net.n_chunks
    shape = (frames, 3, cfg.teacher.data.size, cfg.teacher.data.size)
    rows = []
    for b in batches:
        labels = torch.randint(0, 10, (b,))
        noise = torch.randn(b, *shape)
        sampler = EulerSampler(cfg.eval.teacher_steps)
        nfe = sampler.sample(real, noise[:1], labels[:1]).nfe
        wall = median_time(lambda s=sampler, x=noise, c=labels: s.sample(real, x, c), repeats)
        rows.append({
            "sampler": f"teacher Euler {cfg.eval.teacher_steps} (CFG {cfg.guidance})",
            "batch": b, "nfe_per_frame": nfe, "seconds": wall,
            "frames_per_second": b * frames / wall, "first_output_seconds": wall,
        })  # fmt: skip
        for k, first in ((1, 0), (2, 0), (4, 0), (4, 8)):
            walls, firsts, nfes = [], [], []
            for _ in range(repeats):
                s = StreamStats()
                t0 = time.perf_counter()
                list(stream(student, n_chunks, k, first, None, labels, stats=s))
                walls.append(time.perf_counter() - t0)
                firsts.append(s.chunk_seconds[0])
                nfes.append(s.nfe)
            per_frame = nfes[0] / n_chunks  # passes each frame goes through, chunk-averaged
            wall = statistics.median(walls)
            rows.append({
                "sampler": f"self-forcing K={k}" + (f", FFE {first}" if first else ""),
                "batch": b, "nfe_per_frame": per_frame, "seconds": wall,
                "frames_per_second": b * frames / wall,
                "first_output_seconds": statistics.median(firsts),
            })  # fmt: skip
    long_stats = StreamStats()
    list(stream(student, 3 * 8, 4, 0, 3, torch.randint(0, 10, (1,)), stats=long_stats))
    per_chunk = long_stats.chunk_seconds
    return {
        "rows": rows,
        "long_stream": {"chunks": len(per_chunk), "window": 3, "steps": 4,
                        "chunk_seconds": per_chunk,
                        "first_8_median": statistics.median(per_chunk[:8]),
                        "last_8_median": statistics.median(per_chunk[-8:])},
        "config": {"frames": frames, "size": cfg.teacher.data.size,
                   "patch": list(cfg.teacher.patch), "dim": cfg.teacher.dim,
                   "depth": cfg.teacher.depth, "chunk_frames": cfg.chunk_frames,
                   "chunks": n_chunks},
    }  # fmt: skip


def distill(out: Path) -> dict:
    from fewstep.core import cli

    t0 = time.perf_counter()
    if cli.main(["distill", "video-self-forcing", "--out", str(out)]) != 0:
        raise RuntimeError("video-self-forcing failed")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def table(rows: list[dict]) -> str:
    cols = ["sampler", "batch", "nfe_per_frame", "seconds", "frames_per_second",
            "first_output_seconds"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=str, default="1,16")
    ap.add_argument("--distill", action="store_true", help="also run the recipe (trains)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"machine": machine(), "repeats": args.repeats}
    result["speed"] = speed(args.repeats, tuple(int(b) for b in args.batches.split(",")))
    if args.distill:
        with tempfile.TemporaryDirectory() as tmp:
            result["distill"] = distill(Path(tmp) / "run")
    out = Path(__file__).parent / "results" / "video_self_forcing.json"
    out.write_text(json.dumps(result, indent=2))
    print(table(result["speed"]["rows"]))
    ls = result["speed"]["long_stream"]
    print(f"\nlong stream: {ls['chunks']} chunks, window {ls['window']}: median chunk seconds "
          f"first 8 {ls['first_8_median']:.4g}, last 8 {ls['last_8_median']:.4g}")  # fmt: skip
    if "distill" in result:
        print(json.dumps({k: v for k, v in result["distill"].items()
                          if not isinstance(v, (list, dict))}, indent=2))  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
