"""Discrete consistency distillation, LCM-style.

Song et al., "Consistency Models" (ICML 2023), consistency distillation (alg. 2, eq. 7);
Luo et al., "Latent Consistency Models" (2023): skipping-step teacher ODE solves under
classifier-free guidance (sec. 4.2-4.3, eq. 9) and the pseudo-Huber metric.

On a grid t_0 = t_min < t_1 < ... < t_N = t_max (fractions i/N of the path), draw i, noise
real data to x_{t_i}, take one teacher ODE step (DDIM or Heun, guided if the teacher is a
CFG wrapper) to x_{t_{i-1}}, and minimise d(f_theta(x_{t_i}, t_i), f_ema(x_{t_{i-1}},
t_{i-1})) with f_ema an exponential moving average of f_theta that is never optimised.

f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t) enforces f(x, t_min) = x (CM appendix C)
with sigma~ = sigma(t)/alpha(t) the EDM-equivalent noise level:
    c_skip = sd^2 / ((k sigma~)^2 + sd^2),   c_out = k sigma~ / sqrt((k sigma~)^2 + sd^2),
k = ``boundary_scale`` (LCM's timestep scaling of 10 makes f ~ x0_theta away from t_min, so
a student initialised from the teacher starts as the teacher's x0-predictor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.models import Denoiser, _batch_t, ema_update_, frozen_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import noised, ode_step


@dataclass
class ConsistencyConfig(ObjectiveConfig):
    num_intervals: int = 50  # N: teacher ODE grid size (LCM: 50 skipping steps over 1000)
    ema_decay: float = 0.95  # target network EMA decay mu (LCM: 0.95)
    metric: Literal["huber", "l2"] = "huber"  # distance d
    huber_c: float = 1e-3  # pseudo-Huber c (LCM default)
    teacher_solver: Literal["euler", "heun"] = "euler"  # one teacher step (euler == DDIM)
    boundary_scale: float = 10.0  # k in c_skip / c_out
    sigma_data: float = 0.5  # sd in c_skip / c_out


class ConsistencyFunction(Denoiser):
    """f(x, t) = c_skip x + c_out x0_base(x, t), an x0-predicting denoiser."""

    def __init__(self, base: Denoiser, boundary_scale: float = 10.0, sigma_data: float = 0.5):
        super().__init__(base.path, "x0")
        self.base = base
        self.k = boundary_scale
        self.sd = sigma_data

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        a, s = self.path.coeffs(t, like)
        a_min, s_min = self.path.coeffs(torch.tensor(self.path.t_min), like)
        # sigma~ - sigma~_min, written without dividing by alpha (alpha may be 0 at t_max)
        ks = self.k * (s - a * (s_min / a_min))
        denom = ks * ks + (self.sd * a) ** 2
        return (self.sd * a) ** 2 / denom, ks / denom.sqrt()

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        c_skip, c_out = self.coefficients(t, x_t)
        return c_skip * x_t + c_out * self.base.predict(x_t, t, cond, kind="x0")


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """mean(sqrt((a - b)^2 + c^2) - c), elementwise as in LCM."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


class ConsistencyDistillation(Objective):
    name = "consistency"
    config_cls = ConsistencyConfig
    roles = ("student",)
    frozen_roles = ("target",)
    needs_data = True
    summary = "discrete consistency distillation with EMA target, LCM-style (Song 2023; Luo 2023)"

    def build_roles(self, student: Denoiser, example) -> dict[str, nn.Module]:
        return {"student": student, "target": frozen_copy(student)}

    def wrap(self, d: Denoiser) -> ConsistencyFunction:
        return ConsistencyFunction(d, self.config.boundary_scale, self.config.sigma_data)

    def student_denoiser(self, roles):
        return self.wrap(roles["student"])

    def teacher_step(self, x: Tensor, t: Tensor, t_next: Tensor, cond) -> Tensor:
        return ode_step(self.teacher, x, t, t_next, cond, self.config.teacher_solver)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        if batch.x is None:
            raise ValueError("consistency distillation needs real data x in the batch")
        x0 = batch.x
        i = batch.rng.randint(1, cfg.num_intervals + 1).float()
        t_hi = self.path.fraction_to_t(i / cfg.num_intervals).to(x0.device)
        t_lo = self.path.fraction_to_t((i - 1) / cfg.num_intervals).to(x0.device)
        x_hi, _ = noised(self.path, x0, t_hi, batch)
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, batch.cond)
            target = self.wrap(roles["target"])(x_lo, t_lo, batch.cond)
        pred = self.wrap(roles["student"])(x_hi, t_hi, batch.cond)
        if cfg.metric == "huber":
            loss = pseudo_huber(pred, target, cfg.huber_c)
        else:
            loss = (pred.float() - target.float()).pow(2).mean()
        return {"student": loss}, {"consistency_loss": loss.item()}

    def after_update(self, roles, updated, step):
        ema_update_(roles["target"], roles["student"], self.config.ema_decay)
