"""A small CNN digits classifier that fewstep trains and caches: its penultimate features
give a Frechet distance for 8x8 digits (the role Inception plays for FID), its logits give
the per-class accuracy of generated samples."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.image.digits import NUM_CLASSES, load_digits_tensors, split


class DigitsClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) in [-1, 1] -> (B, feature_dim)."""
        return F.silu(self.fc(self.conv(x.clamp(-1, 1)).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Random +-1 pixel translation (padding with background)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), (dy, dx), (2, 3))[..., 1:-1, 1:-1]


def train_classifier(model: DigitsClassifier, steps: int = 1500, seed: int = 0) -> dict:
    (x_tr, y_tr), (x_te, y_te) = split(*load_digits_tensors())
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (128,), generator=g)
        loss = F.cross_entropy(model(_shift(x_tr[idx], g)), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {"heldout_accuracy": acc, "train_seconds": time.perf_counter() - t0}


def load_classifier(steps: int = 1500, seed: int = 0) -> tuple[DigitsClassifier, dict]:
    """The cached classifier (trained on first use, a few seconds on CPU)."""
    from fewstep.core.cache import cached_module

    torch.manual_seed(seed)
    spec = {"model": "DigitsClassifier-v1", "steps": steps, "seed": seed}
    model, info, _ = cached_module(
        "digits-classifier", spec, DigitsClassifier(), lambda m: train_classifier(m, steps, seed)
    )
    return model.eval().requires_grad_(False), info
