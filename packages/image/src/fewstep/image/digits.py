"""scikit-learn's 8x8 handwritten digits (1,797 images, ships inside scikit-learn) as
tensors in [-1, 1], shape (N, 1, 8, 8), with labels 0-9."""

from __future__ import annotations

import torch
from torch import Tensor

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # label index of the unconditional embedding used by CFG


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def split(x: Tensor, y: Tensor, holdout: float = 0.2, seed: int = 0):
    """Fixed train / held-out split: ((x_tr, y_tr), (x_te, y_te))."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_te = int(len(x) * holdout)
    te, tr = perm[:n_te], perm[n_te:]
    return (x[tr], y[tr]), (x[te], y[te])


def null_labels(labels: Tensor) -> Tensor:
    """The unconditional condition for a batch of labels (CFG's null class)."""
    return torch.full_like(labels, NULL_CLASS)
