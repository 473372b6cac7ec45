"""The flow-matching teacher: rotation augmentation, centring, training through core's
Trainer, caching, and Proteina's sampler against an analytic velocity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.core.batch import StepRNG
from fewstep.core.models import Denoiser
from fewstep.protein.model import BackboneTransformerConfig, ProteinaFlow, centre
from fewstep.protein.teacher import (
    AugmentedFragments,
    ProteinaSampler,
    TeacherConfig,
    load_teacher,
    proteina_times,
    random_rotations,
    train_teacher,
)

TINY_NET = BackboneTransformerConfig(dim=16, pair_dim=8, heads=2, layers=2, cond_dim=16, rbf_bins=8)


def noisy_helices(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length, 3) Å: ideal alpha helices (1.5 Å rise, 100 deg per residue, radius 2.3 Å)
    with 0.3 Å noise, random start phases: synthetic CA data built here."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    ang = phase + i * math.radians(100.0)
    ca = torch.stack([2.3 * torch.cos(ang), 2.3 * torch.sin(ang), 1.5 * i.expand(n, -1)], -1)
    return ca + 0.3 * torch.randn(ca.shape, generator=g)


# ------------------------------------------------------------------------- rotations


def test_rotations_are_proper_and_orthogonal():
    rot = random_rotations(torch.randn(500, 4, generator=torch.Generator().manual_seed(1)))
    eye = torch.eye(3).expand(500, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(500), atol=1e-5, rtol=0)


def test_rotations_are_uniform_on_so3():
    """Haar measure: the rotation angle has CDF (theta - sin theta) / pi and E[R] = 0.
    Normalised quaternions of *uniform* (not Gaussian) 4-vectors fail the KS bound."""
    from scipy.stats import kstest

    def angle_ks(rot):
        cos = ((rot.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
        theta = torch.arccos(cos).double().numpy()
        return kstest(theta, lambda a: (a - np.sin(a)) / np.pi).statistic

    g = torch.Generator().manual_seed(2)
    rot = random_rotations(torch.randn(20_000, 4, generator=g))
    assert angle_ks(rot) < 0.015
    assert rot.mean(0).abs().max() < 0.02
    cube = random_rotations(torch.rand(20_000, 4, generator=g) * 2 - 1)
    assert angle_ks(cube) > 0.02  # the check can tell a non-uniform sampler


def test_rotation_input_is_checked():
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        random_rotations(torch.randn(3, 3))


# ---------------------------------------------------------------------- augmentation


def test_augmented_fragments_are_centred_rotated_nm():
    ca = noisy_helices(5, 12)
    data = AugmentedFragments(ca)
    assert data.sample_shape == (12, 3)
    x, cond = data(StepRNG(0, 3, 0, 64, 0, 64))
    assert cond is None and x.shape == (64, 12, 3)
    assert x.mean(1).abs().max() < 1e-5  # centre of mass removed
    # same internal distances (in nm) as a source fragment; orientation changed
    d = torch.cdist(x, x) * 10
    src = torch.cdist(ca, ca)
    match = [(d[k] - src).abs().amax((1, 2)).min().item() for k in range(64)]
    assert max(match) < 1e-3
    plain = AugmentedFragments(ca, rotate=False)(StepRNG(0, 3, 0, 64, 0, 64))[0]
    assert not torch.allclose(plain, x, atol=1e-2)
    # the step's generator decides: same step, same batch (exact resume)
    torch.testing.assert_close(x, data(StepRNG(0, 3, 0, 64, 0, 64))[0])


def test_fragments_must_be_a_batch_of_traces():
    with pytest.raises(ValueError, match=r"\(N, L, 3\)"):
        AugmentedFragments(torch.zeros(0, 10, 3))


# -------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_cfg():
    return TeacherConfig(
        length=12, model=TINY_NET, steps=60, batch_size=32, lr=3e-3, warmup_steps=5,
        ema_decay=0.9, sample_steps=20,
    )  # fmt: skip


def test_teacher_trains_with_core_trainer(tiny_cfg):
    teacher = train_teacher(tiny_cfg, ca=noisy_helices(64, 12))
    losses = [h["loss/student"] for h in teacher.train_history if "loss/student" in h]
    assert len(losses) >= 10  # log_every = steps // 20
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_load_teacher_caches_by_config(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, length=16, stride=16, steps=3)
    a, info = load_teacher(cfg)
    assert not info["cached"] and list((tmp_path / "protein").glob("*.safetensors"))
    b, info = load_teacher(dataclasses.replace(cfg, sample_steps=7))  # sampling: same weights
    assert info["cached"]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# -------------------------------------------------------------------------- sampling


class PointMass(Denoiser):
    """The exact denoiser of a single-point data distribution at x_star: x0 = x_star."""

    def __init__(self, x_star):
        super().__init__(ProteinaFlow(), "x0")
        self.x_star = x_star

    def forward(self, x_t, t, cond=None):
        return self.x_star.expand_as(x_t)


def test_proteina_times_match_the_log_schedule():
    ts = proteina_times(400, 2.0)
    assert ts.shape == (401,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert (ts[1:] < ts[:-1]).all()
    i = torch.arange(401, dtype=torch.float64)
    ref = 1 - (1 - 10 ** (-2 * i / 400)) / (1 - 10**-2.0)
    torch.testing.assert_close(ts.double(), ref, atol=1e-6, rtol=0)
    # steps crowd near the data: the last step is ~100x smaller than the first
    steps = ts[:-1] - ts[1:]
    assert steps[-1] < steps[0] / 50


@pytest.mark.parametrize("mode", ["vf", "sc"])
def test_sampler_lands_on_a_point_mass(mode):
    """Euler on the exact velocity (x - x*) / t telescopes to x* on any grid ending at 0;
    the stochastic sampler's last steps are the ODE, so it lands too."""
    x_star = centre(torch.randn(1, 10, 3))
    sampler = ProteinaSampler(steps=400, mode=mode, noise_scale=0.45,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = sampler.sample(PointMass(x_star), torch.randn(4, 10, 3))
    assert out.nfe == 400
    torch.testing.assert_close(out.x, x_star.expand(4, -1, -1), atol=1e-4, rtol=0)


class Gaussian(Denoiser):
    """The exact denoiser of centred isotropic Gaussian data N(0, s^2 I) on the rectified flow:
    E[x0 | x_t] = (1 - t) s^2 / ((1 - t)^2 s^2 + t^2) x_t."""

    def __init__(self, s: float):
        super().__init__(ProteinaFlow(), "x0")
        self.s2 = s * s

    def forward(self, x_t, t, cond=None):
        t = t.view(-1, 1, 1)
        return (1 - t) * self.s2 / ((1 - t) ** 2 * self.s2 + t**2) * x_t


def test_stochastic_sampler_samples_gaussian_data_and_lowers_the_temperature():
    """On exact Gaussian scores the ODE and the full-temperature SDE (noise_scale 1) both
    reproduce the data std; noise_scale 0.45 (Proteina's low temperature) shrinks it. A wrong
    sign or scale of the score term, of g or of the noise breaks the noise_scale-1 std."""
    s, noise = 0.5, torch.randn(512, 10, 3, generator=torch.Generator().manual_seed(3))
    stds = {}
    for mode, scale in (("vf", 1.0), ("sc", 1.0), ("sc", 0.45)):
        gen = torch.Generator().manual_seed(4)
        x = (
            ProteinaSampler(400, mode=mode, noise_scale=scale, generator=gen)
            .sample(Gaussian(s), noise)
            .x
        )
        stds[(mode, scale)] = (x.pow(2).sum((1, 2)) / (9 * 3)).mean().sqrt().item()
    assert abs(stds[("vf", 1.0)] - s) < 0.03 * s
    assert abs(stds[("sc", 1.0)] - s) < 0.08 * s
    assert stds[("sc", 0.45)] < 0.9 * s


def test_sampler_noise_is_centred_and_scaled():
    """In sc mode the injected noise is centred: samples from a centred point mass stay
    centred even from an off-centre draw."""
    x_star = centre(torch.randn(1, 10, 3))
    noise = torch.randn(2, 10, 3) + 5.0  # an off-centre draw is centred first
    sampler = ProteinaSampler(steps=400, mode="sc", generator=torch.Generator().manual_seed(0))
    out = sampler.sample(PointMass(x_star), noise)
    assert out.x.mean(1).abs().max() < 1e-5


def test_sampler_options_are_checked():
    with pytest.raises(ValueError, match="'vf' or 'sc'"):
        ProteinaSampler(mode="sde")
    with pytest.raises(ValueError, match="noise_scale"):
        ProteinaSampler(noise_scale=-1)
    with pytest.raises(ValueError, match="steps >= 1"):
        proteina_times(0)
