"""Benchmark: LiDiff-style teacher (DDPM-50, DDIM-50) vs a Distillation-DPO student vs the
score-distillation (DMD2) ablation at the same student steps, on the held-out street.

    uv run --package fewstep-lidar python benchmarks/lidar.py [--steps N] [--eval-seeds 0 1]
        [--runs DIR] [--extra ...]

Runs ``fewstep distill lidar-dpo`` twice with its defaults (``--objective distillation_dpo``,
then ``--objective dmd2``: same teacher, scans, schedule and student steps, no preferences),
with the cached default teacher (trained on first use: about 17 minutes on two CPU cores).
Every completion runs one scan at a time on one CPU thread, side by side in this process, so
seconds per scan are comparable across rows. Also reported: the teacher sampled with the
student's few-step sampler (the student before distillation) and the partial input itself.
Metrics are :func:`fewstep.lidar.metrics.evaluate_completion` means over the held-out scans
(Chamfer, precision / recall / F at 0.1, 0.2, 0.5 m, voxel IoU, BEV JSD, EMD on 512 points),
with the spread of Chamfer over scans. ``--eval-seeds`` re-completes the held-out scans with
every sampling-noise seed listed (teacher DDPM, student init, both students) and reports
per-seed means and per-scan wins against the teacher, so "no worse than the teacher" is not
one seed's accident. Both runs keep the checkpoint with the best Chamfer on the recipe's
validation scans (held out of the training streets, never the test street; printed per run).
``--runs DIR`` keeps the two run folders. Writes
benchmarks/results/lidar.json and prints markdown tables.

The paper's claim (Zhao et al. 2025): more than 5x faster than LiDiff with Chamfer no worse.
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

METRICS = ("chamfer", "chamfer_sd", "fscore@0.1", "fscore@0.2", "fscore@0.5", "iou@0.5",
           "iou@0.2", "iou@0.1", "bev_jsd", "emd")  # fmt: skip


def run(objective: str, out: Path, steps: int, with_teacher: bool, extra: list[str]) -> dict:
    """One recipe run; its metrics.json plus wall time."""
    from fewstep.core import cli

    args = ["distill", "lidar-dpo", "--out", str(out), "--objective", objective]
    args += ["--train.steps", str(steps)] if steps else []
    args += ["--train.progress", "false"]
    args += ["--eval.teacher", str(with_teacher).lower(), *extra]
    t0 = time.perf_counter()
    if cli.main(args) != 0:
        raise RuntimeError(f"lidar-dpo --objective {objective} failed")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def teacher_rows(run_dir: Path, student_times: list[float]) -> dict[str, dict]:
    """DDIM-50 and the teacher on the student's few-step sampler, on the same scans."""
    from fewstep.core.samplers import EulerSampler, FewStepSampler
    from fewstep.lidar import metrics as M
    from fewstep.lidar.recipes.dpo import DPO, _scene_stats

    cfg, teacher, _, _, held = DPO.load(run_dir)
    n = cfg.eval.scans or len(held.offsets)
    partial, dense = held.partial()[:n], held.dense[:n]
    k = len(student_times)
    samplers = {
        "teacher DDIM 50": lambda g: EulerSampler(50),
        f"teacher, few-step sampler {k} (student init)": lambda g: FewStepSampler(
            student_times, generator=g
        ),
    }
    out = {}
    for name, fn in samplers.items():
        clouds, nfe, sec = DPO.complete_scans(teacher, fn, partial, cfg)
        rows = [M.evaluate_completion(c, d) for c, d in zip(clouds, dense)]
        out[name] = {**_scene_stats(rows), "nfe": nfe, "seconds_per_scan": sec}
    return out


def seed_rows(runs: dict[str, Path], student_times: list[float], seeds: list[int]) -> dict:
    """Per-scan Chamfer of teacher DDPM, the teacher on the student's few-step sampler (the
    student init) and each run's student, for every sampling-noise seed in ``seeds``."""
    from dataclasses import replace

    from fewstep.core.samplers import DDPMSampler, FewStepSampler
    from fewstep.lidar import metrics as M
    from fewstep.lidar.recipes.dpo import DPO

    cfg, teacher, _, _, held = DPO.load(runs["distillation_dpo"])
    n = cfg.eval.scans or len(held.offsets)
    partial, dense = held.partial()[:n], held.dense[:n]
    few = lambda g: FewStepSampler(student_times, generator=g)  # noqa: E731
    models = {
        f"teacher DDPM {cfg.eval.teacher_steps}": (
            teacher,
            lambda g: DDPMSampler(cfg.eval.teacher_steps, generator=g),
        ),
        "student init (teacher, few-step sampler)": (teacher, few),
    }
    for name, run_dir in runs.items():
        _, _, student, times, _ = DPO.load(run_dir)
        models[name] = (student, lambda g, ts=times: FewStepSampler(ts, generator=g))
    out: dict[str, dict[str, list[float]]] = {}
    for name, (model, fn) in models.items():
        out[name] = {}
        for seed in seeds:
            c = replace(cfg, eval=replace(cfg.eval, seed=seed))
            clouds, _, _ = DPO.complete_scans(model, fn, partial, c)
            out[name][str(seed)] = [M.chamfer(x, d) for x, d in zip(clouds, dense)]
    return out


def pair_diagnostics(run_dir: Path) -> dict:
    """How informative the DPO run's ranked pairs were: their reward gaps (Chamfer, metres)
    and the implicit-reward margins of the auxiliary scores (``pairs.json`` of the run).
    ``margin_agree`` = P(m > 0), about 1/2 while the winners' and losers' scores cannot tell
    the two apart; ``corr_gap_margin`` near 0 while the margin ignores how clear a pair is."""
    import numpy as np

    file = run_dir / "pairs.json"
    if not file.is_file():
        return {}
    gm = np.array(json.loads(file.read_text())["gap_margin"], dtype=float)
    gap, margin = gm[:, 0], gm[:, 1]
    log = json.loads((run_dir / "metrics.json").read_text())["train_log"]
    weight = [r["dpo_weight"] for r in log if "dpo_weight" in r]
    return {
        "pairs": len(gap),
        "gap_mean": float(gap.mean()),
        "gap_median": float(np.median(gap)),
        "margin_mean": float(margin.mean()),
        "margin_sd": float(margin.std()),
        "margin_agree": float((margin > 0).mean()),
        "corr_gap_margin": float(np.corrcoef(gap, margin)[0, 1]),
        "logistic_weight_min": min(weight),
        "logistic_weight_max": max(weight),
    }


def seed_table(per_scan: dict, seeds: list[int]) -> list[dict]:
    """Mean Chamfer per seed, over seeds, and (scan, seed) wins against the teacher row."""
    import numpy as np

    ref_name = next(iter(per_scan))
    ref = np.array([per_scan[ref_name][str(s)] for s in seeds])  # (seeds, scans)
    rows = []
    for name, by_seed in per_scan.items():
        ch = np.array([by_seed[str(s)] for s in seeds])
        r = {"model": name}
        r.update({f"chamfer seed {s}": float(ch[i].mean()) for i, s in enumerate(seeds)})
        r["chamfer mean"] = float(ch.mean())
        r["gap vs teacher"] = float((ch - ref).mean())
        r["scans better than teacher"] = f"{int((ch < ref).sum())}/{ch.size}"
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=0, help="distillation steps (0 = recipe default)")
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds")
    ap.add_argument("--runs", type=Path, default=None, help="keep the run folders here")
    ap.add_argument(
        "--dpo-extra", default="", help='options for the DPO run only, e.g. "--dpo-extra=--x 1"'
    )
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options for every run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lidar.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        dirs = {"distillation_dpo": root / "dpo", "dmd2": root / "dmd2"}
        dpo_extra = [*args.extra, *args.dpo_extra.split()]
        dpo = run("distillation_dpo", dirs["distillation_dpo"], args.steps, True, dpo_extra)
        print(f"distillation_dpo done at {time.time() - t0:.0f} s", flush=True)
        dmd = run("dmd2", dirs["dmd2"], args.steps, False, args.extra)
        print(f"dmd2 done at {time.time() - t0:.0f} s", flush=True)
        extra_rows = teacher_rows(dirs["distillation_dpo"], dpo["student_times"])
        per_scan = seed_rows(dirs, dpo["student_times"], args.eval_seeds)
        pairs = pair_diagnostics(dirs["distillation_dpo"])
        run_cfg = json.loads((dirs["distillation_dpo"] / "config.json").read_text())["config"]
        train_steps = run_cfg["train"]["steps"]
    k = len(dpo["student_times"])
    table = {
        f"teacher DDPM {dpo['teacher']['nfe']}": dpo["teacher"],
        **extra_rows,
        f"Distillation-DPO student, {k} steps": dpo["student"],
        f"DMD2 ablation, {k} steps": dmd["student"],
        "partial input (x_init)": dpo["partial"],
    }
    ref = dpo["teacher"]
    rows = []
    for name, s in table.items():
        r = {"model": name, "NFE": s["nfe"], "s / scan": s.get("seconds_per_scan", 0.0)}
        r.update({k2: s[k2] for k2 in METRICS})
        if s.get("seconds_per_scan"):
            r["speed-up vs DDPM"] = ref["seconds_per_scan"] / s["seconds_per_scan"]
        rows.append(r)
    seeds = seed_table(per_scan, args.eval_seeds)
    report = {
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread",
        "n_scans": dpo["n_scans"],
        "train_steps": train_steps,
        "student_times": dpo["student_times"],
        "eval_seeds": args.eval_seeds,
        "seed_rows": seeds,
        "chamfer_per_scan": per_scan,
        "extra": args.extra,
        "dpo_extra": args.dpo_extra,
        "rows": rows,
        "pair_diagnostics": pairs,
        "runs": {"distillation_dpo": dpo, "dmd2": dmd},
        "seconds": time.time() - t0,
    }
    write_json(args.out, report)
    print(markdown_table(rows))
    print()
    print(markdown_table(seeds))
    for name, m in (("distillation_dpo", dpo), ("dmd2", dmd)):
        ck = m.get("checkpoint")
        if ck:  # chosen on training-street scans held out of distillation, not the test street
            print(
                f"{name}: checkpoint of step {ck['step']} (validation Chamfer "
                f"{ck['val_chamfer']:.4f} on {ck['val_scans']} scans; init "
                f"{ck['val_chamfer_init']:.4f})"
            )
    if pairs:
        print("DPO pairs: " + ", ".join(f"{k} {v:.4g}" for k, v in pairs.items()))
    print(
        f"\n{dpo['n_scans']} held-out scans, {report['train_steps']} steps; "
        f"{report['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
