"""PRD relighting and MDT-dist few-step sampling, measured side by side on CPU.

- PRD (``fewstep.threed.prd``): on the toy scene of known materials (box glowing by
  ``--emission``, a light path the physical model lacks), relit PSNR (light rotated 120 deg
  about z, held-out views) of the PRD student (learned progress map), the same student with the
  progress frozen at 1 (plain PBR fitting), and the radiance field alone (cannot relight), over
  ``--seeds`` camera draws.
- MDT-dist (``fewstep.threed.mdt``): the ``threed-mdt-dist`` recipe; teacher 25 Euler steps vs
  the distilled student at 1 and 2 steps and the untrained student (the teacher at 1 step):
  nearest-training-shape IoU, MMD^2, MSE to the teacher's sample from the same noise, seconds
  per sample and speed-up.

Writes benchmarks/results/threed_more.json and prints markdown tables.
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


def prd(seeds: int, steps: int, emission: float) -> dict:
    from fewstep.threed.cameras import orbit_cameras
    from fewstep.threed.prd import (
        PBRField,
        PRDConfig,
        ToyPBRScene,
        cache_views,
        default_toy_objects,
        distill_prd,
        psnr,
        relit_psnr,
        render_pbr,
    )

    out: dict = {"learned": [], "fixed": [], "radiance_only": [], "learned_best": []}
    teacher = ToyPBRScene(default_toy_objects(emission))
    truth = ToyPBRScene(default_toy_objects(0.0))
    for seed in range(seeds):
        g = torch.Generator().manual_seed(100 + seed)
        train = orbit_cameras(12, 3.0, (-10.0, 60.0), size=24, random=True, generator=g)
        test = orbit_cameras(4, 3.0, 30.0, size=24, azimuth_start=20.0 + 7 * seed)
        v, ve = cache_views(teacher, train, 48), cache_views(teacher, test, 48)
        for mode in ("learned", "fixed"):
            torch.manual_seed(seed)
            f = PBRField(24)
            log = distill_prd(f, v, PRDConfig(steps=steps, progress=mode, eval_every=50), truth, ve)
            out[mode].append(relit_psnr(f, truth, ve, 120.0))
            if mode == "learned":
                out["learned_best"].append(max(e["relit_psnr"] for e in log["eval"]))
        ref, _ = render_pbr(truth, truth.lights.rotated(120.0), ve)
        out["radiance_only"].append(psnr(ve.radiance, ref))
    return out


def mdt(extra: list[str]) -> dict:
    from fewstep.core import cli

    with tempfile.TemporaryDirectory() as d:
        rc = cli.main(["distill", "threed-mdt-dist", "--out", f"{d}/run", *extra])
        if rc != 0:
            raise RuntimeError(f"threed-mdt-dist failed with code {rc}")
        return json.loads(Path(f"{d}/run/metrics.json").read_text())


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prd-steps", type=int, default=200)
    ap.add_argument("--emission", type=float, default=0.25)
    ap.add_argument("--mdt", nargs="*", default=["--teacher-steps", "400", "--train.steps", "150"])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "threed_more.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    p = prd(args.seeds, args.prd_steps, args.emission)
    t1 = time.perf_counter()
    m = mdt(args.mdt)
    t2 = time.perf_counter()
    print(f"## PRD relighting (PSNR dB, mean ± sd over {args.seeds} camera seeds)\n")
    print("| model | relit PSNR |\n|---|---|")
    print(f"| PRD, learned progress (final, {args.prd_steps} steps) | {_ms(p['learned'])} |")
    print(f"| PRD, learned progress (best eval) | {_ms(p['learned_best'])} |")
    print(f"| PBR fit, progress frozen at 1 | {_ms(p['fixed'])} |")
    print(f"| radiance field only | {_ms(p['radiance_only'])} |")
    print("\n## MDT-dist (threed-mdt-dist recipe, one run)\n")
    print(
        "| sampler | NFE | nearest IoU | class TV | MMD^2 | MSE to teacher | s/sample | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in m["samplers"].items():
        print(f"| {name} | {r['nfe']} | {r['nearest_iou']:.3f} | {r['class_tv']:.3f} | "
              f"{r['mmd']:.4f} | {r['mse_to_teacher']:.4f} | {r['seconds_per_sample']:.5f} | "
              f"{r['speedup']:.1f}x |")  # fmt: skip
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "prd": p,
        "prd_seconds": t1 - t0,
        "mdt": m,
        "mdt_seconds": t2 - t1,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({t2 - t0:.0f} s)")


if __name__ == "__main__":
    main()
