"""Attention with a forward-mode tangent: the fused Triton kernel against ``torch.func.jvp``
of the float32 math reference, ``torch.func.jvp`` / ``forward_ad`` through ``attention``, and
gradients through both outputs."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad

from fewstep.core.kernels import attention, attention_with_tangent, triton_attention
from fewstep.core.kernels.masks import validate_block_mask
from fewstep.core.kernels.reference import attention_jvp_reference


def _inputs(n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, 2, n, d, generator=g) for _ in range(6)]
    return [x.to(device=device, dtype=dtype) for x in xs]


def _mask(nb, seed=3):
    m = torch.rand(1, 2, nb, nb, generator=torch.Generator().manual_seed(seed)) < 0.5
    return m | torch.eye(nb, dtype=torch.bool)


@pytest.mark.parametrize(
    ("dtype", "causal"),
    [(torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, True)],
)
def test_fused_tangent_matches_func_jvp_of_reference(dtype, causal, device, assert_close):
    bs, n = 16, 75
    q, k, v, tq, tk, tv = _inputs(n, 32, dtype, device)
    mask = _mask(5)
    o, t = attention_with_tangent(q, k, v, tq, tk, tv, mask, block_size=bs, causal=causal,
                                  backend="triton")  # fmt: skip
    full = validate_block_mask(mask.to(device), 1, 2, n, n, bs, causal)
    o_ref, t_ref = attention_jvp_reference(q, k, v, tq, tk, tv, full, bs, causal, 32**-0.5)
    assert_close(o, o_ref, dtype, "output")
    assert_close(t, t_ref, dtype, "tangent")


class _AttentionLayer(torch.nn.Module):
    """A model that calls fewstep's attention: projections, heads, attention, output."""

    def __init__(self, dim=32, heads=2, backend="sdpa"):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.heads, self.backend = heads, backend

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, block_size=16, backend=self.backend)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def test_func_jvp_of_a_model_uses_the_fused_kernel(monkeypatch, device, assert_close):
    torch.manual_seed(0)
    model = _AttentionLayer(backend="triton").to(device)
    x, tx = (torch.randn(2, 40, 32, device=device) for _ in range(2))
    calls = []
    real = triton_attention.forward

    def spy(*args, **kwargs):
        calls.append(len(args) > 7 or kwargs.get("tangents") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "forward", spy)
    out, tangent = torch.func.jvp(model, (x,), (tx,))
    assert True in calls, "the tangent did not come from the fused Triton kernel"
    model.backend = "sdpa"
    out_ref, tangent_ref = torch.func.jvp(model, (x,), (tx,))
    assert_close(out, out_ref, torch.float32, "output")
    assert_close(tangent, tangent_ref, torch.float32, "tangent")
    # and with the dual-tensor API of torch.autograd.forward_ad
    model.backend = "triton"
    with fwad.dual_level():
        dual_tangent = fwad.unpack_dual(model(fwad.make_dual(x, tx))).tangent
    assert_close(dual_tangent, tangent_ref, torch.float32, "forward_ad tangent")


def test_gradients_through_output_and_tangent(device, assert_close):
    """A training step can use both outputs: the output's gradient comes from the Triton
    backward, the tangent's from the reference; both must match autograd of the reference."""
    q, k, v, tq, tk, tv = _inputs(40, 16, torch.float32, device, seed=1)
    w_o, w_t = torch.randn(2, 1, 2, 40, 16, device=device)
    grads = {}
    for backend in ("triton", "sdpa"):
        xs = [x.detach().requires_grad_() for x in (q, k, v, tq, tk, tv)]
        o, t = attention_with_tangent(*xs, block_size=16, backend=backend)
        ((o * w_o).sum() + (t * w_t).sum()).backward()
        grads[backend] = [x.grad for x in xs]
    for name, g, g_ref in zip(["q", "k", "v", "tq", "tk", "tv"], *grads.values()):
        assert_close(g, g_ref, torch.float32, f"d{name}")
