"""Small pieces shared by objectives: time draws, noising, the denoising loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.paths import Path


def sample_times(path: Path, batch: Batch, frac_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """(B,) times uniform over a fraction range of the path's time domain."""
    lo, hi = frac_range
    u = batch.rng.rand()
    return path.fraction_to_t(lo + (hi - lo) * u).to(batch.rng.device)


def noised(path: Path, x0: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """(x_t, eps) with fresh noise from the batch's generator."""
    eps = batch.rng.randn_like(x0).to(x0)
    return path.noise(x0, t.to(x0), eps), eps


def denoising_loss(model: Denoiser, x0: Tensor, cond, batch: Batch) -> Tensor:
    """The standard diffusion / flow-matching loss in the model's own parameterization:
    mean || f(x_t, t) - target(x0, eps) ||^2 with t from the path's training density
    (Ho 2020 eq. 14 for eps; Salimans & Ho 2022 for v; Lipman 2023 eq. 23 for velocity)."""
    path = model.path
    t = path.sample_t(batch.size, batch.rng.rand()).to(x0.device)
    x_t, eps = noised(path, x0, t, batch)
    target = path.from_x0_eps(x0, eps, model.prediction, t)
    return F.mse_loss(model(x_t, t, cond), target)
