"""Confirm the protein rows that decide issue 10's target: more samples at a fresh noise seed
for the teacher's 400-step sampler and chosen students of a ``benchmarks/protein.py --runs``
folder, then a timing pass that samples one batch with each model in turn, several rounds
(so teacher and students see the same machine load; every other round in reverse order). A
student's speed-up is the median over rounds of (teacher seconds / student seconds in that
round), with the lowest and highest round beside it; a round's ratio compares runs minutes
apart, not hours.

    python benchmarks/protein_confirm.py RUNS [--samples 512] [--seed 777] [--rounds 5]
        [--students sida_k20:18 sida_k20 sida_k16 sid_k16 sid_k16_base]

A student ``NAME:N`` samples run folder NAME on N of its trained times
(``sampling.thin_times``); a bare NAME on the times its run saved. NAME may be a path.

Writes benchmarks/results/protein_confirm.json and prints the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from report_io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, help="run folders of benchmarks/protein.py --runs")
    ap.add_argument("--samples", type=int, default=512, help="0: timing only")
    ap.add_argument("--seed", type=int, default=777, help="sampling noise")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (one batch each)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--students",
        nargs="+",
        default=["sida_k20:18", "sida_k20", "sida_k16", "sid_k16", "sid_k16_base"],
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "protein_confirm.json"
    )
    args = ap.parse_args()
    from fewstep.protein.metrics import evaluate_backbones
    from fewstep.protein.recipes.sid import SID, _nfe, saved_sample_times
    from fewstep.protein.sampling import thin_times
    from fewstep.protein.teacher import ProteinaSampler

    cfg, teacher, _, _, ca = SID.load(args.runs / args.students[0].split(":")[0])
    tc = cfg.teacher
    gen = torch.Generator().manual_seed(args.seed + 2)
    models = {"teacher": (teacher, ProteinaSampler(400, tc.schedule_p, "sc", tc.noise_scale, gen))}
    for name in args.students:
        folder, _, steps = name.partition(":")
        _, _, student, meta, _ = SID.load(args.runs / folder)
        times = thin_times(meta["times"], int(steps)) if steps else saved_sample_times(meta)
        models[name] = (student, SID.eval_sampler(cfg, times, meta["noise_scale"]))
    torch.set_num_threads(1)  # after SID.load, which applies the run's thread setting
    results: dict[str, dict] = {name: {"nfe": _nfe(s, m)} for name, (m, s) in models.items()}
    quality = models if args.samples else {}  # --samples 0: timing only
    for name, (model, sampler) in quality.items():
        x, _ = SID.generate(sampler, model, args.samples, ca.shape[1], args.batch, args.seed)
        m = evaluate_backbones(x, ca)
        results[name].update({k: v for k, v in m.items() if isinstance(v, (int, float))})
        print(name, {k: round(m[k], 3) for k in ("clash_rate", "rg_ratio", "sse_tv")}, flush=True)
    noise = torch.randn(args.batch, ca.shape[1], 3, generator=torch.Generator().manual_seed(7))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):  # odd rounds run the models in reverse order (load drift)
        for name, (model, sampler) in list(models.items())[:: -1 if r % 2 else 1]:
            t0 = time.perf_counter()
            with torch.no_grad():
                sampler.sample(model, noise)
            seconds[name].append(time.perf_counter() - t0)
    for name in models:
        ratios = sorted(t / s for t, s in zip(seconds["teacher"], seconds[name], strict=True))
        results[name].update(
            seconds_per_batch=seconds[name],
            speedup=statistics.median(ratios),
            speedup_range=[ratios[0], ratios[-1]],
            speedup_of_sums=sum(seconds["teacher"]) / sum(seconds[name]),
        )
        print(
            f"{name}: NFE {results[name]['nfe']}, {results[name]['speedup']:.1f}x "
            f"(rounds {ratios[0]:.1f}-{ratios[-1]:.1f}x)",
            flush=True,
        )
    write_json(args.out, {"samples": args.samples, "seed": args.seed, "results": results})


if __name__ == "__main__":
    main()
