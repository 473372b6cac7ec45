"""Block-sparse attention: Triton forward and backward against the float32 math reference,
the other backends against each other, and the mask contract (no empty rows)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from fewstep.core.kernels import attention, dispatch
from fewstep.core.kernels.masks import num_blocks, validate_block_mask
from fewstep.core.kernels.reference import math_attention


def _qkv(b, h, n_q, n_k, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k, v = (torch.randn(b, h, n_k, d, generator=g) for _ in range(2))
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def _random_mask(b, h, nqb, nkb, density=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, nqb, nkb, generator=g) < density
    m[..., torch.arange(min(nqb, nkb)), torch.arange(min(nqb, nkb))] = True  # keep each row alive
    return m


def _reference(q, k, v, mask, bs, causal):
    """Output and input gradients of the float32 math reference for a fixed output grad."""
    b, h, n_q, d = q.shape
    full = validate_block_mask(mask.to(q.device), b, h, n_q, k.shape[-2], bs, causal)
    xs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = math_attention(*xs, full, bs, causal, d**-0.5)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    out.backward(do)
    return out, do, [x.grad for x in xs]


@pytest.mark.parametrize(
    ("dtype", "causal"),
    [(torch.float32, False), (torch.float32, True), (torch.float16, True), (torch.bfloat16, False)],
)
def test_triton_forward_and_backward_match_reference(dtype, causal, device, assert_close):
    # 100 tokens in blocks of 32: the last block is partial (padding inside the kernel)
    bs, n = 32, 100
    q, k, v = _qkv(1, 2, n, n, 64, dtype, device)
    mask = _random_mask(1, 2, num_blocks(n, bs), num_blocks(n, bs))
    ref, do, ref_grads = _reference(q, k, v, mask, bs, causal)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*xs, mask, block_size=bs, causal=causal, backend="triton")
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "output")
    out.backward(do.to(dtype))
    for name, x, g in zip("qkv", xs, ref_grads):
        assert_close(x.grad, g, dtype, f"d{name}")


@pytest.mark.parametrize(("n_q", "n_k", "d"), [(50, 90, 128), (40, 40, 40)])
def test_triton_cross_attention_and_head_dims(n_q, n_k, d, device, assert_close):
    """Queries and keys of different lengths; head 128, and an odd head (40, zero-padded)."""
    bs = 16
    q, k, v = _qkv(2, 1, n_q, n_k, d, torch.float32, device)
    mask = _random_mask(2, 1, num_blocks(n_q, bs), num_blocks(n_k, bs), density=0.5)
    ref, do, ref_grads = _reference(q, k, v, mask, bs, False)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*xs, mask, block_size=bs, backend="triton")
    assert_close(out, ref, torch.float32, "output")
    out.backward(do)
    for name, x, g in zip("qkv", xs, ref_grads):
        assert_close(x.grad, g, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", ["triton", "blockwise", "sdpa", "flex"])
def test_all_ones_mask_is_dense_attention(backend, device, assert_close):
    q, k, v = _qkv(1, 2, 48, 48, 32, torch.float32, device)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = attention(q, k, v, block_size=16, backend=backend)  # no mask: every tile kept
    assert_close(out, dense, torch.float32, backend)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(attention(q, k, v, block_size=16, causal=True, backend=backend), causal,
                 torch.float32, f"{backend} causal")  # fmt: skip


@pytest.mark.parametrize("backend", ["blockwise", "sdpa", "flex"])
def test_cpu_backends_match_reference(backend, device, assert_close):
    bs, n = 16, 70
    q, k, v = _qkv(2, 2, n, n, 32, torch.float32, device)
    mask = _random_mask(2, 2, num_blocks(n, bs), num_blocks(n, bs), density=0.3)
    for causal in (False, True):
        ref, *_ = _reference(q, k, v, mask, bs, causal)
        out = attention(q, k, v, mask, block_size=bs, causal=causal, backend=backend)
        assert_close(out, ref, torch.float32, f"{backend} causal={causal}")


@pytest.mark.parametrize("backend", ["triton", "blockwise"])
def test_masked_tiles_are_not_read(backend, device):
    """Keys and values in a dropped tile cannot change the output; in a kept tile they do."""
    bs, n = 16, 64
    q, k, v = _qkv(1, 1, n, n, 16, torch.float32, device)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, 0] = mask[..., 0, 1] = True
    mask[..., 1:, 2] = True
    base = attention(q, k, v, mask, block_size=bs, backend=backend)
    for block, changes in ((3, False), (1, True)):
        k2, v2 = k.clone(), v.clone()
        k2[..., block * bs : (block + 1) * bs, :] += 5.0
        v2[..., block * bs : (block + 1) * bs, :] -= 5.0
        out = attention(q, k2, v2, mask, block_size=bs, backend=backend)
        assert (not torch.equal(out[..., :bs, :], base[..., :bs, :])) == changes


def test_masks_that_would_leave_a_row_empty_are_refused():
    q = torch.randn(1, 1, 64, 16)
    empty_row = torch.ones(4, 4, dtype=torch.bool)
    empty_row[2] = False
    with pytest.raises(ValueError, match="at least one key block"):
        attention(q, q, q, empty_row, block_size=16)
    future_only = torch.zeros(4, 4, dtype=torch.bool)
    future_only[:, 3] = True  # rows 0-2 keep only a block after their diagonal
    with pytest.raises(ValueError, match="at or before the diagonal"):
        attention(q, q, q, future_only, block_size=16, causal=True)


def test_bad_inputs_name_what_was_expected():
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match=r"expected \(B\|1, H\|1, 4, 4\)"):
        attention(q, q, q, torch.ones(3, 4, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match="bool"):
        attention(q, q, q, torch.ones(4, 4), block_size=16)
    with pytest.raises(ValueError, match="multiple of 16"):
        attention(q, q, q, block_size=20)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match=r"\(batch, heads, tokens, head_dim\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*triton"):
        attention(q, q, q, backend="fast")
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(q, q[..., :32, :], q[..., :32, :], causal=True, block_size=16)


def test_dispatch_picks_reference_on_cpu_and_logs_a_fallback_once(monkeypatch, caplog):
    assert dispatch._choose(torch.zeros(1), "auto") == "sdpa"
    fake_cuda = SimpleNamespace(is_cuda=True)
    assert dispatch._choose(fake_cuda, "auto") == (
        "triton" if dispatch.triton_available() else "sdpa"
    )
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    dispatch._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        for _ in range(3):
            assert dispatch._choose(fake_cuda, "auto") == "sdpa"
    assert sum("triton is not importable" in r.message for r in caplog.records) == 1


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention(q, q, q, block_size=16, backend="triton")
