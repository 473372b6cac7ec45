"""Benchmark: block-sparse attention and the attention JVP kernel.

    uv run --package fewstep-core python benchmarks/kernels.py

Everywhere:
- parity of the Triton kernels (forward, dq/dk/dv, JVP tangent) against the float32 math
  reference for float32/float16/bfloat16, causal and not (on CPU under TRITON_INTERPRET=1,
  set by this script when there is no GPU);
- what BLADE's adaptive mask (ASA) skips on video-like tokens: the fraction of tiles (hence
  attention FLOPs) skipped, the exact attention mass the kept tiles hold, and the output
  error against dense attention, for row-major, tile and Hilbert token orders.
On CUDA also (else marked "not measured"):
- time and peak memory of the Triton kernel against dense SDPA (flash) and FlexAttention
  with the same block mask at 4k/16k/64k tokens and densities 5/10/20/50 %;
- the fused JVP kernel against torch.func.jvp over SDPA's math path, and against the plain
  forward.
Writes benchmarks/results/kernels.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

from fewstep.core.kernels import (  # noqa: E402
    asa_block_mask,
    attention,
    attention_with_tangent,
    curve_order,
    tile_order,
)
from fewstep.core.kernels.masks import validate_block_mask  # noqa: E402
from fewstep.core.kernels.reference import attention_jvp_reference, math_attention  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def parity(n: int, d: int, bs: int) -> list[dict]:
    rows = []
    nb = -(-n // bs)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 2, nb, nb, generator=g) < 0.3
    mask |= torch.eye(nb, dtype=torch.bool)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for causal in (False, True):
            xs = [torch.randn(1, 2, n, d, generator=g).to(DEV, dtype) for _ in range(6)]
            q, k, v, tq, tk, tv = xs
            full = validate_block_mask(mask.to(DEV), 1, 2, n, n, bs, causal)
            ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
            ref = math_attention(*ref_in, full, bs, causal, d**-0.5)
            do = torch.randn(ref.shape, generator=g).to(DEV)
            ref.backward(do)
            tri_in = [x.detach().requires_grad_() for x in (q, k, v)]
            out = attention(*tri_in, mask, block_size=bs, causal=causal, backend="triton")
            out.backward(do.to(dtype))
            _, t = attention_with_tangent(q, k, v, tq, tk, tv, mask, block_size=bs,
                                          causal=causal, backend="triton")  # fmt: skip
            _, t_ref = attention_jvp_reference(q, k, v, tq, tk, tv, full, bs, causal, d**-0.5)
            row = {"dtype": str(dtype).removeprefix("torch."), "causal": causal,
                   "out": rel(out, ref), "tangent": rel(t, t_ref)}  # fmt: skip
            row.update({f"d{c}": rel(a.grad, b.grad) for c, a, b in zip("qkv", tri_in, ref_in)})
            rows.append(row)
    return rows


def video_tokens(grid: tuple[int, int, int], d: int, heads: int, seed: int = 0):
    """q, k, v for a (T, H, W) grid of video-like tokens (row-major): features are smooth
    functions of position (random Fourier features at low frequencies) plus noise, so
    attention concentrates on nearby tokens, as in video diffusion transformers."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack(torch.meshgrid(*(torch.arange(s) / s for s in grid), indexing="ij"), -1)
    pos = pos.reshape(-1, 3)
    freqs = torch.randn(3, 64, generator=g) * 6.0
    feats = torch.cat([(pos @ freqs).sin(), (pos @ freqs).cos()], -1)
    feats = feats + 0.2 * torch.randn(feats.shape, generator=g)
    # keys share most of the query projection, so q . k behaves like a similarity of the two
    # tokens' features (what makes attention in trained video transformers local)
    w = torch.randn(feats.shape[-1], heads * d, generator=g) / math.sqrt(feats.shape[-1])
    wk = w + 0.5 * torch.randn(w.shape, generator=g) / math.sqrt(feats.shape[-1])
    wv = torch.randn(w.shape, generator=g) / math.sqrt(feats.shape[-1])
    return [(feats @ m * 2.0).view(1, -1, heads, d).transpose(1, 2) for m in (w, wk, wv)]


def sparsity(grid, d, heads, bs, thresholds, samples=(4, 16)) -> list[dict]:
    q, k, v = video_tokens(grid, d, heads)
    n = q.shape[-2]
    orders = {
        "row-major": torch.arange(n),
        "tiles": tile_order(grid, (1, 8, 8) if bs == 64 else (1, 4, bs // 4)),
        "hilbert": curve_order(grid, "hilbert"),
    }
    rows = []
    for name, perm in orders.items():
        qo, ko, vo = (x[:, :, perm] for x in (q, k, v))
        p = (qo @ ko.transpose(-1, -2) * d**-0.5).softmax(-1)  # exact probabilities
        dense = p @ vo
        nb = -(-n // bs)
        mass = p.view(1, heads, nb, bs, nb, bs).sum((3, 5)) / bs  # per tile, rows sum to 1
        for s, thr in ((s, t) for s in samples for t in thresholds):
            m = asa_block_mask(qo, ko, block_size=bs, threshold=thr, min_retain=0.02,
                               max_retain=0.5, samples_per_block=s)  # fmt: skip
            out = attention(qo, ko, vo, m, block_size=bs, backend="sdpa")
            rows.append({"order": name, "samples": s, "threshold": thr,
                         "density": m.float().mean().item(),
                         "skipped": 1 - m.float().mean().item(),
                         "mass_kept": (mass * m).sum(-1).mean().item(),
                         "out_rel_err": rel(out, dense)})  # fmt: skip
    return rows


def _time(fn, repeats=10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _peak(fn) -> float:
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def gpu_speed(tokens, densities, heads=16, d=64, bs=64) -> list[dict]:
    rows = []
    for n in tokens:
        q, k, v = (torch.randn(1, heads, n, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        nb = n // bs
        dense_t = _time(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        for dens in densities:
            m = torch.rand(1, heads, nb, nb, device=DEV) < dens
            m |= torch.eye(nb, dtype=torch.bool, device=DEV)
            row = {"tokens": n, "density": dens, "sdpa_ms": dense_t * 1e3}
            for be in ("triton", "flex"):

                def run(be=be, q=q, k=k, v=v, m=m):
                    return attention(q, k, v, m, block_size=bs, backend=be)

                try:
                    row[f"{be}_ms"], row[f"{be}_gib"] = _time(run) * 1e3, _peak(run)
                except Exception as e:  # record what failed instead of dropping the row
                    row[f"{be}_error"] = f"{type(e).__name__}: {e}"[:200]
            row["speedup_vs_sdpa"] = (
                row["sdpa_ms"] / row["triton_ms"] if "triton_ms" in row else None
            )
            rows.append(row)
    return rows


def gpu_jvp(tokens, heads=16, d=64) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for n in tokens:
        xs = [torch.randn(1, heads, n, d, device=DEV, dtype=torch.bfloat16) for _ in range(6)]
        q, k, v = xs[:3]
        row = {"tokens": n}

        def fwd(q=q, k=k, v=v):
            return attention(q, k, v, backend="triton")

        def fused(xs=xs):
            return attention_with_tangent(*xs, backend="triton")

        def math_jvp(xs=xs):
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(F.scaled_dot_product_attention, tuple(xs[:3]), tuple(xs[3:]))

        row["forward_ms"], row["fused_jvp_ms"] = _time(fwd) * 1e3, _time(fused) * 1e3
        row["jvp_over_forward"] = row["fused_jvp_ms"] / row["forward_ms"]
        row["fused_jvp_gib"] = _peak(fused)
        try:
            row["func_jvp_math_ms"] = _time(math_jvp, repeats=3) * 1e3
            row["func_jvp_math_gib"] = _peak(math_jvp)
            row["speedup_vs_func_jvp"] = row["func_jvp_math_ms"] / row["fused_jvp_ms"]
        except torch.OutOfMemoryError:
            row["func_jvp_math_ms"] = "out of memory"
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    device = (
        torch.cuda.get_device_name()
        if CUDA
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    t0 = time.time()
    res = {"device": device, "torch": torch.__version__, "interpreter": not CUDA}
    # parity: small on the interpreter, GPU-sized on CUDA
    res["parity"] = parity(n=4096 if CUDA else 200, d=64, bs=64 if CUDA else 32)
    res["asa_sparsity"] = sparsity(
        (8, 16, 16), d=64, heads=2, bs=64, thresholds=[0.5, 0.8, 0.9, 0.95]
    )
    if CUDA:
        res["speed"] = gpu_speed([4096, 16384, 65536], [0.05, 0.1, 0.2, 0.5])
        res["jvp"] = gpu_jvp([4096, 16384])
    else:
        res["speed"] = res["jvp"] = "not measured (no GPU)"
    res["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"device: {device}\n\n## parity (relative max error vs float32 reference)\n")
    print(table(res["parity"]))
    print("\n## ASA on 2,048 video-like tokens (8 x 16 x 16), blocks of 64\n")
    print(table(res["asa_sparsity"]))
    for key in ("speed", "jvp"):
        print(f"\n## {key}\n")
        print(table(res[key]) if isinstance(res[key], list) else res[key])
    print(f"\nwrote {args.out} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
