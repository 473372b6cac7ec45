"""Plain PyTorch block-sparse attention: the references the Triton kernels are tested
against, and the CPU backends of the dispatch.

Shapes: q (B, H, Nq, D), k and v (B, H, Nk, D); ``mask`` is a validated (B, H, Nqb, Nkb)
block mask (``masks.validate_block_mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_mask(mask: Tensor, n_q: int, n_k: int, block_size: int, causal: bool) -> Tensor:
    """(B, H, Nq, Nk) bool: the block mask expanded to tokens, causal applied per token."""
    full = mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    full = full[..., :n_q, :n_k]
    if causal:
        full = full & torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).tril()
    return full


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block_size: int, causal: bool, scale: float
) -> Tensor:
    """Block mask expanded for ``scaled_dot_product_attention``: dense compute, exact
    result, differentiable in both modes (under forward AD through SDPA's math backend:
    PyTorch's fused CPU/flash kernels have no forward-mode rule)."""
    if bool(mask.all()):  # dense: no mask tensor, so SDPA may use its fused kernels
        m = None
    else:
        m = token_mask(mask, q.shape[-2], k.shape[-2], block_size, causal)
        causal = False  # the token mask holds it
    if _forward_ad(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, m, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, m, is_causal=causal, scale=scale)


def _forward_ad(*xs: Tensor) -> bool:
    """Whether a tensor carries a forward-mode tangent (torch.func transforms wrap tensors;
    ``torch.autograd.forward_ad`` makes dual tensors)."""
    import torch.autograd.forward_ad as fwad

    return any(
        torch._C._functorch.is_functorch_wrapped_tensor(x)
        or fwad.unpack_dual(x).tangent is not None
        for x in xs
    )


def math_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block_size: int, causal: bool, scale: float
) -> Tensor:
    """softmax(scale q k^T + mask) v written out in float32: the reference of references."""
    s = scale * q.float() @ k.float().transpose(-1, -2)
    m = token_mask(mask, q.shape[-2], k.shape[-2], block_size, causal)
    return (s.masked_fill(~m, float("-inf")).softmax(-1) @ v.float()).to(q.dtype)


def blockwise_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block_size: int, causal: bool, scale: float
) -> Tensor:
    """Tile by tile with an online softmax, skipping masked tiles: the Triton kernel's
    algorithm in PyTorch (FlashAttention-2, Dao 2023, Alg. 1), so compute falls with density
    on CPU too. Differentiable by autograd (it is plain tensor code)."""
    b, h, n_q, d = q.shape
    n_k, bs = k.shape[-2], block_size
    out = torch.empty(b, h, n_q, v.shape[-1], dtype=q.dtype, device=q.device)
    qf, kf, vf = q.float() * scale, k.float(), v.float()
    for i in range(mask.shape[-2]):
        qs = slice(i * bs, min((i + 1) * bs, n_q))
        keep = mask[..., i, :]  # (B, H, Nkb)
        # one (batch, head) pair at a time: each has its own kept tiles
        for bh in range(b * h):
            bi, hi = divmod(bh, h)
            cols = keep[bi, hi].nonzero().flatten().tolist()
            qi = qf[bi, hi, qs]
            m_run = torch.full((qi.shape[0], 1), float("-inf"), device=q.device)
            l_run = torch.zeros_like(m_run)
            acc = torch.zeros(qi.shape[0], v.shape[-1], device=q.device)
            for j in cols:
                ks = slice(j * bs, min((j + 1) * bs, n_k))
                s = qi @ kf[bi, hi, ks].T
                if causal:
                    qpos = torch.arange(qs.start, qs.stop, device=q.device)[:, None]
                    kpos = torch.arange(ks.start, ks.stop, device=q.device)[None, :]
                    s = s.masked_fill(kpos > qpos, float("-inf"))
                m_new = torch.maximum(m_run, s.amax(-1, keepdim=True))
                m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
                p = (s - m_safe).exp()
                alpha = (m_run - m_safe).exp()
                l_run = l_run * alpha + p.sum(-1, keepdim=True)
                acc = acc * alpha + p @ vf[bi, hi, ks]
                m_run = m_new
            out[bi, hi, qs] = (acc / l_run).to(q.dtype)
    return out


def attention_jvp_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor,
    tk: Tensor,
    tv: Tensor,
    mask: Tensor,
    block_size: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(output, tangent) by ``torch.func.jvp`` of the float32 math attention."""

    def f(q_, k_, v_):
        return math_attention(q_, k_, v_, mask, block_size, causal, scale)

    as32 = [t.float() for t in (q, k, v)]
    o, t = torch.func.jvp(f, tuple(as32), tuple(t.float() for t in (tq, tk, tv)))
    return o.to(q.dtype), t.to(q.dtype)
