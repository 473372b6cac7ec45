"""SDS (DreamFusion eq. 3): gradient parity and direction."""

from __future__ import annotations

import pytest
import torch

from fewstep.threed.distill3d import (
    CameraConfig,
    Distill3DConfig,
    distill_scene,
    init_gaussians,
    turntable,
)
from fewstep.threed.prior import PriorAdapter, TimeSchedule
from fewstep.threed.score import SDS, SDSConfig, make_score
from fewstep.threed.score import sds as sds_module

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sds_gradient_is_w_times_eps_hat_minus_eps(score_target_prior):
    """x.grad * B = w(t) (eps_hat - eps) for the same draws (fractions, then eps), and for the
    target prior (x0 = target, no guidance) that is w a / s (x - target) in closed form."""
    ad = PriorAdapter(score_target_prior)
    cfg = SDSConfig(guidance_scale=1.0, weighting="sigma2", schedule=TimeSchedule("uniform"))
    sds = SDS(ad, cfg)
    g0 = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 8, 8, generator=g0).requires_grad_(True)
    cond = torch.tensor([0, 1, 1])
    losses, logs = sds.loss(x, cond, 0, 10, generator=torch.Generator().manual_seed(9))
    losses["scene"].backward()

    g = torch.Generator().manual_seed(9)  # replay: fractions (B,), then eps
    frac = 0.02 + 0.96 * torch.rand(3, generator=g)
    eps = torch.randn(3, 1, 8, 8, generator=g)
    a, s = (1 - frac).reshape(-1, 1, 1, 1), frac.reshape(-1, 1, 1, 1)
    x_t = a * x.detach() + s * eps
    target = score_target_prior.denoiser.net.targets[cond]
    eps_hat = (x_t - a * target) / s
    w = s * s / (a * a + s * s)
    torch.testing.assert_close(x.grad * 3, w * (eps_hat - eps))
    torch.testing.assert_close(x.grad * 3, w * a / s * (x.detach() - target))
    assert logs["t"] == pytest.approx(frac.mean().item())


def _distance_after(prior, steps: int) -> tuple[float, float]:
    ad = PriorAdapter(prior)
    score = make_score("sds", ad, SDSConfig(guidance_scale=1.0))
    cfg = Distill3DConfig(steps=steps, cameras=CameraConfig(views=4, size=16))
    scene = init_gaussians(150, radius=0.5, seed=0)
    target = prior.denoiser.net.targets[0]

    def dist():
        return (ad.to_prior(turntable(scene, 8, cfg)) - target).pow(2).mean().item()

    before = dist()
    distill_scene(scene, score, torch.tensor(0), cfg)
    return before, dist()


def test_sds_moves_renders_toward_the_target_and_a_flipped_sign_does_not(
    score_target_prior, monkeypatch
):
    before, after = _distance_after(score_target_prior, 20)
    assert after < 0.7 * before
    monkeypatch.setattr(sds_module, "sds_gradient", lambda e, n, w: -w * (e - n))
    before_f, after_f = _distance_after(score_target_prior, 20)
    assert before_f == pytest.approx(before)
    assert after_f > before_f


def test_unknown_weighting_and_method_are_named(score_target_prior):
    ad = PriorAdapter(score_target_prior)
    with pytest.raises(ValueError, match="sigma2"):
        SDS(ad, SDSConfig(weighting="snr"))
    with pytest.raises(KeyError, match="tsm"):
        make_score("sjc", ad)
    with pytest.raises(TypeError, match="SDSConfig"):
        SDS(ad, object())
