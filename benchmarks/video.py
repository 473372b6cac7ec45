"""Benchmark: every video student against its 50-step teacher, on the same machine in one
run — NFE per frame, seconds per video, frames per second, first-output latency, and quality
under fewstep's video classifier (video FD, per-frame FD, digit accuracy, warp error).

    uv run --package fewstep-video python benchmarks/video.py [--methods self-forcing,blade]
        [--set blade:train.steps=200 ...]

Runs ``fewstep distill video-<method>`` with the recipe's defaults (plus ``--set`` overrides)
for self-forcing, StreamDiT, MCM, BLADE, AccVideo, VDOT and LiveTalk, and reads each run's
``metrics.json`` into one table. Each recipe scores its own teacher (the default moving-digits
teacher, MCM's low-quality teacher, VDOT's two-condition teacher) with the teacher's Euler
sampler under CFG on the same labels and noise, so ratios are within a row pair. BLADE's
attention density and FLOPs saved are printed under the table. Writes
benchmarks/results/video.json after every method (a late failure keeps the finished rows);
run folders go to ``--keep DIR`` if given, else to a temporary folder; ``--resume`` keeps
the methods already in the output and runs the rest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from report_io import machine, markdown_table, write_json

QUALITY = ("video_fd", "frame_fd", "digit_accuracy", "warp_error")


def _quality(m: dict, who: str) -> dict:
    return {k: m.get(f"{who}_{k}") for k in QUALITY}


def _row(sampler: str, nfe_frame, seconds, videos: int, frames: int, first=None, **q) -> dict:
    """One sampler's row; ``first``: seconds to the first frames of one video (streaming
    recipes measure it alone; the others emit all frames at the end of a batch)."""
    return {
        "sampler": sampler, "nfe_per_frame": nfe_frame, "seconds_per_video": seconds / videos,
        "frames_per_second": videos * frames / seconds, "first_output_seconds": first, **q,
    }  # fmt: skip


def streaming_rows(m: dict, cfg: dict) -> list[dict]:
    """Self-forcing and StreamDiT: streaming student and the teacher's full-clip sampler."""
    n, f = cfg["eval"]["samples"], m["frames"]
    return [
        _row("teacher", m["teacher_nfe_per_frame"], m["teacher_seconds"], n, f,
             m["teacher_first_frame_latency"], **_quality(m, "teacher")),
        _row("student", m["student_nfe_per_frame"], m["student_seconds"], n, f,
             m["student_first_chunk_latency"], **_quality(m, "student")),
    ]  # fmt: skip


def flat_rows(m: dict, cfg: dict) -> list[dict]:
    """BLADE, VDOT: ``{teacher,student}_nfe`` / ``_seconds`` and quality keys; every
    network call processes every frame, so NFE per frame is NFE per video."""
    teacher = cfg["teacher"].get("base", cfg["teacher"])  # VDOT fine-tunes a base teacher
    n, f = cfg["eval"]["samples"], teacher["data"]["frames"]
    return [
        _row(who, m[f"{who}_nfe"], m[f"{who}_seconds"], n, f, **_quality(m, who))
        for who in ("teacher", "student")
    ]  # fmt: skip


def sampler_rows(m: dict, cfg: dict) -> list[dict]:
    """MCM, AccVideo: ``samplers`` {name: {nfe, seconds, ...quality}}, the teacher first;
    rows without NFE (MCM's real low-quality clips) are references, not samplers."""
    n, f = cfg["eval"]["samples"], m["frames"]
    names = ["teacher"] + [k for k, r in m["samplers"].items() if k != "teacher" and r["nfe"]]
    return [
        _row(name.replace("_", " "), m["samplers"][name]["nfe"], m["samplers"][name]["seconds"],
             n, f, **_quality(m, name))
        for name in names
    ]  # fmt: skip


# method -> (recipe, rows from its metrics and config)
METHODS: dict[str, tuple[str, Callable[[dict, dict], list[dict]]]] = {
    "self-forcing": ("video-self-forcing", streaming_rows),
    "streamdit": ("video-streamdit", streaming_rows),
    "mcm": ("video-mcm", sampler_rows),
    "blade": ("video-blade", flat_rows),
    "accvideo": ("video-accvideo", sampler_rows),
    "vdot": ("video-vdot", flat_rows),
    "livetalk": ("video-livetalk", streaming_rows),  # self-forcing's metrics, control teacher
}


def run(recipe: str, out: Path, extra: list[str]) -> tuple[dict, dict, float]:
    """(metrics, config, wall seconds) of one recipe run."""
    from fewstep.core import cli

    t0 = time.perf_counter()
    if cli.main(["distill", recipe, "--out", str(out), *extra]) != 0:
        raise RuntimeError(f"{recipe} failed")
    m = json.loads((out / "metrics.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    return m, cfg.get("config", cfg), time.perf_counter() - t0


def overrides(items: list[str]) -> dict[str, list[str]]:
    """``METHOD:key=value`` items -> {method: ["--key", "value", ...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not (sep and eq) or method not in METHODS:
            raise SystemExit(f"--set expects METHOD:key=value with METHOD in {sorted(METHODS)}, "
                             f"got {item!r}")  # fmt: skip
        out.setdefault(method, []).extend([f"--{key}", value])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--set", action="append", default=[], help="METHOD:key=value override")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "video.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep run folders here")
    ap.add_argument("--resume", action="store_true",
                    help="keep the methods already in --out and run only the others")  # fmt: skip
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    extra = overrides(args.set)
    start_machine, t0 = machine(), time.time()
    rows, runs, earlier = [], {}, 0.0
    if args.resume and args.out.exists():
        done = json.loads(args.out.read_text())
        rows, runs, earlier = done["rows"], done["runs"], done["seconds"]
        methods = [m for m in methods if m not in runs]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name in methods:
            recipe, to_rows = METHODS[name]
            m, cfg, wall = run(recipe, root / name, extra.get(name, []))
            runs[name] = {"metrics": m, "overrides": extra.get(name, []), "wall_seconds": wall}
            pair = to_rows(m, cfg)
            teacher = pair[0]
            for r in pair:
                r["nfe_reduction"] = teacher["nfe_per_frame"] / r["nfe_per_frame"]
                r["speedup"] = teacher["seconds_per_video"] / r["seconds_per_video"]
                rows.append({"method": name, **r})
            print(markdown_table(rows[-len(pair) :]), flush=True)
            report = {"machine_at_start": start_machine, "machine": machine(), "rows": rows,
                      "runs": runs, "seconds": earlier + time.time() - t0}  # fmt: skip
            write_json(args.out, report)
    print()
    print(markdown_table(rows))
    if "blade" in runs:
        b = runs["blade"]["metrics"]
        print(f"\nBLADE: attention density {b['attn_density']:.3f}, attention FLOPs saved "
              f"{b['attn_flops_saved']:.3f}, FLOPs ratio vs teacher "
              f"{b['flops_ratio_vs_teacher']:.1f}")  # fmt: skip
    print(f"\n{earlier + time.time() - t0:.0f} s in all; wrote {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
