"""Sweep: variants of one video recipe side by side, several processes at a time, one table.

    uv run --package fewstep-video python benchmarks/video_sweep.py --sweep mcm \
        --runs DIR [--parallel 4] [--only NAME ...] [--warm NAME ...] [--extra ARG ...]

Each variant is ``fewstep distill <recipe> --out DIR/<variant> <args>`` in its own process
(teachers and the classifier come from fewstep's cache, so the variants of a sweep share them;
a cold cache trains them once per process, so ``--warm`` runs named variants alone first;
``benchmarks/gpu_video_sweep.sh`` runs every sweep on a GPU machine that way). A failed
variant is reported with its log's tail; the others go on. Every run's ``metrics.json`` is
read back and the sweep's columns (dotted paths into it) tabulated; the JSON with every
variant's full metrics goes to ``--out``. Made for a GPU machine, where a sweep of small
students takes minutes (``device`` auto picks CUDA), but runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report_io import machine, markdown_table, write_json  # noqa: E402

_MCM_COLS = [f"samplers.{s}.{k}" for s in ("student_1", "student_4", "teacher")
             for k in ("video_fd", "digit_accuracy", "sharpness_ratio")]  # fmt: skip
_PAIR_COLS = [f"{who}_{k}" for who in ("student", "teacher")
              for k in ("video_fd", "digit_accuracy")]  # fmt: skip

_PLAIN_CD = "--mcm.motion raw --mcm.adv_weight 0 --mcm.mix_ratio 0"
_T4000 = "--teacher.steps 4000 --teacher.lr 1e-3"
_TEACHER_D = "--train.steps 2000 --mcm.disc_backbone teacher --mcm.gp_weight 0"

# sweep -> (recipe, columns, {variant: extra CLI arguments, split at spaces})
SWEEPS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "mcm": ("video-mcm", _MCM_COLS, {
        "plain-cd": _PLAIN_CD,
        "plain-cd-2000": f"{_PLAIN_CD} --train.steps 2000",
        "diff-mix-2000": "--mcm.adv_weight 0 --train.steps 2000",
        "default": "",
        "default-2000": "--train.steps 2000",
        "bce-0.003-2000": "--mcm.adv_weight 0.003 --train.steps 2000",
        "bce-0.001-2000": "--mcm.adv_weight 0.001 --train.steps 2000",
        "bce-0.01-late-2000": "--train.steps 2000 --mcm.disc_start_step 1000",
        "raw-bce-0.003-2000": "--mcm.motion raw --mcm.mix_ratio 0 --mcm.adv_weight 0.003 "
                              "--train.steps 2000",
        "cfg2-plain-cd-2000": f"{_PLAIN_CD} --train.steps 2000 --guidance 2",
        "cfg2-bce-0.003-2000": "--mcm.adv_weight 0.003 --train.steps 2000 --guidance 2",
        # a head on the frozen teacher's DiT features instead of the pixel CNN (2,000 steps)
        "teacher-d-0.003": f"{_TEACHER_D} --mcm.adv_weight 0.003",
        "teacher-d-0.01": f"{_TEACHER_D} --mcm.adv_weight 0.01",
        "teacher-d-0.03": f"{_TEACHER_D} --mcm.adv_weight 0.03",
        "teacher-d-depth4-0.01": f"{_TEACHER_D} --mcm.adv_weight 0.01 --mcm.disc_depth 4",
    }),
    "vdot": ("video-vdot", [*_PAIR_COLS, "student_direction_accuracy",
                            "teacher_direction_accuracy", "reference_direction_accuracy"], {
        "default": "",
        "cfg4": "--guidance 4",
        "teacher-4000-lr1e-3": _T4000,
        "teacher-4000-lr1e-3-cfg4": f"{_T4000} --guidance 4",
        "teacher-4000-lr1e-3-1000": f"{_T4000} --train.steps 1000",
    }),
    "blade": ("video-blade", [*_PAIR_COLS, "dense_student_video_fd",
                              "dense_student_digit_accuracy"], {
        "default": "",
        "steps-1000": "--train.steps 1000",
        "steps-1000-batch-16": "--train.steps 1000 --train.batch_size 16",
    }),
}  # fmt: skip


def lookup(metrics: dict, path: str):
    """``metrics`` at a dotted path, or None where it is missing."""
    node = metrics
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def run_variant(recipe: str, name: str, args: list[str], runs: Path) -> dict:
    out = runs / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fewstep.core.cli", "distill", recipe, "--out", str(out), *args]
    t0 = time.perf_counter()
    with open(out / "sweep.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    seconds = time.perf_counter() - t0
    metrics_file = out / "metrics.json"
    if rc != 0 or not metrics_file.is_file():
        tail = (out / "sweep.log").read_text()[-1500:]
        print(f"[{name}] FAILED rc={rc} after {seconds:.0f} s\n{tail}", flush=True)
        return {"variant": name, "args": args, "rc": rc, "seconds": seconds, "log_tail": tail}
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    m = json.loads(metrics_file.read_text())
    return {"variant": name, "args": args, "rc": 0, "seconds": seconds, "metrics": m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", required=True, choices=sorted(SWEEPS))
    ap.add_argument("--runs", type=Path, required=True, help="folder for the run folders")
    ap.add_argument("--parallel", type=int, default=2, help="variants run at a time")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument(
        "--warm", nargs="*", default=[], help="variants run alone, in this order, before the rest"
    )
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="arguments added to every variant (last on the command line)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: RUNS/sweep.json)")
    a = ap.parse_args()
    recipe, cols, variants = SWEEPS[a.sweep]
    unknown = (set(a.only or ()) | set(a.warm)) - set(variants)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; the sweep has {sorted(variants)}")
    chosen = {k: v.split() for k, v in variants.items() if a.only is None or k in a.only}
    a.runs.mkdir(parents=True, exist_ok=True)
    out, t0, results = a.out or a.runs / "sweep.json", time.perf_counter(), []

    def finish(result: dict) -> list[dict]:  # the JSON is rewritten after every variant
        results.append(result)
        rows = [{"variant": r["variant"], "seconds": round(r["seconds"]),
                 **{c: lookup(r.get("metrics", {}), c) for c in cols}}
                for r in results]  # fmt: skip
        write_json(out, {"machine": machine(), "sweep": a.sweep, "recipe": recipe,
                         "seconds": time.perf_counter() - t0, "extra": a.extra,
                         "rows": rows, "runs": results})  # fmt: skip
        return rows

    rows = []
    for name in a.warm:  # alone first: they fill the cache (data, teachers) the rest share
        if name in chosen:
            rows = finish(run_variant(recipe, name, [*chosen.pop(name), *a.extra], a.runs))
    with ThreadPoolExecutor(max(1, a.parallel)) as pool:
        jobs = [pool.submit(run_variant, recipe, k, [*v, *a.extra], a.runs)
                for k, v in chosen.items()]  # fmt: skip
        for job in as_completed(jobs):
            rows = finish(job.result())
    print(markdown_table(rows, ["variant", "seconds", *cols]))


if __name__ == "__main__":
    main()
