"""Hyper-SD: trajectory segmented consistency distillation (TSCD).

Ren et al., "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image
Synthesis" (NeurIPS 2024), sec. 3.1 and alg. 1. The time range [t_min, t_max] is split into
S equal segments with boundaries b_0 = t_min < b_1 < ... < b_S = t_max. Inside a segment
the student is a consistency function to the segment's *lower* boundary, written as a DDIM
jump with its own prediction (the boundary condition f(x, b_k -> b_k) = x holds exactly):
    f_theta(x_t, t -> b_k) = alpha(b_k) x0_theta(x_t, t) + sigma(b_k) eps_theta(x_t, t).
On a grid of N teacher steps (N a multiple of every S), draw a step t_i -> t_{i-1} inside
segment k, noise real data to x_{t_i}, take one teacher ODE step (DDIM / Heun, guided if the
teacher is a CFG wrapper) to x_{t_{i-1}}, and minimise
    d( f_theta(x_{t_i}, t_i -> b_k), f_ema(x_{t_{i-1}}, t_{i-1} -> b_k) )
with the EMA target of ``consistency.py``. S is reduced progressively over training
(8 -> 4 -> 2 -> 1 in the paper), switched by step (``stage_steps`` per stage, derived from the
step alone, so resuming is exact); the student of each stage initialises the next. A student
trained with S segments samples in S deterministic steps: the DDIM jumps between segment
boundaries (``EulerSampler`` over the boundaries, ``segment_sampler``).

Omitted: the human-feedback (reward) stage and the one-step score-distillation (DMD) stage of
sec. 3.2-3.3 — they are separate objectives here (a reward hook and ``dmd2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.models import Denoiser
from fewstep.core.objectives.common import noised
from fewstep.core.objectives.consistency import (
    ConsistencyConfig,
    ConsistencyDistillation,
    pseudo_huber,
)
from fewstep.core.samplers import EulerSampler


@dataclass
class HyperSDConfig(ConsistencyConfig):
    num_intervals: int = 48  # N teacher steps over the whole range; a multiple of each S
    segments: tuple[int, ...] = (8, 4, 2, 1)  # S per stage, decreasing (paper: 8, 4, 2, 1)
    stage_steps: int = 1000  # training steps per stage; the last stage runs to the end


def segment_jump(d: Denoiser, x: Tensor, t: Tensor, boundary: Tensor, cond) -> Tensor:
    """DDIM jump of ``d``'s prediction from (x, t) to ``boundary`` (per-sample times (B,))."""
    x0, eps = d.x0_eps(x, t, cond)
    return d.path.noise(x0, boundary, eps)


class HyperSD(ConsistencyDistillation):
    name = "hyper_sd"
    config_cls = HyperSDConfig
    summary = "trajectory segmented consistency distillation, segments merged 8-4-2-1 (Ren 2024)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        segs = tuple(int(s) for s in cfg.segments)
        if not segs or any(s < 1 for s in segs) or list(segs) != sorted(segs, reverse=True):
            raise ValueError(f"segments must be positive and non-increasing, got {cfg.segments}")
        bad = [s for s in segs if cfg.num_intervals % s]
        if cfg.num_intervals < 1 or bad:
            raise ValueError(
                f"num_intervals ({cfg.num_intervals}) must be a positive multiple of every "
                f"segment count; {bad} do not divide it"
            )
        if cfg.stage_steps < 1:
            raise ValueError(f"stage_steps must be >= 1, got {cfg.stage_steps}")
        if not cfg.student_times and cfg.student_steps % segs[-1]:
            raise ValueError(
                f"student_steps ({cfg.student_steps}) must be a multiple of the last stage's "
                f"segment count ({segs[-1]}): each step must end on a segment boundary"
            )

    def segments_at(self, step: int) -> int:
        """S, the number of segments trained at ``step``."""
        segs = self.config.segments
        return int(segs[min(step // self.config.stage_steps, len(segs) - 1)])

    def _euler(self, fractions) -> EulerSampler:
        return EulerSampler(times=[float(self.path.fraction_to_t(f)) for f in fractions])

    def segment_sampler(self, segments: int) -> EulerSampler:
        """Deterministic sampling in ``segments`` steps: DDIM jumps between the boundaries."""
        return self._euler([1.0 - k / segments for k in range(segments)])

    def student_sampler(self):
        if self.config.student_times:
            return self._euler(self.config.student_times)
        return self.segment_sampler(self.config.student_steps)

    def student_denoiser(self, roles):
        return roles["student"]

    def losses(self, roles, batch, update, step):
        cfg = self.config
        if batch.x is None:
            raise ValueError("hyper_sd needs real data x in the batch")
        x0, n = batch.x, cfg.num_intervals
        per = n // self.segments_at(step)  # teacher steps per segment
        i = batch.rng.randint(1, n + 1)
        b = torch.div(i - 1, per, rounding_mode="floor") * per  # the segment's lower boundary
        t_hi = self.path.fraction_to_t(i.float() / n).to(x0.device)
        t_lo = self.path.fraction_to_t((i.float() - 1) / n).to(x0.device)
        t_b = self.path.fraction_to_t(b.float() / n).to(x0.device)
        x_hi, _ = noised(self.path, x0, t_hi, batch)
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, batch.cond)
            target = segment_jump(roles["target"], x_lo, t_lo, t_b, batch.cond)
        pred = segment_jump(roles["student"], x_hi, t_hi, t_b, batch.cond)
        if cfg.metric == "huber":
            loss = pseudo_huber(pred, target, cfg.huber_c)
        else:
            loss = (pred.float() - target.float()).pow(2).mean()
        return {"student": loss}, {"tscd_loss": loss.item(), "segments": float(n // per)}
