"""Progressive distillation: halve the number of DDIM steps, round after round.

Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR 2022),
alg. 2 and sec. 3-4. In a round whose teacher samples with N DDIM steps on the uniform grid
of path fractions i / N, the student learns to take ONE step where the teacher takes TWO:
for real data x, i ~ U{1..N/2}, fractions f = 2i/N, f' = f - 1/N, f'' = f - 2/N and
z_t = alpha_t x + sigma_t eps,
    z_t'  = alpha_t'  x_eta(z_t)  + sigma_t'  eps_eta(z_t)        (teacher DDIM step)
    z_t'' = alpha_t'' x_eta(z_t') + sigma_t'' eps_eta(z_t')       (teacher DDIM step)
    x~    = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
the clean sample from which one DDIM step of the student from z_t lands exactly on z_t''
(alg. 2; f'' = 0 means clean data: alpha = 1, sigma = 0, so x~ = the teacher's second x0).
The loss is w(lambda_t) ||x~ - x_theta(z_t)||^2 with the truncated-SNR weight
w = max(alpha_t^2 / sigma_t^2, 1) (sec. 4), in the teacher's x-space; ``weighting="native"``
instead converts x~ into the student's own parameterization (eps, v, velocity, ...) and
uses the plain squared error there. Then the student becomes the teacher, N halves, and the
next round starts, from ``teacher_steps`` down to ``student_steps``.

One trainer run: round r = min(step // round_steps, rounds - 1) distils the N = teacher_steps
/ 2^r step teacher; round 0's teacher is the given teacher (guided if it is a CFG wrapper),
later rounds' is the frozen role ``round_teacher``, into which ``after_update`` copies the
student at each round boundary (checkpointed, so resuming mid-run is exact). Sampling is
deterministic DDIM with ``student_steps`` uniform steps (``EulerSampler``; see
``common.euler_grid``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, frozen_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import euler_grid, noised
from fewstep.core.objectives.reflow import per_sample
from fewstep.core.paths import Path
from fewstep.core.samplers import EulerSampler


@dataclass
class ProgressiveConfig(ObjectiveConfig):
    teacher_steps: int = 8  # N of round 0's teacher; halves every round down to student_steps
    round_steps: int = 200  # optimisation steps per round (the last round takes any extra)
    weighting: Literal["truncated_snr", "native"] = "truncated_snr"  # loss space and weight


def grid_coeffs(path: Path, frac: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) broadcastable to ``like`` at path fractions (B,); fraction 0 is clean
    data exactly (alpha = 1, sigma = 0), where the sampler's last step lands."""
    a, s = path.coeffs(path.fraction_to_t(frac).to(like.device), like)
    clean = (frac == 0).to(like.device).reshape(a.shape)
    return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)


def ddim_step(model: Denoiser, z: Tensor, t: Tensor, a_next: Tensor, s_next: Tensor, cond):
    """alpha' x_hat + sigma' eps_hat from (z, t) (DDIM, Song et al. 2021 eq. 12)."""
    x0, eps = model.x0_eps(z, t, cond)
    return a_next * x0 + s_next * eps


def two_step_target(teacher: Denoiser, path: Path, z_t: Tensor, f: Tensor, n: int, cond) -> Tensor:
    """Salimans & Ho alg. 2: the x~ for which one DDIM step from (z_t, f) equals two of the
    teacher's steps f -> f - 1/n -> f - 2/n. z_t: (B, ...), f: (B,) fractions."""
    f1, f2 = f - 1.0 / n, f - 2.0 / n
    a, s = grid_coeffs(path, f, z_t)
    a1, s1 = grid_coeffs(path, f1, z_t)
    a2, s2 = grid_coeffs(path, f2, z_t)
    t, t1 = path.fraction_to_t(f).to(z_t.device), path.fraction_to_t(f1).to(z_t.device)
    z1 = ddim_step(teacher, z_t, t, a1, s1, cond)
    z2 = ddim_step(teacher, z1, t1, a2, s2, cond)
    ratio = s2 / s
    return (z2 - ratio * z_t) / (a2 - ratio * a)


class ProgressiveDistillation(Objective):
    name = "progressive"
    config_cls = ProgressiveConfig
    roles = ("student",)
    frozen_roles = ("round_teacher",)
    needs_data = True
    summary = "progressive distillation: one student step = two teacher DDIM steps (Salimans 2022)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.student_times:
            raise ValueError(
                "progressive distillation halves a uniform grid; set student_steps, "
                f"not student_times (got {cfg.student_times})"
            )
        ratio = cfg.teacher_steps // max(cfg.student_steps, 1)
        if (
            cfg.student_steps < 1
            or cfg.teacher_steps % cfg.student_steps
            or ratio < 2
            or ratio & (ratio - 1)
        ):
            raise ValueError(
                "progressive: teacher_steps must be student_steps times a power of two >= 2, "
                f"got teacher_steps={cfg.teacher_steps}, student_steps={cfg.student_steps}"
            )
        if cfg.round_steps < 1:
            raise ValueError(f"progressive: round_steps must be >= 1, got {cfg.round_steps}")
        if cfg.weighting not in ("truncated_snr", "native"):
            raise ValueError(
                f"progressive: weighting must be 'truncated_snr' or 'native', got {cfg.weighting!r}"
            )
        self.rounds = ratio.bit_length() - 1  # log2(teacher_steps / student_steps)

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        if type(student.path) is not type(self.path):
            raise ValueError(
                f"progressive: the student must live on the teacher's path ({self.path.name}), "
                f"got {student.path.name}"
            )
        return {"student": student, "round_teacher": frozen_copy(student)}

    def round_of(self, step: int) -> int:
        return min(step // self.config.round_steps, self.rounds - 1)

    def steps_in_round(self, step: int) -> int:
        """N: the DDIM steps of this round's teacher."""
        return self.config.teacher_steps >> self.round_of(step)

    def losses(self, roles, batch, update, step):
        if batch.x is None:
            raise ValueError("progressive distillation needs real data x in the batch")
        cfg, path, x = self.config, self.path, batch.x
        n = self.steps_in_round(step)
        teacher = self.teacher if self.round_of(step) == 0 else roles["round_teacher"]
        student = roles["student"]
        f = 2.0 * batch.rng.randint(1, n // 2 + 1).float() / n  # student grid fractions
        t = path.fraction_to_t(f).to(x.device)
        z_t, _ = noised(path, x, t, batch)
        with torch.no_grad():
            target = two_step_target(teacher, path, z_t, f, n, batch.cond)
        if cfg.weighting == "native":
            kind = student.prediction
            pred = student(z_t, t, batch.cond)
            err = per_sample((pred - path.convert(target, "x0", kind, z_t, t)).pow(2))
        else:
            pred = student.predict(z_t, t, batch.cond, kind="x0")
            a, s = path.coeffs(t, x)
            w = (a * a / (s * s)).clamp_min(1.0).flatten()  # truncated SNR (sec. 4)
            err = w * per_sample((pred - target).pow(2))
        loss = err.mean()
        return {"student": loss}, {"progressive_loss": loss.item(), "teacher_steps": float(n)}

    def after_update(self, roles, updated, step):
        if self.round_of(step + 1) != self.round_of(step):  # the round ends: student -> teacher
            roles["round_teacher"].load_state_dict(roles["student"].state_dict())

    def student_sampler(self) -> EulerSampler:
        return euler_grid(self.path, self.config.student_steps)
