"""TSM (Dreamer XL): parity with a plain re-computation, deterministic inversion, direction."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.threed.prior import PriorAdapter, TimeSchedule
from fewstep.threed.score import TSM, TSMConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def _ddim(x, f_from, f_to, x0_fn):
    """One plain DDIM step on the rectified flow (alpha = 1 - f, sigma = f)."""
    x0 = x0_fn(x)
    eps = (x - (1 - f_from) * x0) / f_from
    return (1 - f_to) * x0 + f_to * eps


def test_tsm_gradient_matches_a_plain_recomputation(score_mixed_prior):
    net = score_mixed_prior.denoiser.net
    cfg = TSMConfig(guidance_scale=2.0, schedule=TimeSchedule("uniform", 0.3, 0.9))
    tsm = TSM(PriorAdapter(score_mixed_prior), cfg)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    cond = torch.tensor([1, 0])
    tsm.loss(x, cond, 0, 10, generator=torch.Generator().manual_seed(3))[0]["scene"].backward()

    g = torch.Generator().manual_seed(3)  # replay: t fractions, then the start noise
    frac = 0.3 + 0.6 * torch.rand(2, generator=g)
    noise = torch.randn(2, 1, 8, 8, generator=g)

    def uncond(z):
        return net.targets[2] + net.mix(z)

    grads = []
    with torch.no_grad():
        for i in range(2):
            t = frac[i].item()
            s = t - 0.10  # delta_t_start at step 0
            mu = s + (t - s) * math.sqrt(1 - 0.3**2)
            cur = 0.01  # start_min (s - 5 * 0.2 < 0.01)
            z = (1 - cur) * x[i : i + 1].detach() + cur * noise[i : i + 1]
            while cur < s:  # DDIM inversion in strides of 0.2, unconditional
                nxt = min(cur + 0.2, s)
                z = _ddim(z, cur, nxt, uncond)
                cur = nxt
            x_t = _ddim(z, s, t, uncond)
            x_mu = _ddim(z, s, mu, uncond)
            eps_mu = (x_mu - (1 - mu) * uncond(x_mu)) / mu
            c = cond[i : i + 1]
            x0g = uncond(x_t) + 2.0 * (net.targets[c] + net.mix(x_t) - uncond(x_t))
            eps_t = (x_t - (1 - t) * x0g) / t
            grads.append(t / (1 - t) * (eps_t - eps_mu))
    torch.testing.assert_close(x.grad * 2, torch.cat(grads), rtol=1e-3, atol=1e-4)


def test_inversion_is_deterministic(score_mixed_prior):
    tsm = TSM(PriorAdapter(score_mixed_prior), TSMConfig())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    frac, cond = torch.tensor([0.3, 0.6, 0.95]), torch.tensor([0, 1, 0])
    a = tsm.invert(x, frac, cond, noise, 0, 10)
    b = tsm.invert(x, frac, cond, noise, 0, 10)
    for u, v in zip(a[:3], b[:3]):
        assert torch.equal(u, v)
    x_s, x_t, x_mu, (s, mu) = a
    assert bool((s < mu).all() and (mu < frac).all())
    assert not torch.allclose(x_t, x_mu)  # two different paths from the same x_s


def test_interval_anneals_between_its_endpoints(score_target_prior):
    tsm = TSM(PriorAdapter(score_target_prior), TSMConfig())  # warm-up: first 30 % of the run
    t = torch.tensor([0.5])
    assert tsm.fractions(t, 0, 100)[1].item() == pytest.approx(0.40)
    assert tsm.fractions(t, 30, 100)[1].item() == pytest.approx(0.42)
    assert tsm.fractions(t, 100, 100)[1].item() == pytest.approx(0.42)


def test_tsm_pulls_toward_gaussian_data(score_gaussian_prior, distance_after_optimising):
    tsm = TSM(PriorAdapter(score_gaussian_prior), TSMConfig(guidance_scale=1.0))
    before, after = distance_after_optimising(tsm)
    assert after < 0.5 * before


def test_bad_config_is_named(score_target_prior):
    with pytest.raises(ValueError, match="gamma"):
        TSM(PriorAdapter(score_target_prior), TSMConfig(gamma=1.0))
