"""Shared fixtures for fewstep-threed tests.

Score distillation (SDS / VSD / CDS / TSM) is tested on ANALYTIC 2-D priors, built here, whose
predictions are known in closed form, so no test depends on the cached digits teacher:

* ``score_target_prior``: a class-conditional core ``Denoiser`` on a rectified-flow path whose
  x0-prediction is a fixed target image per class (index ``NUM_CLASSES`` is the null class
  for CFG) plus a zero-initialised 3x3 conv of x_t (a layer for LoRA to adapt; setting its
  weights gives an x_t-dependent prior). Its classifier scores -||x - target_k||^2.
* ``score_gaussian_prior``: the exact posterior-mean denoiser of Gaussian data N(mu, std^2 I)
  on a rectified flow: x0_hat = mu + a std^2 / (a^2 std^2 + s^2) (x_t - a mu).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import RectifiedFlow
from fewstep.core.priors import Prior2D

NUM_CLASSES = 2
SIZE = 8


def target_images() -> torch.Tensor:
    """(NUM_CLASSES + 1, 1, 8, 8) in [-1, 1]: a vertical bar, a horizontal bar, and the null
    class (their mean)."""
    v = -torch.ones(SIZE, SIZE)
    v[:, 3:5] = 1.0
    h = v.t().clone()
    return torch.stack([v, h, 0.5 * (v + h)])[:, None]


class TargetNet(nn.Module):
    """x0-prediction: targets[cond] + conv(x_t) (conv zero at init)."""

    def __init__(self, targets: torch.Tensor):
        super().__init__()
        self.register_buffer("targets", targets)
        self.mix = nn.Conv2d(1, 1, 3, padding=1)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x, time, cond):
        if cond is None:
            cond = torch.full((x.shape[0],), NUM_CLASSES, dtype=torch.long, device=x.device)
        return self.targets[cond.long()] + self.mix(x)


def make_target_prior() -> Prior2D:
    targets = target_images()
    denoiser = ModuleDenoiser(TargetNet(targets), RectifiedFlow(), "x0").eval()
    denoiser.requires_grad_(False)

    def classify(x):
        return -(x[:, None] - targets[None, :NUM_CLASSES]).pow(2).flatten(2).sum(-1)

    return Prior2D(
        denoiser=denoiser,
        channels=1,
        size=SIZE,
        num_classes=NUM_CLASSES,
        null_cond=lambda c: torch.full_like(c, NUM_CLASSES),
        classify=classify,
    )


class GaussianNet(nn.Module):
    """Exact x0 posterior mean of N(mu, std^2 I) data on a rectified flow (network time =
    1000 t)."""

    def __init__(self, mu: torch.Tensor, std: float):
        super().__init__()
        self.register_buffer("mu", mu)
        self.std = std

    def forward(self, x, time, cond):
        t = (time / 1000.0).reshape(-1, 1, 1, 1)
        a, s = 1.0 - t, t
        v = self.std**2
        return self.mu + a * v / (a * a * v + s * s) * (x - a * self.mu)


def make_gaussian_prior(std: float = 0.5) -> Prior2D:
    mu = target_images()[0]
    denoiser = ModuleDenoiser(GaussianNet(mu, std), RectifiedFlow(), "x0").eval()
    return Prior2D(denoiser=denoiser, channels=1, size=SIZE, null_cond=None)


@pytest.fixture
def score_target_prior() -> Prior2D:
    return make_target_prior()


@pytest.fixture
def score_gaussian_prior() -> Prior2D:
    return make_gaussian_prior()


@pytest.fixture
def score_mixed_prior() -> Prior2D:
    """The target prior with a fixed non-zero conv: its x0 depends on x_t."""
    prior = make_target_prior()
    g = torch.Generator().manual_seed(3)
    net = prior.denoiser.net
    with torch.no_grad():
        net.mix.weight.copy_(0.3 * torch.randn(net.mix.weight.shape, generator=g))
        net.mix.bias.fill_(0.1)
    return prior


@pytest.fixture
def single_thread():
    """One intra-op thread: the tiny renders and priors of these tests run several times
    faster without threading on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated_cache(monkeypatch, tmp_path):
    """Recipe runs: a fresh fewstep cache, and torch's thread count restored afterwards
    (recipes set their own)."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def distance_after_optimising(score_gaussian_prior):
    """f(method) -> (distance before, after) of images optimised for 100 steps by a score
    method under the exact prior of N(mu, 0.5^2) data; mean squared distance to mu."""

    def run(method) -> tuple[float, float]:
        mu = score_gaussian_prior.denoiser.net.mu
        x = mu + 2.0 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        x = x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        before = (x - mu).pow(2).mean().item()
        for step in range(100):
            g = torch.Generator().manual_seed(step)
            loss = method.loss(x, None, step, 100, generator=g)[0]
            opt.zero_grad()
            loss["scene"].backward()
            opt.step()
        return before, (x - mu).pow(2).mean().item()

    return run
