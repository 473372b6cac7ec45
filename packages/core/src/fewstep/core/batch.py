"""A training batch and the randomness that goes with it.

All randomness an objective uses (noise, times, guidance scales) is drawn through the
batch's ``StepRNG``. It is seeded by (seed, step, micro-batch) and always draws for the
*global* batch, then keeps this process's slice. Two consequences the trainer relies on:
resuming at step N replays exactly the same draws, and k processes with batch B see the same
numbers as one process with batch k*B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class StepRNG:
    """Per-step random draws for a slice [offset, offset + local) of a global batch."""

    def __init__(
        self,
        seed: int,
        step: int,
        micro: int,
        global_size: int,
        offset: int,
        local_size: int,
        device: torch.device | str = "cpu",
    ):
        self.generator = torch.Generator().manual_seed(
            (seed * 1_000_003 + step * 7_919 + micro * 104_729) % (2**63 - 1)
        )
        self.global_size = global_size
        self.offset = offset
        self.local_size = local_size
        self.device = torch.device(device)

    def _slice(self, t: Tensor) -> Tensor:
        return t[self.offset : self.offset + self.local_size].to(self.device)

    def randn(self, *shape: int, dtype=torch.float32) -> Tensor:
        """Standard normal of shape (local_batch, *shape)."""
        return self._slice(
            torch.randn(self.global_size, *shape, generator=self.generator, dtype=dtype)
        )

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(*x.shape[1:], dtype=x.dtype)

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) of shape (local_batch, *shape)."""
        return self._slice(torch.rand(self.global_size, *shape, generator=self.generator))

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers in [low, high) of shape (local_batch, *shape)."""
        return self._slice(
            torch.randint(low, high, (self.global_size, *shape), generator=self.generator)
        )

    def shared_randint(self, low: int, high: int) -> int:
        """One integer shared by the whole global batch (e.g. a rollout depth)."""
        return int(torch.randint(low, high, (1,), generator=self.generator))


@dataclass
class Batch:
    """What an objective sees each step. ``x`` is real data (None for data-free methods);
    ``cond`` is whatever the denoisers take as condition; ``rng`` draws the randomness."""

    x: Tensor | None
    cond: Any
    rng: StepRNG
    extras: dict[str, Any] = field(default_factory=dict)  # domain-specific tensors

    @property
    def size(self) -> int:
        return self.rng.local_size


def cond_to(cond: Any, device: torch.device | str) -> Any:
    """A condition on ``device``: tensors move, dicts move their values, anything else
    (None, strings) is returned as is."""
    if isinstance(cond, Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: cond_to(v, device) for k, v in cond.items()}
    return cond


def index_cond(cond: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of a condition: a tensor, a (nested) dict of tensors, or None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    if isinstance(cond, Tensor):
        return cond[idx.to(cond.device)]
    raise TypeError(f"cannot index a condition of type {type(cond).__name__}; expected tensors")
