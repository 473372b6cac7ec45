"""rCM: score-regularized continuous-time consistency.

Zheng et al. (NVIDIA), "Large Scale Diffusion Distillation via Score-Regularized
Continuous-Time Consistency" (2025; public code NVlabs/rcm). sCM's forward-divergence
consistency loss (``scm.py``) is "mode-covering" and accumulates error over long skips;
rCM adds DMD's reverse-KL distribution matching as a long-skip regulariser:
    L_student = L_sCM + lambda L_DMD(x),   x = the student's few-step sample,
with L_DMD the DMD generator loss (Yin et al. 2024, eqs. 7-8; ``dmd2.dmd_loss``) between
the teacher and a fake score trained on the student's samples with the denoising loss.
As in the reference code: the DMD term and the fake-score updates start after the tangent
warmup (``dmd_start``); afterwards the fake score is updated every step and the student every
``fake_updates_per_student`` steps; the student's sample comes from noise through its own
few-step sampler, starting the gradient step at a random one of its steps (backward
simulation, ``common.student_x0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, trainable_copy
from fewstep.core.objectives.common import (
    denoising_loss,
    student_x0,
    unguided,
)
from fewstep.core.objectives.dmd2 import dm_term
from fewstep.core.objectives.scm import SCM, SCMConfig


@dataclass
class RCMConfig(SCMConfig):
    dmd_weight: float = 1.0  # lambda: weight of the DMD regulariser in the student's loss
    dmd_start: int | None = None  # first step with DMD and fake-score updates (None: warmup)
    fake_updates_per_student: int = 5  # after dmd_start: steps per student update (rCM: 5)
    dmd_t_range: tuple[float, float] = (0.02, 0.98)  # DMD times as fractions of the path
    backward_simulation: bool = True  # multi-step: DMD on the student's own rollouts


class RCM(SCM):
    name = "rcm"
    config_cls = RCMConfig
    roles = ("student", "fake_score")
    summary = "sCM plus a DMD reverse-KL regulariser for long skips (Zheng 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.dmd_weight < 0 or cfg.fake_updates_per_student < 1:
            raise ValueError("dmd_weight must be >= 0 and fake_updates_per_student >= 1")
        self.dmd_start = cfg.tangent_warmup if cfg.dmd_start is None else cfg.dmd_start

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        roles = super().build_roles(student, example)
        roles["fake_score"] = trainable_copy(unguided(self.teacher))
        return roles

    def schedule(self, step: int) -> list[str]:
        student = ["student", "weighting"] if self.config.adaptive_weighting else ["student"]
        if step < self.dmd_start:
            return student
        if (step - self.dmd_start) % self.config.fake_updates_per_student == 0:
            return [*student, "fake_score"]
        return ["fake_score"]

    def losses(self, roles, batch, update, step):
        cfg = self.config
        fake = roles["fake_score"]
        losses, logs = {}, {}
        x = None
        if "student" in update:
            x_t, t, dxdt, cond = self.training_points(roles, batch)
            loss, logs = self.scm_loss(roles, x_t, t, dxdt, cond, step)
            if step >= self.dmd_start and cfg.dmd_weight > 0:
                x = self.generate(roles, batch)
                dmd, dm_logs = dm_term(self.teacher, fake, x, batch, cfg.dmd_t_range)
                logs.update(dm_logs)
                loss = loss + cfg.dmd_weight * dmd
            for r in update:
                if r != "fake_score":
                    losses[r] = loss
        if "fake_score" in update:
            if x is None:
                with torch.no_grad():
                    x = self.generate(roles, batch)
            loss = denoising_loss(fake, x.detach(), batch.cond, batch)
            logs["fake_score_loss"] = loss.item()
            losses["fake_score"] = loss
        return losses, logs

    def generate(self, roles, batch: Batch):
        """A student sample x0 (with gradient when enabled) from its TrigFlow view."""
        x, _ = student_x0(
            self.view(roles["student"]),
            self.student_sampler(),
            batch,
            self.config.backward_simulation,
        )
        return x
