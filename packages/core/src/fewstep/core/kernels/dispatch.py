"""One attention call for every backend: ``attention(q, k, v, block_mask=…)``.

Backends (same signature, same result up to floating-point rounding):

- ``triton``: the block-sparse Triton kernels (``triton_attention``), differentiable in
  reverse mode (FlashAttention-2 backward) and forward mode (the fused tangent kernel), so
  ``torch.func.jvp`` of a model calling this never falls back to the math path. Runs on
  CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (how the tests run it on CPU).
- ``sdpa``: the block mask expanded for ``scaled_dot_product_attention`` (dense compute).
- ``blockwise``: a PyTorch tile loop that skips masked tiles (compute falls with density).
- ``flex``: ``torch.nn.attention.flex_attention`` with the same block mask.
- ``xformers``: ``memory_efficient_attention`` with the mask as an additive bias, when
  xformers is installed.

``backend="auto"`` picks ``triton`` for CUDA tensors when triton imports, else ``sdpa``;
a fallback is logged once, never silent, and never changes the result beyond rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from fewstep.core.kernels import reference
from fewstep.core.kernels.masks import num_blocks, validate_block_mask

log = logging.getLogger(__name__)

Backend = Callable[[Tensor, Tensor, Tensor, Tensor, int, bool, float], Tensor]


@cache
def _log_once(message: str) -> None:
    log.warning(message)


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # an ImportError, or a broken install raising on import
        return False
    return True


def _tri():
    from fewstep.core.kernels import triton_attention

    return triton_attention


def _check_triton(q: Tensor) -> None:
    if not triton_available():
        raise RuntimeError(
            "the triton backend needs triton installed (it ships with torch on Linux)"
        )
    if not q.is_cuda and not _tri().interpreting():
        raise RuntimeError(
            "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 to run it on CPU"
        )


class _TritonAttention(torch.autograd.Function):
    """Block-sparse attention through Triton with backward and forward-mode (jvp) rules."""

    @staticmethod
    def forward(q, k, v, mask, block_size, causal, scale):
        o, lse, _ = _tri().forward(q, k, v, mask, block_size, causal, scale)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, block_size, causal, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mark_non_differentiable(lse)
        ctx.args = (mask, block_size, causal, scale)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        grads = _tri().backward(q, k, v, o, lse, do, *ctx.args)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        # under torch.func the saved tensors are still wrapped: go through a Function, whose
        # forward sees plain tensors (and which makes the tangent differentiable too)
        q, k, v = ctx.saved_tensors
        tangents = [
            torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), (tq, tk, tv))
        ]
        return _TritonAttentionWithTangent.apply(q, k, v, *tangents, *ctx.args)[1], None


class _TritonAttentionWithTangent(torch.autograd.Function):
    """(output, tangent) from the fused kernel; the output's gradient through the Triton
    backward, the tangent's (rarely needed: sCM and MeanFlow stop it) through the float32
    reference, logged once."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, block_size, causal, scale):
        o, lse, t = _tri().forward(q, k, v, mask, block_size, causal, scale, (tq, tk, tv))
        return o, t, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, *args = inputs
        o, _, lse = output
        ctx.save_for_backward(q, k, v, tq, tk, tv, o, lse)
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, do, dt, _dlse):
        q, k, v, tq, tk, tv, o, lse = ctx.saved_tensors
        grads = [None] * 6
        if do is not None:
            grads[:3] = _tri().backward(q, k, v, o, lse, do, *ctx.args)
        if dt is not None and bool(dt.any()):
            _log_once("gradient through an attention tangent uses the float32 reference")

            def tangent(*xs):
                return reference.attention_jvp_reference(*xs, *ctx.args)[1]

            inputs = (q, k, v, tq, tk, tv)
            with torch.enable_grad():
                xs = [x.detach().float().requires_grad_() for x in inputs]
                extra = torch.autograd.grad(tangent(*xs), xs, dt.float())
            grads = [
                e.to(x.dtype) if g is None else g + e.to(x.dtype)
                for g, e, x in zip(grads, extra, inputs)
            ]
        return (*grads, None, None, None, None)


def _triton(q, k, v, mask, block_size, causal, scale) -> Tensor:
    _check_triton(q)
    return _TritonAttention.apply(q, k, v, mask, block_size, causal, scale)[0]


@cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # eager flex materialises the scores (fine for the CPU reference); only compiled flex
    # skips tiles, so CUDA runs compile it once per process
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _flex(q, k, v, mask, block_size, causal, scale) -> Tensor:
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        keep = mask[b, h, qi // block_size, ki // block_size]
        return keep & (qi >= ki) if causal else keep

    b, h, n_q, _ = q.shape
    bm = create_block_mask(mask_mod, b, h, n_q, k.shape[-2], device=q.device, BLOCK_SIZE=block_size)
    # compiled flex tiles by 128 on Hopper by default, which must divide the mask's blocks
    opts = (
        {"BLOCK_M": block_size, "BLOCK_N": block_size} if q.is_cuda and block_size < 128 else None
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_fn(q.is_cuda)(q, k, v, block_mask=bm, scale=scale, kernel_options=opts)


def _xformers(q, k, v, mask, block_size, causal, scale) -> Tensor:
    import xformers.ops as xops

    m = reference.token_mask(mask, q.shape[-2], k.shape[-2], block_size, causal)
    # xformers wants the bias's last dimension padded to a multiple of 8 in memory
    n_k = k.shape[-2]
    pad = -(-n_k // 8) * 8
    bias = torch.full((*m.shape[:-1], pad), float("-inf"), dtype=q.dtype, device=q.device)
    bias[..., :n_k] = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf"))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_bias=bias[..., :n_k],
        scale=scale,
    )
    return out.transpose(1, 2)


BACKENDS: dict[str, Backend] = {
    "triton": _triton,
    "sdpa": reference.sdpa_attention,
    "blockwise": reference.blockwise_attention,
    "flex": _flex,
    "xformers": _xformers,
}


def _choose(q: Tensor, backend: str) -> str:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown attention backend {backend!r}; backends: auto, {', '.join(BACKENDS)}"
            )
        return backend
    if q.is_cuda:
        if triton_available():
            return "triton"
        _log_once("triton is not importable: block-sparse attention uses the dense sdpa reference")
    return "sdpa"


def _prepare(q, k, v, block_mask, block_size, causal, scale):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape (batch, heads, tokens, head_dim), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, n_q, d = q.shape
    if (
        k.shape[:2] != (b, h)
        or v.shape[:2] != (b, h)
        or k.shape[-2] != v.shape[-2]
        or k.shape[-1] != d
    ):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and heads must "
            "agree, k and v need the same token count, and q and k the same head_dim"
        )
    if v.shape[-1] != d:
        raise ValueError(f"v's head_dim {v.shape[-1]} must equal q's {d}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    n_k = k.shape[-2]
    if block_mask is None:
        nqb, nkb = num_blocks(n_q, block_size), num_blocks(n_k, block_size)
        block_mask = torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=q.device)
    mask = validate_block_mask(block_mask.to(q.device), b, h, n_q, n_k, block_size, causal)
    return mask, d**-0.5 if scale is None else scale


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Tensor | None = None,
    *,
    block_size: int = 64,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Block-sparse (or, without a mask, dense) attention. q (B, H, Nq, D), k and v
    (B, H, Nk, D); ``block_mask`` (B|1, H|1, ceil(Nq/bs), ceil(Nk/bs)) bool says which
    (query block, key block) tiles are computed; ``causal`` adds the token-level causal mask.
    Every query block must keep a key block (at or before the diagonal when causal)."""
    mask, scale = _prepare(q, k, v, block_mask, block_size, causal, scale)
    return BACKENDS[_choose(q, backend)](q, k, v, mask, block_size, causal, scale)


def attention_with_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor,
    tk: Tensor,
    tv: Tensor,
    block_mask: Tensor | None = None,
    *,
    block_size: int = 64,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(attention output, its directional derivative along (tq, tk, tv)) in one fused pass
    on the triton backend (the JVP of sCM / rCM / MeanFlow without an attention matrix);
    other backends use ``torch.func.jvp`` of their own forward."""
    mask, scale = _prepare(q, k, v, block_mask, block_size, causal, scale)
    if tq.shape != q.shape or tk.shape != k.shape or tv.shape != v.shape:
        raise ValueError("tangents must have the shapes of q, k and v")
    name = _choose(q, backend)
    if name == "triton":
        _check_triton(q)
        fused = _TritonAttentionWithTangent.apply
        o, t, _ = fused(q, k, v, tq, tk, tv, mask, block_size, causal, scale)
        return o, t
    fn = BACKENDS[name]
    return torch.func.jvp(
        lambda a, b, c: fn(a, b, c, mask, block_size, causal, scale), (q, k, v), (tq, tk, tv)
    )
