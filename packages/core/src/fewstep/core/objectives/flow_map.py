"""Data-free flow-map distillation (FreeFlow).

Tong, Ma, Xie & Jaakkola, "Flow Map Distillation Without Data" (arXiv 2511.19428, 2025).

Every state the student is trained on comes from the prior, the one distribution teacher and
student share by construction, and from the student's own jumps out of it; no data set is
touched. The student is a flow map X(x_t, t, r) = x_t - (t - r) u(x_t, t, r)
(``meanflow.FlowMapDenoiser``). Two objectives (sec. 3):

* prediction: the student's *generating velocity* must be the teacher's velocity at the
  student's own state. Differentiating X in its end time r,
      d X / d r = u - (t - r) d_r u  =!  v_teacher(X(x_t, t, r), r),
  so with a JVP in r (tangents (0, 0, 1) on (x, t, r)) the loss is
      || u - sg(v_teacher(X, r) + (t - r) d_r u) ||^2
  (adaptive weight as in MeanFlow). The teacher is queried where the student actually is,
  so the student learns to follow the teacher's path from the prior rather than from states
  it never visits; r = t is the boundary u(x, t, t) = v_teacher(x, t). Start states x_t are
  the prior (t = t_max) or the student's own no-gradient jump from the prior to t.
* correction: the prediction objective only matches velocities locally, so small errors
  compound along the path. The correction aligns the noised marginals of the student's
  generations with the teacher's: a fake velocity model is fitted to the student's noised
  samples by flow matching, and the student's samples move along the difference of the
  teacher's and the fake model's denoisers (variational score distillation, written with
  ``dmd2.dmd_loss``; multi-step students generate by backward simulation as in DMD2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.models import trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    check_choice,
    denoising_loss,
    sample_shape,
    unguided,
)
from fewstep.core.objectives.dmd2 import dm_term
from fewstep.core.objectives.meanflow import (
    FlowMapDenoiser,
    adaptive_l2,
    as_flow_map,
    check_flow_map_sampling,
    flow_map_sampler,
    fraction_velocity,
    jvp,
    span,
    to_native,
)
from fewstep.core.paths import _bcast


@dataclass
class FlowMapConfig(ObjectiveConfig):
    prior_start: float = 0.5  # fraction of jumps from the prior; the rest from own states
    r_eq_t: float = 0.1  # fraction with r = t (the boundary u(x, t, t) = v_teacher(x, t))
    adaptive_p: float = 1.0  # adaptive loss weight power p (0 = plain L2)
    adaptive_c: float = 1e-3  # adaptive loss weight constant c
    jvp_mode: Literal["exact", "finite_difference"] = "exact"  # d_r u by forward AD or FD
    fd_eps: float = 1e-4  # finite-difference step, in path fractions
    corrector_weight: float = 1.0  # weight of the correction (score-distillation) loss; 0 = off
    corrector_t_range: tuple[float, float] = (0.02, 0.98)  # correction times, path fractions
    fake_updates_per_student: int = 1  # fake-velocity updates per student update
    time_module: str | None = None  # student's time-embedding submodule (None = auto-detect)
    gap_features: int = 32  # sinusoidal features of the gap (t - r)
    gap_hidden: int = 128  # hidden width of the gap embedding MLP


def flow_map_prediction_target(
    u_fn,
    v_fn,
    x_t: Tensor,
    t: Tensor,
    r: Tensor,
    mode: Literal["exact", "finite_difference"] = "exact",
    fd_eps: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """(u(x_t, t, r), sg(v(X, r) + (t - r) d_r u)) with X = x_t - (t - r) u: the end point
    of the jump must move with the teacher's velocity. x_t: (B, ...); t, r: (B,);
    ``u_fn(x, t, r)``, ``v_fn(x, r)`` in the same time unit."""
    tangents = (torch.zeros_like(x_t), torch.zeros_like(t), torch.ones_like(r))
    u, du_dr = jvp(u_fn, (x_t, t, r), tangents, mode, fd_eps)
    with torch.no_grad():
        gap = _bcast(t - r, x_t)
        v = v_fn(x_t - gap * u.detach(), r)
        target = v + gap * du_dr.detach()
    return u, target


class FlowMapDistillation(Objective):
    name = "flow_map"
    config_cls = FlowMapConfig
    roles = ("student", "fake_score")
    needs_data = False
    summary = "data-free flow-map distillation: predict the teacher path, correct (Tong 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        check_choice("jvp_mode", cfg.jvp_mode, ("exact", "finite_difference"))
        for name in ("prior_start", "r_eq_t"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
        if cfg.corrector_weight < 0 or cfg.fake_updates_per_student < 1:
            raise ValueError("need corrector_weight >= 0 and fake_updates_per_student >= 1")
        if cfg.adaptive_p < 0 or cfg.adaptive_c <= 0 or cfg.fd_eps <= 0:
            raise ValueError("need adaptive_p >= 0, adaptive_c > 0 and fd_eps > 0")
        check_flow_map_sampling(cfg, self.name)

    def build_roles(self, student, example):
        cfg = self.config
        return {
            "student": as_flow_map(student, cfg.time_module, cfg.gap_features, cfg.gap_hidden),
            "fake_score": trainable_copy(unguided(self.teacher)),
        }

    def student_sampler(self):
        return flow_map_sampler(self.config)

    def schedule(self, step: int) -> list[str]:
        cfg = self.config
        if cfg.corrector_weight == 0:
            return ["student"]
        if step % cfg.fake_updates_per_student == 0:
            return ["student", "fake_score"]
        return ["fake_score"]

    def draw_t_r(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(t, r) path fractions (B,): t = 1 (prior) for a ``prior_start`` fraction, else
        uniform; r uniform below t, r = t for an ``r_eq_t`` fraction."""
        cfg = self.config
        s = torch.where(batch.rng.rand() < cfg.prior_start, 1.0, batch.rng.rand())
        q = s * batch.rng.rand()
        return s, torch.where(batch.rng.rand() < cfg.r_eq_t, s, q)

    def generate(self, student: FlowMapDenoiser, x_top: Tensor, batch: Batch) -> Tensor:
        """A student sample from the prior state ``x_top``: its own jumps, without gradient,
        to a random one of its sampling times, then one jump to t_min (with gradient if
        enabled; DMD2-style backward simulation for multi-step students)."""
        grid = self.student_sampler().grid(self.path)
        k = batch.rng.shared_randint(0, len(grid) - 1) if len(grid) > 2 else 0
        x = x_top
        with torch.no_grad():
            for t, r in zip(grid[:k], grid[1 : k + 1], strict=True):
                x = student.jump(x, t, r, batch.cond)
        return student.jump(x, grid[k], grid[-1], batch.cond)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, fake = roles["student"], roles["fake_score"]
        path, scale = self.path, span(self.path)
        x_top = path.prior(batch.rng.randn(*sample_shape(batch)))
        losses, logs = {}, {}
        x0 = None
        if "student" in update:
            s, q = self.draw_t_r(batch)
            with torch.no_grad():  # the student's own state at s, reached from the prior
                x_s = student.jump(x_top, path.t_max, to_native(path, s), batch.cond)
                x_s = torch.where(_bcast(s, x_s) >= 1.0, x_top, x_s)

            def v_fn(x, q):
                return scale * self.teacher.predict(x, to_native(path, q), batch.cond, "velocity")

            u_fn = fraction_velocity(student, batch.cond)
            u, target = flow_map_prediction_target(u_fn, v_fn, x_s, s, q, cfg.jvp_mode, cfg.fd_eps)
            loss, sq = adaptive_l2(u - target, cfg.adaptive_p, cfg.adaptive_c)
            logs.update(prediction_loss=loss.item(), prediction_sq_err=sq.mean().item())
            if cfg.corrector_weight > 0:
                x0 = self.generate(student, x_top, batch)
                corr, dm_logs = dm_term(self.teacher, fake, x0, batch, cfg.corrector_t_range)
                logs.update(correction_loss=dm_logs["dm_loss"])
                logs.update(correction_grad_norm=dm_logs["dm_grad_norm"])
                loss = loss + cfg.corrector_weight * corr
            losses["student"] = loss
        if "fake_score" in update:
            if x0 is None:
                with torch.no_grad():
                    x0 = self.generate(student, x_top, batch)
            loss = denoising_loss(fake, x0.detach(), batch.cond, batch)
            logs["fake_score_loss"] = loss.item()
            losses["fake_score"] = loss
        return losses, logs
