"""DMD: distribution matching distillation with a regression loss.

Yin, Gharbi, Zhang, Shechtman, Durand, Freeman & Park, "One-step Diffusion with
Distribution Matching Distillation" (CVPR 2024).

The one-step generator G is trained with
  * the distribution-matching gradient (eqs. 7-8): grad_x ~ w (x0_fake(x_t) - x0_real(x_t))
    on the noised sample x_t, w = 1 / mean|x - x0_real| per sample (DMD2's ``dmd_loss``);
  * the regression loss (eq. 9): lambda_reg * l(G(z_ref), y_ref) over a fixed set of
    (noise, teacher ODE output) pairs, generated once with a deterministic teacher sampler.
    The paper uses LPIPS (lambda_reg = 0.25); LPIPS needs downloaded weights, so the metric
    is configurable: l2 or pseudo-Huber (``consistency.pseudo_huber``, LCM's choice).
The fake score is trained on detached generator samples with the teacher's denoising loss,
once per generator update (sec. 3.2; DMD2's two time-scale rule is the later fix).

The pair set is built in ``build_roles`` from the teacher (guided, if the teacher is a CFG
wrapper: DMD's text-to-image pairs use the guided teacher) and kept as buffers of the frozen
role ``pairs``, so checkpoints carry it and a resumed run regresses on the same pairs.
Conditional teachers get pair conditions drawn (seeded) from the example batch's
conditions. The regression needs no backward simulation: it is the student's single jump
from the pair's noise at its first time; a multi-step student regresses that first step and
gets the distribution-matching gradient on its own backward-simulated inputs (DMD2 sec. 4.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch, index_cond
from fewstep.core.models import Denoiser, _batch_t, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    denoising_loss,
    sample_shape,
    student_x0,
    unguided,
)
from fewstep.core.objectives.consistency import pseudo_huber
from fewstep.core.objectives.dmd2 import dm_term
from fewstep.core.samplers import EulerSampler, HeunSampler


@dataclass
class DMDConfig(ObjectiveConfig):
    t_range: tuple[float, float] = (0.02, 0.98)  # DM-loss times as fractions of the path
    reg_weight: float = 0.25  # lambda_reg (paper: 0.25 with LPIPS)
    reg_metric: Literal["l2", "huber"] = "l2"  # regression distance (paper: LPIPS)
    huber_c: float = 0.03  # pseudo-Huber c for reg_metric="huber"
    num_pairs: int = 1024  # size of the (noise, teacher output) pair set
    pair_steps: int = 50  # teacher ODE steps per pair
    pair_solver: Literal["euler", "heun"] = "euler"  # deterministic teacher sampler (euler = DDIM)
    pair_seed: int = 0  # seed of the pair noise and pair conditions
    backward_simulation: bool = True  # multi-step: DM gradient on the student's own rollouts


class PairSet(nn.Module):
    """The fixed regression set: noise (N, ...), teacher outputs (N, ...), conditions (N,
    ...) or none, as buffers (a frozen role, so checkpoints carry it)."""

    def __init__(self, noise: Tensor, target: Tensor, cond: Any = None):
        super().__init__()
        self.register_buffer("noise", noise)
        self.register_buffer("target", target)
        self.cond_keys: list[str] | None = None
        if isinstance(cond, dict):
            self.cond_keys = sorted(cond)
            for k in self.cond_keys:
                self.register_buffer(f"cond_{k}", cond[k])
        elif cond is not None:
            self.register_buffer("cond", cond)

    def __len__(self) -> int:
        return self.noise.shape[0]

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor, Any]:
        idx = idx.to(self.noise.device)
        if self.cond_keys is not None:
            cond = {k: getattr(self, f"cond_{k}")[idx] for k in self.cond_keys}
        else:
            cond = self.cond[idx] if hasattr(self, "cond") else None
        return self.noise[idx], self.target[idx], cond


def regression_loss(pred: Tensor, target: Tensor, metric: str, huber_c: float) -> Tensor:
    """DMD eq. 9's distance with l2 (mean squared error) or pseudo-Huber in place of LPIPS."""
    if metric == "l2":
        return F.mse_loss(pred.float(), target.float())
    if metric == "huber":
        return pseudo_huber(pred, target, huber_c)
    raise ValueError(f"unknown regression metric {metric!r}; expected 'l2' or 'huber'")


class DMD(Objective):
    name = "dmd"
    config_cls = DMDConfig
    roles = ("student", "fake_score")
    frozen_roles = ("pairs",)
    summary = "distribution matching + regression on teacher ODE pairs (Yin 2024, CVPR)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.reg_metric not in ("l2", "huber"):
            raise ValueError(f"unknown reg_metric {cfg.reg_metric!r}; expected 'l2' or 'huber'")
        if cfg.pair_solver not in ("euler", "heun"):
            raise ValueError(f"unknown pair_solver {cfg.pair_solver!r}; expected euler or heun")
        if cfg.num_pairs < 1 or cfg.pair_steps < 1:
            raise ValueError("num_pairs and pair_steps must be >= 1")

    @torch.no_grad()
    def make_pairs(self, example: Batch) -> PairSet:
        """(noise, teacher ODE output, condition) triples from the seeded noise."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.pair_seed)
        device = example.rng.device
        noise = torch.randn(cfg.num_pairs, *sample_shape(example), generator=gen).to(device)
        cond = None
        if example.cond is not None:
            idx = torch.randint(0, example.size, (cfg.num_pairs,), generator=gen)
            cond = index_cond(example.cond, idx)
        sampler = (EulerSampler if cfg.pair_solver == "euler" else HeunSampler)(cfg.pair_steps)
        target = sampler.sample(self.teacher, noise, cond).x
        return PairSet(noise, target, cond)

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        return {
            "student": student,
            "fake_score": trainable_copy(unguided(self.teacher)),
            "pairs": self.make_pairs(example),
        }

    def one_jump(self, student: Denoiser, noise: Tensor, cond) -> Tensor:
        """The student's x0 from pure noise at its first time (its one-step sample)."""
        t0 = self.student_sampler().native_times(self.path)[0]
        t = _batch_t(t0, noise)
        return student.predict(self.path.noise(torch.zeros_like(noise), t, noise), t, cond)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, fake, pairs = roles["student"], roles["fake_score"], roles["pairs"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x, _ = student_x0(student, self.student_sampler(), batch, cfg.backward_simulation)

        if "student" in update:
            dm, dm_logs = dm_term(self.teacher, fake, x, batch, cfg.t_range)
            noise, target, cond = pairs.take(batch.rng.randint(0, len(pairs)))
            reg = regression_loss(
                self.one_jump(student, noise, cond), target, cfg.reg_metric, cfg.huber_c
            )
            logs.update(dm_logs, reg_loss=reg.item())
            losses["student"] = dm + cfg.reg_weight * reg

        if "fake_score" in update:
            loss = denoising_loss(fake, x.detach(), batch.cond, batch)
            logs["fake_score_loss"] = loss.item()
            losses["fake_score"] = loss
        return losses, logs
