"""Full-reference image quality: PSNR and SSIM per image.

torchmetrics / scikit-image are not dependencies of fewstep-image, so SSIM is written here
(Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity",
IEEE TIP 2004, eq. 13): an 11x11 Gaussian window of std 1.5, K1 = 0.01, K2 = 0.03,
population statistics, the mean over the valid positions of the SSIM map and over channels
(what scikit-image computes with ``gaussian_weights=True, use_sample_covariance=False``
apart from its border handling).

Images are (B, C, H, W) with values in a range of width ``data_range`` (2 for [-1, 1]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two (B, C, H, W) images of one shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """(B,) peak signal-to-noise ratio in dB: 10 log10(range^2 / mean squared error)."""
    _check(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))).float()


def gaussian_window(size: int = 11, std: float = 1.5) -> Tensor:
    """(size, size) normalised Gaussian weights."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * std**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    a: Tensor, b: Tensor, data_range: float = 2.0, window: int = 11, std: float = 1.5
) -> Tensor:
    """(B,) mean SSIM over the valid window positions and channels (Wang 2004, eq. 13)."""
    _check(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM's {window}x{window} window is larger than the {a.shape[-2:]} image")
    c = a.shape[1]
    w = gaussian_window(window, std).to(a.device)[None, None].repeat(c, 1, 1, 1)
    x, y = a.double(), b.double()

    def blur(z):
        return F.conv2d(z, w, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def mean_std(v: Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of a (B,) metric."""
    v = v.double()
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se
