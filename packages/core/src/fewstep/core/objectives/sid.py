"""SiD: Score identity Distillation, few-step, with long-and-short guidance.

Zhou et al., "Score identity Distillation: Exponentially Fast Distillation of Pretrained
Diffusion Models for One-Step Generation" (ICML 2024); Zhou, Gu & Wang, "Few-Step Diffusion
via Score identity Distillation" (2025); Zhou et al., "Guided Score identity Distillation
for Data-Free One-Step Text-to-Image Generation" (ICLR 2025; first titled "Long and Short
Guidance in Score identity Distillation", SiD-LSG).

The student x_g = G(z) is noised, x_t = a x_g + s eps, and both the teacher (real) and the
fake score denoise it to x0-predictions y_real(x_t), y_fake(x_t). SiD's generator loss
(ICML paper eq. 21 with the L2 - alpha L1 combination of sec. 4; ``training/sid_loss.py``
of the official code) is

    L_G = (y_real - y_fake) . ((y_real - x_g) - alpha (y_real - y_fake)) / w,

w = mean |x_g - y_real| per sample (no gradient), alpha = 1.2 by default. Unlike DMD the
gradient flows through both score networks into x_t (their weights stay fixed): this is
what the score identity turns the model-based Fisher divergence into. Per-sample losses are
averaged over elements here (the code sums them; a constant that Adam absorbs). The fake
score is trained on detached student samples with the teacher's denoising loss, one update
per student update (the paper alternates them 1:1).

Few-step (Zhou, Gu & Wang 2025, sec. 3): a K-step student is matched as the uniform mixture
of its K steps' outputs: each batch takes the x0-prediction of one of its steps, chosen
uniformly, from its own rollout (``common.student_x0``); the fake score learns that mixture.

Guidance (class- or text-conditional teachers). SiD-LSG puts classifier-free guidance
scales on four places: kappa_1 on the fake score while it is trained, kappa_2 = kappa_3 on
the fake score inside L_G, kappa_4 on the teacher inside L_G; the fake score is trained with
10 % null conditions whenever it is guided. ``guidance`` picks:

  none       the teacher exactly as given (a ``GuidedDenoiser`` keeps its own scale), the
             fake score conditional and unguided;
  zero_cfg   (few-step SiD) CFG off in the teacher (kappa_4 = 1) and no condition in the
             fake score, neither in training nor in L_G;
  anti_cfg   (few-step SiD) CFG off in the teacher, the fake score guided with a negative
             scale (``anti_scale``) inside L_G, trained with null-condition dropout;
  custom     SiD-LSG with ``real_scale`` (kappa_4), ``fake_train_scale`` (kappa_1) and
             ``fake_scale`` (kappa_2 = kappa_3).

Zero- and Anti-CFG pull the student towards its condition without CFG's loss of
diversity: the generator gradient is (real score given c) - (fake score without c, or
pushed away from c), an implicit classifier guidance measured against the student's own
distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.classifier_free import drop_cond, guided_predict, null_cond_of
from fewstep.core.objectives.common import noised, sample_times, student_x0, unguided

GUIDANCE = ("none", "zero_cfg", "anti_cfg", "custom")

# ------------------------------------------------------------------------- pure functions


def sid_generator_loss(x: Tensor, y_real: Tensor, y_fake: Tensor, alpha: float) -> Tensor:
    """SiD's generator loss, mean over elements (SiD eq. 21 / ``sid_loss.py``).

    x: student samples (B, ...) with gradient; y_real, y_fake: x0-predictions at the noised
    x, with gradient through x_t (B, ...). The per-sample weight 1 / mean|x - y_real| has no
    gradient."""
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        w = (x - y_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    diff = y_real - y_fake
    return (diff * ((y_real - x) - alpha * diff) / w).mean()


def guided_denoising_loss(
    model: Denoiser,
    x0: Tensor,
    cond: Any,
    batch: Batch,
    scale: float = 1.0,
    null_cond: Callable[[Any], Any] | None = None,
) -> Tensor:
    """The denoising loss (``common.denoising_loss``) on the CFG prediction at ``scale``
    (SiD-LSG's kappa_1); at scale 1 it is the plain conditional loss."""
    path = model.path
    t = path.sample_t(batch.size, batch.rng.rand()).to(x0.device)
    x_t, eps = noised(path, x0, t, batch)
    target = path.from_x0_eps(x0, eps, model.prediction, t)
    pred = guided_predict(model, x_t, t, cond, scale, null_cond, kind=model.prediction)
    return F.mse_loss(pred, target)


# ----------------------------------------------------------------------------- objective


@dataclass
class SiDConfig(ObjectiveConfig):
    alpha: float = 1.2  # L2 - alpha L1 combination (paper: 1.2; 1 = pure score identity)
    t_range: tuple[float, float] = (0.02, 0.98)  # generator-loss times, fractions of path
    backward_simulation: bool = True  # few-step: uniform mixture over the student's steps
    guidance: Literal["none", "zero_cfg", "anti_cfg", "custom"] = "none"  # LSG preset
    anti_scale: float = -1.0  # anti_cfg: CFG scale of the fake score inside L_G (< 0)
    real_scale: float = 1.0  # custom: kappa_4, teacher CFG scale inside L_G
    fake_train_scale: float = 1.0  # custom: kappa_1, fake-score CFG scale while trained
    fake_scale: float = 1.0  # custom: kappa_2 = kappa_3, fake-score CFG scale inside L_G
    fake_cond_dropout: float = 0.1  # null-condition rate for a guided fake score
    null_label: int | None = None  # unconditional label when the teacher is no GuidedDenoiser


class SiD(Objective):
    name = "sid"
    config_cls = SiDConfig
    roles = ("student", "fake_score")
    summary = "score identity distillation, few-step mixture, LSG / Zero- / Anti-CFG (Zhou 2024)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.guidance not in GUIDANCE:
            raise ValueError(f"unknown SiD guidance {cfg.guidance!r}; expected one of {GUIDANCE}")
        if cfg.guidance == "anti_cfg" and cfg.anti_scale >= 0:
            raise ValueError(f"anti_cfg needs a negative anti_scale, got {cfg.anti_scale}")
        self.null_cond = null_cond_of(teacher, cfg.null_label)
        if cfg.guidance != "none" and self.null_cond is None:
            raise ValueError(
                f"SiD guidance {cfg.guidance!r} needs a conditional teacher and its null "
                "condition: pass a GuidedDenoiser teacher or set null_label"
            )

    # the four LSG scales: (teacher in L_G, fake while trained, fake in L_G, fake dropout)
    def scales(self) -> tuple[float | None, float, float, float]:
        cfg = self.config
        if cfg.guidance == "none":
            return None, 1.0, 1.0, 0.0  # None: the teacher as given
        if cfg.guidance == "zero_cfg":
            return 1.0, 0.0, 0.0, 0.0  # scale 0 = the null condition only
        if cfg.guidance == "anti_cfg":
            return 1.0, 1.0, cfg.anti_scale, cfg.fake_cond_dropout
        guided = cfg.fake_train_scale != 1.0 or cfg.fake_scale != 1.0
        drop = cfg.fake_cond_dropout if guided else 0.0
        return cfg.real_scale, cfg.fake_train_scale, cfg.fake_scale, drop

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        return {"student": student, "fake_score": trainable_copy(unguided(self.teacher))}

    def real_x0(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        scale = self.scales()[0]
        if scale is None:
            return self.teacher.predict(x_t, t, cond, kind="x0")
        return guided_predict(unguided(self.teacher), x_t, t, cond, scale, self.null_cond)

    def generator_times(self, batch: Batch) -> Tensor:
        """(B,) times of the generator loss: uniform over ``t_range`` of the path. A recipe
        may draw them as its paper does (protein SiD: a log-spaced grid)."""
        return sample_times(self.path, batch, self.config.t_range)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, fake = roles["student"], roles["fake_score"]
        _, train_scale, gen_scale, dropout = self.scales()
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x, _ = student_x0(student, self.student_sampler(), batch, cfg.backward_simulation)

        if "student" in update:
            t = self.generator_times(batch)
            x_t, _ = noised(self.path, x, t, batch)  # gradient flows through x_t
            y_real = self.real_x0(x_t, t, batch.cond)
            y_fake = guided_predict(fake, x_t, t, batch.cond, gen_scale, self.null_cond)
            loss = sid_generator_loss(x, y_real, y_fake, cfg.alpha)
            logs["sid_loss"] = loss.item()
            logs["score_gap"] = (y_real - y_fake).detach().pow(2).mean().item()
            extra, extra_logs = self.generator_extra(fake, x, x_t, t, y_real, batch)
            logs.update(extra_logs)
            losses["student"] = loss + extra

        if "fake_score" in update:
            cond = drop_cond(batch.cond, self.null_cond, dropout, batch)
            loss = guided_denoising_loss(fake, x.detach(), cond, batch, train_scale, self.null_cond)
            logs["fake_score_loss"] = loss.item()
            extra, extra_logs = self.fake_score_extra(fake, x.detach(), batch)
            logs.update(extra_logs)
            losses["fake_score"] = loss + extra
        return losses, logs

    # hooks for SiD variants that add terms (SiDA's adversarial losses); SiD adds none
    def generator_extra(self, fake, x, x_t, t, y_real, batch) -> tuple[Tensor | float, dict]:
        """A term added to the generator loss at SiD's own x_t (gradient through x)."""
        return 0.0, {}

    def fake_score_extra(self, fake, x_g, batch) -> tuple[Tensor | float, dict]:
        """A term added to the fake score's loss, given the detached student samples x_g."""
        return 0.0, {}
