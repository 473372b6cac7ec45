"""Benchmark: the flow-matching CA-backbone teacher (400 Euler steps, as Proteina samples)
vs SiD few-step students (Xie et al. 2025) at K = 1, 2, 4, 8, 16 steps with noise modulation,
plus the ``EXTRA`` students (SiDA at K = 16 / 20, and SiD without teacher refinement) and
the SiDA K = 20 student on 18 of its times (``THINNED``: the recipe's default).

    uv run --package fewstep-protein python benchmarks/protein.py [--samples 64]

One teacher (cached by config) is trained on the real length-64 CA fragments shipped in
MDAnalysisTests; ``fewstep distill protein-sid`` then trains one student per K, as the paper
does (each K has its own time grid, ``sampling.paper_times``). Every model then samples the
same number of backbones from the same noise, timed side by side on one thread with the same
batch, and every metric of ``metrics.evaluate_backbones`` is computed against the training
fragments. Students distil the refined teacher (``fewstep.protein.refine``: the teacher
fine-tuned on its own plausible samples, the recipe default); the reference stays the base
teacher's 400-step sampler. Extra rows, free of training: the 4-step student without noise
modulation (noise_scale 1: the paper's ablation), the teacher's ODE at 400 steps beside its
default low-temperature SDE, the refined teacher's 400-step SDE, the teacher's ODE cut to 4
and 16 steps, and the base and refined teachers run as K = 16 / 20 / 32 students (the
noise-modulated sampler on its paper grid: the students' start).
Writes benchmarks/results/protein.json and prints a markdown table.
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

STEPS = (1, 2, 4, 8, 16)
# the benchmark's teacher and distillation settings (recipe options)
# (the recipe's defaults, spelled out for the record: ~20 CPU minutes of teacher training)
TEACHER = [
    "--teacher.length", "64", "--teacher.stride", "16", "--teacher.steps", "7000",
    "--teacher.batch-size", "32", "--teacher.lr", "1e-3", "--teacher.warmup-steps", "200",
    "--teacher.lr-decay", "cosine", "--teacher.ema-decay", "0.999",
    "--teacher.model.layers", "4", "--teacher.model.pair-values", "true",
    "--teacher.model.coord-head", "true",
    "--teacher.sample-mode", "sc", "--teacher.noise-scale", "0.45",
]  # fmt: skip
DISTILL = ["--train.steps", "300", "--train.batch-size", "8", "--train.progress", "false"]
# further students beside the SiD ones: (run folder, K, extra recipe options, table row).
# SiDA on the refined teacher with the recipe's SiDA settings (recipes/sid.py SIDA_CONFIG,
# SIDA_DEFAULTS: lambda_adv 5e-5, EMA 0.99; K from the row, flags given here win; sampled on
# all K times here, the THINNED rows sample on fewer)
SIDA = ["--objective", "sida", "--sample-steps", "0"]
SID_ARGS = ["--objective", "sid"]  # the STEPS rows and the base-teacher row: plain SiD
EXTRA = [
    ("sida_k16", 16, SIDA, "SiDA K=16, noise 0.45"),
    ("sida_k20", 20, SIDA, "SiDA K=20, noise 0.45"),
    (
        "sid_k16_base",
        16,
        [*SID_ARGS, "--refine.enabled", "false"],
        "SiD K=16 from the base teacher",
    ),
]
# students sampled on N of their trained times (sampling.thin_times): (run folder, N, row)
THINNED = [("sida_k20", 18, "SiDA K=20 on 18 of its times (recipe default)")]
COLUMNS = {  # table column -> metric key (see fewstep.protein.metrics)
    "NFE": "nfe",
    "samples/s": "samples_per_second",
    "speed-up": "speedup",
    "CA-CA MAD (Å)": "ca_ca_mad",
    "CA-CA off (frac)": "ca_ca_frac_outside",
    "clash rate": "clash_rate",
    "Rg / expected": "rg_ratio",
    "helix": "helix",
    "strand": "strand",
    "coil": "coil",
    "SSE TV vs train": "sse_tv",
    "pairwise RMSD (Å)": "pairwise_rmsd",
    "clusters (frac)": "cluster_frac_rmsd",
    "novelty RMSD (Å)": "novelty_rmsd",
}


def distill(k: int, out: Path, samples: int, extra: list[str] | None = None) -> dict:
    from fewstep.core import cli

    args = ["distill", "protein-sid", "--out", str(out), "--student-steps", str(k),
            "--eval.samples", str(samples), "--eval.teacher", "false",
            *TEACHER, *DISTILL, *(extra or [])]  # fmt: skip
    t0 = time.perf_counter()
    if cli.main(args) != 0:
        raise RuntimeError(f"protein-sid K={k} failed")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def evaluate(name, model, sampler, ca, samples: int, batch: int, seed: int) -> dict:
    from fewstep.protein.metrics import evaluate_backbones
    from fewstep.protein.recipes.sid import SID, _nfe

    x, seconds = SID.generate(sampler, model, samples, ca.shape[1], batch, seed)
    m = evaluate_backbones(x, ca)
    m.update(samples_per_second=samples / seconds, nfe=_nfe(sampler, model), seconds=seconds)
    print(f"{name}: {m['samples_per_second']:.3g} samples/s, NFE {m['nfe']}", flush=True)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=32, help="backbones per model")
    ap.add_argument("--seed", type=int, default=1234, help="sampling noise (same for all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "protein.json")
    ap.add_argument("--runs", type=Path, default=None, help="keep (and reuse) run folders here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    from fewstep.protein.recipes.sid import SID
    from fewstep.protein.refine import load_refined_teacher
    from fewstep.protein.sampling import thin_times
    from fewstep.protein.teacher import ProteinaSampler

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        for k in STEPS:
            done = root / f"sid_k{k}" / "metrics.json"
            if done.exists():  # a kept run folder (--runs): evaluate it again, do not retrain
                runs[f"K={k}"] = json.loads(done.read_text())
                continue
            runs[f"K={k}"] = distill(k, root / f"sid_k{k}", args.samples, SID_ARGS)
            print(f"distilled K={k} in {runs[f'K={k}']['wall_seconds']:.0f} s", flush=True)
        for name, k, extra, _ in EXTRA:
            done = root / name / "metrics.json"
            if done.exists():
                runs[name] = json.loads(done.read_text())
                continue
            runs[name] = distill(k, root / name, args.samples, extra)
            print(f"distilled {name} in {runs[name]['wall_seconds']:.0f} s", flush=True)
        # side by side: same noise, same batch, one thread
        rows, results = [], {}
        cfg, teacher, _, _, ca = SID.load(root / f"sid_k{STEPS[0]}")
        torch.set_num_threads(1)
        b, tc = args.samples, cfg.teacher

        def teacher_sampler(n: int, mode: str = tc.sample_mode) -> ProteinaSampler:
            gen = torch.Generator().manual_seed(args.seed + 2)
            return ProteinaSampler(n, tc.schedule_p, mode, tc.noise_scale, gen)

        mode = f"sc {tc.noise_scale:g}" if tc.sample_mode == "sc" else "ODE"
        teacher_row = f"teacher (400 Euler, {mode})"  # the reference: the teacher's own sampler
        results[teacher_row] = evaluate(
            "teacher", teacher, teacher_sampler(400), ca, b, b, args.seed
        )
        if tc.sample_mode == "sc":  # the ODE for comparison
            results["teacher (400 Euler, ODE)"] = evaluate(
                "teacher ODE", teacher, teacher_sampler(400, "vf"), ca, b, b, args.seed
            )
        refined, _ = load_refined_teacher(tc, cfg.refine)
        results[f"refined teacher (400 Euler, {mode})"] = evaluate(
            "refined teacher", refined, teacher_sampler(400), ca, b, b, args.seed
        )
        for k in STEPS:
            _, _, student, meta, _ = SID.load(root / f"sid_k{k}")
            sampler = SID.eval_sampler(cfg, meta["times"], meta["noise_scale"])
            name = "SiD K=1 (one step: unmodulated)" if k == 1 else f"SiD K={k}, noise 0.45"
            results[name] = evaluate(f"K={k}", student, sampler, ca, b, b, args.seed)
            if k == 4:  # the paper's ablation: no noise modulation
                plain = SID.eval_sampler(cfg, meta["times"], 1.0)
                results["SiD K=4, noise 1.0 (no modulation)"] = evaluate(
                    "K=4 plain", student, plain, ca, b, b, args.seed
                )
        for name, _k, _, row in EXTRA:
            _, _, student, meta, _ = SID.load(root / name)
            sampler = SID.eval_sampler(cfg, meta["times"], meta["noise_scale"])
            results[row] = evaluate(name, student, sampler, ca, b, b, args.seed)
        for name, n, row in THINNED:
            _, _, student, meta, _ = SID.load(root / name)
            sampler = SID.eval_sampler(cfg, thin_times(meta["times"], n), meta["noise_scale"])
            results[row] = evaluate(f"{name} on {n}", student, sampler, ca, b, b, args.seed)
        for k in (16, 20, 32):  # the students' start: a teacher on the student sampler
            sampler = SID.eval_sampler(cfg, SID.student_times(cfg, k), cfg.noise_scale)
            for who, model in (("teacher", teacher), ("refined teacher", refined)):
                results[f"{who} as K={k} student (no SiD), noise 0.45"] = evaluate(
                    f"{who} K={k} modulated", model, sampler, ca, b, b, args.seed
                )
        for n in (4, 16):  # the teacher cut short: the ODE (the SDE's g dt > 1 diverges)
            results[f"teacher ({n} Euler, ODE)"] = evaluate(
                f"teacher {n}", teacher, teacher_sampler(n, "vf"), ca, b, b, args.seed
            )
    base = results[teacher_row]["samples_per_second"]
    for name, m in results.items():
        m["speedup"] = m["samples_per_second"] / base
        rows.append({"model": name, **{c: m.get(key) for c, key in COLUMNS.items()}})
    t400 = results[teacher_row]
    ref = {k: t400[f"ref_{k}"] for k in ("helix", "strand", "coil")}
    rows.append({"model": "training fragments", **ref, "Rg / expected": t400["ref_rg_ratio"]})
    report = {
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "samples": args.samples,
        "teacher_options": TEACHER,
        "distill_options": DISTILL,
        "rows": rows,
        "results": results,
        "runs": runs,
        "seconds": time.time() - t0,
    }
    write_json(args.out, report)
    print(markdown_table(rows, ["model", *COLUMNS]))
    print(f"\n{report['machine']}; {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
