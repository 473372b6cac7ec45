"""A 2-D prior seen from 3-D: renders into the prior's image space, guided predictions through
core's path conversions, and the timestep schedules of score distillation.

The prior is a ``fewstep.core.priors.Prior2D`` (e.g. ``load_prior("digits")``): a frozen core
``Denoiser`` with a declared path and parameterisation. Nothing here assumes either: eps and
x0 come from ``Path.to_x0_eps`` and classifier-free guidance from core's ``guided_predict``
(guidance is linear in every parameterisation, so guiding the raw output is exact).

Times are drawn as fractions of the prior's path (0 = data, 1 = noise) and mapped to its
native unit with ``Path.fraction_to_t``, so "t in [0.02, 0.98]" means the same thing on a
rectified flow, a 1000-step VP table or an EDM sigma range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.core.models import Denoiser
from fewstep.core.objectives.classifier_free import guided_predict
from fewstep.core.objectives.common import unguided
from fewstep.core.paths import Path
from fewstep.core.priors import Prior2D

# ITU-R BT.601 luma weights: RGB renders -> the grey images a 1-channel prior was trained on.
LUMA = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------------- time schedules


@dataclass
class TimeSchedule:
    """Which fractions of the prior's path score distillation draws t from, over a run.

    ``progress`` = step / total_steps in [0, 1]. Each schedule gives a range (lo, hi) of
    path fractions; t is drawn uniformly in it, or set to hi when ``deterministic``.
    """

    name: str = "uniform"  # one of SCHEDULES: uniform, prolific, linear, sqrt
    t_min: float = 0.02  # lower end of the range (all schedules)
    t_max: float = 0.98  # upper end at the start of the run
    t_max_end: float = 0.5  # upper end once annealed (prolific, linear, sqrt)
    switch: float = 0.2  # prolific: fraction of the run after which the upper end drops
    anneal_until: float = 1.0  # linear, sqrt: fraction of the run by which annealing ends
    deterministic: bool = False  # t = the annealed upper end (no draw), as DreamTime/Consistent3D


def _uniform(s: TimeSchedule, p: float) -> tuple[float, float]:
    """DreamFusion (Poole et al. 2022, sec. 3): t ~ U(0.02, 0.98) throughout."""
    return s.t_min, s.t_max


def _prolific(s: TimeSchedule, p: float) -> tuple[float, float]:
    """ProlificDreamer (Wang et al. 2023, sec. 5 / App. C.1) two-stage annealing: U(0.02, 0.98)
    for the first ``switch`` of the run (5k of 25k steps), then U(0.02, 0.5)."""
    return (s.t_min, s.t_max) if p < s.switch else (s.t_min, s.t_max_end)


def _annealed(s: TimeSchedule, p: float) -> float:
    """Progress through the annealing phase (the first ``anneal_until`` of the run), in [0, 1]."""
    return min(p / s.anneal_until, 1.0) if s.anneal_until > 0 else 1.0


def _linear(s: TimeSchedule, p: float) -> tuple[float, float]:
    """Upper end decays linearly from t_max to t_max_end: LucidDreamer / Dreamer XL's
    warm-up (max step 0.98 -> 0.5 as ``warm_up_rate`` goes 1 -> 0 over ``warmup_iter``)."""
    return s.t_min, s.t_max + (s.t_max_end - s.t_max) * _annealed(s, p)


def _sqrt(s: TimeSchedule, p: float) -> tuple[float, float]:
    """Upper end decays with sqrt(progress): Consistent3D's ``anneal_t`` (700 -> 100 on the
    1000-step table); with ``deterministic`` it is the monotone, non-increasing t(step)
    schedule that DreamTime (Huang et al. 2023) argues for, fast early and slow late."""
    return s.t_min, s.t_max + (s.t_max_end - s.t_max) * math.sqrt(_annealed(s, p))


# Schedule name -> (schedule, progress) -> (lo, hi) path fractions.
SCHEDULES: dict[str, Callable[[TimeSchedule, float], tuple[float, float]]] = {
    "uniform": _uniform,
    "prolific": _prolific,
    "linear": _linear,
    "sqrt": _sqrt,
}


def schedule_range(schedule: TimeSchedule, step: int, total_steps: int) -> tuple[float, float]:
    """(lo, hi) path fractions at ``step`` of ``total_steps``."""
    if schedule.name not in SCHEDULES:
        raise ValueError(
            f"unknown time schedule {schedule.name!r}; expected one of {list(SCHEDULES)}"
        )
    if not 0.0 <= schedule.t_min <= min(schedule.t_max, schedule.t_max_end) <= 1.0:
        raise ValueError(
            "time schedule needs 0 <= t_min <= t_max, t_max_end <= 1, got "
            f"t_min={schedule.t_min}, t_max={schedule.t_max}, t_max_end={schedule.t_max_end}"
        )
    p = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return SCHEDULES[schedule.name](schedule, p)


def annealed_progress(schedule: TimeSchedule, step: int, total_steps: int) -> float:
    """How far the schedule's annealing phase has run at ``step``, in [0, 1] (methods that
    anneal other quantities with the same warm-up, e.g. TSM's interval, read it)."""
    p = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return _annealed(schedule, p)


def draw_fractions(
    schedule: TimeSchedule,
    n: int,
    step: int,
    total_steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n,) path fractions for this step (uniform in the schedule's range, or its upper end)."""
    lo, hi = schedule_range(schedule, step, total_steps)
    if schedule.deterministic:
        return torch.full((n,), hi)
    return lo + (hi - lo) * torch.rand(n, generator=generator)


# ----------------------------------------------------------------------------- the adapter


class PriorAdapter:
    """A ``Prior2D`` as 3-D score distillation uses it.

    ``to_prior`` maps renders (C, H, W, 3) in [0, 1] to the prior's images
    (C, channels, size, size) in its value range, differentiably: area-average down to
    ``size`` (the box filter every pixel of the prior integrates), BT.601 luma when the prior
    is grey, then a linear map [0, 1] -> value_range. ``predict`` gives eps / x0 / any
    parameterisation under classifier-free guidance at scale ``guidance_scale``
    (uncond + s (cond - uncond), Ho & Salimans 2022 eq. 6; 1 = conditional only).
    """

    def __init__(self, prior: Prior2D, guidance_scale: float = 1.0):
        if prior.channels not in (1, 3):
            raise ValueError(f"priors with 1 or 3 channels are supported, got {prior.channels}")
        self.prior = prior
        self.denoiser: Denoiser = unguided(prior.denoiser)
        self.guidance_scale = float(guidance_scale)
        if self.guidance_scale != 1.0 and prior.null_cond is None:
            raise ValueError(
                f"guidance_scale {guidance_scale} needs a conditional prior with null_cond; "
                "this prior has none (use guidance_scale=1)"
            )

    # -- what the prior is
    @property
    def path(self) -> Path:
        return self.denoiser.path

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, size, size) of one prior image."""
        return (self.prior.channels, self.prior.size, self.prior.size)

    def null_cond(self, cond: Any) -> Any:
        if self.prior.null_cond is None:
            raise ValueError("this prior is unconditional: it has no null condition")
        return self.prior.null_cond(cond)

    # -- images
    def to_prior(self, images: Tensor) -> Tensor:
        """Renders (C, H, W, 3) in [0, 1] -> prior images (C, channels, size, size)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"renders must be (C, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)
        if self.prior.channels == 1:
            w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        s = self.prior.size
        if x.shape[-2:] != (s, s):
            mode = "area" if min(x.shape[-2:]) >= s else "bilinear"
            x = F.interpolate(x, size=(s, s), mode=mode)
        lo, hi = self.prior.value_range
        return lo + (hi - lo) * x

    def from_prior(self, x: Tensor) -> Tensor:
        """Prior images (B, channels, size, size) -> [0, 1] (for pictures and reports)."""
        lo, hi = self.prior.value_range
        return ((x - lo) / (hi - lo)).clamp(0, 1)

    def classify(self, x: Tensor) -> Tensor:
        """Logits of the prior's classifier on prior images (B, channels, size, size)."""
        clf = self.prior.classify
        if clf is None:
            raise ValueError("this prior has no classifier (Prior2D.classify is None)")
        params = list(clf.parameters()) if isinstance(clf, torch.nn.Module) else []
        return clf(x.to(params[0].device) if params else x)

    # -- predictions
    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Any,
        kind: str = "eps",
        guidance_scale: float | None = None,
        model: Denoiser | None = None,
    ) -> Tensor:
        """Guided prediction of ``kind`` (eps, x0, v, velocity, score) at (x_t (B, ...),
        t (B,) native time, cond). ``model`` defaults to the prior's denoiser (a critic that
        shares the prior's path and null condition can be passed instead)."""
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        null = self.prior.null_cond if s != 1.0 else None
        return guided_predict(model or self.denoiser, x_t, t, cond, s, null, kind=kind)

    def fractions_to_t(self, fractions: Tensor) -> Tensor:
        """Path fractions (B,) in [0, 1] -> native times (B,)."""
        return self.path.fraction_to_t(fractions).reshape(-1)

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) broadcast against ``like`` (B, ...)."""
        return self.path.coeffs(t.to(like.device), like)
