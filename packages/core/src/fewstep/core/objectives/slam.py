"""SLAM / SPLAM: sub-path linear approximation model.

Xu et al., "Accelerating Image Generation with Sub-path Linear Approximation Model" (ECCV
2024; public code MCG-NJU/SPLAM). Consistency distillation (LCM-style, ``consistency.py``)
whose student is trained along the sub-path between two points sampled on the teacher's
trajectory instead of only at its upper end. For a grid step t_{n+k} -> t_n, with x_{n+k}
real data noised to t_{n+k} and x_n one teacher ODE step from it, the sub-path linear ODE
(SL-ODE) interpolates the two points at the upper point's signal scale r = alpha(t_{n+k}) /
alpha(t_n), gamma ~ U(0, 1]:
    x_gamma = gamma x_{n+k} + (1 - gamma) r x_n,
a sample with signal alpha(t_{n+k}) x0 and noise level
    sigma_gamma^2 = (r sigma(t_n))^2 + gamma^2 (sigma(t_{n+k})^2 - (r sigma(t_n))^2)
(the forward transition from t_n to t_{n+k} with only a gamma fraction of its noise, as in
the reference code's ``predicted_origin_splam``). The loss is
    d( f_theta(x_gamma), f_ema(x_n, t_n) )
with f the consistency function of ``consistency.py``: at gamma = 1 it is LCM's consistency
distillation, and as gamma -> 0 the error estimate shrinks continuously to zero along the
sub-path (the "progressive and continuous error estimation" of sec. 4).

Deviation: the reference conditions the UNet on gamma through LCM's w-embedding and keeps
the time input at t_{n+k}. Here the student takes no extra input: x_gamma is evaluated at
the path time with the same signal-to-noise ratio alpha(t_{n+k}) / sigma_gamma (rescaled to
that time, ``trigflow.match_snr``), so the time input itself carries gamma's noise level and
the objective works unchanged for any student network and any path. In the reference the
time input is always a grid time (gamma only changes the embedding), so the times the
sampler uses are trained at every gamma; here a share ``endpoint_prob`` of the samples takes
gamma = 1 to keep them trained (without it a discrete-VP eps student fails at t_max, where
x0 = (x - sigma eps) / alpha amplifies eps errors 15-fold). The student samples with
consistency multistep sampling (``FewStepSampler``), as LCM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.objectives.common import noised
from fewstep.core.objectives.consistency import (
    ConsistencyConfig,
    ConsistencyDistillation,
    pseudo_huber,
)
from fewstep.core.objectives.trigflow import match_snr
from fewstep.core.paths import Path


@dataclass
class SLAMConfig(ConsistencyConfig):
    endpoint_prob: float = 0.2  # share of samples with gamma = 1 (the sampler's grid times)


def sub_path_point(
    path: Path, x_hi: Tensor, t_hi: Tensor, x_lo: Tensor, t_lo: Tensor, gamma: Tensor
) -> tuple[Tensor, Tensor]:
    """The SL-ODE point at ``gamma`` (B,) in (0, 1] between x_hi at t_hi and x_lo at t_lo
    (t_lo < t_hi, (B,)), as a state of ``path``: (x (B, ...), its path time (B,))."""
    a_hi, s_hi = path.coeffs(t_hi, x_hi)
    a_lo, s_lo = path.coeffs(t_lo, x_lo)
    g = gamma.reshape(-1, *([1] * (x_hi.ndim - 1))).to(x_hi)
    r = a_hi / a_lo
    x = g * x_hi + (1 - g) * r * x_lo
    rs2 = (r * s_lo) ** 2
    sigma = torch.sqrt(rs2 + g * g * (s_hi * s_hi - rs2).clamp_min(0))
    return match_snr(path, x, a_hi.expand_as(sigma), sigma)


class SLAM(ConsistencyDistillation):
    name = "slam"
    config_cls = SLAMConfig
    summary = (
        "consistency distillation along sub-path linear ODEs between trajectory points (Xu 2024)"
    )

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        if not 0.0 <= self.config.endpoint_prob <= 1.0:
            raise ValueError(f"endpoint_prob must be in [0, 1], got {self.config.endpoint_prob}")

    def losses(self, roles, batch, update, step):
        cfg = self.config
        if batch.x is None:
            raise ValueError("slam needs real data x in the batch")
        x0 = batch.x
        i = batch.rng.randint(1, cfg.num_intervals + 1).float()
        t_hi = self.path.fraction_to_t(i / cfg.num_intervals).to(x0.device)
        t_lo = self.path.fraction_to_t((i - 1) / cfg.num_intervals).to(x0.device)
        x_hi, _ = noised(self.path, x0, t_hi, batch)
        u, keep = batch.rng.rand().to(x0), batch.rng.rand().to(x0) < cfg.endpoint_prob
        gamma = torch.where(keep, torch.ones_like(u), 1.0 - u)  # in (0, 1]
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, batch.cond)
            target = self.wrap(roles["target"])(x_lo, t_lo, batch.cond)
            x_g, t_g = sub_path_point(self.path, x_hi, t_hi, x_lo, t_lo, gamma)
        pred = self.wrap(roles["student"])(x_g, t_g, batch.cond)
        if cfg.metric == "huber":
            loss = pseudo_huber(pred, target, cfg.huber_c)
        else:
            loss = (pred.float() - target.float()).pow(2).mean()
        return {"student": loss}, {"slam_loss": loss.item(), "gamma": gamma.mean().item()}
