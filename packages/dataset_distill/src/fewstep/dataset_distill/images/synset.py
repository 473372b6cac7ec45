"""What every distillation method returns: the synthetic set and how it was learned."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Distilled:
    """A distilled image set in network space (standardised or ZCA-whitened)."""

    images: Tensor  # (K*ipc, C, H, W), class order
    labels: Tensor  # (K*ipc,) in 0..K-1
    lr: float | None = None  # step size learned with the images (MTT, FTD), else None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, matching loss)
    info: dict = field(default_factory=dict)  # method-specific scalars (JSON-able)


def check_finite(method: str, iteration: int, loss: float) -> None:
    """Stop with a clear message when a matching loss is NaN or infinite."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{method}: non-finite matching loss ({loss}) at iteration {iteration}; "
            "lower the image learning rate"
        )
