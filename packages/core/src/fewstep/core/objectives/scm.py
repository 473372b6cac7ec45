"""sCM: continuous-time consistency distillation in TrigFlow.

Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
(ICLR 2025). The student is the consistency function (eq. 6)
    f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t),   x_t = cos(t) x0 + sin(t) z,
trained with the continuous-time CD gradient (eq. 8)
    grad E[ -w(t) sd sin(t) F_theta(x_t, t)^T df_theta-(x_t, t)/dt ],
    df-/dt = -cos(t) (sd F- - dx_t/dt) - sin(t) (x_t + sd dF-/dt),
where theta- = stopgrad(theta) and dx_t/dt = sd F_teacher is the teacher's probability-flow
velocity. With w = 1 / (sd tan t) the factor is cos(t), and as in sec. 4 the gradient is
taken through the surrogate
    || F_theta - F_theta- - g ||^2 / D,   g = cos(t) df-/dt with tangent warmup:
    g = -cos^2(t) (sd F- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF-/dt),
r rising linearly from 0 to 1 over ``tangent_warmup`` steps, and tangent normalisation
g <- g / (||g|| + c). dF-/dt is one Jacobian-vector product of F along (dx_t/dt, 1),
computed with the "JVP rearrangement" (sec. 5.1; tangents (cos t sin t dx_t/dt,
cos t sin t) give cos t sin t dF-/dt directly), exactly by forward-mode AD or by a central
finite difference (``common.jvp``). Optional: sCM's adaptive weighting (a small network
w_phi(t), loss e^{-w} L + w, written as EDM2's log-variance), and the extra prior weight
1 / (sd tan t) that the public TBCM / sCM-MNIST code multiplies in (``weighting='inv_tan'``).
Training angles come from sCM's log-normal proposal, or (``time_sampling='path'``) from
the teacher path's own training density mapped to angles.

The teacher lives on its own path: ``trigflow.TrigFlowDenoiser`` maps a TrigFlow state to
the teacher's point with the same signal-to-noise ratio and back, so this file is written
once for eps-, x0-, v- and velocity-predicting teachers on any path. The student is a copy
of the teacher on the teacher's path, viewed in TrigFlow coordinates; the trainer samples
that view with ``FewStepSampler`` (1 step, or 2+ with re-noising as in sCM's 2-step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import jvp
from fewstep.core.objectives.trigflow import TrigFlowDenoiser, path_angle
from fewstep.core.paths import Path, _bcast
from fewstep.core.toy import sinusoidal_embedding, sinusoidal_frequencies


@dataclass
class SCMConfig(ObjectiveConfig):
    sigma_data: float = 0.5  # TrigFlow data std sd (sCM: 0.5 for images in [-1, 1])
    time_sampling: Literal["lognormal", "path"] = "lognormal"  # lognormal: sCM's proposal;
    # path: the teacher path's own training density (e.g. uniform for rectified flow) as angles
    p_mean: float = -1.0  # lognormal: sd tan(t) = exp(N(p_mean, p_std)) (sCM's proposal)
    p_std: float = 1.4  # see p_mean
    jvp_mode: Literal["exact", "finite_difference"] = "exact"  # how dF-/dt is computed
    fd_eps: float = 1e-4  # finite-difference step along the tangent (rCM uses 1e-4)
    tangent_warmup: int = 10_000  # steps over which r rises from 0 to 1 (sCM: 10k)
    tangent_norm_c: float = 0.1  # c in g / (||g|| + c) (sCM: 0.1); <= 0 disables it
    weighting: Literal["uniform", "inv_tan"] = "uniform"  # prior weight; inv_tan: 1/(sd tan t)
    adaptive_weighting: bool = False  # learn w_phi(t) as an extra role "weighting"


def trig_times(cfg: SCMConfig, batch: Batch, path: Path, window: tuple[float, float]) -> Tensor:
    """(B,) training angles, clipped to ``window``: sd tan(t) log-normal (sCM's proposal), or
    the teacher ``path``'s own training times mapped to the angles with the same SNR."""
    u = batch.rng.rand()
    if cfg.time_sampling == "path":
        t = path_angle(path, path.sample_t(batch.size, u.cpu()).float(), cfg.sigma_data)
    else:
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-6, 1 - 1e-6) - 1.0)
        t = torch.atan(torch.exp(cfg.p_mean + cfg.p_std * z) / cfg.sigma_data)
    return t.to(u.device).clamp(*window)


def scm_tangent(
    F_minus: Tensor,
    dxdt: Tensor,
    x_t: Tensor,
    dF_scaled: Tensor,
    t: Tensor,
    r: float,
    sigma_data: float,
    norm_c: float,
) -> tuple[Tensor, Tensor]:
    """sCM's g = cos(t) df-/dt with warmup r and tangent normalisation (sec. 4, 5.1).

    F_minus, dxdt (= sd F_teacher), x_t, dF_scaled (= cos t sin t dF-/dt): (B, ...); t: (B,).
    Returns (g normalised, per-sample ||g|| before normalisation)."""
    cos, sin = torch.cos(_bcast(t, x_t)), torch.sin(_bcast(t, x_t))
    g = -cos * cos * (sigma_data * F_minus - dxdt) - r * (cos * sin * x_t + sigma_data * dF_scaled)
    norm = g.flatten(1).norm(dim=1)
    if norm_c > 0:
        g = g / (_bcast(norm, g) + norm_c)
    return g, norm


class AdaptiveWeight(nn.Module):
    """w_phi(t): a linear layer on sinusoidal features of the angle (sCM's adaptive
    weighting), zero at initialisation so training starts unweighted."""

    def __init__(self, features: int = 64):
        super().__init__()
        self.register_buffer("freqs", sinusoidal_frequencies(features, 20.0), persistent=False)
        self.lin = nn.Linear(features, 1)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.lin(sinusoidal_embedding(t, self.freqs)).squeeze(-1)


class SCM(Objective):
    name = "scm"
    config_cls = SCMConfig
    roles = ("student",)
    needs_data = True
    summary = (
        "continuous-time consistency distillation in TrigFlow with JVP tangents (Lu & Song 2024)"
    )

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {cfg.sigma_data}")
        if cfg.jvp_mode not in ("exact", "finite_difference"):
            raise ValueError(
                f"unknown jvp_mode {cfg.jvp_mode!r}; expected 'exact' or 'finite_difference'"
            )
        if cfg.time_sampling not in ("lognormal", "path"):
            raise ValueError(
                f"unknown time_sampling {cfg.time_sampling!r}; expected 'lognormal' or 'path'"
            )
        if cfg.weighting not in ("uniform", "inv_tan"):
            raise ValueError(
                f"unknown weighting {cfg.weighting!r}; expected 'uniform' or 'inv_tan'"
            )
        if cfg.tangent_warmup < 0 or cfg.fd_eps <= 0:
            raise ValueError("tangent_warmup must be >= 0 and fd_eps > 0")
        if cfg.adaptive_weighting:  # instance attribute: the trainer reads objective.roles
            self.roles = (*type(self).roles, "weighting")
        self.teacher_view = TrigFlowDenoiser(teacher, cfg.sigma_data)

    # --- roles and views ------------------------------------------------------------------
    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        roles: dict[str, nn.Module] = {"student": student}
        if self.config.adaptive_weighting:
            roles["weighting"] = AdaptiveWeight()
        return roles

    def view(self, d: Denoiser) -> TrigFlowDenoiser:
        return TrigFlowDenoiser(d, self.config.sigma_data)

    def student_denoiser(self, roles):
        return self.view(roles["student"])

    def window(self, student_view: TrigFlowDenoiser) -> tuple[float, float]:
        """Angles both the teacher's and the student's paths cover."""
        a, b = self.teacher_view.path, student_view.path
        return max(a.t_min, b.t_min), min(a.t_max, b.t_max)

    def warmup(self, step: int) -> float:
        w = self.config.tangent_warmup
        return 1.0 if w == 0 else min(1.0, step / w)

    # --- training points ------------------------------------------------------------------
    def training_points(self, roles, batch: Batch) -> tuple[Tensor, Tensor, Tensor, object]:
        """sCD: real data noised in TrigFlow, and the teacher's dx_t/dt there.
        Returns (x_t, t, dx_t/dt, cond)."""
        if batch.x is None:
            raise ValueError(f"{self.name} needs real data x in the batch (needs_data=True)")
        sd = self.config.sigma_data
        window = self.window(self.view(roles["student"]))
        t = trig_times(self.config, batch, self.teacher.path, window)
        t = t.to(batch.x)
        eps = batch.rng.randn_like(batch.x).to(batch.x)
        ang = _bcast(t, batch.x)
        x_t = torch.cos(ang) * batch.x + sd * torch.sin(ang) * eps
        with torch.no_grad():
            dxdt = self.teacher_view(x_t, t, batch.cond)
        return x_t, t, dxdt, batch.cond

    # --- the sCM loss ---------------------------------------------------------------------
    def tangent(self, view: TrigFlowDenoiser, x_t, t, dxdt, cond) -> tuple[Tensor, Tensor]:
        """(F-, cos t sin t dF-/dt) at (x_t, t) along the teacher's flow, no gradient."""
        cfg = self.config
        cs = torch.cos(t) * torch.sin(t)

        def fn(x, tt):
            return view.F(x, tt, cond)

        with torch.no_grad():
            F_minus, dF = jvp(fn, (x_t, t), (_bcast(cs, x_t) * dxdt, cs), cfg.jvp_mode, cfg.fd_eps)
        return F_minus.detach(), dF.detach()

    def scm_loss(self, roles, x_t, t, dxdt, cond, step: int) -> tuple[Tensor, dict]:
        cfg = self.config
        view = self.view(roles["student"])
        F_minus, dF = self.tangent(view, x_t, t, dxdt, cond)
        r = self.warmup(step)
        g, gnorm = scm_tangent(F_minus, dxdt, x_t, dF, t, r, cfg.sigma_data, cfg.tangent_norm_c)
        F = view.F(x_t, t, cond)
        per_sample = (F.float() - F_minus.float() - g.float()).pow(2).flatten(1).mean(dim=1)
        if cfg.weighting == "inv_tan":
            per_sample = per_sample / (cfg.sigma_data * torch.tan(t.float()))
        logs = {"scm_loss": per_sample.mean().item(), "tangent_norm": gnorm.mean().item(), "r": r}
        if cfg.adaptive_weighting:
            logvar = roles["weighting"](t.float())
            per_sample = per_sample * torch.exp(-logvar) + logvar
            logs["logvar"] = logvar.mean().item()
        return per_sample.mean(), logs

    def losses(self, roles, batch, update, step):
        x_t, t, dxdt, cond = self.training_points(roles, batch)
        loss, logs = self.scm_loss(roles, x_t, t, dxdt, cond, step)
        return {r: loss for r in update}, logs
