"""Benchmark: one-step super-resolution by CTMSR against bicubic upsampling, with and
without distribution trajectory matching (DTM), on digits 8 -> 16 and on scikit-learn's
sample photos x4 (grey 32x32 crops; held-out crops from a separate region of each photo).

    uv run --package fewstep-image python benchmarks/image_sr.py [--steps 500]

Per dataset, as CTMSR itself does (DTM fine-tunes a consistency-trained model), one run of
``fewstep distill image-sr-ctmsr`` trains pure consistency training (CT) for the first half
of the steps; its checkpoint is then resumed twice to the full step count, once with
DTM weight 0 (CT only) and once with CTMSR's weight 1.6, so both arms share everything up
to the split. Reports PSNR / SSIM against HR on the held-out set (mean +- standard error
over images), the sliced Wasserstein distance between the output set and the HR set (pixels;
the distribution gap DTM targets) and milliseconds per image (CPU, 1 thread, a shared
machine: compare ratios within a run). Writes benchmarks/results/image_sr.json, a grid PNG
per dataset (rows LR / bicubic / CT / CT+DTM / HR) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from report_io import markdown_table, write_json

DATASETS = {
    "digits 8->16": ["--data.dataset", "digits"],
    "photos x4 (grey 32x32)": ["--data.dataset", "photos"],
}


def distill(out: Path, opts: list[str]) -> dict:
    from fewstep.core import cli

    args = ["distill", "image-sr-ctmsr", "--out", str(out), "--train.progress", "false"]
    if cli.main([*args, "--threads", "1", "--device", "cpu", *opts]) != 0:
        raise RuntimeError(f"image-sr-ctmsr failed with {opts}")
    return json.loads((out / "metrics.json").read_text())


def row(dataset: str, method: str, r: dict) -> dict:
    return {
        "dataset": dataset,
        "method": method,
        "NFE": r["nfe"],
        "PSNR dB": f"{r['psnr']:.2f} ± {r['psnr_se']:.2f}",
        "SSIM": f"{r['ssim']:.4f} ± {r['ssim_se']:.4f}",
        "SWD to HR": r["swd_to_hr"],
        "ms / image": r["ms_per_image"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500, help="training steps per arm")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options for every run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "image_sr.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    split = args.steps // 2
    common = ["--ctmsr.total_steps", str(args.steps), "--ctmsr.dtm_start", str(split)]
    common += ["--train.checkpoint_every", str(split), "--train.eval_every", "0", *args.extra]
    rows, runs = [], {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for di, (dataset, data_opts) in enumerate(DATASETS.items()):
            base = Path(tmp) / f"d{di}_ct"
            ts = time.time()
            m_ct = distill(base, [*data_opts, *common, "--train.steps", str(split)])
            runs[dataset] = {"ct_half": m_ct, "ct_half_seconds": time.time() - ts}
            rows.append(row(dataset, "bicubic", m_ct["bicubic"]))
            rows.append(row(dataset, f"CT, {split} steps, 1 step", m_ct["ctmsr_1step"]))
            outs = {}
            for arm, w in (("CT only", "0"), ("CT + DTM", "1.6")):
                out = Path(tmp) / f"d{di}_{w}"
                shutil.copytree(base / "checkpoints", out / "checkpoints")
                ts = time.time()
                opts = [*data_opts, *common, "--train.steps", str(args.steps)]
                m = distill(out, [*opts, "--ctmsr.dtm_weight", w])
                runs[dataset][arm] = {**m, "seconds": time.time() - ts}
                for k, label in (("ctmsr_1step", "1 step"), ("ctmsr_2step", "2 steps")):
                    rows.append(row(dataset, f"{arm}, {args.steps} steps, {label}", m[k]))
                outs[arm] = out
            grid = args.out.parent / f"image_sr_{DATASETS[dataset][1]}.png"
            _grid(outs, grid)
            runs[dataset]["grid"] = str(grid.name)
    report = {
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), shared CPU",
        "steps": args.steps,
        "dtm_start": split,
        "rows": rows,
        "runs": runs,
        "seconds": time.time() - t0,
    }
    write_json(args.out, report)
    print(markdown_table(rows))
    print(f"\n{report['seconds']:.0f} s")


def _grid(outs: dict[str, Path], path: Path) -> None:
    """Rows LR / bicubic / CT 1 step / CT+DTM 1 step / HR on the first 8 held-out images."""
    import torch.nn.functional as F

    from fewstep.core.report import save_image_grid
    from fewstep.image.recipes.ctmsr import RECIPE
    from fewstep.image.sr.ctmsr import sample_sr

    rows, pairs = [], None
    for run in outs.values():
        cfg, f, ds = RECIPE.load(run)
        pairs = ds.heldout
        y = pairs.lr_up[:8]
        if not rows:
            size = pairs.hr.shape[-1]
            rows += [F.interpolate(pairs.lr[:8], size=(size, size), mode="nearest"), y]
        rows.append(sample_sr(f, y, (1.0,), torch.Generator().manual_seed(cfg.eval_seed)))
    rows.append(pairs.hr[:8])
    size = rows[0].shape[-1]
    save_image_grid(path, torch.cat(rows).clamp(-1, 1), nrow=8, upscale=64 // size, pad=2)


if __name__ == "__main__":
    main()
