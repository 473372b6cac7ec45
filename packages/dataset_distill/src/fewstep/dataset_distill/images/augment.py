"""Differentiable Siamese augmentation (DSA; Zhao & Bilen, ICML 2021).

DSA applies the same random transformation A_w to the real and the synthetic batch (Eq. 4:
``D(grad L(A_w(S)), grad L(A_w(T)))``, one ``w`` for both: "Siamese") and is differentiable in
the images, so the matching gradient reaches the synthetic pixels through the augmentation.

As in the authors' ``DiffAugment`` with its default single mode, one transformation family is
drawn per call from ``strategy`` (an underscore-separated list), and its parameters are drawn
either per image (evaluation, MTT's student: ``siamese=False``) or once for the whole batch
(``siamese=True``), in which case the same :class:`Aug` applied to two batches transforms
both identically. The families and ranges are DSA's (``ParamDiffAug``):

* ``color``: brightness ``x + (b - 0.5) * 1.0``, saturation ``(x - mean_c) * 2s + mean_c``,
  contrast ``(x - mean) * (c + 0.5) + mean``, with b, s, c ~ U(0, 1);
* ``crop``: an integer translation of up to ``round(0.125 * side)`` pixels, zero padded;
* ``cutout``: zero a square of side ``round(0.5 * side)`` at a random centre;
* ``flip``: horizontal flip with probability 0.5 (left out of the digits default: a mirrored
  digit is not a digit);
* ``scale``: ``x, y`` scaled independently by factors in [1/1.2, 1.2] (affine grid);
* ``rotate``: rotation by an angle in [-15, 15] degrees (affine grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class DSAConfig:
    strategy: str = "color_crop_cutout_scale_rotate"  # families, one drawn per call (+ flip)
    scale: float = 1.2  # largest scale factor (smallest: its inverse)
    rotate: float = 15.0  # largest rotation, degrees
    crop: float = 0.125  # largest translation, as a share of the image side
    cutout: float = 0.5  # cutout square side, as a share of the image side
    brightness: float = 1.0  # brightness shift range
    saturation: float = 2.0  # saturation factor range
    contrast: float = 0.5  # contrast factor offset (factor in [contrast, contrast + 1])


@dataclass
class Aug:
    """One sampled transformation: family ``op`` and its parameters, each with a leading
    dimension of 1 (shared by every image: Siamese) or of the batch size."""

    op: str
    params: dict[str, Tensor] = field(default_factory=dict)


def _n(p: Tensor, x: Tensor) -> Tensor:
    """Parameters (1 or B, ...) on ``x``'s device, broadcast to ``x``'s batch."""
    p = p.to(x.device)
    return p.expand(len(x), *p.shape[1:]) if len(p) == 1 else p


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` (B, C, H, W) with affine matrices ``theta`` (B, 2, 3) as DSA does."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


# --- each family: (sample(n, cfg, side, generator) -> params, apply(x, params, cfg) -> x)


def _sample_color(n: int, cfg: DSAConfig, side: int, g: torch.Generator) -> dict[str, Tensor]:
    return {
        k: torch.rand(n, 1, 1, 1, generator=g) for k in ("brightness", "saturation", "contrast")
    }


def _apply_color(x: Tensor, p: dict[str, Tensor], cfg: DSAConfig) -> Tensor:
    x = x + (_n(p["brightness"], x) - 0.5) * cfg.brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_n(p["saturation"], x) * cfg.saturation) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_n(p["contrast"], x) + cfg.contrast) + m


def _shift(side: int, ratio: float) -> int:
    return int(side * ratio + 0.5)


def _sample_crop(n: int, cfg: DSAConfig, side: int, g: torch.Generator) -> dict[str, Tensor]:
    s = _shift(side, cfg.crop)
    return {"shift": torch.randint(-s, s + 1, (n, 2), generator=g)}


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """``out[b, :, i, j] = x[b, :, i + dy_b, j + dx_b]`` (zero outside); ``shift`` (B, 2)
    integer (dy, dx). Differentiable in ``x``."""
    b, c, h, w = x.shape
    s = int(shift.abs().max().item()) if shift.numel() else 0
    if s == 0:
        return x
    pad = F.pad(x, (s, s, s, s))
    dev = x.device
    iy = torch.arange(h, device=dev)[None, :] + s + shift[:, 0:1].to(dev)  # (B, H)
    ix = torch.arange(w, device=dev)[None, :] + s + shift[:, 1:2].to(dev)  # (B, W)
    # every index broadcast to (B, C, H, W), so the result is laid out like x (an index
    # permuted into place gives a channels-last-like layout, on which some CPU conv backward
    # kernels crash for few channels)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return pad[bi, ci, iy.view(b, 1, h, 1), ix.view(b, 1, 1, w)]


def _apply_crop(x: Tensor, p: dict[str, Tensor], cfg: DSAConfig) -> Tensor:
    return translate(x, _n(p["shift"], x))


def _sample_cutout(n: int, cfg: DSAConfig, side: int, g: torch.Generator) -> dict[str, Tensor]:
    size = _shift(side, cfg.cutout)
    return {"centre": torch.randint(0, side + (1 - size % 2), (n, 2), generator=g)}


def _apply_cutout(x: Tensor, p: dict[str, Tensor], cfg: DSAConfig) -> Tensor:
    _, _, h, w = x.shape
    size = _shift(h, cfg.cutout)
    c = _n(p["centre"], x)
    lo = c - size // 2  # (B, 2): top-left corner, may lie outside the image
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= lo[:, 0:1]) & (ys < lo[:, 0:1] + size)  # (B, H)
    in_x = (xs >= lo[:, 1:2]) & (xs < lo[:, 1:2] + size)  # (B, W)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])  # (B, H, W)
    return x * keep[:, None].to(x.dtype)


def _sample_flip(n: int, cfg: DSAConfig, side: int, g: torch.Generator) -> dict[str, Tensor]:
    return {"flip": torch.rand(n, 1, 1, 1, generator=g) < 0.5}


def _apply_flip(x: Tensor, p: dict[str, Tensor], cfg: DSAConfig) -> Tensor:
    return torch.where(_n(p["flip"], x), x.flip(3), x)


def _sample_scale(n: int, cfg: DSAConfig, side: int, g: torch.Generator) -> dict[str, Tensor]:
    lo = 1.0 / cfg.scale
    return {"factors": torch.rand(n, 2, generator=g) * (cfg.scale - lo) + lo}


def _apply_scale(x: Tensor, p: dict[str, Tensor], cfg: DSAConfig) -> Tensor:
    f = _n(p["factors"], x).to(x.dtype)
    z = torch.zeros_like(f[:, 0])
    theta = torch.stack(
        [torch.stack([f[:, 0], z, z], 1), torch.stack([z, f[:, 1], z], 1)], 1
    )  # (B, 2, 3)
    return _affine(x, theta)


def _sample_rotate(n: int, cfg: DSAConfig, side: int, g: torch.Generator) -> dict[str, Tensor]:
    return {"angle": (torch.rand(n, generator=g) - 0.5) * 2 * cfg.rotate / 180 * math.pi}


def rotation_theta(angle: Tensor) -> Tensor:
    """Affine matrices (B, 2, 3) of DSA's rotation by ``angle`` (B,) radians."""
    c, s, z = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([c, s, z], 1), torch.stack([-s, c, z], 1)], 1)


def _apply_rotate(x: Tensor, p: dict[str, Tensor], cfg: DSAConfig) -> Tensor:
    return _affine(x, rotation_theta(_n(p["angle"], x).to(x.dtype)))


Sampler = Callable[[int, DSAConfig, int, torch.Generator], dict[str, Tensor]]
Applier = Callable[[Tensor, dict[str, Tensor], DSAConfig], Tensor]

FAMILIES: dict[str, tuple[Sampler, Applier]] = {
    "color": (_sample_color, _apply_color),
    "crop": (_sample_crop, _apply_crop),
    "cutout": (_sample_cutout, _apply_cutout),
    "flip": (_sample_flip, _apply_flip),
    "scale": (_sample_scale, _apply_scale),
    "rotate": (_sample_rotate, _apply_rotate),
}


def parse_strategy(strategy: str) -> list[str]:
    """``"color_crop"`` -> ``["color", "crop"]``; ``""`` or ``"none"`` -> ``[]``."""
    if strategy.strip().lower() in ("", "none"):
        return []
    ops = strategy.split("_")
    bad = [o for o in ops if o not in FAMILIES]
    if bad:
        raise ValueError(
            f"unknown DSA augmentation(s) {bad} in strategy {strategy!r}; "
            f"available: {', '.join(FAMILIES)} (joined with '_')"
        )
    return ops


def sample_aug(
    cfg: DSAConfig, batch: int, side: int, generator: torch.Generator, siamese: bool
) -> Aug | None:
    """Draw one family from ``cfg.strategy`` and its parameters: one set shared by the batch
    when ``siamese`` (apply it to the real and the synthetic batch alike), else one per
    image. ``None`` when the strategy is empty. Sampled on the CPU from ``generator``."""
    ops = parse_strategy(cfg.strategy)
    if not ops:
        return None
    op = ops[int(torch.randint(len(ops), (1,), generator=generator))]
    n = 1 if siamese else batch
    return Aug(op, FAMILIES[op][0](n, cfg, side, generator))


def apply_aug(x: Tensor, aug: Aug | None, cfg: DSAConfig) -> Tensor:
    """``A_w(x)``: differentiable in ``x`` (B, C, H, W); identity for ``aug=None``."""
    if aug is None:
        return x
    return FAMILIES[aug.op][1](x, aug.params, cfg)


def augment(x: Tensor, cfg: DSAConfig, generator: torch.Generator, siamese: bool = False) -> Tensor:
    """Sample and apply in one go (per-image parameters unless ``siamese``)."""
    return apply_aug(x, sample_aug(cfg, len(x), x.shape[-1], generator, siamese), cfg)
