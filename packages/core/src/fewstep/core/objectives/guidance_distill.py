"""Guidance distillation, stage one: one pass instead of two per step.

Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans, "On Distillation of Guided Diffusion Models"
(CVPR 2023), sec. 3.1, eq. 5 (stage one).

A classifier-free guided teacher needs two network evaluations per step,
    f_w(x_t, c) = f(x_t, null) + w (f(x_t, c) - f(x_t, null))
(Ho & Salimans 2022, eq. 6; w = 1 is the conditional model; Meng et al. write 1 + w for our w).
The student takes w as an input (``GuidanceEmbedded``: a zero-initialised Fourier-MLP embedding
of w added to the time embedding, as in the paper and in FLUX-dev's guidance embedding) and is
trained to match it in one pass:
    min E_{w ~ U[w_min, w_max], t, x ~ data, eps} || f_student(x_t, t, c, w) - f_w(x_t, c) ||^2,
with x_t = alpha(t) x + sigma(t) eps the noised data. Guidance is linear in the prediction, so
the loss is written in the teacher's own parameterization (eps, x0, v or velocity) for any
path; the student is sampled with the teacher's ODE solver at a chosen w
(``student_denoiser`` fixes w = ``sample_scale``), at half the teacher's NFE.

Out of scope: the paper's stage two (progressive distillation of the guided student to fewer
steps). Run ``progressive`` or any few-step objective on ``FixedGuidance(student, w)`` for it.

The teacher passed in must be the CFG teacher, ``GuidedDenoiser(base, scale, null_cond=...)``:
its ``null_cond`` builds the unconditional input; its own scale is ignored (w is drawn here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, GuidedDenoiser
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.classifier_free import guided_predict
from fewstep.core.objectives.common import noised, unguided
from fewstep.core.objectives.guidance_embed import FixedGuidance, GuidanceEmbedded, pack_guidance
from fewstep.core.samplers import EulerSampler, Sampler


@dataclass
class GuidanceDistillConfig(ObjectiveConfig):
    student_steps: int = 50  # Euler (DDIM) steps the guided student is sampled with
    scale_range: tuple[float, float] = (1.0, 5.0)  # [w_min, w_max], w drawn uniformly per sample
    sample_scale: float = 3.0  # w that ``student_denoiser`` fixes for sampling / evaluation
    embed_module: str = ""  # dotted name of the time-embedding submodule ("" = auto-detect)
    embed_hidden: int = 128  # width of the guidance-embedding MLP


def cfg_teacher_parts(teacher: Denoiser, who: str) -> tuple[Denoiser, Any]:
    """(conditional network, null_cond) of a ``GuidedDenoiser`` teacher."""
    if not isinstance(teacher, GuidedDenoiser):
        raise TypeError(
            f"{who} distils classifier-free guidance, so its teacher must be the CFG teacher "
            f"GuidedDenoiser(base, scale, null_cond=...); got {type(teacher).__name__}"
        )
    return teacher.base, teacher.null_cond


def guided_prediction(base: Denoiser, null_cond, x_t: Tensor, t: Tensor, cond, w: Tensor):
    """CFG prediction with a per-sample scale w (B,) in ``base``'s own parameterization."""
    return guided_predict(base, x_t, t, cond, w, null_cond, kind=base.prediction)


def draw_scales(batch: Batch, scale_range: tuple[float, float]) -> Tensor:
    lo, hi = scale_range
    return lo + (hi - lo) * batch.rng.rand()


def check_scale_config(cfg, who: str) -> None:
    lo, hi = cfg.scale_range
    if not lo <= hi:
        raise ValueError(
            f"{who}: scale_range must be (w_min, w_max) with w_min <= w_max, got {cfg.scale_range}"
        )
    if cfg.student_steps < 1:
        raise ValueError(f"{who}: student_steps must be >= 1, got {cfg.student_steps}")


class GuidanceDistillation(Objective):
    name = "guidance_distill"
    config_cls = GuidanceDistillConfig
    roles = ("student",)
    needs_data = True
    summary = "one-pass student with a guidance-scale input matches the CFG teacher (Meng 2023)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        self.base, self.null_cond = cfg_teacher_parts(teacher, self.name)
        check_scale_config(self.config, self.name)

    @property
    def path(self):
        return self.base.path

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        cfg = self.config
        net = unguided(student).requires_grad_(True).train()
        wrapped = GuidanceEmbedded(
            net, cfg.embed_module or None, hidden=cfg.embed_hidden, default_scale=cfg.sample_scale
        )
        return {"student": wrapped}

    def student_sampler(self) -> Sampler:
        cfg = self.config
        if cfg.student_times:
            times = [float(self.path.fraction_to_t(f)) for f in cfg.student_times]
            return EulerSampler(times=times)
        return EulerSampler(cfg.student_steps)

    def student_denoiser(self, roles) -> Denoiser:
        return FixedGuidance(roles["student"], self.config.sample_scale)

    def target(self, x_t: Tensor, t: Tensor, cond, w: Tensor) -> Tensor:
        """The guided teacher's output in its own parameterization (no gradient)."""
        with torch.no_grad():
            return guided_prediction(self.base, self.null_cond, x_t, t, cond, w)

    def losses(self, roles, batch, update, step):
        if batch.x is None:
            raise ValueError("guidance_distill trains on noised data: the batch needs x")
        if batch.cond is None:
            raise ValueError("guidance_distill needs conditions (batch.cond) to guide")
        student = roles["student"]
        t = self.path.sample_t(batch.size, batch.rng.rand()).to(batch.x.device)
        x_t, _ = noised(self.path, batch.x, t, batch)
        w = draw_scales(batch, self.config.scale_range).to(x_t.device)
        target = self.target(x_t, t, batch.cond, w)
        pred = student.predict(x_t, t, pack_guidance(batch.cond, w), kind=self.base.prediction)
        loss = F.mse_loss(pred.float(), target.float())
        return {"student": loss}, {"guidance_loss": loss.item()}
