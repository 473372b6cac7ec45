"""TrigFlow coordinates for a denoiser that lives on any path.

Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (sCM,
ICLR 2025), sec. 2 and eq. 6: TrigFlow writes x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I),
t in [0, pi/2], and the consistency model as f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t/sd, t)
with F the TrigFlow velocity over sd. sCM, rCM and TBCM are written in these coordinates,
while their teachers (and the students initialised from them) live on their own paths
(rectified flow, discrete VP, EDM, ...). This module maps between the two:

* A TrigFlow state (x, angle t) and a path state (x_p, s) describe the same noisy sample
  when their signal-to-noise ratios agree, alpha_p(s) / sigma_p(s) = cos t / (sd sin t),
  and x_p = c x with c = |(alpha_p, sigma_p)| / |(cos t, sd sin t)|. Data x0 and unit noise
  eps are the same in both coordinates, so a prediction converts through (x0, eps).
  ``match_snr`` does this for any state alpha x0 + sigma eps (SLAM's sub-path points too).
* ``path_time`` inverts the path's angle s -> atan2(sigma_p(s), sd alpha_p(s)) by a
  safeguarded Newton solve, then takes one more Newton step from the detached solution: the
  value is the solve's and the derivative is ds/dt = 1 / (dangle/ds), so forward-mode
  (``torch.func.jvp``) and reverse-mode AD see the exact time derivative of the map (sCM's
  tangent needs dF/dt).
* ``TrigFlowDenoiser`` is the TrigFlow view of a denoiser: a ``Denoiser`` on the TrigFlow
  path (restricted to the angles the base path covers) predicting the TrigFlow velocity
  dx/dt = -sin(t) x0 + sd cos(t) eps = sd F. Its x0-prediction is exactly sCM's f, so the
  trainer samples it with ``FewStepSampler`` (consistency multistep sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.paths import Path, TrigFlow, _bcast

TABLE_SIZE = 1025  # grid of path times that brackets each angle inversion
NEWTON_STEPS = 1  # float64 Newton steps inside the bracket (quadratic convergence)


@dataclass
class TrigFlowWindow(TrigFlow):
    """TrigFlow restricted to angles [eps_t, angle_max]: the range of signal-to-noise ratios
    a base path covers (a discrete VP path never reaches pure noise, angle < pi/2)."""

    angle_max: float = math.pi / 2  # largest angle (t_max)

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return self.angle_max


def path_angle(path: Path, s: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow angle with the same signal-to-noise ratio as path time ``s`` (any shape)."""
    return torch.atan2(path.sigma(s), sigma_data * path.alpha(s))


def path_angle_slope(path: Path, s: Tensor, sigma_data: float) -> Tensor:
    """d angle / ds = sd (alpha sigma' - sigma alpha') / (sd^2 alpha^2 + sigma^2)."""
    a, sg = path.alpha(s), path.sigma(s)
    da, ds = path.d_alpha(s), path.d_sigma(s)
    return sigma_data * (a * ds - sg * da) / ((sigma_data * a) ** 2 + sg * sg)


def angle_window(path: Path, sigma_data: float) -> tuple[float, float]:
    """(smallest, largest) TrigFlow angle the path's time range covers."""
    ends = torch.tensor([path.t_min, path.t_max], dtype=torch.float64)
    lo, hi = path_angle(path, ends, sigma_data).tolist()
    return lo, hi


_TABLES: dict[tuple[int, float, str], tuple[Path, Tensor, Tensor]] = {}


def _angle_table(path: Path, sigma_data: float, device) -> tuple[Tensor, Tensor]:
    """(times, angles): a float64 grid of ``TABLE_SIZE`` path times and their angles, built
    once per path object and device (the path is kept alive with its table, so its id stays
    unique). A cache of a pure function: nothing here is training state."""
    key = (id(path), float(sigma_data), str(device))
    if key not in _TABLES:
        s = torch.linspace(float(path.t_min), float(path.t_max), TABLE_SIZE, dtype=torch.float64)
        _TABLES[key] = (path, s.to(device), path_angle(path, s, sigma_data).to(device))
    _, s, a = _TABLES[key]
    return s, a


def path_time(path: Path, angle: Tensor, sigma_data: float) -> Tensor:
    """Native time s of ``path`` whose angle is ``angle`` ((B,) or scalar), clamped to the
    path's range; differentiable in ``angle`` (forward and reverse mode).

    Safeguarded Newton: bracket from a precomputed grid, linear interpolation, Newton steps
    kept inside the bracket, all detached; then one last Newton step from the detached
    solution, which leaves the value and gives the exact derivative ds/dt = 1 / slope."""
    grid_s, grid_a = _angle_table(path, sigma_data, angle.device)
    target = angle.detach().double().clamp(float(grid_a[0]), float(grid_a[-1]))
    k = torch.searchsorted(grid_a, target).clamp(1, TABLE_SIZE - 1)
    lo_s, hi_s, lo_a, hi_a = grid_s[k - 1], grid_s[k], grid_a[k - 1], grid_a[k]
    s = lo_s + (hi_s - lo_s) * (target - lo_a) / (hi_a - lo_a).clamp_min(1e-300)
    for _ in range(NEWTON_STEPS):
        step = (target - path_angle(path, s, sigma_data)) / path_angle_slope(path, s, sigma_data)
        s = torch.minimum(torch.maximum(s + step, lo_s), hi_s)
    s0 = s.to(angle.dtype)
    with torch.no_grad():
        resid = path_angle(path, s0, sigma_data)
        slope = path_angle_slope(path, s0, sigma_data)
    return s0 + (angle - resid) / slope


def match_snr(path: Path, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """A state x = alpha x0 + sigma eps (coefficients broadcastable against x (B, ...)) ->
    the path's (x_p, s) with the same signal-to-noise ratio: x_p = c x with c = |(alpha_p(s),
    sigma_p(s))| / |(alpha, sigma)|. Differentiable in x, alpha and sigma."""
    per_sample = (x.shape[0],) + (1,) * (x.ndim - 1)
    angle = torch.broadcast_to(torch.atan2(sigma, alpha), per_sample).reshape(x.shape[0])
    s = path_time(path, angle, 1.0)
    a_p, s_p = path.coeffs(s, x)
    c = torch.sqrt(a_p * a_p + s_p * s_p) / torch.sqrt(alpha * alpha + sigma * sigma)
    return c * x, s


def to_path(path: Path, x: Tensor, angle: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """TrigFlow state (x (B, ...), angle (B,)) -> the path's (x_p, s) with the same SNR."""
    ang = _bcast(angle, x)
    return match_snr(path, x, torch.cos(ang), sigma_data * torch.sin(ang))


def trig_x0_eps(
    denoiser: Denoiser, x: Tensor, angle: Tensor, cond, sigma_data: float
) -> tuple[Tensor, Tensor]:
    """(x0, unit eps) that ``denoiser`` (on its own path) predicts for TrigFlow state (x, t)."""
    x_p, s = to_path(denoiser.path, x, angle, sigma_data)
    return denoiser.x0_eps(x_p, s, cond)


class TrigFlowDenoiser(Denoiser):
    """TrigFlow view of ``base``: predicts the TrigFlow velocity sd F = -sin t x0 + sd cos t
    eps (``prediction='velocity'`` on a ``TrigFlowWindow`` path), so ``predict(kind='x0')``
    is sCM's consistency function f = cos t x - sin t sd F. Parameters stay in ``base``."""

    def __init__(self, base: Denoiser, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        lo, hi = angle_window(base.path, sigma_data)
        super().__init__(TrigFlowWindow(sigma_data=sigma_data, eps_t=lo, angle_max=hi), "velocity")
        self.base = base
        self.sigma_data = sigma_data

    @property
    def evals_per_call(self) -> int:  # type: ignore[override]
        return self.base.evals_per_call

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        x0, eps = trig_x0_eps(self.base, x_t, t, cond, self.sigma_data)
        ang = _bcast(t, x_t)
        return -torch.sin(ang) * x0 + self.sigma_data * torch.cos(ang) * eps

    def F(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """sCM's network output F (the TrigFlow velocity over sd)."""
        return self(x_t, t, cond) / self.sigma_data
