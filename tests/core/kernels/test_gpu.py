"""CUDA-only checks: the compiled Triton kernels (not the interpreter) against PyTorch's
flash SDPA at GPU sizes, and the optional xformers backend. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.kernels import attention, attention_with_tangent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_compiled_kernels_match_flash_sdpa(dtype, d, assert_close):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, d, device="cuda", dtype=dtype) for _ in range(3))
    for causal in (False, True):
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = attention(*xs, causal=causal)  # auto: triton on CUDA
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=causal)
        assert_close(out, ref, dtype, f"output causal={causal}")
        do = torch.randn_like(ref)
        out.backward(do.to(dtype))
        ref.backward(do)
        for name, a, b in zip("qkv", xs, ref_in):
            assert_close(a.grad, b.grad, dtype, f"d{name} causal={causal}")


def test_compiled_jvp_matches_func_jvp(assert_close):
    torch.manual_seed(0)
    xs = [torch.randn(1, 4, 777, 64, device="cuda") for _ in range(6)]
    o, t = attention_with_tangent(*xs)
    o_ref, t_ref = torch.func.jvp(
        lambda a, b, c: attention(a, b, c, backend="sdpa"), tuple(xs[:3]), tuple(xs[3:])
    )
    assert_close(o, o_ref, torch.float32, "output")
    assert_close(t, t_ref, torch.float32, "tangent")


def test_xformers_backend_when_installed(assert_close):
    pytest.importorskip("xformers")
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.rand(1, 2, 5, 5, device="cuda") < 0.5
    mask |= torch.eye(5, dtype=torch.bool, device="cuda")
    ref = attention(q.float(), k.float(), v.float(), mask, backend="sdpa")
    assert_close(attention(q, k, v, mask, backend="xformers"), ref, torch.float16, "xformers")
