"""The student's few-step sampler: the paper's time grid and inference-time noise
modulation (analytic variance of the re-noised state), parity with core's plain multistep
sampler at noise_scale 1, the registry and clear errors."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.models import Denoiser
from fewstep.core.samplers import FewStepSampler
from fewstep.protein.model import BackboneTransformerConfig, ProteinaFlow, build_denoiser, centre
from fewstep.protein.sampling import (
    STUDENT_SAMPLERS,
    NoiseModulatedSampler,
    make_student_sampler,
    paper_times,
    thin_times,
)


class Spy(Denoiser):
    """Predicts a fixed clean backbone x_hat and records every input it is given."""

    def __init__(self, x_hat):
        super().__init__(ProteinaFlow(), "x0")
        self.x_hat, self.inputs = x_hat, []

    def forward(self, x_t, t, cond=None):
        self.inputs.append((x_t.clone(), t.clone()))
        return self.x_hat.expand_as(x_t)


def test_paper_time_grid():
    ts = paper_times(8)
    s = torch.round(torch.linspace(30, 400, 8, dtype=torch.float64))
    assert ts == pytest.approx((10 ** (-2 * s / 400)).tolist())
    assert ts[0] == pytest.approx(10**-0.15) and ts[-1] == pytest.approx(0.01)
    assert paper_times(1) == [0.63]  # one step: t_P = 0.37
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))


def test_thinned_times_keep_the_first_steps_and_the_last():
    ts = paper_times(20)
    assert thin_times(ts, 20) == ts
    assert thin_times(ts, 18) == ts[:17] + [ts[-1]]  # drops 0.0157 and 0.0124
    assert thin_times(ts, 2) == [ts[0], ts[-1]]
    assert thin_times([0.63], 1) == [0.63]
    for bad in (0, 1, 21):
        with pytest.raises(ValueError, match="inference steps must be in 2..20"):
            thin_times(ts, bad)
    # a sampler on the thinned grid evaluates the student once per kept time, in order
    spy = Spy(torch.zeros(1, 8, 3))
    out = NoiseModulatedSampler(thin_times(ts, 5), 0.45).sample(spy, torch.randn(2, 8, 3))
    assert out.nfe == 5
    assert [t[0].item() for _, t in spy.inputs] == pytest.approx(ts[:4] + [ts[-1]])


@pytest.mark.parametrize("scale", [0.0, 0.45, 1.0])
def test_noise_modulation_scales_the_renoising_noise(scale):
    """Each step's input is (1 - t_k) x_hat + t_k * scale * eps with centred eps, so its
    spread around (1 - t_k) x_hat is (t_k * scale)^2 (L - 1) / L per coordinate (the
    centred normal loses one residue's worth of variance). Without modulation the spread
    would be t_k^2 (L - 1) / L at every scale."""
    n, length = 4000, 8
    x_hat = centre(torch.randn(1, length, 3, generator=torch.Generator().manual_seed(0)))
    spy = Spy(x_hat)
    times = [0.7, 0.3, 0.05]
    sampler = NoiseModulatedSampler(times, scale, torch.Generator().manual_seed(1))
    out = sampler.sample(spy, torch.randn(n, length, 3))
    assert out.nfe == 3
    torch.testing.assert_close(out.x, x_hat.expand(n, -1, -1))
    assert len(spy.inputs) == 3
    for (x_in, t_in), t in zip(spy.inputs, times, strict=True):
        assert torch.allclose(t_in, torch.full((n,), t))
        prev = torch.zeros_like(x_hat) if t == times[0] else x_hat  # the first estimate is 0
        resid = x_in - (1 - t) * prev
        assert resid.mean(1).abs().max() < 1e-5  # centred noise
        var = resid.var(dim=0).mean().item()
        expected = (t * scale) ** 2 * (length - 1) / length
        assert var == pytest.approx(expected, rel=0.05, abs=1e-10)


def test_scale_one_is_core_plain_multistep():
    """noise_scale = 1 reproduces core's FewStepSampler on the same times and draws (the
    denoiser's x0 ignores the centre of mass, so centring the noise changes nothing)."""
    net = build_denoiser(BackboneTransformerConfig(dim=16, pair_dim=8, heads=2, layers=1,
                                                   cond_dim=16, rbf_bins=8))  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    times, noise = paper_times(4), torch.randn(3, 10, 3)
    ours = NoiseModulatedSampler(times, 1.0, torch.Generator().manual_seed(5)).sample(net, noise)
    core = FewStepSampler(times, generator=torch.Generator().manual_seed(5)).sample(net, noise)
    torch.testing.assert_close(ours.x, core.x, atol=1e-5, rtol=1e-4)
    assert ours.nfe == core.nfe == 4
    half = NoiseModulatedSampler(times, 0.45, torch.Generator().manual_seed(5)).sample(net, noise)
    assert not torch.allclose(half.x, core.x, atol=1e-3)


def test_rollout_stops_at_a_step_for_backward_simulation():
    spy = Spy(centre(torch.randn(1, 6, 3)))
    sampler = NoiseModulatedSampler([0.8, 0.4, 0.1], 1.0)
    draws = []

    def fresh(like):
        draws.append(1)
        return torch.randn_like(like)

    x, t, nfe = sampler.rollout(spy, torch.randn(2, 6, 3), upto=2, fresh=fresh)
    assert nfe == 2 and float(t) == pytest.approx(0.1) and len(draws) == 2
    x, t, nfe = sampler.rollout(spy, torch.randn(2, 6, 3))
    assert t is None and nfe == 3
    torch.testing.assert_close(x, spy.x_hat.expand(2, -1, -1))


def test_registry_and_errors():
    assert set(STUDENT_SAMPLERS) >= {"noise_modulated", "plain"}
    assert isinstance(make_student_sampler("plain", [0.7, 0.2], 1.0), FewStepSampler)
    with pytest.raises(ValueError, match="noise_modulated"):
        make_student_sampler("ddim", [0.5], 1.0)
    with pytest.raises(ValueError, match="no noise modulation"):
        make_student_sampler("plain", [0.5], 0.45)
    with pytest.raises(ValueError, match="strictly decrease"):
        NoiseModulatedSampler([0.3, 0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseModulatedSampler([1.5])
    with pytest.raises(ValueError, match="noise_scale"):
        NoiseModulatedSampler([0.5], -0.1)
    with pytest.raises(ValueError, match=">= 1"):
        paper_times(0)
