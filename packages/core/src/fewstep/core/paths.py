"""Forward processes x_t = alpha(t) * x0 + sigma(t) * eps and exact conversions between
what a network predicts.

Every path runs from data at ``t_min`` to (approximately) pure noise at ``t_max`` in its own
native time unit (a fraction for flows, a diffusers timestep index for discrete VP, sigma
for EDM, an angle for TrigFlow). Objectives never look at the unit: they ask the path for
``alpha``, ``sigma``, their time derivatives, a training-time draw and a sampling grid.

Conversions go through the pair (x0, eps), which is linear in the prediction for every
parameterization, so classifier-free guidance commutes with every conversion.

Parameterizations (``Prediction``):
  eps       the noise:                      eps
  x0        the clean sample:               x0
  v         Salimans & Ho (2022), eq. 9:    v = alpha * eps - sigma * x0
  velocity  flow matching (Lipman 2023):    u = dx_t/dt = alpha' * x0 + sigma' * eps
  score     grad log p_t(x_t) (Song 2021):  -eps / sigma
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Prediction = Literal["eps", "x0", "v", "velocity", "score"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "velocity", "score")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Scalar, (B,) or leading-dims (B, T, ...) times -> broadcastable against ``like``
    of shape (B, ...): trailing singleton dims are added (a (B, T) time gives every
    position of a sequence its own noise level, as Streaming Diffusion Policy needs)."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(*v.shape, *([1] * (like.ndim - v.ndim)))


class Path(ABC):
    """A forward process. ``t`` tensors have shape (B,) or are scalars."""

    name: str = "path"
    t_min: float
    t_max: float

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor: ...

    def network_time(self, t: Tensor) -> Tensor:
        """What the network is conditioned on (diffusers UNets expect ~0..1000)."""
        return t

    def sample_t(self, n: int, u: Tensor) -> Tensor:
        """Training-time draw from uniforms ``u`` of shape (n,) in [0, 1)."""
        return self.t_min + (self.t_max - self.t_min) * u

    def timesteps(self, n: int) -> Tensor:
        """Sampling grid of ``n`` decreasing times from ``t_max``; the step after the last
        one lands on clean data (alpha=1, sigma=0)."""
        return torch.linspace(self.t_max, self.t_min, n + 1)[:-1]

    def fraction_to_t(self, f: Tensor | float) -> Tensor:
        """Map a fraction in [0, 1] of the path's time range to native time."""
        return self.t_min + (self.t_max - self.t_min) * torch.as_tensor(f, dtype=torch.float32)

    # --- forward process ---------------------------------------------------------------
    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
        return _bcast(self.alpha(t), like), _bcast(self.sigma(t), like)

    def noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps."""
        a, s = self.coeffs(t, x0)
        return a * x0 + s * eps

    def prior(self, eps: Tensor) -> Tensor:
        """Starting point of sampling at t_max (the data term alpha(t_max) x0 is dropped)."""
        return float(self.sigma(torch.tensor(self.t_max))) * eps

    def input_scale(self, t: Tensor, sigma_data: float = 1.0) -> Tensor:
        """1 / std(x_t) for data of std ``sigma_data`` (EDM's c_in, Karras 2022 tab. 1)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        return (self.alpha(t) ** 2 * sigma_data**2 + self.sigma(t) ** 2).rsqrt()

    # --- conversions ---------------------------------------------------------------------
    def to_x0_eps(self, pred: Tensor, kind: str, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Recover (x0, eps) from a prediction of ``kind`` at (x_t, t)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        if kind == "eps":
            return (x_t - s * pred) / a, pred
        if kind == "x0":
            return pred, (x_t - a * pred) / s
        if kind == "v":
            norm = a * a + s * s
            return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
        if kind == "velocity":
            da, ds = _bcast(self.d_alpha(t), x_t), _bcast(self.d_sigma(t), x_t)
            det = a * ds - s * da
            return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det
        if kind == "score":
            return (x_t + s * s * pred) / a, -s * pred
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")

    def from_x0_eps(self, x0: Tensor, eps: Tensor, kind: str, t: Tensor) -> Tensor:
        """Express (x0, eps) at time t as a prediction of ``kind``."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
        a, s = _bcast(self.alpha(t), x0), _bcast(self.sigma(t), x0)
        if kind == "eps":
            return eps
        if kind == "x0":
            return x0
        if kind == "v":
            return a * eps - s * x0
        if kind == "velocity":
            return _bcast(self.d_alpha(t), x0) * x0 + _bcast(self.d_sigma(t), x0) * eps
        if kind == "score":
            return -eps / s
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")

    def convert(self, pred: Tensor, src: str, dst: str, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert a prediction from parameterization ``src`` to ``dst``."""
        if src == dst:
            return pred
        x0, eps = self.to_x0_eps(pred, src, x_t, t)
        return self.from_x0_eps(x0, eps, dst, t)

    def describe(self) -> dict:
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}


# ---------------------------------------------------------------------------------------
@dataclass
class RectifiedFlow(Path):
    """Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023):
    x_t = (1 - t) x0 + t eps, t in [0, 1]. ``t_sampling='logit_normal'`` is SD3's
    training density (Esser et al. 2024, eq. 19)."""

    time_scale: float = 1000.0  # network sees t * time_scale (diffusers' flow models use 1000)
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"  # training-time density
    logit_mean: float = 0.0  # logit-normal location
    logit_std: float = 1.0  # logit-normal scale

    name = "rectified_flow"
    t_min = 0.0
    t_max = 1.0

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def network_time(self, t):
        return t * self.time_scale

    def sample_t(self, n, u):
        if self.t_sampling == "logit_normal":
            z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-6, 1 - 1e-6) - 1.0)
            return torch.sigmoid(self.logit_mean + self.logit_std * z)
        return u


@dataclass
class VPContinuous(Path):
    """Continuous variance-preserving path (Song et al. 2021, eq. 33 for 'linear'; Nichol &
    Dhariwal 2021, eq. 17 for 'cosine'): alpha = sqrt(abar(t)), sigma = sqrt(1 - abar(t))."""

    schedule: Literal["linear", "cosine"] = "linear"  # abar(t) family
    beta_min: float = 0.1  # linear schedule beta(0)
    beta_max: float = 20.0  # linear schedule beta(1)
    cosine_s: float = 0.008  # cosine schedule offset
    eps_t: float = 1e-3  # smallest time used (abar(0) = 1 makes eps-conversions singular)
    time_scale: float = 1000.0  # network sees t * time_scale

    name = "vp"
    t_max = 1.0

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.eps_t

    def _log_abar(self, t):
        if self.schedule == "linear":
            return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)
        s = self.cosine_s
        f = torch.cos((t + s) / (1 + s) * math.pi / 2).clamp_min(1e-12)
        return 2 * torch.log(f) - 2 * math.log(math.cos(s / (1 + s) * math.pi / 2))

    def _d_log_abar(self, t):
        if self.schedule == "linear":
            return -(self.beta_min + (self.beta_max - self.beta_min) * t)
        s = self.cosine_s
        ang = (t + s) / (1 + s) * math.pi / 2
        return -2 * torch.tan(ang) * math.pi / (2 * (1 + s))

    def alpha(self, t):
        return torch.exp(0.5 * self._log_abar(t))

    def sigma(self, t):
        return torch.sqrt((-torch.expm1(self._log_abar(t))).clamp_min(0))

    def d_alpha(self, t):
        return 0.5 * self._d_log_abar(t) * self.alpha(t)

    def d_sigma(self, t):
        abar = torch.exp(self._log_abar(t))
        return -0.5 * self._d_log_abar(t) * abar / self.sigma(t).clamp_min(1e-12)

    def network_time(self, t):
        return t * self.time_scale


def diffusers_alphas_cumprod(
    schedule: str,
    n: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    zero_snr: bool = False,
) -> Tensor:
    """abar table exactly as diffusers' DDPMScheduler builds it for ``beta_schedule``; with
    ``zero_snr`` the betas are rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1;
    diffusers' ``rescale_betas_zero_snr``, CogVideoX) and the last abar is set to 2^-24, as
    diffusers' schedulers do, so that conversions through 1 / alpha stay finite."""
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":

        def f(x: float) -> float:
            return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    else:
        raise ValueError(
            f"unknown beta schedule {schedule!r}; expected linear, scaled_linear or "
            "squaredcos_cap_v2"
        )
    abar = torch.cumprod(1.0 - betas, dim=0)
    if zero_snr:
        root = abar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        abar = ((root - last) * first / (first - last)) ** 2
        abar[-1] = 2.0**-24
    return abar


@dataclass
class VPDiscrete(Path):
    """Discrete VP path with diffusers' 1000-step tables (Ho et al. 2020); t is the timestep
    index as a float. Between integer indices abar is interpolated linearly so that ODE
    solvers and derivatives are defined; at integers it matches the table exactly."""

    schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"  # table
    num_train_timesteps: int = 1000  # table length
    beta_start: float = 1e-4  # first beta (diffusers default 1e-4; SD uses 0.00085)
    beta_end: float = 0.02  # last beta (diffusers default 0.02; SD uses 0.012)
    zero_snr: bool = False  # betas rescaled to zero terminal SNR (rescale_betas_zero_snr)

    name = "vp_discrete"
    t_min = 0.0

    def __post_init__(self) -> None:
        self.abar = diffusers_alphas_cumprod(
            self.schedule, self.num_train_timesteps, self.beta_start, self.beta_end, self.zero_snr
        ).double()

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.num_train_timesteps - 1)

    def _abar(self, t):
        tab = self.abar.to(t.device)
        tc = t.double().clamp(0, self.t_max)
        lo = tc.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = tc - lo
        return ((1 - w) * tab[lo] + w * tab[lo + 1]).to(t.dtype), (tab[lo + 1] - tab[lo]).to(
            t.dtype
        )

    def alpha(self, t):
        return self._abar(t)[0].sqrt()

    def sigma(self, t):
        return (1 - self._abar(t)[0]).sqrt()

    def d_alpha(self, t):
        abar, slope = self._abar(t)
        return 0.5 * slope / abar.sqrt()

    def d_sigma(self, t):
        abar, slope = self._abar(t)
        return -0.5 * slope / (1 - abar).sqrt()

    def sample_t(self, n, u):
        return (u * self.num_train_timesteps).floor().clamp(max=self.t_max)

    def timesteps(self, n):
        # diffusers' "trailing" spacing, computed as diffusers does (numpy float64 arange,
        # round half to even, then minus one) so grids agree for every n, e.g. n=16.
        n_train = self.num_train_timesteps
        ts = np.round(np.arange(n_train, 0, -n_train / n)) - 1
        return torch.from_numpy(ts).float().clamp(min=0)


@dataclass
class EDM(Path):
    """Variance-exploding path in EDM form (Karras et al. 2022): x_t = x0 + t eps, t = sigma.
    The network is conditioned on c_noise = ln(sigma) / 4 (tab. 1); training sigmas are
    log-normal (P_mean, P_std); sampling uses the rho schedule (eq. 5)."""

    sigma_min: float = 0.002  # smallest noise level
    sigma_max: float = 80.0  # largest noise level
    p_mean: float = -1.2  # log-normal training density mean
    p_std: float = 1.2  # log-normal training density std
    rho: float = 7.0  # sampling-grid curvature

    name = "edm"

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.sigma_min

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def network_time(self, t):
        return 0.25 * torch.log(t)

    def sample_t(self, n, u):
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-6, 1 - 1e-6) - 1.0)
        return torch.exp(self.p_mean + self.p_std * z).clamp(self.sigma_min, self.sigma_max)

    def timesteps(self, n):
        i = torch.arange(n, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        denom = max(n - 1, 1)
        return ((hi + i / denom * (lo - hi)) ** self.rho).float()


@dataclass
class TrigFlow(Path):
    """TrigFlow (Lu & Song 2024, sCM, eq. 6): x_t = cos(t) x0 + sin(t) z with z ~ N(0,
    sigma_d^2 I), t in [0, pi/2]. With eps ~ N(0, I): sigma(t) = sigma_d sin t. The sCM
    network F predicts velocity / sigma_d."""

    sigma_data: float = 0.5  # data std sigma_d
    time_scale: float = 1.0  # network sees t * time_scale (sCM uses c_noise = t)
    p_mean: float = -1.0  # training density: tan(t) = exp(N(p_mean, p_std)) / sigma_d
    p_std: float = 1.4  # see p_mean
    eps_t: float = 0.0  # smallest time used

    name = "trigflow"
    t_max = math.pi / 2

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.eps_t

    def alpha(self, t):
        return torch.cos(t)

    def sigma(self, t):
        return self.sigma_data * torch.sin(t)

    def d_alpha(self, t):
        return -torch.sin(t)

    def d_sigma(self, t):
        return self.sigma_data * torch.cos(t)

    def network_time(self, t):
        return t * self.time_scale

    def sample_t(self, n, u):
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-6, 1 - 1e-6) - 1.0)
        return torch.atan(torch.exp(self.p_mean + self.p_std * z) / self.sigma_data)


PATHS: dict[str, type[Path]] = {
    "rectified_flow": RectifiedFlow,
    "vp": VPContinuous,
    "vp_discrete": VPDiscrete,
    "edm": EDM,
    "trigflow": TrigFlow,
}


def make_path(name: str, **kwargs) -> Path:
    """Build a path by registry name; unknown names list the valid ones."""
    try:
        cls = PATHS[name]
    except KeyError:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(PATHS)}") from None
    return cls(**kwargs)
