"""Benchmark: every objective on the 2-D suite, one table.

    uv run --package fewstep-core python benchmarks/objectives.py
        [--objectives dmd2 sid ...] [--teachers rf_mixture vp_mixture ...] [--nfe 1 2 4]

For each objective and toy teacher (rectified flow / discrete VP, ring of Gaussians /
checkerboard) a student is distilled per NFE in 1/2/4 with the objective's suite budget
(``fewstep.core.budgets2d.BUDGETS``, the same budgets core's tests use) and scored against
the teacher's 50-step Euler samples from the same noise: sliced Wasserstein (SW), MMD, modes
covered (ring), whether it "learned" (the tests' criterion: SW below half the untrained
student's, and >= 6 of 8 ring modes), wall time of the run (training plus scoring), and peak
memory. Each objective runs in a fresh process (``--workers`` of them side by side, one
thread each), so its peak resident memory is its own; the table reports it above a process
that only loaded the teachers. Objectives whose budget says an NFE is not meaningful for them
(e.g. compression objectives sampled with the teacher's sampler) report their native NFE
once. The untrained student (the teacher in k jumps) is the first row per teacher.

Writes benchmarks/results/objectives_2d.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

TEACHERS = {  # name -> make_toy_teacher arguments (the test suite's teachers)
    "rf_mixture": ("rectified_flow", "velocity", "mixture", {}),
    "vp_mixture": ("vp_discrete", "eps", "mixture", {"schedule": "scaled_linear"}),
    "rf_checkerboard": ("rectified_flow", "velocity", "checkerboard", {}),
    "vp_checkerboard": ("vp_discrete", "eps", "checkerboard", {"schedule": "scaled_linear"}),
}
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
TEACHER_STEPS = 1500  # as in tests/core/conftest.py


def _teacher(name: str, conditional: bool = False):
    import torch

    from fewstep.core.toy import make_toy_teacher

    path, pred, data, kw = TEACHERS[name]
    if kw:
        kw = {**kw, **SD_BETAS}
    torch.set_num_threads(1)
    return make_toy_teacher(
        path, pred, data, steps=TEACHER_STEPS, path_kwargs=kw or None, conditional=conditional
    ), data


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _baseline(teachers: list[str]) -> dict:
    """Peak RSS of a process that loaded the teachers and their references, and the
    untrained students' scores (the teacher sampled in k jumps)."""
    from fewstep.core.samplers import FewStepSampler
    from fewstep.core.suite2d import reference, sample_with, score

    rows = []
    for name in teachers:
        teacher, data = _teacher(name)
        noise, ref, cond = reference(teacher)
        for k in (1, 2, 4):
            x = sample_with(teacher, FewStepSampler.uniform(k), noise, cond)
            rows.append(
                {"teacher": name, "objective": "(untrained)", "nfe": k, **score(x, ref, data)}
            )
    return {"rss_mb": _rss_mb(), "rows": rows}


def _student(budget, teacher, k: int, eps: bool, tmp: str):
    """The student a run starts from: a budget's named student, another objective's distilled
    student (``init``), or None (the trainer copies the teacher)."""
    from fewstep.core.budgets2d import BUDGETS, STUDENTS
    from fewstep.core.models import trainable_copy
    from fewstep.core.suite2d import distil

    if budget.student:
        return STUDENTS[budget.student](teacher)
    if budget.init:
        first = distil(teacher, budget.init, *BUDGETS[budget.init].configs(k, eps), tmp)
        return trainable_copy(first.trainer.ema)
    return None


def _run_guided(name: str, budget, teachers: list[str]) -> list[dict]:
    """Guidance objectives: the one-pass student at each CFG scale against the CFG teacher."""
    from fewstep.core.suite2d import distil_guided

    rows = []
    for tname in teachers:
        if not tname.endswith("mixture"):
            continue  # the toy teachers' classes are the ring's modes
        teacher, _ = _teacher(tname, conditional=True)
        obj_cfg, train_cfg = budget.configs(budget.nfe[0], teacher.prediction == "eps")
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            o = distil_guided(teacher, name, obj_cfg, train_cfg, out, with_mmd=True)
            seconds = time.perf_counter() - t0
        for w, s in o.after.items():
            rows.append(
                {
                    "teacher": tname,
                    "objective": f"{name} (w={w:g})",
                    "nfe": budget.nfe[0],
                    **s,
                    "sw_untrained": o.before[w]["sw"],
                    "learned": s["sw"] < 0.5 * o.before[w]["sw"],
                    "train_seconds": seconds,
                    "steps": train_cfg.get("steps"),
                }
            )
    return rows


def _run_objective(name: str, teachers: list[str], nfes: list[int]) -> dict:
    """Distil ``name`` on each teacher at each NFE; rows plus this process's peak RSS."""
    import torch

    from fewstep.core.budgets2d import BUDGETS
    from fewstep.core.suite2d import MIN_MODES, REWARDS, distil

    budget = BUDGETS[name]
    if budget.guided:
        return {"objective": name, "rss_mb": _rss_mb(), "rows": _run_guided(name, budget, teachers)}
    reward = REWARDS[budget.reward] if budget.reward else None
    ks = [k for k in budget.nfe if k in nfes] if budget.vary_steps else list(budget.nfe)
    rows = []
    for tname in teachers:
        teacher, data = _teacher(tname, conditional=budget.conditional)
        eps = teacher.prediction == "eps"
        for k in ks:
            obj_cfg, train_cfg = budget.configs(k, eps)
            row = {"teacher": tname, "objective": name, "nfe": k}
            try:
                with tempfile.TemporaryDirectory() as out:
                    torch.manual_seed(0)
                    student = _student(budget, teacher, k, eps, out + "/init")
                    torch.manual_seed(0)
                    t0 = time.perf_counter()
                    o = distil(
                        teacher,
                        name,
                        obj_cfg,
                        train_cfg,
                        out,
                        data=data,
                        student=student,
                        reward=reward,
                        with_mmd=True,
                    )
            except Exception as err:  # one broken objective must not hide the others
                rows.append({**row, "error": repr(err)})
                continue
            if reward is not None:  # mean reward of the student's samples, before -> after
                row["reward"] = [float(reward(x).mean()) for x in (o.samples_before, o.samples)]
            rows.append(
                {
                    **row,
                    "sw": o.after,
                    "sw_untrained": o.before,
                    "mmd": o.mmd,
                    "covered": o.covered,
                    # tuning an already distilled student (PSO) is not judged by its SW drop
                    "learned": None
                    if budget.init
                    else o.learned(min_modes=MIN_MODES if data == "mixture" else 0),
                    "train_seconds": time.perf_counter() - t0,
                    "steps": train_cfg.get("steps"),
                }
            )
    return {"objective": name, "rss_mb": _rss_mb(), "rows": rows}


def main() -> None:
    from fewstep.core.budgets2d import BUDGETS

    ap = argparse.ArgumentParser()
    ap.add_argument("--objectives", nargs="*", default=sorted(BUDGETS))
    ap.add_argument("--teachers", nargs="*", default=list(TEACHERS))
    ap.add_argument("--nfe", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--workers", type=int, default=2, help="objectives run side by side")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "objectives_2d.json"
    )
    ap.add_argument("--tables", action="store_true", help="only print the tables of --out")
    args = ap.parse_args()
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    unknown = set(args.objectives) - set(BUDGETS)
    if unknown:
        raise SystemExit(f"no suite budget for {sorted(unknown)}; known: {sorted(BUDGETS)}")

    ctx = get_context("spawn")
    t_all = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
        base = pool.submit(_baseline, args.teachers).result()
    # one fresh process per objective, so each peak resident memory is its own
    with ProcessPoolExecutor(args.workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {
            name: pool.submit(_run_objective, name, args.teachers, args.nfe)
            for name in args.objectives
        }
        results = []
        for name, fut in futures.items():
            r = fut.result()
            r["peak_mb_above_baseline"] = max(0.0, r["rss_mb"] - base["rss_mb"])
            results.append(r)
            print(f"{name}: done ({len(r['rows'])} runs)", flush=True)
    import torch

    payload = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": 1,
            "workers": args.workers,
        },
        "total_seconds": time.perf_counter() - t_all,
        "baseline": base,
        "objectives": results,
    }
    from fewstep.core.io import atomic_write_json

    atomic_write_json(args.out, payload)
    print(tables(payload))


def tables(payload: dict) -> str:
    return summary(payload) + "\n" + markdown(payload)


def summary(payload: dict) -> str:
    """One row per objective: SW per teacher and NFE, ✓ where it learned (the tests'
    criterion), the mean wall time of its runs and its peak memory."""
    teachers = [t for t in TEACHERS if any(r["teacher"] == t for r in payload["baseline"]["rows"])]
    nfes = (1, 2, 4)
    short = {"rf_mixture": "ring RF", "vp_mixture": "ring VP"}
    short |= {"rf_checkerboard": "board RF", "vp_checkerboard": "board VP"}
    head = [f"{short.get(t, t)} {k}" for t in teachers for k in nfes]
    lines = [
        "| objective | " + " | ".join(head) + " | wall s | MB |",
        "|---|" + "---|" * (len(head) + 2),
    ]
    base = {(r["teacher"], r["nfe"]): f"{r['sw']:.2f}" for r in payload["baseline"]["rows"]}
    lines.append(
        "| (untrained) | "
        + " | ".join(base.get((t, k), "") for t in teachers for k in nfes)
        + " | - | - |"
    )
    for obj in payload["objectives"]:
        groups: dict[str, dict] = {}
        for r in obj["rows"]:  # guided objectives report one row per scale
            groups.setdefault(r["objective"], {})[(r["teacher"], r["nfe"])] = r
        for label, cells in groups.items():
            own = sorted({k for _, k in cells} - set(nfes))  # compression: the sampler's NFE
            if own:
                label = f"{label} ({own[0]} NFE)"
                cells = {(t, 1): r for (t, _), r in cells.items()}

            def cell(r):
                if r is None:
                    return ""
                if "error" in r:
                    return "error"
                return f"{r['sw']:.2f}" + (" ✓" if r["learned"] else "")

            secs = [r["train_seconds"] for r in cells.values() if "train_seconds" in r]
            wall = f"{sum(secs) / len(secs):.1f}" if secs else "-"
            lines.append(
                f"| {label} | "
                + " | ".join(cell(cells.get((t, k))) for t in teachers for k in nfes)
                + f" | {wall} | {obj['peak_mb_above_baseline']:.0f} |"
            )
    return "\n".join(lines)


def markdown(payload: dict) -> str:
    lines = []
    teachers = sorted({r["teacher"] for r in payload["baseline"]["rows"]})
    for t in teachers:
        lines += [
            f"\n### {t}\n",
            "| objective | NFE | SW (untrained) | MMD | modes | learned | reward | wall s | MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in payload["baseline"]["rows"]:
            if r["teacher"] == t:
                lines.append(
                    f"| (untrained) | {r['nfe']} | {r['sw']:.3f} | {r['mmd']:.4f} | "
                    f"{r['covered']} | - | - | - | - |"
                )
        for obj in payload["objectives"]:
            for r in obj["rows"]:
                if r["teacher"] != t:
                    continue
                if "error" in r:
                    lines.append(f"| {r['objective']} | {r['nfe']} | error: {r['error'][:60]} |")
                    continue
                learned = {True: "yes", False: "no", None: "-"}[r["learned"]]
                reward = "{:.2f} -> {:.2f}".format(*r["reward"]) if "reward" in r else "-"
                lines.append(
                    f"| {r['objective']} | {r['nfe']} | {r['sw']:.3f} ({r['sw_untrained']:.3f}) | "
                    f"{r['mmd']:.4f} | {r['covered']} | {learned} | {reward} | "
                    f"{r['train_seconds']:.1f} | {obj['peak_mb_above_baseline']:.0f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
