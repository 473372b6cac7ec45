"""2-D priors: image denoisers that other domains (3-D score distillation) borrow by name.

A package that owns an image teacher registers a loader under the ``fewstep.priors`` entry
point group, e.g. ``digits = "fewstep.image.priors:digits"``; a 3-D package asks for
``load_prior("digits")`` and gets a ``Prior2D``, without importing the image package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from torch import Tensor

from fewstep.core.models import Denoiser

GROUP = "fewstep.priors"


@dataclass
class Prior2D:
    """A frozen image denoiser and what a caller needs to feed it."""

    denoiser: Denoiser  # frozen; images (B, channels, size, size) in value_range
    channels: int  # image channels the denoiser expects
    size: int  # image side the denoiser was trained on
    value_range: tuple[float, float] = (-1.0, 1.0)  # pixel range of its data
    num_classes: int | None = None  # class-conditional priors: number of classes
    null_cond: Callable[[Any], Any] | None = None  # cond -> its null condition (CFG)
    classify: Callable[[Tensor], Tensor] | None = None  # images -> logits (evaluation)
    info: dict[str, Any] = field(default_factory=dict)  # provenance (training time, ...)


def prior_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_prior(name: str, **kwargs: Any) -> Prior2D:
    """The prior registered as ``name``; kwargs go to its loader."""
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        valid = ", ".join(sorted(eps)) or "(none installed: install fewstep-image)"
        raise KeyError(f"unknown 2-D prior {name!r}; installed priors: {valid}")
    prior = eps[name].load()(**kwargs)
    if not isinstance(prior, Prior2D):
        raise TypeError(f"prior loader {name!r} returned {type(prior).__name__}, not Prior2D")
    return prior
