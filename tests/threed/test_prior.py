"""PriorAdapter: renders into prior space, guided predictions, time schedules."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.threed.prior import (
    LUMA,
    SCHEDULES,
    PriorAdapter,
    TimeSchedule,
    draw_fractions,
    schedule_range,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_to_prior_is_luma_area_average_scaled(score_target_prior):
    ad = PriorAdapter(score_target_prior)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 32, 32, 3, generator=g, requires_grad=True)
    x = ad.to_prior(img)
    assert x.shape == (2, 1, 8, 8)
    # plain reference: luma per pixel, mean over each 4x4 block, [0, 1] -> [-1, 1]
    grey = sum(w * img[..., i] for i, w in enumerate(LUMA))
    ref = grey.reshape(2, 8, 4, 8, 4).mean((2, 4))[:, None] * 2 - 1
    torch.testing.assert_close(x, ref)
    x.sum().backward()  # differentiable back to the render
    assert img.grad is not None and img.grad.abs().sum() > 0
    torch.testing.assert_close(ad.from_prior(x), ((x + 1) / 2).clamp(0, 1))


def test_to_prior_rejects_channel_first(score_target_prior):
    with pytest.raises(ValueError, match=r"\(C, H, W, 3\)"):
        PriorAdapter(score_target_prior).to_prior(torch.zeros(2, 3, 8, 8))


def test_guided_eps_matches_hand_cfg(score_target_prior):
    """For the target prior, x0 = target[c]: guided x0 = u + s (c - u), eps = (x_t - a x0)/s."""
    ad = PriorAdapter(score_target_prior, guidance_scale=3.0)
    tg = score_target_prior.denoiser.net.targets
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    cond = torch.tensor([0, 1, 0])
    x0 = tg[2] + 3.0 * (tg[cond] - tg[2])
    a, s = (1 - t).reshape(-1, 1, 1, 1), t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ad.predict(x_t, t, cond, "eps"), (x_t - a * x0) / s)
    torch.testing.assert_close(ad.predict(x_t, t, cond, "x0", guidance_scale=1.0), tg[cond])


def test_guidance_needs_a_null_condition(score_gaussian_prior):
    with pytest.raises(ValueError, match="null_cond"):
        PriorAdapter(score_gaussian_prior, guidance_scale=7.5)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_hit_their_endpoints(name):
    s = TimeSchedule(name, t_min=0.02, t_max=0.98, t_max_end=0.5, switch=0.2)
    lo0, hi0 = schedule_range(s, 0, 100)
    lo1, hi1 = schedule_range(s, 100, 100)
    assert lo0 == lo1 == 0.02 and hi0 == 0.98
    assert hi1 == (0.98 if name == "uniform" else 0.5)


def test_schedule_shapes_between_the_endpoints():
    lin = TimeSchedule("linear", 0.0, 1.0, 0.5, anneal_until=0.5)
    assert schedule_range(lin, 25, 100)[1] == pytest.approx(0.75)  # half-way through warm-up
    assert schedule_range(lin, 60, 100)[1] == pytest.approx(0.5)  # annealed
    sq = TimeSchedule("sqrt", 0.0, 0.7, 0.1)
    assert schedule_range(sq, 25, 100)[1] == pytest.approx(0.7 - 0.6 * math.sqrt(0.25))
    pro = TimeSchedule("prolific", 0.02, 0.98, 0.5, switch=0.2)
    assert schedule_range(pro, 19, 100)[1] == 0.98 and schedule_range(pro, 20, 100)[1] == 0.5


def test_draws_stay_in_range_and_deterministic_is_the_upper_end():
    s = TimeSchedule("uniform", 0.3, 0.4)
    f = draw_fractions(s, 500, 0, 10, torch.Generator().manual_seed(0))
    assert f.min() >= 0.3 and f.max() <= 0.4 and f.std() > 0.02
    d = TimeSchedule("sqrt", 0.1, 0.7, 0.1, deterministic=True)
    assert torch.equal(draw_fractions(d, 4, 100, 100), torch.full((4,), 0.1))


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="uniform"):
        schedule_range(TimeSchedule("cosine"), 0, 10)
    with pytest.raises(ValueError, match="t_min"):
        schedule_range(TimeSchedule("uniform", 0.5, 0.4), 0, 10)
