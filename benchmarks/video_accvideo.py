"""Benchmark: AccVideo's m-step student vs the 50-step teacher on moving digits.

    uv run --package fewstep-video python benchmarks/video_accvideo.py

Runs ``fewstep distill video-accvideo`` twice on the default cached teacher (trained and
cached on first use) and one SynVid (the teacher's 50-step Euler trajectories under CFG,
cached under the fewstep cache, so the second run and reruns reuse it):

- AccVideo: trajectory-based few-step guidance (eq. 6) + the key-time GAN (eqs. 7-8,
  lambda_adv = 0.1);
- the ablation: guidance only (``accvideo.adv_weight 0``), same steps, seed and data;
- with ``--disc-lrs``, AccVideo again with the projection heads at other learning rates
  (at the recipe's 1e-4 for both roles the heads barely separate real from fake).

Each run evaluates, on the same labels and noise, the teacher (50 Euler steps under CFG),
the teacher on the m = 5 key times, and the student (EMA) on the 5 key times and on 3:
NFE, seconds per video and wall-time ratio against the teacher (side by side in one
process, one thread), video FD / frame FD / digit accuracy / warp error
(``fewstep.video.evaluate``) and the distance to the teacher's video from the same noise.
One training seed and one evaluation seed: FD differences of ~20 % are within noise at this
scale (DESIGN.md).

Writes benchmarks/results/video_accvideo.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from report_io import machine, markdown_table, write_json

KEYS = ("nfe", "s_per_video", "speedup_vs_teacher", "video_fd", "frame_fd",
        "digit_accuracy", "warp_error", "mse_to_teacher")  # fmt: skip


def run(name: str, args, extra: list[str]) -> dict:
    from fewstep.core import cli

    common = [
        "--synvid.videos", str(args.videos), "--train.steps", str(args.steps),
        "--eval.samples", str(args.samples), "--threads", str(args.threads),
        "--train.progress", "false",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        t0 = time.perf_counter()
        if cli.main(["distill", "video-accvideo", "--out", str(out), *common, *extra]) != 0:
            raise RuntimeError(f"fewstep distill video-accvideo ({name}) failed")
        m = json.loads((out / "metrics.json").read_text())
        m["run_seconds"] = time.perf_counter() - t0
        return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=512, help="SynVid trajectories")
    p.add_argument("--steps", type=int, default=500, help="distillation steps per run")
    p.add_argument("--samples", type=int, default=128, help="videos per sampler")
    p.add_argument(
        "--disc-lrs",
        type=float,
        nargs="*",
        default=[],
        help="extra AccVideo runs with these projection-head learning rates",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results" / "video_accvideo.json")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = {
        "accvideo": run("accvideo", args, []),
        "guidance_only": run("guidance_only", args, ["--accvideo.adv_weight", "0"]),
    }
    for lr in args.disc_lrs:
        role_lr = json.dumps({"discriminator": lr})
        runs[f"accvideo_disc_lr{lr:g}"] = run("disc_lr", args, ["--train.role_lr", role_lr])
    rows = []
    first = runs["accvideo"]
    for who in ("teacher", f"teacher_{first['keys']}"):
        rows.append({"sampler": who, **{k: first["samplers"][who][k] for k in KEYS}})
    for run_name, m in runs.items():
        for who, r in m["samplers"].items():
            if who.startswith("student"):
                rows.append({"sampler": f"{run_name}: {who}", **{k: r[k] for k in KEYS}})
    report = {
        "benchmark": "video_accvideo", "machine": machine(),
        "settings": {"synvid_videos": args.videos, "train_steps": args.steps,
                     "samples": args.samples, "threads": args.threads,
                     "disc_lrs": args.disc_lrs},
        "table": rows,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "classifier"}
                 for k, v in runs.items()},
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    write_json(args.out, report)
    print(markdown_table(rows))
    for name, m in runs.items():
        disc = "" if m["disc_loss_last"] is None else f"disc loss {m['disc_loss_last']:.3f}, "
        print(f"{name}: guide loss {m['guide_loss_first']:.4g} -> {m['guide_loss_last']:.4g}, "
              f"{disc}"
              f"train {m['train_seconds']:.0f} s, SynVid cached {m['synvid_cached']} "
              f"({m['synvid_seconds']:.0f} s to make), run {m['run_seconds']:.0f} s")  # fmt: skip
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
