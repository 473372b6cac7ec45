"""Triton block-sparse attention: forward (optionally with a forward-mode tangent) and
backward, FlashAttention-2 style (Dao 2023): online softmax over key tiles, no attention
matrix in memory, float32 accumulation for float32 / float16 / bfloat16 inputs.

Sparsity: a (B, H, Nqb, Nkb) block mask becomes, per query block, the list of kept key
blocks (and, for dK/dV, per key block the list of query blocks that keep it); each program
loops over its list only, so skipped tiles cost nothing. The tile is the mask's block.

Tangent (``TANGENT``): for tangents (tq, tk, tv) the kernel also returns
``t = d/de attention(q + e tq, k + e tk, v + e tv)`` at e = 0 in the same pass:
with S = scale q k^T, P = softmax(S), dS = scale (tq k^T + q tk^T), mu = rowsum(P * dS),
``t = P ((dS - mu) V) + P tV = [sum_j p_j (dS_j V_j + tV_j) - mu O]`` — three running sums
(numerator, mu, normaliser) share the forward's running max (as rCM's FlashAttention JVP).

Tested on CPU with ``TRITON_INTERPRET=1``; importing this module needs triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # The interpreter multiplies bfloat16 tiles as raw uint16 bits (triton 3.x): upcast
    # there. On a GPU, bf16 x bf16 products are exact in the fp32 accumulator anyway.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, TQ, TK, TV, TO, CNT, IDX,
    N_Q, N_K, NQB, MAXK, qk_scale, sm_scale,
    BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, TANGENT: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = mb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, BLOCK)
    q_base = bh.to(tl.int64) * N_Q * D
    k_base = bh.to(tl.int64) * N_K * D
    row_ok = offs_m < N_Q
    q_ptrs = q_base + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
    if TANGENT:
        tq = tl.load(TQ + q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        tq = tl.zeros([BLOCK, D], dtype=q.dtype)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    mu = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    acc_t = tl.zeros([BLOCK, D], tl.float32)
    row = bh * NQB + mb
    cnt = tl.load(CNT + row)
    for i in range(0, cnt):
        nb = tl.load(IDX + row * MAXK + i)
        offs_n = nb * BLOCK + offs_j
        col_ok = offs_n < N_K
        kv_ptrs = k_base + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(V + kv_ptrs, mask=col_ok[:, None], other=0.0)
        valid = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(valid, _dot(q, tl.trans(k), UPCAST) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        if TANGENT:
            tk = tl.load(TK + kv_ptrs, mask=col_ok[:, None], other=0.0)
            tv = tl.load(TV + kv_ptrs, mask=col_ok[:, None], other=0.0)
            ds = _dot(tq, tl.trans(k), UPCAST) + _dot(q, tl.trans(tk), UPCAST)
            pds = p * tl.where(valid, ds * sm_scale, 0.0)
            mu = mu * alpha + tl.sum(pds, 1)
            acc_t = acc_t * alpha[:, None] + _dot(pds.to(v.dtype), v, UPCAST)
            acc_t += _dot(p.to(tv.dtype), tv, UPCAST)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows can be empty
    o = acc / l_safe[:, None]
    tl.store(O + q_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, m_i + tl.log2(l_safe), mask=row_ok)
    if TANGENT:
        t = acc_t / l_safe[:, None] - (mu / l_safe)[:, None] * o
        tl.store(TO + q_ptrs, t.to(TO.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _probs(
    q, k, lse, offs_m, offs_n, row_ok, col_ok, qk_scale, CAUSAL: tl.constexpr, UPCAST: tl.constexpr
):
    """Recomputed attention probabilities of one tile from the stored log-sum-exp."""
    valid = col_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        valid = valid & (offs_m[:, None] >= offs_n[None, :])
    s = _dot(q, tl.trans(k), UPCAST) * qk_scale
    return tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CNT_T, IDX_T,
    N_Q, N_K, NKB, MAXQ, qk_scale, sm_scale,
    BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    nb = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = nb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, BLOCK)
    q_base = bh.to(tl.int64) * N_Q * D
    k_base = bh.to(tl.int64) * N_K * D
    col_ok = offs_n < N_K
    kv_ptrs = k_base + offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_ptrs, mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    row = bh * NKB + nb
    cnt = tl.load(CNT_T + row)
    for i in range(0, cnt):
        mb = tl.load(IDX_T + row * MAXQ + i)
        offs_m = mb * BLOCK + offs_j
        row_ok = offs_m < N_Q
        q_ptrs = q_base + offs_m[:, None] * D + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
        p = _probs(q, k, lse, offs_m, offs_n, row_ok, col_ok, qk_scale, CAUSAL, UPCAST)
        dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
        dp = _dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CNT, IDX,
    N_Q, N_K, NQB, MAXK, qk_scale, sm_scale,
    BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = mb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, BLOCK)
    q_base = bh.to(tl.int64) * N_Q * D
    k_base = bh.to(tl.int64) * N_K * D
    row_ok = offs_m < N_Q
    q_ptrs = q_base + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK, D], tl.float32)
    row = bh * NQB + mb
    cnt = tl.load(CNT + row)
    for i in range(0, cnt):
        nb = tl.load(IDX + row * MAXK + i)
        offs_n = nb * BLOCK + offs_j
        col_ok = offs_n < N_K
        kv_ptrs = k_base + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(V + kv_ptrs, mask=col_ok[:, None], other=0.0)
        p = _probs(q, k, lse, offs_m, offs_n, row_ok, col_ok, qk_scale, CAUSAL, UPCAST)
        dp = _dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST)
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def block_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, R, C) bool -> (kept count per row (B*H*R,), kept column indices ascending,
    padded (B*H*R, max count)), both int32, as the kernels read them."""
    m = mask.reshape(-1, mask.shape[-1])
    cnt = m.sum(-1, dtype=torch.int32)
    width = max(1, int(cnt.max()))
    idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)[:, :width]
    return cnt.contiguous(), idx.to(torch.int32).contiguous()


def _pad_d(x: Tensor, d: int) -> Tensor:
    """Contiguous, head dimension zero-padded to the kernel's power of two (zeros change no
    dot product and add output columns that are sliced off)."""
    x = x.contiguous()
    return x if x.shape[-1] == d else torch.nn.functional.pad(x, (0, d - x.shape[-1]))


def _kernel_dim(d: int) -> int:
    if d > 256:
        raise ValueError(f"head dimension {d} > 256 is not supported by the Triton kernel")
    return max(16, triton.next_power_of_2(d))


def _launch_opts(d: int) -> dict:
    return {"num_warps": 4 if d <= 64 else 8}


def _upcast(x: Tensor) -> bool:
    return interpreting() and x.dtype == torch.bfloat16


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    block_size: int,
    causal: bool,
    scale: float,
    tangents: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(output (B, H, Nq, D), log2-sum-exp (B*H, Nq) float32, tangent or None)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[-2]
    dk = _kernel_dim(d)
    qp, kp, vp = (_pad_d(x, dk) for x in (q, k, v))
    o = torch.empty_like(qp)
    lse = torch.empty(b * h, n_q, dtype=torch.float32, device=q.device)
    cnt, idx = block_lists(mask)
    if tangents is None:
        tq = tk = tv = to = qp  # unused pointers
    else:
        tq, tk, tv = (_pad_d(x.to(q.dtype), dk) for x in tangents)
        to = torch.empty_like(qp)
    grid = (mask.shape[-2], b * h)
    _fwd_kernel[grid](
        qp, kp, vp, o, lse, tq, tk, tv, to, cnt, idx,
        n_q, n_k, mask.shape[-2], idx.shape[-1], scale * LOG2E, scale,
        BLOCK=block_size, D=dk, CAUSAL=causal, TANGENT=tangents is not None,
        UPCAST=_upcast(q), **_launch_opts(dk),
    )  # fmt: skip
    tangent = None if tangents is None else to[..., :d]
    return o[..., :d], lse, tangent


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    mask: Tensor,
    block_size: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of the output for an output gradient ``do``."""
    b, h, n_q, d = q.shape
    n_k = k.shape[-2]
    dk_ = _kernel_dim(d)
    qp, kp, vp, dop = (_pad_d(x, dk_) for x in (q, k, v, do.to(q.dtype)))
    # FlashAttention-2's D_i = rowsum(dO * O): one cheap elementwise pass
    delta = (do.float() * o.float()).sum(-1).reshape(b * h, n_q).contiguous()
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    cnt, idx = block_lists(mask)
    cnt_t, idx_t = block_lists(mask.transpose(-1, -2))
    common = dict(BLOCK=block_size, D=dk_, CAUSAL=causal, UPCAST=_upcast(q), **_launch_opts(dk_))
    _bwd_dkdv_kernel[(mask.shape[-1], b * h)](
        qp, kp, vp, dop, lse, delta, dk, dv, cnt_t, idx_t,
        n_q, n_k, mask.shape[-1], idx_t.shape[-1], scale * LOG2E, scale, **common,
    )  # fmt: skip
    _bwd_dq_kernel[(mask.shape[-2], b * h)](
        qp, kp, vp, dop, lse, delta, dq, cnt, idx,
        n_q, n_k, mask.shape[-2], idx.shape[-1], scale * LOG2E, scale, **common,
    )  # fmt: skip
    return dq[..., :d], dk[..., :d], dv[..., :d]
