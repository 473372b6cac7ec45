"""Benchmark: VCD on procedural streets. The camera + LiDAR-depth expert (VCD-E) vs the
camera-only apprentice (VCD-A) trained with and without VCD's distillation terms, on the same
held-out streets.

    python benchmarks/lidar_vcd.py [--seeds 0 1 2 3] [--variants none vcd feature trajectory]
        [--steps N] [--tag TAG] [--extra RECIPE OPTIONS...]

Runs ``fewstep distill lidar-vcd`` once per (apprentice seed, variant): ``none`` = no
distillation (``--distill false``), ``vcd`` = both distillation terms at the recipe's weights,
``feature`` / ``trajectory`` = only that term (the other weight 0). Same data, expert (trained
once, cached), schedule and seed across variants; only the distillation terms differ. ``--steps``
overrides the expert's and apprentice's steps (default: the recipe's). ``--extra
--val-streets 1`` evaluates on a validation street cut from the training streets instead of the
test streets (for choosing settings). Everything runs on one CPU thread in this process, so
latencies are comparable across rows. Metrics (see :mod:`fewstep.lidar.detection_metrics`): mAP
over centre-distance thresholds 0.5 / 1 / 2 / 4 m, ATE / ASE / AOE, simplified
NDS = (3 mAP + sum over ATE, ASE, AOE of (1 - min(1, err))) / 6. Writes
benchmarks/results/lidar_vcd.json (``lidar_vcd_TAG.json`` with ``--tag``) and prints markdown
tables: mean and sd over seeds per variant, and per seed with each variant's gain over ``none``.

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
ON = ["--distill", "true"]
VARIANTS = {  # name: (row label, recipe options)
    "none": ("apprentice, no distillation", ["--distill", "false"]),
    "vcd": ("apprentice, VCD (feature + trajectory)", ON),
    "feature": ("apprentice, feature term only", [*ON, "--weights.trajectory", "0"]),
    "trajectory": ("apprentice, trajectory term only", [*ON, "--weights.feature", "0"]),
}


def run(out: Path, variant: str, seed: int, steps: int | None, extra: list[str]) -> dict:
    from fewstep.core import cli

    args = ["distill", "lidar-vcd", "--out", str(out), *VARIANTS[variant][1]]
    args += ["--train.seed", str(seed)]
    if steps is not None:
        args += ["--train.steps", str(steps), "--expert-train.steps", str(steps)]
    args += extra  # last, so --extra can override the weights of a variant
    t0 = time.perf_counter()
    if cli.main(args) != 0:
        raise RuntimeError(f"lidar-vcd {variant} --train.seed {seed} failed")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--variants", nargs="+", default=["none", "vcd"], choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="expert and apprentice steps")
    p.add_argument("--tag", default="", help="suffix of the result file (lidar_vcd_TAG.json)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more recipe options")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for v in args.variants:
                m = run(Path(tmp) / f"{seed}-{v}", v, seed, args.steps, args.extra)
                runs.append({"seed": seed, "variant": v, **m})
                a = m["apprentice"]
                print(f"seed {seed} {v}: mAP {a['mAP']:.3f} NDS {a['NDS']:.3f} "
                      f"train {m['train_seconds']:.0f} s", flush=True)  # fmt: skip
    rows = [{"model": "expert (camera + LiDAR depth)", "seeds": 1,
             **{k: runs[0]["expert"][k] for k in KEYS},
             "train_s": runs[0]["expert_train_seconds"]}]  # fmt: skip
    for v in args.variants:
        rs = [r for r in runs if r["variant"] == v]
        row = {"model": VARIANTS[v][0], "seeds": len(rs)}
        for k in KEYS:
            x = np.array([r["apprentice"][k] for r in rs])
            row[k] = float(x.mean())
            row[f"{k}_sd"] = float(x.std(ddof=1)) if len(x) > 1 else None
        row["train_s"] = float(np.mean([r["train_seconds"] for r in rs]))
        rows.append(row)
    table = markdown_table(rows, ["model", "seeds", "mAP", "mAP_sd", "NDS", "NDS_sd", "ap@0.5",
                                  "ap@1", "ap@2", "ap@4", "ATE", "ASE", "AOE", "train_s",
                                  "latency_ms"])  # fmt: skip
    by = {(r["seed"], r["variant"]): r["apprentice"] for r in runs}
    seed_rows = []
    for s in args.seeds:
        row = {"seed": s}
        for v in args.variants:
            row[f"mAP {v}"] = by[s, v]["mAP"]
        for v in args.variants:
            row[f"NDS {v}"] = by[s, v]["NDS"]
        if "none" in args.variants:
            for v in args.variants:
                if v != "none":
                    row[f"mAP {v} - none"] = by[s, v]["mAP"] - by[s, "none"]["mAP"]
        seed_rows.append(row)
    gains = {}
    if "none" in args.variants:
        for v in args.variants:
            if v != "none":
                d = np.array([by[s, v]["mAP"] - by[s, "none"]["mAP"] for s in args.seeds])
                gains[v] = {"mean": float(d.mean()),
                            "sd": float(d.std(ddof=1)) if len(d) > 1 else None,
                            "seeds_better": int((d > 0).sum()), "seeds": len(d)}  # fmt: skip
    per_seed = markdown_table(seed_rows)
    print(table)
    print(per_seed)
    print("paired mAP gain over no distillation:", json.dumps(gains))
    report = {
        "benchmark": "lidar_vcd",
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "steps": args.steps,
        "seeds": args.seeds,
        "variants": args.variants,
        "extra": args.extra,
        "n_train": runs[0]["n_train"],
        "n_test": runs[0]["n_test"],
        "wall_seconds": time.perf_counter() - t_start,
        "rows": rows,
        "paired_mAP_gain": gains,
        "runs": [
            {k: v for k, v in r.items() if k not in ("train_log", "expert_train_log")} for r in runs
        ],  # fmt: skip
        "table": table,
        "per_seed": per_seed,
    }
    name = f"lidar_vcd_{args.tag}.json" if args.tag else "lidar_vcd.json"
    write_json(Path(__file__).parent / "results" / name, report)


if __name__ == "__main__":
    main()
