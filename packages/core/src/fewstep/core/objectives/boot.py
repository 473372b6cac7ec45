"""BOOT: data-free distillation by bootstrapping.

Gu, Zhai, Zhang, Liu & Susskind, "BOOT: Data-free Distillation of Denoising Diffusion Models
with Bootstrapping" (arXiv 2306.05544, 2023).

A student g(eps, t) predicts, from the prior noise eps alone, the *signal* of the teacher's
deterministic (DDIM) trajectory that starts at eps, for any time t (sec. 3.1, Signal-ODE):
    x_t = a(t) y_t + s(t) eps,     y_t = (x_t - s(t) eps) / a(t),
which stays smooth where x_t itself is dominated by the fixed noise (y_T = 0 at the prior
x_T = s(T) eps, y_0 = x_0). The teacher's DDIM step from t to s in these coordinates is
    y_s = y_t + (s(s)/a(s) - s(t)/a(t)) (eps^_teacher(x_t, t) - eps),
and the student is trained by bootstrapping between consecutive times (sec. 3.2): its own
prediction at t, pushed one teacher step, is the target for its prediction at s:
    || g(eps, s) - sg( signal_s(ode_step(teacher, a(t) g(eps, t) + s(t) eps, t -> s)) ) ||^2,
with the first step from the prior itself (y_T = 0, the boundary condition). Written with
the shared ``common.ode_step`` (DDIM = exact Euler for any path and parameterization) and the
signal conversion above, so it serves eps-, x0-, v- and velocity-teachers alike. Only noise
is ever drawn: no data. A one-step sample is x_{t_min} = a(t_min) g(eps, t_min) + s(t_min) eps.

The student is the teacher's network fed the prior draw x_T = s(T) eps at every time t, its
output read as an x0-prediction about x_T at time T (g(eps, t) = x0^(x_T, T; net(x_T, t))),
which at t = T is the teacher's own x0-prediction from the prior (the warm start). Sampling
goes through ``FlowMapSampler((1.0,))``: the student is a flow map out of the prior,
u(x_T, T, r) = (x_T - x_r) / (T - r).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import check_choice, ode_step, sample_shape
from fewstep.core.paths import _bcast
from fewstep.core.samplers import FlowMapSampler


@dataclass
class BOOTConfig(ObjectiveConfig):
    num_intervals: int = 16  # N: consecutive times are path fractions k/N and (k-1)/N
    teacher_solver: Literal["euler", "heun"] = "euler"  # one teacher step (euler == DDIM, as BOOT)
    weighting: Literal["signal", "x"] = "signal"  # L2 on y_s, or on x_s = a(s) y_s (weight a(s)^2)


class BOOTGenerator(Denoiser):
    """A BOOT student as a generator: ``signal(x_T, t)`` is y_t of the trajectory from the
    prior state x_T; ``average_velocity`` makes it a flow map out of the prior."""

    def __init__(self, student: Denoiser):
        super().__init__(student.path, student.prediction)
        self.student = student

    @property
    def evals_per_call(self) -> int:  # type: ignore[override]
        return self.student.evals_per_call

    def forward(self, x_t, t, cond=None):
        return self.student(x_t, t, cond)

    def signal(self, x_top: Tensor, t, cond=None) -> Tensor:
        """y_t = g(eps, t) for the prior state x_top = s(T) eps (B, ...): the network's output
        at (x_top, t), read as an x0-prediction about x_top at T (conversions at t itself
        would pin it, e.g. x0 = x on rectified flow at t = 0)."""
        t_top = torch.full((x_top.shape[0],), float(self.path.t_max), device=x_top.device)
        out = self.student(x_top, _batch_t(t, x_top), cond)
        return self.path.to_x0_eps(out, self.prediction, x_top, t_top)[0]

    def average_velocity(self, x_t: Tensor, t, r, cond=None) -> Tensor:
        """(x_t - x_r) / (t - r) for jumps out of the prior (t = t_max) only."""
        path = self.path
        t, r = _batch_t(t, x_t), _batch_t(r, x_t)
        if not torch.allclose(t, torch.full_like(t, float(path.t_max))):
            raise ValueError(
                "a BOOT student generates from the prior only: sample it with "
                "FlowMapSampler((1.0,)) (one step)"
            )
        eps = x_t / float(path.sigma(torch.tensor(float(path.t_max))))
        a, s = path.coeffs(r, x_t)
        x_r = a * self.signal(x_t, r, cond) + s * eps
        return (x_t - x_r) / _bcast(t - r, x_t)


def boot_target(
    teacher: Denoiser,
    x_top: Tensor,
    y_t: Tensor,
    t: Tensor,
    s: Tensor,
    at_top: Tensor,
    cond,
    solver: Literal["euler", "heun"] = "euler",
) -> Tensor:
    """sg(y_s) one teacher ODE step below the student's y_t (BOOT sec. 3.2).

    x_top = s(T) eps (B, ...) is the prior state; y_t: (B, ...) the student's signal at t;
    t, s: (B,) native times; ``at_top`` (B,) marks t = T, where the step starts at x_top."""
    path = teacher.path
    eps = x_top / float(path.sigma(torch.tensor(float(path.t_max))))
    with torch.no_grad():
        a_t, s_t = path.coeffs(t, x_top)
        top = at_top.reshape(-1, *([1] * (x_top.ndim - 1)))
        x_t = torch.where(top, x_top, a_t * y_t + s_t * eps)
        x_s = ode_step(teacher, x_t, t, s, cond, solver)
        a_s, s_s = path.coeffs(s, x_top)
        return (x_s - s_s * eps) / a_s


class BOOT(Objective):
    name = "boot"
    config_cls = BOOTConfig
    roles = ("student",)
    needs_data = False
    summary = "data-free signal-ODE bootstrapping between consecutive teacher steps (Gu 2023)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        check_choice("teacher_solver", cfg.teacher_solver, ("euler", "heun"))
        check_choice("weighting", cfg.weighting, ("signal", "x"))
        if cfg.num_intervals < 1:
            raise ValueError(f"num_intervals must be >= 1, got {cfg.num_intervals}")
        if cfg.student_steps != 1 or cfg.student_times not in ((), (1.0,), [1.0]):
            raise ValueError(
                "BOOT students generate in one step from the prior: use student_steps=1 and "
                "no student_times"
            )

    def build_roles(self, student, example):
        return {"student": student}

    def student_denoiser(self, roles):
        return BOOTGenerator(roles["student"])

    def student_sampler(self):
        return FlowMapSampler((1.0,))

    def losses(self, roles, batch, update, step):
        cfg = self.config
        path, n = self.path, cfg.num_intervals
        gen = BOOTGenerator(roles["student"])
        x_top = path.prior(batch.rng.randn(*sample_shape(batch)))
        k = batch.rng.randint(1, n + 1).float()
        t = path.fraction_to_t(k / n).to(x_top.device)
        s = path.fraction_to_t((k - 1) / n).to(x_top.device)
        with torch.no_grad():
            y_t = gen.signal(x_top, t, batch.cond)
        target = boot_target(self.teacher, x_top, y_t, t, s, k == n, batch.cond, cfg.teacher_solver)
        y_s = gen.signal(x_top, s, batch.cond)
        err = (y_s.float() - target.float()).pow(2)
        if cfg.weighting == "x":
            a_s, _ = path.coeffs(s, err)
            err = a_s * a_s * err
        loss = err.mean()
        return {"student": loss}, {"boot_loss": loss.item()}
