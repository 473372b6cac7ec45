"""Benchmark: diffusion-policy teacher (100-step DDPM) vs Streaming Diffusion Policy and
one-step consistency and DMD2 students on ReachAround, in closed loop on the same seeds.

    uv run --package fewstep-policy python benchmarks/policy.py [--episodes 100]

Runs ``fewstep distill policy-sdp``, ``policy-consistency`` and ``policy-dmd`` with their
defaults, plus SDP descending two levels per evaluation, SDP with the paper's ancestral (DDPM)
update instead of the default DDIM one, and a two-step consistency student
(one cached teacher trained on 200 scripted demonstrations); the teacher is rolled out once,
in the first run. Reports success rate, mode fractions against the expert's (and
their total-variation distance), NFE per action, and single-environment milliseconds per
action. Writes benchmarks/results/policy.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from report_io import markdown_table, write_json

# (row name, recipe, options): the recipes' defaults, and the variants the table compares
RUNS = (
    ("sdp", "policy-sdp", []),
    ("sdp, 2 levels per step", "policy-sdp", ["--sdp.levels-per-step", "2"]),
    ("sdp, DDPM update (paper)", "policy-sdp", ["--sdp.update", "ddpm"]),
    ("consistency", "policy-consistency", []),
    ("consistency, 2 steps", "policy-consistency", ["--objective.student-steps", "2"]),
    ("dmd", "policy-dmd", []),
)


def run(recipe: str, out: Path, episodes: int, with_teacher: bool, extra: list[str]) -> dict:
    """One recipe run; its metrics.json plus wall time."""
    from fewstep.core import cli

    args = ["distill", recipe, "--out", str(out), "--eval.episodes", str(episodes)]
    args += ["--eval.teacher", str(with_teacher).lower(), "--train.progress", "false", *extra]
    t0 = time.perf_counter()
    if cli.main(args) != 0:
        raise RuntimeError(f"{recipe} failed")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def row(name: str, s: dict) -> dict:
    fr = s["mode_fractions"]
    return {
        "policy": name,
        "success": s["success_rate"],
        "left / right / none": f"{fr.get('left', 0):.2f} / {fr.get('right', 0):.2f} / "
        f"{fr.get('none', 0):.2f}",
        "mode TV vs expert": s["mode_tv"],
        "NFE / action": s["nfe_per_action"],
        "NFE / plan": s["nfe_per_plan"],
        "ms / action (1 env)": s["ms_per_action"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=100, help="closed-loop episodes per policy")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options for every run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "policy.json")
    args = ap.parse_args()
    t0 = time.time()
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, recipe, opts) in enumerate(RUNS):
            m = run(recipe, Path(tmp) / f"run{i}", args.episodes, i == 0, opts + args.extra)
            results[name] = m
            if i == 0:
                rows.append(row("teacher (DDPM 100)", m["teacher"]))
            rows.append(row(name, m["student"]))
    teacher = results[RUNS[0][0]]["teacher"]
    for r in rows[1:]:
        r["success vs teacher"] = r["success"] - teacher["success_rate"]
        r["NFE / action reduction"] = teacher["nfe_per_action"] / r["NFE / action"]
    report = {
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "episodes": args.episodes,
        "expert_mode_fractions": teacher["expert_mode_fractions"],
        "rows": rows,
        "runs": results,
        "seconds": time.time() - t0,
    }
    write_json(args.out, report)
    print(markdown_table(rows))
    print(f"\nexpert modes: {report['expert_mode_fractions']}; {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
