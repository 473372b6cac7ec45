"""Classifier-free guidance helpers shared by objectives that guide their own networks
(SiD-LSG, VSD, guidance distillation, AGD): the guided prediction, condition dropout, and
the unconditional input. Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, GuidedDenoiser, _batch_t, _concat_cond
from fewstep.core.paths import _bcast


def guided_predict(
    model: Denoiser,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    scale: float | Tensor,
    null_cond: Callable[[Any], Any] | None,
    kind: str = "x0",
) -> Tensor:
    """CFG prediction uncond + scale (cond - uncond) in any parameterization ``kind``
    (guidance is linear in every prediction). ``scale`` is a float or a (B,) tensor of
    per-sample scales; 1 is the conditional prediction, 0 the unconditional one."""
    if isinstance(scale, (int, float)) and scale == 1.0 or cond is None:
        return model.predict(x_t, t, cond, kind=kind)
    if null_cond is None:
        raise ValueError("guidance needs null_cond(cond) to build the unconditional input")
    if isinstance(scale, (int, float)) and scale == 0.0:
        return model.predict(x_t, t, null_cond(cond), kind=kind)
    t = _batch_t(t, x_t)
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), _concat_cond(cond, null_cond(cond)))
    both = both.chunk(2)
    pc = model.path.convert(both[0], model.prediction, kind, x_t, t)
    pu = model.path.convert(both[1], model.prediction, kind, x_t, t)
    s = _bcast(scale, x_t) if isinstance(scale, Tensor) else scale
    return pu + s * (pc - pu)


def drop_cond(cond: Any, null_cond: Callable[[Any], Any] | None, p: float, batch: Batch) -> Any:
    """Replace each sample's condition by the null one with probability ``p`` (CFG training,
    Ho & Salimans 2022): tensors, or dicts of tensors, each sample's entries dropped together
    (what a dropped entry becomes is ``null_cond``'s choice, e.g. the label only)."""
    if cond is None or p <= 0:
        return cond
    if null_cond is None:
        raise ValueError("condition dropout needs null_cond(cond)")
    mask = batch.rng.rand() < p
    return _where(mask, null_cond(cond), cond)


def _where(mask: Tensor, null: Any, cond: Any) -> Any:
    if isinstance(cond, dict):
        return {k: _where(mask, null[k], v) for k, v in cond.items()}
    if not isinstance(cond, Tensor):
        raise TypeError(
            f"condition dropout supports tensors or dicts of tensors, got {type(cond).__name__}"
        )
    m = mask.to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
    return torch.where(m, null, cond)


def null_cond_of(teacher: Denoiser, null_label: int | None) -> Callable[[Any], Any] | None:
    """The unconditional input: a ``GuidedDenoiser`` teacher's ``null_cond``, else labels
    filled with ``null_label``, else None."""
    if isinstance(teacher, GuidedDenoiser):
        return teacher.null_cond
    if null_label is not None:
        return lambda c: torch.full_like(c, null_label)
    return None
