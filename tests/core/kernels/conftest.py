"""Kernel tests run the Triton kernels on CUDA when there is one, else in Triton's CPU
interpreter. ``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here,
before any test module imports ``fewstep.core.kernels.triton_attention``."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances of the Triton kernels against the float32 math reference, as a fraction of the
# reference's largest magnitude: accumulation is float32 in both, so what is left is the
# rounding of inputs and of P before P @ V (FlashAttention-2 does the same).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def assert_close():
    """Check ``out`` against the float32 ``ref`` at the tolerance of ``dtype``."""

    def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
        assert torch.isfinite(out).all(), f"{what}: non-finite values"
        err = (out.float() - ref.float()).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"

    return check
