"""Benchmark: digits teacher (many NFE) vs distilled student (1 NFE), side by side in one run.

    uv run --package fewstep-image python benchmarks/image_digits.py [--objective dmd2]
        [--seeds 10] [--fresh-cache] [--key value ...recipe overrides]

Trains the teacher (timed; with --fresh-cache in an empty cache so the time is real),
distils with the recipe's defaults (timed), then over ``--seeds`` noise seeds generates
1,000 samples from each and reports FD on the digits classifier's features (mean +- sd),
classifier accuracy on the requested classes, and samples/s measured alternately on the same
machine. Writes benchmarks/results/image_digits_OBJECTIVE[_TAG].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objective", default="dmd2")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--fresh-cache", action="store_true", help="retrain teacher to time it")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tag", default="", help="suffix of the result file, for variant runs")
    ap.add_argument("--table", action="store_true", help="only tabulate results with --tag")
    args, rest = ap.parse_known_args()
    if args.table:
        print(table(args.tag))
        return
    if args.fresh_cache:
        os.environ["FEWSTEP_CACHE"] = tempfile.mkdtemp(prefix="fewstep-bench-cache-")

    from fewstep.core.cli import resolve
    from fewstep.core.config import parse_overrides, to_dict
    from fewstep.core.io import atomic_write_json
    from fewstep.core.metrics import time_per_sample
    from fewstep.image import digits_eval as ev
    from fewstep.image.recipes.digits import RECIPE
    from fewstep.image.teacher import guided, load_teacher, teacher_sampler

    cfg, obj_cfg = resolve(RECIPE, {"objective": args.objective, **parse_overrides(rest)})
    out = args.out or Path(tempfile.mkdtemp(prefix="fewstep-bench-digits-"))
    atomic_write_json(
        out / "config.json",
        {"recipe": RECIPE.name, "config": to_dict(cfg), "objective_config": to_dict(obj_cfg)},
    )
    t0 = time.perf_counter()
    teacher, tinfo = load_teacher(cfg.teacher, progress=False)
    teacher_load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    RECIPE.distill(cfg, obj_cfg, out)
    distill_seconds = time.perf_counter() - t0

    student, _, s_sampler = ev.load_student(out)
    gteacher, t_sampler = guided(teacher, cfg.guidance_scale), teacher_sampler(cfg.teacher)
    scorer = ev.Scorer(cfg.classifier_steps)
    rows = {"teacher": [], "student": []}
    nfe = {}
    for seed in range(args.seeds):
        for name, model, sampler in (
            ("teacher", gteacher, t_sampler),
            ("student", student, s_sampler),
        ):
            x, nfe[name] = ev.generate(model, sampler, args.samples, seed=1000 + seed)
            rows[name].append(scorer.score(x))
    speed = {"teacher": [], "student": []}
    for _ in range(3):  # alternate, so both see the same machine state
        for name, model, sampler in (
            ("teacher", gteacher, t_sampler),
            ("student", student, s_sampler),
        ):

            def fn(b, model=model, sampler=sampler):
                sampler.sample(model, ev._noise(b, 3), ev._labels(b))

            speed[name].append(
                time_per_sample(fn, 250, 250, warmup=1, repeats=1)["samples_per_second"]
            )

    def stat(name, key):
        vals = [r[key] for r in rows[name]]
        return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

    result = {
        "objective": args.objective,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "seeds": args.seeds,
        "samples_per_seed": args.samples,
        "teacher_nfe": nfe["teacher"],
        "student_nfe": nfe["student"],
        "teacher_fd": stat("teacher", "fd"),
        "student_fd": stat("student", "fd"),
        "teacher_class_accuracy": stat("teacher", "class_accuracy"),
        "student_class_accuracy": stat("student", "class_accuracy"),
        "teacher_samples_per_second": statistics.median(speed["teacher"]),
        "student_samples_per_second": statistics.median(speed["student"]),
        "teacher_train_seconds": tinfo.get("train_seconds"),
        "teacher_load_seconds": teacher_load_seconds,
        "distill_seconds_total": distill_seconds,
        "distill_steps": cfg.train.steps,
        "run_dir": str(out),
        "config": to_dict(cfg),
        "objective_config": to_dict(obj_cfg),
    }
    result["fd_ratio"] = result["student_fd"][0] / result["teacher_fd"][0]
    result["throughput_ratio"] = (
        result["student_samples_per_second"] / result["teacher_samples_per_second"]
    )
    dest = (
        Path(__file__).parent
        / "results"
        / f"image_digits_{args.objective}{'_' + args.tag if args.tag else ''}.json"
    )
    atomic_write_json(dest, result)
    f = result
    print(json.dumps(f, indent=2))
    print()
    print(
        f"| model | NFE | FD (mean ± sd, {args.seeds} seeds × {args.samples}) "
        "| class accuracy | samples/s |"
    )
    print("|---|---|---|---|---|")
    for name in ("teacher", "student"):
        fd, acc = f[f"{name}_fd"], f[f"{name}_class_accuracy"]
        print(
            f"| {name} | {f[f'{name}_nfe']} | {fd[0]:.2f} ± {fd[1]:.2f} | "
            f"{acc[0]:.3f} ± {acc[1]:.3f} | {f[f'{name}_samples_per_second']:.0f} |"
        )
    print(
        f"\nFD ratio student/teacher: {f['fd_ratio']:.3f}; throughput ratio: "
        f"{f['throughput_ratio']:.1f}x; teacher training {f['teacher_train_seconds']:.0f} s; "
        f"distillation (incl. final eval) {f['distill_seconds_total']:.0f} s"
    )


def table(tag: str) -> str:
    """One row per objective over the result files ``image_digits_*_TAG.json``."""
    lines = [
        "| objective | student NFE | student FD | teacher FD (50 NFE) | FD ratio "
        "| class accuracy | throughput × | distil s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    suffix = f"_{tag}.json" if tag else ".json"
    for path in sorted((Path(__file__).parent / "results").glob(f"image_digits_*{suffix}")):
        f = json.loads(path.read_text())
        if not tag and path.stem != f"image_digits_{f['objective']}":
            continue  # an untagged table lists untagged runs only
        sfd, tfd, acc = f["student_fd"], f["teacher_fd"], f["student_class_accuracy"]
        lines.append(
            f"| {f['objective']} | {f['student_nfe']} | {sfd[0]:.2f} ± {sfd[1]:.2f} | "
            f"{tfd[0]:.2f} ± {tfd[1]:.2f} | {f['fd_ratio']:.2f} | {acc[0]:.3f} | "
            f"{f['throughput_ratio']:.0f} | {f['distill_seconds_total']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
