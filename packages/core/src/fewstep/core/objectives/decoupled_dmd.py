"""Decoupled DMD: CFG augmentation (the engine) and distribution matching (the regulariser).

Liu, Gao, Liu, Du, Li, Wu, Jin, Cao, Zhang, Li and Hoi, "Decoupled DMD: CFG Augmentation as
the Spear, Distribution Matching as the Shield" (arXiv 2511.22677, 2025; ICLR 2026).

DMD with a guided real score x0_cfg = x0_u + w (x0_c - x0_u) (classifier-free guidance, Ho &
Salimans 2022, eq. 6; c = conditional, u = unconditional teacher) has the generator gradient
(DMD eq. 7, in x0 form)

    g = x0_fake - x0_cfg = (x0_fake - x0_c) - (w - 1) (x0_c - x0_u)
      =        g_DM       +         g_CA

The paper's decomposition: g_CA, CFG augmentation, bakes the guidance direction into the
student and drives few-step quality (the "engine"); g_DM, distribution matching against the
*unguided* conditional teacher, is the regulariser that keeps training stable (the
"shield"). Decoupled, each term has its own weight and its own re-noising time range (the
paper decouples the noise schedules of the two terms); with equal ranges both terms share
one re-noising draw, and with ``ca_weight = dm_weight = 1`` the gradient is exactly DMD's with
the guided teacher. Each term is normalised like DMD (eq. 8), by 1 / mean|x - x0_cfg| at its
own point. On the 2-D ring of tests/core (label k = mode k, w = 2) the coupled schedule pushes
the student off the ring, since at high noise x0_c - x0_u points from the ring's centre to
the mode; CA re-noised only at low noise (``ca_t_range=(0.02, 0.5)``) with DM over the whole
path learns the conditional ring.

The teacher is either a ``GuidedDenoiser`` (its base network, null condition and, unless
``guidance_scale`` is given, its scale are used) or a plain conditional denoiser with
``null_label`` naming the unconditional class. The fake score, its training and the TTUR
schedule are DMD2's (``dmd2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.models import GuidedDenoiser, _concat_cond
from fewstep.core.objectives.common import noised, sample_times, student_x0
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config, dmd_loss

DEFAULT_RANGE = (0.02, 0.98)


@dataclass
class DecoupledDMDConfig(DMD2Config):
    guidance_scale: float | None = None  # CFG scale w; None: the GuidedDenoiser teacher's own
    null_label: int | None = None  # unconditional class label for a teacher without CFG wrapper
    ca_weight: float = 1.0  # weight of the CFG-augmentation term (w - 1)(x0_c - x0_u)
    dm_weight: float = 1.0  # weight of the distribution-matching term x0_fake - x0_c
    ca_t_range: tuple[float, float] = DEFAULT_RANGE  # CA re-noising times (path fractions)
    dm_t_range: tuple[float, float] = DEFAULT_RANGE  # DM re-noising times (path fractions)


def decoupled_dmd_loss(
    x: Tensor,
    dm: tuple[Tensor, Tensor, Tensor],
    ca: tuple[Tensor, Tensor] | None,
    scale: Tensor | float,
    dm_weight: float = 1.0,
    ca_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Surrogate whose gradient wrt x is
        dm_weight n_dm (x0_fake - x0_c) - ca_weight n_ca (w - 1) (x0_c' - x0_u')   (/ numel)
    with n = 1 / mean|x - x0_cfg| per sample at each term's own re-noising point.

    x: (B, ...) student samples; dm = (x0_c, x0_u, x0_fake) at the DM point; ca = (x0_c',
    x0_u') at the CA point (None: CA is off); scale: w, a float or (B, 1, ...)."""
    c, u, fake = dm
    cfg_dm = c + (scale - 1) * (c - u)
    # dmd_loss's gradient is (its x0_fake - its x0_real) / |x - its x0_real|: pass the DM
    # difference shifted onto the guided normaliser
    dm_loss, dm_norm = dmd_loss(x, cfg_dm, cfg_dm + (fake - c))
    loss = dm_weight * dm_loss
    logs = {"dm_loss": dm_loss.item(), "dm_grad_norm": dm_norm.mean().item()}
    if ca is not None:
        c2, u2 = ca
        cfg_ca = c2 + (scale - 1) * (c2 - u2)
        # CA is DMD with the conditional teacher in the fake score's place: c2 - cfg_ca
        ca_loss, ca_norm = dmd_loss(x, cfg_ca, c2)
        loss = loss + ca_weight * ca_loss
        logs.update(ca_loss=ca_loss.item(), ca_grad_norm=ca_norm.mean().item())
    return loss, logs


class DecoupledDMD(DMD2):
    name = "decoupled_dmd"
    config_cls = DecoupledDMDConfig
    roles = ("student", "fake_score")
    summary = (
        "DMD split into CFG augmentation and distribution matching, own weights/times (Liu 2025)"
    )

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.gan_weight > 0:
            raise ValueError("decoupled_dmd has no GAN head; set gan_weight=0 (or use dmd2)")
        if tuple(cfg.t_range) != DEFAULT_RANGE:
            raise ValueError("decoupled_dmd uses dm_t_range and ca_t_range, not t_range")
        for key in ("ca_t_range", "dm_t_range"):
            lo, hi = getattr(cfg, key)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{key} must be fractions 0 <= lo <= hi <= 1, got {(lo, hi)}")
        if cfg.ca_weight < 0 or cfg.dm_weight < 0:
            raise ValueError("ca_weight and dm_weight must be >= 0")
        t = self.teacher
        if isinstance(t, GuidedDenoiser):
            self.cond_teacher = t.base
            self._null = (lambda c: t.negative) if t.negative is not None else t.null_cond
            self.scale = t.scale if cfg.guidance_scale is None else cfg.guidance_scale
        else:
            self.cond_teacher = t
            label = cfg.null_label
            self._null = None if label is None else (lambda c: torch.full_like(c, label))
            self.scale = 1.0 if cfg.guidance_scale is None else cfg.guidance_scale
        if self.guided and self._null is None:
            raise ValueError(
                f"decoupled_dmd with guidance_scale={self.scale} needs the unconditional "
                "input: pass a GuidedDenoiser teacher or set null_label"
            )

    @property
    def guided(self) -> bool:
        return isinstance(self.scale, tuple) or float(self.scale) != 1.0

    def guidance(self, batch: Batch, like: Tensor) -> Tensor | float:
        """w: a float, or per-sample draws (B, 1, ...) for a (low, high) scale range."""
        if isinstance(self.scale, tuple):
            lo, hi = self.scale
            u = batch.rng.rand().to(like)
            return (lo + (hi - lo) * u).reshape(-1, *([1] * (like.ndim - 1)))
        return float(self.scale)

    def teacher_pair(self, x_t: Tensor, t: Tensor, cond) -> tuple[Tensor, Tensor]:
        """(x0_cond, x0_uncond) of the teacher at (x_t, t), in one batched call."""
        both = self.cond_teacher.predict(
            torch.cat([x_t, x_t]), torch.cat([t, t]), _concat_cond(cond, self._null(cond)), "x0"
        )
        return both.chunk(2)

    def generate(self, student, batch):
        cached = getattr(self, "_sample", None)
        return cached if cached is not None else super().generate(student, batch)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, fake = roles["student"], roles["fake_score"]["score"]
        cond = batch.cond
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x, _ = student_x0(student, self.student_sampler(), batch, cfg.backward_simulation)

        if "student" in update:
            if self.guided and cond is None:
                raise ValueError("decoupled_dmd with guidance needs conditions in batch.cond")
            w = self.guidance(batch, x)
            xd = x.detach()
            tau = sample_times(self.path, batch, cfg.dm_t_range)
            x_t, _ = noised(self.path, xd, tau, batch)
            with torch.no_grad():
                if self.guided:
                    c, u = self.teacher_pair(x_t, tau, cond)
                else:
                    c = u = self.cond_teacher.predict(x_t, tau, cond, kind="x0")
                f = fake.predict(x_t, tau, cond, kind="x0")
                ca = None
                ca_window = tuple(cfg.ca_t_range)
                if self.guided and cfg.ca_weight > 0:
                    if ca_window == tuple(cfg.dm_t_range):  # shared re-noising draw
                        ca = (c, u)
                    else:
                        tau2 = sample_times(self.path, batch, ca_window)
                        x_t2, _ = noised(self.path, xd, tau2, batch)
                        ca = self.teacher_pair(x_t2, tau2, cond)
            loss, term_logs = decoupled_dmd_loss(x, (c, u, f), ca, w, cfg.dm_weight, cfg.ca_weight)
            losses["student"] = loss
            logs.update(term_logs)

        if "fake_score" in update:  # DMD2's fake-score update on this step's samples
            self._sample = x
            try:
                critic, critic_logs = super().losses(roles, batch, ["fake_score"], step)
            finally:
                self._sample = None
            losses.update(critic)
            logs.update(critic_logs)
        return losses, logs
