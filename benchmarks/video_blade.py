"""Benchmark: BLADE's sparse few-step video student vs the 50-step dense teacher.

    uv run --package fewstep-video python benchmarks/video_blade.py [--quality]

Speed part (always): a DiT of the teacher's architecture at a size where attention matters
(default 16 frames of 32 x 32, patches (2, 4, 4): 512 tokens, tiles of (2, 4, 4) = 32-token
blocks, 16 blocks per row), with ASA in the student's attention (``fewstep.video.blade``).
Weights are random (adaLN gates opened), not trained: time does not depend on weights, and
the ASA density it reports is what the mask builds on these activations under the
``max_retain`` ceiling (a trained model's density can be lower, never higher). Measured side
by side in one process, one thread, best of ``--repeats``:

- attention density per layer (kept tiles), attention FLOPs saved, end-to-end FLOPs ratio
  (teacher: 50 Euler steps under CFG = 100 calls of the dense DiT; student: K calls of the
  sparse DiT);
- end-to-end wall time per video of the teacher, of the sparse K-step student and of the same
  student with dense attention. On CPU the model's attention runs core's dispatch default,
  dense-compute SDPA with the block mask, so the sparse student's wall time includes the mask
  cost but not the skipped tiles: the end-to-end ratio on CPU comes from NFE;
- attention alone on each layer's captured q, k, v: core's ``blockwise`` backend (the
  Triton kernel's tile-skipping algorithm in PyTorch) with the ASA masks vs with dense masks,
  and dense SDPA, so what skipping tiles buys on this machine is measured, not assumed.

On CUDA (``--device cuda``, optionally ``--dtype bfloat16`` under autocast) the student's
attention is core's Triton block-sparse kernel (dispatch ``auto``) and the dense teacher's is
flash SDPA (pinned ``sdpa`` backend, no mask), so the end-to-end ratio includes the skipped
tiles; the per-layer rows then compare Triton sparse, Triton dense mask and flash SDPA.

Quality part (``--quality``): runs ``fewstep distill video-blade`` with its defaults (trains
and caches the default teacher and classifier when missing) and adds its metrics (FD, digit
accuracy, warp error of sparse student, dense-attention student and teacher).

Writes benchmarks/results/video_blade.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from report_io import machine, markdown_table, write_json


def best_time(fn, repeats: int, cuda: bool = False) -> float:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:  # the first call compiles the Triton kernels
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def capture_qkv(student, x, t, labels, heads: int) -> list[tuple]:
    """(q, k, v) of every attention layer for one forward (hooks on the qkv projections)."""
    out = []

    def hook(module, inputs, o):
        b, n, c3 = o.shape
        out.append(o.view(b, n, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4))

    hooks = [blk.attn.qkv.register_forward_hook(hook) for blk in student.net.blocks]
    with torch.no_grad():
        student(x, t, labels)
    for h in hooks:
        h.remove()
    return out


def speed(args) -> dict:
    import contextlib

    from fewstep.core.kernels import attention
    from fewstep.core.models import GuidedDenoiser, ModuleDenoiser
    from fewstep.core.paths import make_path
    from fewstep.core.samplers import EulerSampler
    from fewstep.video.blade import ASAConfig, dit_flops, sparse_student, student_mask
    from fewstep.video.dit import VideoDiT, VideoDiTConfig
    from fewstep.video.recipes.blade import per_layer
    from fewstep.video.teacher import null_labels

    cfg = VideoDiTConfig(frames=args.frames, size=args.size, patch=tuple(args.patch), dim=args.dim,
                         depth=args.depth, heads=args.heads, num_classes=10)  # fmt: skip
    torch.manual_seed(0)
    net = VideoDiT(cfg)
    with torch.no_grad():  # open the adaLN-Zero gates so every layer shapes the next
        for name, p in net.named_parameters():
            if "ada" in name or "head" in name:
                p.normal_(0.0, 0.02)
    dev, cuda = torch.device(args.device), args.device.startswith("cuda")
    teacher = ModuleDenoiser(net.to(dev), make_path("rectified_flow"), "velocity").eval()
    teacher.requires_grad_(False)
    asa = ASAConfig(block_size=args.block, tile=tuple(args.tile), threshold=args.threshold,
                    min_retain=0.05, max_retain=args.max_retain)  # fmt: skip
    student, _ = sparse_student(teacher, asa)
    student.eval().requires_grad_(False)
    mask = student_mask(student)
    if cuda:  # the dense teacher gets the fastest dense kernel, flash SDPA
        for blk in teacher.net.blocks:
            blk.attn.backend = "sdpa"
    amp = (torch.autocast(dev.type, dtype=getattr(torch, args.dtype))
           if args.dtype != "float32" else contextlib.nullcontext())  # fmt: skip
    dense_student = ModuleDenoiser(teacher.net, teacher.path, "velocity")  # same weights
    guided = GuidedDenoiser(teacher, args.guidance, null_labels)

    gen = torch.Generator().manual_seed(0)
    b = args.batch
    noise = torch.randn(b, cfg.frames, 3, cfg.size, cfg.size, generator=gen).to(dev)
    labels = torch.randint(0, 10, (b,), generator=gen).to(dev)
    teacher_sampler = EulerSampler(args.teacher_steps)

    def fractions(k):
        return [float(teacher.path.fraction_to_t(1 - i / k)) for i in range(k)]

    rows, per_k = [], {}
    with torch.no_grad(), amp:
        t_teacher = best_time(lambda: teacher_sampler.sample(guided, noise, labels), args.repeats,
                              cuda)  # fmt: skip
        t_nfe = teacher_sampler.sample(guided, noise[:1], labels[:1]).nfe
        dense_flops = dit_flops(cfg)
        rows.append({"sampler": f"dense teacher, {args.teacher_steps} Euler steps, CFG",
                     "nfe": t_nfe, "attn_density": 1.0, "s_per_video": t_teacher / b,
                     "speedup_vs_teacher": 1.0, "flops_ratio_vs_teacher": 1.0})  # fmt: skip
        for k in args.steps:
            sampler = EulerSampler(times=fractions(k))
            stats = mask.reset()
            s_sample = sampler.sample(student, noise, labels)
            dens = per_layer(stats.kept, cfg.depth)
            t_sparse = best_time(lambda s=sampler: s.sample(student, noise, labels), args.repeats,
                                 cuda)  # fmt: skip
            t_dense = best_time(lambda s=sampler: s.sample(dense_student, noise, labels),
                                args.repeats, cuda)  # fmt: skip
            sparse_flops = dit_flops(cfg, dens)
            flops_ratio = t_nfe * dense_flops["total"] / (s_sample.nfe * sparse_flops["total"])
            per_k[k] = {"attn_density_per_layer": dens,
                        "attn_flops_saved": 1 - sparse_flops["attention"]
                        / dense_flops["attention"]}  # fmt: skip
            rows.append({"sampler": f"BLADE student, K={k}, ASA", "nfe": s_sample.nfe,
                         "attn_density": sum(dens) / len(dens), "s_per_video": t_sparse / b,
                         "speedup_vs_teacher": t_teacher / t_sparse,
                         "flops_ratio_vs_teacher": flops_ratio})  # fmt: skip
            rows.append({"sampler": f"same student, K={k}, dense attention",
                         "nfe": s_sample.nfe, "attn_density": 1.0, "s_per_video": t_dense / b,
                         "speedup_vs_teacher": t_teacher / t_dense,
                         "flops_ratio_vs_teacher": t_nfe / s_sample.nfe})  # fmt: skip

        # attention alone, layer by layer, on the student's own q, k, v at the first step
        t0 = torch.full((b,), float(teacher.path.fraction_to_t(1.0)), device=dev)
        stats = mask.reset(record_masks=True)
        qkv = capture_qkv(student, noise, t0, labels, cfg.heads)
        # tile-skipping kernel (sparse mask vs all-ones mask) and dense SDPA (flash on CUDA)
        skipper = "triton" if cuda else "blockwise"
        kernel_rows = []
        for layer, ((q, k_, v), m) in enumerate(zip(qkv, stats.masks, strict=True)):
            ones = torch.ones_like(m)
            timings = {}
            for name, backend, bm in ((f"{skipper}_sparse", skipper, m),
                                      (f"{skipper}_dense", skipper, ones),
                                      ("sdpa_dense", "sdpa", None),
                                      ("sdpa_masked", "sdpa", m)):  # fmt: skip

                def call(be=backend, bm=bm, qkv=(q, k_, v)):
                    return attention(*qkv, bm, block_size=args.block, backend=be)

                try:
                    timings[name] = best_time(call, args.repeats, cuda)
                except torch.OutOfMemoryError:  # the masked SDPA expands a token mask
                    timings[name] = float("nan")
                    torch.cuda.empty_cache()
            kernel_rows.append({
                "layer": layer, "density": m.float().mean().item(),
                **{f"{name}_ms": 1e3 * sec for name, sec in timings.items()},
                f"{skipper}_speedup": timings[f"{skipper}_dense"] / timings[f"{skipper}_sparse"],
                "sparse_vs_sdpa_dense": timings["sdpa_dense"] / timings[f"{skipper}_sparse"],
            })  # fmt: skip
    return {
        "config": {"frames": cfg.frames, "size": cfg.size, "patch": cfg.patch, "dim": cfg.dim,
                   "depth": cfg.depth, "heads": cfg.heads, "tokens": len(teacher.net.pos),
                   "block_size": args.block, "tile": args.tile,
                   "threshold": args.threshold, "max_retain": args.max_retain,
                   "guidance": args.guidance, "teacher_steps": args.teacher_steps,
                   "batch": b, "repeats": args.repeats, "weights": "random (untrained)",
                   "device": args.device, "dtype": args.dtype},
        "per_step_count": per_k,
        "end_to_end": rows,
        "attention_kernels": kernel_rows,
    }  # fmt: skip


def quality() -> dict:
    from fewstep.core import cli

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if cli.main(["distill", "video-blade", "--out", str(out)]) != 0:
            raise RuntimeError("fewstep distill video-blade failed")
        return json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patch", type=int, nargs=3, default=[2, 4, 4], help="frames, rows, cols")
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--tile", type=int, nargs=3, default=[2, 4, 4])
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--max-retain", type=float, default=0.25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the Triton kernel")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype of the networks (float32: none)")  # fmt: skip
    p.add_argument("--quality", action="store_true", help="also distil and evaluate")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results" / "video_blade.json")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = {"benchmark": "video_blade", "machine": machine(), "speed": speed(args)}
    if args.quality:
        report["quality"] = quality()
    report["seconds"] = time.perf_counter() - t0
    write_json(args.out, report)
    s = report["speed"]
    print(markdown_table(s["end_to_end"]))
    print()
    print(markdown_table(s["attention_kernels"]))
    for k, v in s["per_step_count"].items():
        print(f"K={k}: attention FLOPs saved {100 * v['attn_flops_saved']:.1f} %, density per "
              f"layer {[round(d, 3) for d in v['attn_density_per_layer']]}")  # fmt: skip
    if "quality" in report:
        q = report["quality"]
        keys = ("video_fd", "frame_fd", "digit_accuracy", "warp_error")
        print(markdown_table([{"sampler": who, **{k: q[f"{who}_{k}"] for k in keys}}
                              for who in ("student", "dense_student", "teacher")]))  # fmt: skip
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
