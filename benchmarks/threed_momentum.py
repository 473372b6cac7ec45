"""Benchmark (issue 8): Momentum-GS ablations on the procedural block scene, CPU.

    uv run --package fewstep-threed python benchmarks/threed_momentum.py [--steps 300]

Scene: ``toy_block_scene`` (ground slab with a checker and one object per quadrant) split
into a 2 x 2 block grid trained by 2 workers (slots run one after another in this process);
``--train-views`` aerial views per block for training, ``--test-views`` held-out per block.
Variants, each from the same initial anchors (same seed) and the same number of iterations:

- ``momentum``: the method (momentum teacher decoder, consistency weight 50, m = 0.9,
  reconstruction-guided block weighting);
- ``no momentum``: consistency weight 0 (the teacher decoder is still updated but unused);
- ``momentum, cons. weight 5``: momentum with a 10x smaller consistency weight
  (``--consistency-low``), to see whether the paper's 50 suits short runs;
- ``no weighting``: momentum on, every block weight 1;
- ``single block``: one block holding every anchor, one worker, momentum on, trained on the
  union of the blocks' training views (plain Scaffold-GS with the momentum decoder). It
  renders one view per iteration where the 2-worker runs render two, so it is also run for
  twice the iterations (``single block, 2x iters``: the same number of rendered views).

Held-out PSNR / SSIM: every block's Gaussians cropped to its cell and rendered together
(``render_merged``) at all blocks' held-out views; per-block PSNR of each block's own
Gaussians on its held-out views (min / max over blocks); process CPU seconds of training.
Every variant is run for each of ``--seeds`` (cameras and initial anchor features); the
table gives mean ± sd over seeds. Writes benchmarks/results/threed_momentum.json and prints a
markdown table. One torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from report_io import machine, markdown_table, write_json


def _data(blocks, scene, n_train: int, n_test: int, size: int, seed: int):
    from fewstep.threed.momentum_gs import render_block_data
    from fewstep.threed.volume import VolumeRenderConfig

    rc = VolumeRenderConfig(n_samples=64, background="white")
    return render_block_data(scene, blocks, n_train, n_test, size, rc, seed)


def _union(data):
    from fewstep.threed.momentum_gs import BlockData
    from fewstep.threed.recipes.pvd import _cat_cameras

    return BlockData(
        _cat_cameras([d.train_cameras for d in data]),
        torch.cat([d.train_images for d in data]),
        _cat_cameras([d.test_cameras for d in data]),
        torch.cat([d.test_images for d in data]),
    )


def run_variant(name, cfg, blocks, data, pts, test_all) -> dict:
    from fewstep.threed.momentum_gs import (
        MomentumGS,
        evaluate_blocks,
        image_psnr,
        ssim,
        train_momentum_gs,
    )

    torch.manual_seed(cfg.seed)
    model = MomentumGS.from_points(pts, blocks, cfg)
    cams, imgs = test_all
    c0 = time.process_time()
    log = train_momentum_gs(model, data, cfg)
    cpu = time.process_time() - c0
    with torch.no_grad():
        merged = model.render_merged(cams)
        bp, _ = evaluate_blocks(model, data)
    row = {
        "variant": name,
        "blocks": len(blocks),
        "workers": cfg.workers,
        "iters": cfg.steps,
        "views rendered": cfg.steps * cfg.workers,
        "momentum (cons. weight)": cfg.consistency_weight,
        "block weighting": cfg.block_weighting and len(blocks) > 1,
        "held-out PSNR": image_psnr(merged, imgs),
        "held-out SSIM": float(ssim(merged, imgs)),
        "block PSNR min": float(bp.min()),
        "block PSNR max": float(bp.max()),
        "final weights": " / ".join(f"{w:.2f}" for w in log["weights"]),
        "train cpu-s (incl. weight evals)": cpu,
        "photo loss (last 20)": sum(log["photo"][-20:]) / 20,
    }
    print(row, flush=True)
    return {"row": row, "evals": log["evals"], "loss_every_10": log["loss"][::10]}


def _variants(base, steps: int, consistency_low: float) -> dict:
    """Variant name -> (config, block grid)."""
    single = dataclasses.replace(base, blocks=(1, 1), workers=1)
    return {
        "momentum": (base, base.blocks),
        "no momentum": (dataclasses.replace(base, consistency_weight=0.0), base.blocks),
        f"momentum, cons. weight {consistency_low:g}": (
            dataclasses.replace(base, consistency_weight=consistency_low),
            base.blocks,
        ),
        "no weighting": (dataclasses.replace(base, block_weighting=False), base.blocks),
        "single block": (single, (1, 1)),
        "single block, 2x iters": (dataclasses.replace(single, steps=2 * steps), (1, 1)),
    }


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def main() -> None:
    from fewstep.threed.momentum_gs import (
        TOY_AABB,
        MomentumGSConfig,
        image_psnr,
        partition_blocks,
        scene_points,
        toy_block_scene,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="iterations of every variant")
    ap.add_argument("--train-views", type=int, default=6, help="training views per block")
    ap.add_argument("--test-views", type=int, default=2, help="held-out views per block")
    ap.add_argument("--size", type=int, default=32, help="image size (pixels)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="cameras and init")
    ap.add_argument("--consistency-low", type=float, default=5.0, help="extra variant's weight")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--variants", nargs="+", default=None, help="subset of variant names (default: all)"
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "threed_momentum.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    scene = toy_block_scene()
    base0 = MomentumGSConfig(steps=args.steps)
    pts, _ = scene_points(scene, base0.anchor_voxel)
    all_names = list(_variants(base0, args.steps, args.consistency_low))
    names = args.variants or all_names
    unknown = sorted(set(names) - set(all_names))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {all_names}")
    report = {
        "benchmark": "threed_momentum",
        "machine": machine(),
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "config": dataclasses.asdict(base0),
            "anchors": int(pts.shape[0]),
        },
        "runs": {n: [] for n in names},
    }
    for seed in args.seeds:
        base = dataclasses.replace(base0, seed=seed)
        grids = {g: partition_blocks(TOY_AABB, g, base.overlap) for g in (base.blocks, (1, 1))}
        data = _data(grids[base.blocks], scene, args.train_views, args.test_views, args.size, seed)
        union = _union(data)
        test_all = (union.test_cameras, union.test_images)
        imgs = test_all[1]
        report["settings"][f"const_psnr_seed{seed}"] = image_psnr(
            imgs.mean((0, 1, 2)).expand_as(imgs), imgs
        )
        variants = _variants(base, args.steps, args.consistency_low)
        for name in names:
            cfg, grid = variants[name]
            dt = data if grid == base.blocks else [union]
            r = run_variant(name, cfg, grids[grid], dt, pts, test_all)
            r["row"]["seed"] = seed
            report["runs"][name].append(r)
            write_json(args.out, report)
    rows = []
    for name in names:
        rs = [r["row"] for r in report["runs"][name]]
        first = rs[0]
        rows.append(
            {
                "variant": name,
                "blocks / workers": f"{first['blocks']} / {first['workers']}",
                "iters (views rendered)": f"{first['iters']} ({first['views rendered']})",
                "cons. weight": first["momentum (cons. weight)"],
                "block weighting": first["block weighting"],
                "held-out PSNR": _mean_sd([r["held-out PSNR"] for r in rs]),
                "held-out SSIM": _mean_sd([r["held-out SSIM"] for r in rs]),
                "worst block PSNR": _mean_sd([r["block PSNR min"] for r in rs]),
                "final weights (first seed)": first["final weights"],
                "train cpu-s": _mean_sd([r["train cpu-s (incl. weight evals)"] for r in rs]),
            }
        )
    report["rows"] = rows
    report["wall_seconds"] = time.time() - t0
    write_json(args.out, report)
    print(f"\n## Momentum-GS ablations (mean ± sd over seeds {args.seeds})\n")
    print(markdown_table(rows))
    print(f"\n{report['wall_seconds']:.0f} s wall; {args.out}")


if __name__ == "__main__":
    main()
