"""Benchmark: LiveTalk's multimodal streaming student vs its 50-step control teacher.

    uv run --package fewstep-video python benchmarks/video_livetalk.py [--run DIR] [-- KEY V ...]

Runs ``fewstep distill video-livetalk`` with its defaults (the class teacher, then the
control teacher, are trained and cached on first use), or reads the ``metrics.json`` of an
existing run folder with ``--run``, and prints: NFE per frame, frames per second, first
output latency, video / frame FD, digit accuracy and warp error of the student and the
teacher (``fewstep.video.evaluate``), and control adherence (``fewstep.video.control``) of
each with its own controls and with the controls shuffled across videos. Evaluation
conditions are the last clips of the data (label, control, and for the student the real
first chunk); adherence is measured on the frames after the first chunk.

Writes benchmarks/results/video_livetalk.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from report_io import machine, markdown_table, write_json

QUALITY = ("video_fd", "frame_fd", "digit_accuracy", "warp_error")


def distill(extra: list[str]) -> dict:
    from fewstep.core import cli

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "livetalk"
        t0 = time.perf_counter()
        if cli.main(["distill", "video-livetalk", "--out", str(out), *extra]) != 0:
            raise RuntimeError("fewstep distill video-livetalk failed")
        m = json.loads((out / "metrics.json").read_text())
        m["run_seconds"] = time.perf_counter() - t0
        return m


def tables(m: dict) -> tuple[list[dict], list[dict]]:
    speed = [
        {"sampler": f"student (K = {m['student_steps']}, real first chunk)",
         "nfe_per_frame": m["student_nfe_per_frame"],
         "frames_per_second": m["student_frames_per_second"],
         "first_output_s": m["student_first_chunk_latency"],
         **{k: m[f"student_{k}"] for k in QUALITY}},
        {"sampler": "control teacher (50 Euler, CFG over the label)",
         "nfe_per_frame": m["teacher_nfe_per_frame"],
         "frames_per_second": m["teacher_frames_per_second"],
         "first_output_s": m["teacher_first_frame_latency"],
         **{k: m[f"teacher_{k}"] for k in QUALITY}},
    ]  # fmt: skip
    control = [
        {"sampler": who, "controls": ctl,
         "correlation": m[f"{who}_{pre}control_correlation"],
         "motion_gap": m[f"{who}_{pre}control_motion_gap"]}
        for who in ("student", "teacher")
        for ctl, pre in (("own", ""), ("shuffled", "shuffled_"))
    ]  # fmt: skip
    return speed, control


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="read this run folder instead of distilling")
    p.add_argument("extra", nargs="*", help="recipe keys passed through (after --)")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results" / "video_livetalk.json")  # fmt: skip
    args = p.parse_args()
    if args.run:
        m = json.loads((args.run / "metrics.json").read_text())
    else:
        m = distill(args.extra)
    speed, control = tables(m)
    write_json(args.out, {"benchmark": "video_livetalk", "machine": machine(), "metrics": m,
                          "speed_quality": speed, "control": control})  # fmt: skip
    print(markdown_table(speed))
    print()
    print(markdown_table(control))
    print(f"NFE per frame {m['nfe_reduction']:.1f}x lower; wall {m['wall_speedup']:.1f}x; "
          f"first output {m['latency_speedup']:.1f}x sooner; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
