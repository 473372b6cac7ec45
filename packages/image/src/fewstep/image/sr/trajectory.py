"""The LR-to-HR trajectory of CTMSR (You et al., "Consistency Trajectory Matching for
One-Step Generative Super-Resolution", ICCV 2025, sec. 3; official code
LabShuHangGU/CTMSR, ``basicsr/utils/diffusion.py``: ``q_sample``, ``karras_schedule``).

A ResShift-type forward process from the HR image x0 towards the bicubic-upsampled LR
image y plus Gaussian noise:

    x_t = x0 + alpha(t) (y - x0) + sigma(t) eps = (1 - alpha(t)) x0 + alpha(t) y + sigma(t) eps,

    alpha(t) = t^res_rho,   sigma(t) = kappa t^noise_rho,   t in [0, 1],

so x_0 is the HR image and x_1 = y + kappa eps, the "LR image with noise" the one-step
student starts from. The official code builds (alpha_i, sigma_i) on N + 1 grid points with
``karras_schedule(N + 1, 0, hi, rho)`` = hi (i / N)^rho, which is this continuous schedule
sampled at t_i = i / N (defaults: kappa = 1, res_rho = noise_rho = 1 on [-1, 1] images).

Conditioned on y, it is a Gaussian path on the residual (1 - alpha) x0 + sigma eps, so its
probability-flow ODE is

    dx_t/dt = alpha'(t) (y - E[x0 | x_t, y]) + sigma'(t) E[eps | x_t, y],
    E[eps | x_t, y] = (x_t - (1 - alpha) E[x0 | x_t, y] - alpha y) / sigma,

deterministic from x_1 = y + kappa eps to an HR image; a consistency function of it maps
any x_t straight to the ODE's end at t = 0 (the HR estimate).

Shapes: images (B, C, H, W); times (B,) or scalars in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TrajectoryConfig:
    sigma_max: float = 1.0  # kappa: noise std at t = 1 on [-1, 1] images (CTMSR sigma_max = 1)
    res_rho: float = 1.0  # alpha(t) = t^res_rho, how fast x_t shifts towards y (CTMSR res_rho)
    noise_rho: float = 1.0  # sigma(t) = kappa t^noise_rho (CTMSR noise_rho)

    def __post_init__(self):
        if self.sigma_max < 0 or self.res_rho <= 0 or self.noise_rho <= 0:
            raise ValueError(
                "trajectory needs sigma_max >= 0 and res_rho, noise_rho > 0; got "
                f"sigma_max={self.sigma_max}, res_rho={self.res_rho}, noise_rho={self.noise_rho}"
            )


def _bcast(v: Tensor | float, like: Tensor) -> Tensor:
    """Scalar or (B,) -> broadcastable against (B, C, H, W)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v if v.ndim == 0 else v.reshape(-1, *([1] * (like.ndim - 1)))


def _check_t(t: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"trajectory times must lie in [0, 1], got range [{t.min()}, {t.max()}]")
    return t


def alpha(t: Tensor | float, cfg: TrajectoryConfig) -> Tensor:
    """Residual shift alpha(t) = t^res_rho: 0 at t = 0 (HR), 1 at t = 1 (LR)."""
    return _check_t(t) ** cfg.res_rho


def sigma(t: Tensor | float, cfg: TrajectoryConfig) -> Tensor:
    """Noise std sigma(t) = kappa t^noise_rho: 0 at t = 0, kappa at t = 1."""
    return cfg.sigma_max * _check_t(t) ** cfg.noise_rho


def d_alpha(t: Tensor | float, cfg: TrajectoryConfig) -> Tensor:
    """d alpha / dt (t > 0 where res_rho < 1)."""
    t = _check_t(t)
    return cfg.res_rho * t ** (cfg.res_rho - 1)


def d_sigma(t: Tensor | float, cfg: TrajectoryConfig) -> Tensor:
    """d sigma / dt (t > 0 where noise_rho < 1)."""
    t = _check_t(t)
    return cfg.sigma_max * cfg.noise_rho * t ** (cfg.noise_rho - 1)


def grid(num_intervals: int) -> Tensor:
    """(N + 1,) times t_i = i / N, increasing from 0 (HR) to 1 (LR + noise): the
    discretisation consistency training pairs adjacent points of (CTMSR's karras grid)."""
    if num_intervals < 1:
        raise ValueError(f"the trajectory grid needs >= 1 interval, got {num_intervals}")
    return torch.arange(num_intervals + 1, dtype=torch.float32) / num_intervals


def forward(x0: Tensor, y: Tensor, t: Tensor | float, eps: Tensor, cfg: TrajectoryConfig):
    """x_t = (1 - alpha) x0 + alpha y + sigma eps (CTMSR's ``q_sample``).

    x0: (B, C, H, W) HR images; y: (B, C, H, W) bicubic-upsampled LR; eps like x0; t (B,)
    or scalar. Written as a convex combination so that t = 0 gives x0 and t = 1 gives
    y + kappa eps exactly (no rounding from x0 + (y - x0))."""
    if x0.shape != y.shape or x0.shape != eps.shape:
        raise ValueError(
            f"x0, y and eps must share one shape (B, C, H, W); got {tuple(x0.shape)}, "
            f"{tuple(y.shape)}, {tuple(eps.shape)}"
        )
    a, s = _bcast(alpha(t, cfg), x0), _bcast(sigma(t, cfg), x0)
    return (1 - a) * x0 + a * y + s * eps


def prior(y: Tensor, eps: Tensor, cfg: TrajectoryConfig) -> Tensor:
    """x_1 = y + kappa eps, where the one-step student starts (the "LR image with noise")."""
    return y + cfg.sigma_max * eps


def pf_ode_drift(
    x_t: Tensor, y: Tensor, x0_hat: Tensor, t: Tensor | float, cfg: TrajectoryConfig
) -> Tensor:
    """dx_t/dt of the probability-flow ODE given the HR estimate x0_hat = E[x0 | x_t, y]:
    alpha' (y - x0_hat) + sigma' eps_hat with eps_hat = (x_t - (1 - alpha) x0_hat -
    alpha y) / sigma. Defined for t > 0 (sigma > 0); shapes (B, C, H, W), t (B,) or scalar."""
    a, s = _bcast(alpha(t, cfg), x_t), _bcast(sigma(t, cfg), x_t)
    if bool((s <= 0).any()):
        raise ValueError("the PF-ODE drift needs sigma(t) > 0 (t > 0 and sigma_max > 0)")
    eps_hat = (x_t - (1 - a) * x0_hat - a * y) / s
    return _bcast(d_alpha(t, cfg), x_t) * (y - x0_hat) + _bcast(d_sigma(t, cfg), x_t) * eps_hat
