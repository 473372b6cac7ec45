"""TSM: trajectory score matching (Dreamer XL).

Miao, Xu, Wang, Chen, Xiong, Fan, Zhang, "DreamerXL: Towards High-Resolution Text-to-3D
Generation via Trajectory Score Matching" (2024), sec. 3; the form below follows the
authors' ``train_step`` (xingy038/Dreamer-XL, guidance/sd_utils.py), built on LucidDreamer's
interval score matching (ISM, Liang et al. CVPR 2024).

ISM replaces SDS's random eps by the prior's own eps at a DDIM-inverted point: the render x
is DDIM-inverted (deterministically, with the unconditional prior) to x_s, one more
inversion step gives x_t, and the gradient is w(t) (eps_hat(x_t; y, t) - eps(x_s; s)). TSM
starts *two paths from the same x_s* and compares them:

    x_s   = DDIM-inversion(x; 0 -> s) in strides of ``xs_delta_t``      (no gradient)
    x_t   = DDIM-inversion(x_s; s -> t)                                   (path 1)
    x_mu  = DDIM-inversion(x_s; s -> mu),  mu = s + (t - s) sqrt(1 - gamma^2)  (path 2)
    grad_x = w(t) (eps_hat(x_t; y, t) - eps(x_mu; mu)),   w(t) = sigma_t / alpha_t,

with eps_hat guided at CFG 7.5 and the inversion (and eps(x_mu)) unconditional
(``denoise_guidance_scale`` 1 = the null prompt). Comparing with the nearer mu instead of s
shrinks the pseudo-ground-truth error that accumulates along the inversion. Times: t ~ U(0.02,
hi) with hi annealed linearly 0.98 -> 0.5 over the warm-up (750 of 2500 iterations),
s = t - dt with dt annealed 0.10 -> 0.08 over the same warm-up (``annealing_intervals``).
The inversion starts at fraction ``start_min`` (0.01), not 0: on a flow sigma(0) = 0, where an
x0- or eps-predicting prior's eps is undefined (Dreamer XL starts at index 0 of Stable
Diffusion's table, where sigma is already 0.03).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fewstep.core.models import Denoiser
from fewstep.core.objectives.common import ode_step
from fewstep.core.paths import Path
from fewstep.threed.prior import TimeSchedule, annealed_progress
from fewstep.threed.score.base import ScoreMethod, grad_logs, randn, reparam_loss, weight


@dataclass
class TSMConfig:
    guidance_scale: float = 7.5  # CFG scale of eps_hat(x_t) (Dreamer XL: 7.5)
    inversion_guidance_scale: float = 0.0  # CFG of the inversion and eps(x_mu); 0 = unconditional
    weighting: str = "sigma_over_alpha"  # w(t), a WEIGHTINGS name (ISM/TSM: sigma_t / alpha_t)
    schedule: TimeSchedule = field(
        default_factory=lambda: TimeSchedule("linear", 0.02, 0.98, 0.5, anneal_until=0.3)
    )  # t ~ U(0.02, hi), hi 0.98 -> 0.5 over the first 30 % of the run
    delta_t: float = 0.08  # t - s once annealed (80 of 1000)
    delta_t_start: float = 0.10  # t - s at the start (100 of 1000)
    gamma: float = 0.3  # mu = s + (t - s) sqrt(1 - gamma^2)
    xs_delta_t: float = 0.2  # DDIM-inversion stride from 0 to s (200 of 1000)
    xs_inv_steps: int = 5  # inversion strides at most (the start is s - strides * stride)
    start_min: float = 0.01  # lowest start and s fraction (eps is undefined where sigma = 0)


def tsm_gradient(eps_t: Tensor, eps_mu: Tensor, w: Tensor) -> Tensor:
    """w(t) (eps_hat(x_t; y, t) - eps(x_mu; mu)): the TSM gradient on the render, (B, ...)."""
    return w * (eps_t - eps_mu)


def ddim_invert(
    model: Denoiser,
    path: Path,
    x0: Tensor,
    noise: Tensor,
    start: Tensor,
    end: Tensor,
    stride: float,
    max_steps: int,
    cond,
) -> Tensor:
    """DDIM inversion from path fraction ``start`` to ``end`` (B,) in strides of ``stride``.

    The start point is alpha x0 + sigma noise at ``start``;
    each stride re-noises the model's (x0, eps) at the current point to the next fraction
    (core's ``ode_step``, Euler = DDIM). Samples already at ``end`` stay there."""

    def t_of(f: Tensor) -> Tensor:
        return path.fraction_to_t(f).reshape(-1).to(x0.device)

    cur = start.clone()
    x = path.noise(x0, t_of(cur), noise)
    for _ in range(max_steps):
        if bool((cur >= end).all()):
            break
        nxt = torch.minimum(cur + stride, end)
        x = torch.where(
            (cur < end).reshape(-1, *([1] * (x.ndim - 1))).to(x.device),
            ode_step(model, x, t_of(cur), t_of(nxt), cond),
            x,
        )
        cur = nxt
    return x


class TSM(ScoreMethod):
    name = "tsm"
    config_cls = TSMConfig

    def __init__(self, adapter, config: TSMConfig | None = None, seed: int = 0):
        super().__init__(adapter, config, seed)
        c = self.config
        if not 0.0 <= c.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {c.gamma}")
        if c.xs_delta_t <= 0 or c.xs_inv_steps < 1:
            raise ValueError("xs_delta_t must be > 0 and xs_inv_steps >= 1")

    def fractions(self, frac_t: Tensor, step: int, total: int) -> tuple[Tensor, Tensor, Tensor]:
        """(start, s, mu) path fractions for t fractions (B,)."""
        c = self.config
        p = annealed_progress(c.schedule, step, total)
        dt = c.delta_t_start + (c.delta_t - c.delta_t_start) * p
        s = (frac_t - dt).clamp_min(c.start_min)
        mu = s + (frac_t - s) * (1.0 - c.gamma**2) ** 0.5
        start = (s - c.xs_delta_t * c.xs_inv_steps).clamp_min(c.start_min)
        return start, s, mu

    def invert(self, x: Tensor, frac_t: Tensor, cond, noise: Tensor, step: int, total: int):
        """(x_s, x_t, x_mu, (s, mu) fractions): the shared start and both paths, no gradient."""
        c, path = self.config, self.adapter.path
        inv = self.guided(c.inversion_guidance_scale)
        start, s, mu = self.fractions(frac_t, step, total)
        with torch.no_grad():
            x_s = ddim_invert(inv, path, x.detach(), noise, start, s, c.xs_delta_t,
                              c.xs_inv_steps, cond)  # fmt: skip
            t_s = self.adapter.fractions_to_t(s).to(x.device)
            x_t = ode_step(inv, x_s, t_s, self.adapter.fractions_to_t(frac_t).to(x.device), cond)
            x_mu = ode_step(inv, x_s, t_s, self.adapter.fractions_to_t(mu).to(x.device), cond)
        return x_s, x_t, x_mu, (s, mu)

    def loss(self, x, cond, step, total_steps, camera=None, generator=None):
        """Draws, in order: t fractions (B,), then the start noise like x."""
        c = self.config
        frac, t = self.times(x.shape[0], step, total_steps, generator, x.device)
        noise = randn(x.shape, generator, x)
        _, x_t, x_mu, (_, mu) = self.invert(x, frac, cond, noise, step, total_steps)
        with torch.no_grad():
            t_mu = self.adapter.fractions_to_t(mu).to(x.device)
            eps_mu = self.guided(c.inversion_guidance_scale).predict(x_mu, t_mu, cond, kind="eps")
            eps_t = self.adapter.predict(x_t, t, cond, "eps", c.guidance_scale)
            a, s = self.adapter.coeffs(t, x)
            grad = tsm_gradient(eps_t, eps_mu, weight(c.weighting, a, s))
        return {"scene": reparam_loss(x, grad)}, grad_logs(grad, frac)
