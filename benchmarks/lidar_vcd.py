"""Benchmark: VCD on procedural streets. The camera + LiDAR-depth expert (VCD-E) vs the
camera-only apprentice (VCD-A) trained with and without VCD's distillation terms, on the same
held-out streets.

    uv run --package fewstep-lidar python benchmarks/lidar_vcd.py [--seeds 0 1] [--steps 500]

Runs ``fewstep distill lidar-vcd`` with ``--distill true`` and ``--distill false`` for each
apprentice seed: same data, expert (trained once, cached), schedule and seed; only the
distillation terms differ. Everything runs on one CPU thread in this process, so latencies are
comparable across rows. Metrics (see :mod:`fewstep.lidar.detection_metrics`): mAP over
centre-distance thresholds 0.5 / 1 / 2 / 4 m, AP at 2 m, ATE / ASE / AOE, simplified
NDS = (3 mAP + sum over ATE, ASE, AOE of (1 - min(1, err))) / 6. Writes
benchmarks/results/lidar_vcd.json (``lidar_vcd_TAG.json`` with ``--tag``) and prints a markdown
table.

The paper's claim (Huang et al. 2023): distillation from the same-structure expert lifts the
camera-only apprentice; VCD-A reaches 63.1 % NDS on nuScenes (the abstract), where the
official README lists its ResNet-50 camera-only baseline at 0.401 mAP / 0.515 NDS.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report_io import markdown_table, write_json

KEYS = ("mAP", "NDS", "ap@0.5", "ap@1", "ap@2", "ap@4", "ATE", "ASE", "AOE", "latency_ms")


def run(out: Path, distill: bool, seed: int, steps: int, extra: list[str]) -> dict:
    from fewstep.core import cli

    args = ["distill", "lidar-vcd", "--out", str(out), "--distill", str(distill).lower()]
    args += ["--train.seed", str(seed), "--train.steps", str(steps)]
    args += ["--expert-train.steps", str(steps), *extra]
    t0 = time.perf_counter()
    if cli.main(args) != 0:
        raise RuntimeError(f"lidar-vcd --distill {distill} --train.seed {seed} failed")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=500, help="expert and apprentice steps")
    p.add_argument("--tag", default="", help="suffix of the result file (lidar_vcd_TAG.json)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more recipe options")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for distill in (False, True):
                m = run(Path(tmp) / f"{seed}-{distill}", distill, seed, args.steps, args.extra)
                runs.append({"seed": seed, "distill": distill, **m})
                a = m["apprentice"]
                print(f"seed {seed} distill {distill}: mAP {a['mAP']:.3f} NDS {a['NDS']:.3f} "
                      f"train {m['train_seconds']:.0f} s", flush=True)  # fmt: skip
    rows = [{"model": "expert (camera + LiDAR depth)", "seeds": 1,
             **{k: runs[0]["expert"][k] for k in KEYS},
             "train_s": runs[0]["expert_train_seconds"]}]  # fmt: skip
    for distill, name in ((False, "apprentice, no distillation"), (True, "apprentice, VCD")):
        rs = [r for r in runs if r["distill"] == distill]
        row = {"model": name, "seeds": len(rs)}
        for k in KEYS:
            v = np.array([r["apprentice"][k] for r in rs])
            row[k] = float(v.mean())
            row[f"{k}_sd"] = float(v.std())
        row["train_s"] = float(np.mean([r["train_seconds"] for r in rs]))
        rows.append(row)
    table = markdown_table(rows, ["model", "seeds", "mAP", "mAP_sd", "NDS", "NDS_sd", "ap@0.5",
                                  "ap@1", "ap@2", "ap@4", "ATE", "ASE", "AOE", "train_s",
                                  "latency_ms"])  # fmt: skip
    per_seed = markdown_table(
        [
            {
                "seed": r["seed"],
                "distill": r["distill"],
                "mAP": r["apprentice"]["mAP"],
                "NDS": r["apprentice"]["NDS"],
            }
            for r in runs
        ]  # fmt: skip
    )
    print(table)
    print(per_seed)
    report = {
        "benchmark": "lidar_vcd",
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "steps": args.steps,
        "seeds": args.seeds,
        "extra": args.extra,
        "n_train": runs[0]["n_train"],
        "n_test": runs[0]["n_test"],
        "rows": rows,
        "runs": [
            {k: v for k, v in r.items() if k not in ("train_log", "expert_train_log")} for r in runs
        ],  # fmt: skip
        "table": table,
    }
    name = f"lidar_vcd_{args.tag}.json" if args.tag else "lidar_vcd.json"
    write_json(Path(__file__).parent / "results" / name, report)


if __name__ == "__main__":
    main()
