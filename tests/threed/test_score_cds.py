"""CDS (Consistent3D): parity with a plain re-computation, the shared ODE noise, direction."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.threed.prior import PriorAdapter, TimeSchedule
from fewstep.threed.score import CDS, CDSConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_cds_gradient_matches_a_plain_recomputation(score_mixed_prior):
    """x_n = a x + s eps*; one DDIM step of the guided prior n -> t; grad = w (eps_n - eps_t).
    The prior's x0 depends on x_t (a fixed conv), so the ODE step is not trivial."""
    net = score_mixed_prior.denoiser.net
    cfg = CDSConfig(guidance_scale=3.0, guidance_scale_end=1.0, weighting="sigma2")
    cds = CDS(PriorAdapter(score_mixed_prior), cfg, seed=7)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    cond = torch.tensor([0, 1])
    losses, logs = cds.loss(x, cond, 5, 10, generator=torch.Generator().manual_seed(2))
    losses["scene"].backward()

    g = torch.Generator().manual_seed(2)  # deterministic t: only the gaps are drawn
    frac = 0.7 - 0.6 * math.sqrt(0.5)
    gap = 0.1 + 0.2 * torch.rand(2, generator=g)
    n_frac = (frac + gap).clamp(max=0.98)
    eps_star = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    scale = 3.0 + (1.0 - 3.0) * 0.5

    def x0_guided(z, c):
        u = net.targets[2] + net.mix(z)
        return u + scale * (net.targets[c] + net.mix(z) - u)

    grads = []
    with torch.no_grad():
        for i in range(2):
            xi, c = x[i : i + 1].detach(), cond[i : i + 1]
            an, sn = 1 - n_frac[i], n_frac[i]
            at, st = 1 - frac, frac
            xn = an * xi + sn * eps_star
            x0n = x0_guided(xn, c)
            eps_n = (xn - an * x0n) / sn
            x_ode = at * x0n + st * eps_n  # DDIM n -> t
            eps_t = (x_ode - at * x0_guided(x_ode, c)) / st
            grads.append(sn**2 / (an**2 + sn**2) * (eps_n - eps_t))
    torch.testing.assert_close(x.grad * 2, torch.cat(grads))
    assert logs["guidance_scale"] == pytest.approx(2.0)


def test_shared_noise_makes_the_prior_deterministic(score_mixed_prior):
    """With one eps* and fixed times, the gradient does not depend on the step's generator;
    with fresh noise (SDS-like) it does."""
    ad = PriorAdapter(score_mixed_prior)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 1])

    def grad(shared: bool, seed: int) -> torch.Tensor:
        cds = CDS(ad, CDSConfig(guidance_scale=2.0, gap=(0.2, 0.2), shared_noise=shared), seed=3)
        xr = x.clone().requires_grad_(True)
        cds.loss(xr, cond, 0, 10, generator=torch.Generator().manual_seed(seed))[0][
            "scene"
        ].backward()
        return xr.grad

    torch.testing.assert_close(grad(True, 1), grad(True, 2))
    assert not torch.allclose(grad(False, 1), grad(False, 2))
    assert "noise" in CDS(ad, CDSConfig(), seed=3).state_dict()  # checkpointed


def test_cds_pulls_toward_gaussian_data(score_gaussian_prior, distance_after_optimising):
    """Optimising images directly by CDS under the exact prior of N(mu, 0.5^2) data brings
    them toward mu (a sign or weighting error would push them away or stall)."""
    ad = PriorAdapter(score_gaussian_prior)
    cds = CDS(ad, CDSConfig(guidance_scale=1.0, guidance_scale_end=1.0), seed=0)
    before, after = distance_after_optimising(cds)
    assert after < 0.5 * before


def test_bad_gap_is_named(score_target_prior):
    with pytest.raises(ValueError, match="gap"):
        CDS(PriorAdapter(score_target_prior), CDSConfig(gap=(0.0, 0.1)))


def test_schedule_default_is_the_papers(score_target_prior):
    s = CDSConfig().schedule
    assert isinstance(s, TimeSchedule) and s.name == "sqrt" and s.deterministic
    assert (s.t_max, s.t_max_end) == (0.7, 0.1)
