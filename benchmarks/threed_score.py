"""Benchmark: class-to-3D with the digits teacher as the 2-D prior, by SDS (DreamFusion), VSD
(ProlificDreamer), CDS (Consistent3D) and TSM (Dreamer XL), on the same digits and seeds.

    uv run --package fewstep-threed python benchmarks/threed_score.py [--steps 200]

Each run is the ``threed-<method>`` recipe with its paper defaults (guidance scale, time
schedule, weighting): 1000 Gaussians rendered at 32x32 from 4 random orbit cameras per step,
area-downsampled to the prior's 8x8. Each scene is judged on 16 evenly spaced turntable views
by the digits classifier: view accuracy (fraction of views read as the requested digit) and
mean confidence (its mean probability), plus seconds per run. Writes
benchmarks/results/threed_score.json, a turntable grid per method (one row per run) under
benchmarks/results/threed_score/ (the --out path without its suffix), and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("sds", "vsd", "cds", "tsm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="optimisation steps per run")
    ap.add_argument("--digits", type=int, nargs="+", default=[0, 1, 3, 7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--views", type=int, default=16, help="evaluation views per scene")
    results = Path(__file__).parent / "results"
    ap.add_argument("--out", type=Path, default=results / "threed_score.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from fewstep.core.priors import load_prior
    from fewstep.core.report import save_image_grid
    from fewstep.threed.gaussians import load_ply
    from fewstep.threed.prior import PriorAdapter
    from fewstep.threed.recipes import score as recipes

    prior = load_prior("digits")  # trained once and cached by fewstep-image
    recipes.PRIOR_LOADERS["digits"] = lambda: prior  # load it once for every run
    adapter = PriorAdapter(prior)
    grid_dir = args.out.with_suffix("")  # results/threed_score.json -> results/threed_score/
    runs, grids = [], {}
    for method in args.methods:
        recipe = getattr(recipes, method.upper())
        grids[method] = []
        for digit in args.digits:
            for seed in args.seeds:
                cfg = recipe.config_cls()
                cfg.label, cfg.eval_views = digit, args.views
                cfg.distill.steps, cfg.distill.seed = args.steps, seed
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    m = recipe.distill(cfg, None, Path(tmp))
                    seconds = time.perf_counter() - t0
                    scene = load_ply(Path(tmp) / recipes.SCENE_FILE)
                res = recipes.evaluate_views(scene, adapter, digit, args.views, cfg.distill)
                grids[method].append(res.pop("_images")[1])
                row = {
                    "method": method,
                    "digit": digit,
                    "seed": seed,
                    "view_accuracy": res["view_accuracy"],
                    "mean_confidence": res["mean_confidence"],
                    "predicted": res["predicted"],
                    "seconds": seconds,
                    "seconds_per_step": m["seconds_per_step"],
                }
                runs.append(row)
                print(
                    f"{method} digit {digit} seed {seed}: acc {row['view_accuracy']:.3f} "
                    f"conf {row['mean_confidence']:.3f} {seconds:.1f}s",
                    flush=True,
                )
        save_image_grid(
            grid_dir / f"{method}.png", torch.cat(grids[method]), nrow=args.views,
            value_range=prior.value_range, upscale=4,
        )  # fmt: skip

    table = []
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        acc = [r["view_accuracy"] for r in rs]
        table.append(
            {
                "method": method,
                "view_accuracy_mean": statistics.mean(acc),
                "view_accuracy_min": min(acc),
                "mean_confidence": statistics.mean(r["mean_confidence"] for r in rs),
                "seconds_per_run": statistics.mean(r["seconds"] for r in rs),
                "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in rs),
                "per_digit_accuracy": {r["digit"]: r["view_accuracy"] for r in rs},
            }
        )
    report = {
        "benchmark": "threed_score",
        "config": {
            "steps": args.steps,
            "digits": args.digits,
            "seeds": args.seeds,
            "eval_views": args.views,
            "n_gaussians": 1000,
            "render": 32,
            "prior_size": 8,
            "views_per_step": 4,
            "defaults": "each method's paper settings (recipe defaults)",
        },  # fmt: skip
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU",
        "table": table,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print()
    print("| method | view accuracy (mean) | min over digits | mean confidence | s / run | "
          "s / step | accuracy per digit |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in table:
        per = ", ".join(f"{d}: {a:.2f}" for d, a in r["per_digit_accuracy"].items())
        print(
            f"| {r['method']} | {r['view_accuracy_mean']:.3f} | {r['view_accuracy_min']:.3f} | "
            f"{r['mean_confidence']:.3f} | {r['seconds_per_run']:.1f} | "
            f"{r['seconds_per_step']:.3f} | {per} |"
        )
    print(f"\nwrote {args.out} and {grid_dir}/<method>.png")


if __name__ == "__main__":
    main()
