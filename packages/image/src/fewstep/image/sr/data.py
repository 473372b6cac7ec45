"""Paired LR / HR super-resolution data that ships with scikit-learn (no download).

Recipes (all images in [-1, 1], (N, C, H, W)):

- ``digits`` (8 -> 16 by default): HR = scikit-learn's 8x8 digits bicubic-upsampled to
  ``hr_size`` (16); LR = HR blurred by a Gaussian (std ``blur_sigma`` HR pixels, default
  0.8), bicubic-downsampled by ``scale`` (2, antialiased) and given additive Gaussian noise
  (std ``noise_std``, default 0.05, seeded), clamped to [-1, 1]. Train / held-out: the
  project's digits split (80 / 20 % by default, fixed permutation).
- ``photos`` (x4 by default): ``sklearn.datasets.load_sample_images()`` (china.jpg,
  flower.jpg), grey (ITU-R 601 luma) or RGB, resized by ``photo_zoom`` (antialiased) so a
  crop holds more structure; HR = random ``hr_size`` crops (32); LR = bicubic-downsampled
  by ``scale`` (4, antialiased), optionally blurred / noised first / after as for digits
  (defaults 0). Training crops come from the left ``1 - heldout_fraction`` of every image's
  width, held-out crops from the remaining right part (default: left halves for training,
  right halves held out), so no held-out pixel is trained on.

``y`` for the trajectory and the bicubic baseline is the LR image bicubic-upsampled back to
HR size (``lr_up``, clamped to [-1, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SRDataConfig:
    dataset: str = "digits"  # digits (8x8 digits, 8 -> 16) or photos (scikit-learn's photos)
    scale: int = 0  # upscaling factor; 0 = the dataset's default (digits 2, photos 4)
    hr_size: int = 0  # HR side / crop size in pixels; 0 = default (digits 16, photos 32)
    colour: Literal["grey", "rgb"] = "grey"  # photos: luma or RGB (digits are grey)
    blur_sigma: float = -1.0  # Gaussian blur std in HR pixels before downsampling; < 0 = default
    noise_std: float = -1.0  # std of Gaussian noise added to LR (on [-1, 1]); < 0 = default
    photo_zoom: float = 0.25  # photos: resize factor of the full photos before cropping
    train_crops: int = 4096  # photos: number of random training crops
    eval_crops: int = 256  # photos: number of random held-out crops
    heldout_fraction: float = 0.0  # held-out share; 0 = default (digits 0.2, photos 0.5 = right)
    seed: int = 0  # crops and LR noise


@dataclass
class SRPairs:
    """Aligned HR / LR images in [-1, 1]."""

    hr: Tensor  # (N, C, H, W)
    lr: Tensor  # (N, C, H / scale, W / scale)
    lr_up: Tensor  # (N, C, H, W): lr bicubic-upsampled, the trajectory's y and the baseline
    origins: Tensor | None = None  # photos: (N, 3) (image index, top, left) of each HR crop

    def __len__(self) -> int:
        return len(self.hr)


@dataclass
class SRDataset:
    name: str  # registry name
    scale: int  # upscaling factor
    train: SRPairs  # pairs to train on
    heldout: SRPairs  # pairs never trained on
    recipe: str  # one line saying how LR was made from HR (for reports)


@dataclass(frozen=True)
class _Defaults:
    scale: int
    hr_size: int
    blur_sigma: float
    noise_std: float
    heldout_fraction: float


DEFAULTS: dict[str, _Defaults] = {
    "digits": _Defaults(scale=2, hr_size=16, blur_sigma=0.8, noise_std=0.05, heldout_fraction=0.2),
    "photos": _Defaults(scale=4, hr_size=32, blur_sigma=0.0, noise_std=0.0, heldout_fraction=0.5),
}


def resolved(cfg: SRDataConfig) -> SRDataConfig:
    """``cfg`` with the dataset's defaults filled in and validated (clear errors)."""
    import dataclasses

    if cfg.dataset not in DATASETS:
        raise ValueError(
            f"unknown SR dataset {cfg.dataset!r}; available: {', '.join(sorted(DATASETS))}"
        )
    d = DEFAULTS[cfg.dataset]
    out = dataclasses.replace(
        cfg,
        scale=cfg.scale or d.scale,
        hr_size=cfg.hr_size or d.hr_size,
        blur_sigma=d.blur_sigma if cfg.blur_sigma < 0 else cfg.blur_sigma,
        noise_std=d.noise_std if cfg.noise_std < 0 else cfg.noise_std,
        heldout_fraction=cfg.heldout_fraction or d.heldout_fraction,
    )
    if out.scale < 1 or out.hr_size < 1:
        raise ValueError(f"scale and hr_size must be >= 1, got {out.scale} and {out.hr_size}")
    if out.hr_size % out.scale:
        raise ValueError(
            f"scale {out.scale} does not divide the HR size {out.hr_size}: the LR image would "
            f"not be a whole number of pixels; pick an hr_size that is a multiple of the scale"
        )
    if out.colour not in ("grey", "rgb"):
        raise ValueError(f"colour must be 'grey' or 'rgb', got {out.colour!r}")
    if not 0 < out.heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {out.heldout_fraction}")
    return out


# ----------------------------------------------------------------------------- degradation


def gaussian_blur(x: Tensor, std: float) -> Tensor:
    """(N, C, H, W) blurred by an isotropic Gaussian of ``std`` pixels (scipy.ndimage,
    reflecting borders); std 0 returns x."""
    if std <= 0:
        return x
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(x.double().numpy(), sigma=(0, 0, std, std), mode="reflect")
    return torch.from_numpy(out).to(x.dtype)


def bicubic_resize(x: Tensor, size: int) -> Tensor:
    """(N, C, H, W) -> (N, C, size, size), bicubic with antialiasing (when shrinking), then
    clamped to [-1, 1] (bicubic overshoots at edges)."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)


def degrade(hr: Tensor, scale: int, blur_sigma: float, noise_std: float, seed: int) -> Tensor:
    """LR = clamp(bicubic_down(blur(HR)) + noise_std * n), n ~ N(0, I) seeded: the stated
    degradation of both datasets. hr: (N, C, H, W) with H divisible by scale."""
    lr = bicubic_resize(gaussian_blur(hr, blur_sigma), hr.shape[-1] // scale)
    if noise_std > 0:
        g = torch.Generator().manual_seed(seed)
        lr = (lr + noise_std * torch.randn(lr.shape, generator=g)).clamp(-1, 1)
    return lr


def make_pairs(hr: Tensor, cfg: SRDataConfig, seed: int, origins: Tensor | None = None):
    lr = degrade(hr, cfg.scale, cfg.blur_sigma, cfg.noise_std, seed)
    return SRPairs(hr=hr, lr=lr, lr_up=bicubic_resize(lr, hr.shape[-1]), origins=origins)


# -------------------------------------------------------------------------------- datasets


def _digits(cfg: SRDataConfig) -> SRDataset:
    from fewstep.image.digits import load_digits_tensors, split

    if cfg.colour != "grey":
        raise ValueError("the digits are grey images; colour='rgb' applies to photos only")
    x, y = load_digits_tensors()
    (x_tr, _), (x_te, _) = split(x, y, holdout=cfg.heldout_fraction, seed=0)
    tr = make_pairs(bicubic_resize(x_tr, cfg.hr_size), cfg, cfg.seed)
    te = make_pairs(bicubic_resize(x_te, cfg.hr_size), cfg, cfg.seed + 1)
    return SRDataset("digits", cfg.scale, tr, te, _recipe_text(cfg, "8x8 digits"))


def load_photos(colour: str, zoom: float) -> list[Tensor]:
    """scikit-learn's two sample photos as (C, H, W) in [-1, 1], resized by ``zoom``."""
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:
        x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1.0
        if colour == "grey":  # ITU-R BT.601 luma
            w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            x = (x * w).sum(0, keepdim=True)
        if zoom != 1.0:
            h, w_ = (max(1, round(s * zoom)) for s in x.shape[1:])
            x = F.interpolate(x[None], size=(h, w_), mode="bicubic", antialias=True)[0]
        out.append(x.clamp(-1, 1))
    return out


def random_crops(
    images: list[Tensor], n: int, size: int, col_range: tuple[float, float], seed: int
) -> tuple[Tensor, Tensor]:
    """``n`` crops (n, C, size, size), split evenly over ``images``, whose columns lie wholly
    inside the fraction ``col_range`` of each image's width; with their (image, top, left)."""
    g = torch.Generator().manual_seed(seed)
    crops, origins = [], []
    for k in range(n):
        i = k % len(images)
        img = images[i]
        h, w = img.shape[1:]
        lo, hi = math.ceil(col_range[0] * w), math.floor(col_range[1] * w) - size
        if hi < lo or h < size:
            raise ValueError(
                f"a {size}x{size} crop does not fit in columns {col_range} of a {h}x{w} photo; "
                "lower hr_size, change heldout_fraction or raise photo_zoom"
            )
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = int(torch.randint(lo, hi + 1, (1,), generator=g))
        crops.append(img[:, top : top + size, left : left + size])
        origins.append((i, top, left))
    return torch.stack(crops), torch.tensor(origins, dtype=torch.long)


def _photos(cfg: SRDataConfig) -> SRDataset:
    if cfg.train_crops < 1 or cfg.eval_crops < 1:
        raise ValueError(f"need >= 1 train and eval crop, got {cfg.train_crops}, {cfg.eval_crops}")
    imgs = load_photos(cfg.colour, cfg.photo_zoom)
    cut = 1.0 - cfg.heldout_fraction
    hr_tr, o_tr = random_crops(imgs, cfg.train_crops, cfg.hr_size, (0.0, cut), cfg.seed)
    hr_te, o_te = random_crops(imgs, cfg.eval_crops, cfg.hr_size, (cut, 1.0), cfg.seed + 1)
    tr = make_pairs(hr_tr, cfg, cfg.seed + 2, o_tr)
    te = make_pairs(hr_te, cfg, cfg.seed + 3, o_te)
    what = f"{cfg.colour} crops of scikit-learn's sample photos (zoom {cfg.photo_zoom})"
    return SRDataset("photos", cfg.scale, tr, te, _recipe_text(cfg, what))


def _recipe_text(cfg: SRDataConfig, what: str) -> str:
    lr = cfg.hr_size // cfg.scale
    return (
        f"HR: {cfg.hr_size}x{cfg.hr_size} {what}; LR ({lr}x{lr}, x{cfg.scale}) = bicubic "
        f"down (antialiased) of HR blurred with std {cfg.blur_sigma} px, + Gaussian noise std "
        f"{cfg.noise_std}, clamped to [-1, 1]"
    )


DATASETS: dict[str, Callable[[SRDataConfig], SRDataset]] = {
    "digits": _digits,
    "photos": _photos,
}


def load_sr_dataset(cfg: SRDataConfig) -> SRDataset:
    """The dataset ``cfg.dataset`` (see the module docstring for each recipe)."""
    cfg = resolved(cfg)
    return DATASETS[cfg.dataset](cfg)
