"""Samplers: the teacher's many-step ODE solvers and the student's few-step samplers.

Every sampler returns a ``Sample`` with the number of network evaluations per sample (NFE)
it actually spent, counted from the denoiser's ``evals_per_call`` (2 under CFG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.core.models import Denoiser, _batch_t


@dataclass
class Sample:
    x: Tensor  # generated samples (B, ...)
    nfe: int  # network evaluations per sample


class Sampler:
    """``sample(denoiser, noise, cond) -> Sample``; ``noise`` is standard normal of the
    sample shape and is scaled to the path's prior by the sampler."""

    name = "sampler"

    def sample(self, denoiser: Denoiser, noise: Tensor, cond: Any = None) -> Sample:
        raise NotImplementedError


def _step_to(path, x0: Tensor, eps: Tensor, t_next: Tensor | None) -> Tensor:
    """x at t_next given (x0, eps); t_next=None means clean data."""
    if t_next is None:
        return x0
    return path.noise(x0, t_next, eps)


class EulerSampler(Sampler):
    """First-order probability-flow ODE solver written as x_next = a' x0 + s' eps.

    This is DDIM (Song et al. 2021, eq. 12) and equals Euler on the ODE in
    (x/alpha, sigma/alpha) (Karras et al. 2022, sec. 4); on rectified flow it is exactly
    Euler in t. It is well defined at alpha=0, where Euler in sigma/alpha is not."""

    name = "euler"

    def __init__(self, steps: int = 50, times: Sequence[float] | None = None):
        self.steps = steps
        self.times = times

    def grid(self, path) -> list[Tensor | None]:
        ts = torch.as_tensor(self.times) if self.times is not None else path.timesteps(self.steps)
        return [*ts.float()] + [None]

    @torch.no_grad()
    def sample(self, denoiser, noise, cond=None):
        return self._run(denoiser, noise, cond, [])

    @torch.no_grad()
    def x0_trajectory(self, denoiser, noise, cond=None) -> list[Tensor]:
        """The x0 prediction at every step, from noise to data: what the denoiser takes the
        clean sample to be along its own trajectory (the "diffusion target" that shows
        where layout, then detail, is decided)."""
        record: list[Tensor] = []
        self._run(denoiser, noise, cond, record)
        return record

    def _run(self, denoiser, noise, cond, record: list[Tensor]) -> Sample:
        path = denoiser.path
        grid = self.grid(path)
        x = path.prior(noise)
        nfe = 0
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            x0, eps = denoiser.x0_eps(x, _batch_t(t, x), cond)
            record.append(x0)
            nfe += denoiser.evals_per_call
            x = _step_to(path, x0, eps, None if t_next is None else _batch_t(t_next, x))
        return Sample(x, nfe)


class HeunSampler(EulerSampler):
    """Second-order Heun on the velocity ODE dx/dt = a'(t) x0 + s'(t) eps in native time
    (Karras et al. 2022, alg. 1); the last step to clean data is first order."""

    name = "heun"

    def x0_trajectory(self, denoiser, noise, cond=None) -> list[Tensor]:
        raise NotImplementedError("x0_trajectory follows Euler (DDIM) steps; use EulerSampler")

    @torch.no_grad()
    def sample(self, denoiser, noise, cond=None):
        path = denoiser.path
        grid = self.grid(path)
        x = path.prior(noise)
        nfe = 0
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            tb = _batch_t(t, x)
            d = denoiser.predict(x, tb, cond, kind="velocity")
            nfe += denoiser.evals_per_call
            if t_next is None:
                x = path.convert(d, "velocity", "x0", x, tb)
                continue
            tn = _batch_t(t_next, x)
            dt = (t_next - t).item()
            x_pred = x + dt * d
            d2 = denoiser.predict(x_pred, tn, cond, kind="velocity")
            nfe += denoiser.evals_per_call
            x = x + dt * 0.5 * (d + d2)
        return Sample(x, nfe)


class DDPMSampler(EulerSampler):
    """Ancestral sampling: from x_t draw x_s from the DDPM posterior q(x_s | x_t, x0_hat) at
    each consecutive pair of grid times (Ho et al. 2020, eqs. 6-7, written for a general jump
    t -> s of any VP path: a_ts = a_t / a_s, v_ts = s_t^2 - a_ts^2 s_s^2, mean =
    (a_ts s_s^2 x_t + a_s v_ts x0_hat) / s_t^2, variance v_ts s_s^2 / s_t^2). On a discrete
    path with the full grid this is diffusers' DDPMScheduler with ``fixed_small`` variance.
    ``clip_x0`` clamps x0_hat to [-clip_x0, clip_x0] first (diffusers' ``clip_sample``, which
    diffusion_policy relies on: at the last steps of a cosine table alpha is ~1e-2 and an eps
    error is amplified 100-fold)."""

    name = "ddpm"

    def __init__(
        self,
        steps: int = 100,
        times: Sequence[float] | None = None,
        clip_x0: float | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(steps, times)
        self.clip_x0 = clip_x0
        self.generator = generator

    def x0_trajectory(self, denoiser, noise, cond=None) -> list[Tensor]:
        raise NotImplementedError("x0_trajectory follows Euler (DDIM) steps; use EulerSampler")

    @torch.no_grad()
    def sample(self, denoiser, noise, cond=None):
        path = denoiser.path
        grid = self.grid(path)
        x = path.prior(noise)
        nfe = 0
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            tb = _batch_t(t, x)
            x0, _ = denoiser.x0_eps(x, tb, cond)
            nfe += denoiser.evals_per_call
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            if t_next is None:
                x = x0
                continue
            mean, std = ddpm_posterior(
                *path.coeffs(tb, x), *path.coeffs(_batch_t(t_next, x), x), x, x0
            )
            z = torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
            x = mean + std * z
        return Sample(x, nfe)


def ddpm_posterior(
    a_t: Tensor, s_t: Tensor, a_s: Tensor, s_s: Tensor, x_t: Tensor, x0: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and std of q(x_s | x_t, x0) for s < t on a VP path with coefficients (a, s)
    broadcastable against x (Ho et al. 2020, eqs. 6-7, for a general jump; s_s = 0 gives
    x0). Per-element coefficients allow a different noise level at every position."""
    a_ts = a_t / a_s
    v_ts = s_t**2 - a_ts**2 * s_s**2
    mean = (a_ts * s_s**2 * x_t + a_s * v_ts * x0) / s_t**2
    return mean, (v_ts * s_s**2 / s_t**2).clamp(min=0).sqrt()


class DiffusersSampler(Sampler):
    """Runs any diffusers scheduler (DDPM, DDIM, Euler, DPM-Solver, LCM, FlowMatchEuler, ...)
    over a fewstep denoiser: converts the denoiser's prediction into the scheduler's
    ``prediction_type`` and maps scheduler timesteps to native path time."""

    name = "diffusers"

    def __init__(self, scheduler: Any, steps: int = 50, to_native: Callable | None = None):
        self.scheduler = scheduler
        self.steps = steps
        self.to_native = to_native

    def _native(self, ts: Tensor, path) -> Tensor:
        if self.to_native is not None:
            return self.to_native(ts)
        if path.name == "rectified_flow":  # flow-matching schedulers use sigma * N
            return ts.float() / self.scheduler.config.num_train_timesteps
        return ts.float()

    def _target_kind(self, path) -> str:
        pt = getattr(self.scheduler.config, "prediction_type", None)
        if pt is None or path.name == "rectified_flow":
            return "velocity"
        return {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[pt]

    @torch.no_grad()
    def sample(self, denoiser, noise, cond=None):
        sch = self.scheduler
        path = denoiser.path
        sch.set_timesteps(self.steps, device=noise.device)
        # flow-matching schedulers have neither init_noise_sigma nor scale_model_input:
        # their prior is the unit normal and the model input is unscaled.
        x = noise * getattr(sch, "init_noise_sigma", 1.0)
        kind = self._target_kind(path)
        nfe = 0
        for ts in sch.timesteps:
            inp = sch.scale_model_input(x, ts) if hasattr(sch, "scale_model_input") else x
            t = _batch_t(self._native(ts, path), x)
            pred = denoiser.predict(inp, t, cond, kind=kind)
            nfe += denoiser.evals_per_call
            x = sch.step(pred, ts, x, return_dict=False)[0]
        return Sample(x, nfe)


class FewStepSampler(Sampler):
    """The student's sampler: at each time, predict x0; re-noise to the next time with fresh
    noise (consistency multistep sampling, Song et al. 2023 alg. 1; DMD2's multi-step
    generator). ``times`` are fractions of the path's range (1.0 = pure noise)."""

    name = "few-step"

    def __init__(self, times: Sequence[float] = (1.0,), generator: torch.Generator | None = None):
        if not times:
            raise ValueError("FewStepSampler needs at least one time")
        self.times = list(times)
        self.generator = generator

    @classmethod
    def uniform(cls, steps: int, **kw) -> FewStepSampler:
        """``steps`` evenly spaced fractions from 1 down to 1/steps."""
        return cls([1.0 - i / steps for i in range(steps)], **kw)

    def native_times(self, path) -> list[Tensor]:
        return [path.fraction_to_t(f) for f in self.times]

    def rollout(
        self, denoiser, noise, cond=None, upto: int | None = None, fresh: Callable | None = None
    ) -> tuple[Tensor, Tensor | None, int]:
        """Run the first ``upto`` steps from ``noise``. Returns (x, t, nfe): the state at
        ``times[upto]`` (t=None and x clean once every step ran). ``fresh(like)`` draws the
        re-noising noise (default: the sampler's generator)."""
        path = denoiser.path
        ts = self.native_times(path)
        upto = len(ts) if upto is None else upto
        if fresh is None:

            def fresh(like):
                return torch.randn(like.shape, generator=self.generator).to(like)

        # sigma(t0) * noise: the prior at t_max; the data term is unknown and dropped.
        x = path.noise(torch.zeros_like(noise), _batch_t(ts[0], noise), noise)
        nfe = 0
        for i in range(upto):
            x = denoiser.predict(x, _batch_t(ts[i], x), cond, kind="x0")
            nfe += denoiser.evals_per_call
            if i + 1 < len(ts):
                x = path.noise(x, _batch_t(ts[i + 1], x), fresh(x))
        return x, (ts[upto] if upto < len(ts) else None), nfe

    @torch.no_grad()
    def sample(self, denoiser, noise, cond=None):
        x, _, nfe = self.rollout(denoiser, noise, cond)
        return Sample(x, nfe)


class FlowMapSampler(Sampler):
    """Deterministic flow-map (mean-flow) jumps x_r = x_t - (t - r) u(x_t, t, r) (Geng et
    al. 2025, "Mean Flows for One-step Generative Modeling", eq. 12) over ``times``:
    decreasing fractions of the path's range (1.0 = pure noise), the last jump landing at
    ``t_min``. ``u`` is ``denoiser.average_velocity(x_t, t, r, cond)`` in the path's native
    velocity units (flow-map students: MeanFlow, flow-map distillation, BOOT); a plain
    denoiser without it is stepped with its instantaneous velocity u(x_t, t, t), i.e. Euler
    in native time."""

    name = "flow-map"

    def __init__(self, times: Sequence[float] = (1.0,)):
        times = [float(f) for f in times]
        if not times:
            raise ValueError("FlowMapSampler needs at least one time")
        if any(not 0.0 < f <= 1.0 for f in times) or any(
            a <= b for a, b in zip(times[:-1], times[1:], strict=False)
        ):
            raise ValueError(
                f"FlowMapSampler times must be strictly decreasing fractions in (0, 1], got {times}"
            )
        self.times = times

    @classmethod
    def uniform(cls, steps: int) -> FlowMapSampler:
        """``steps`` evenly spaced fractions from 1 down to 1/steps."""
        if steps < 1:
            raise ValueError(f"FlowMapSampler needs steps >= 1, got {steps}")
        return cls([1.0 - i / steps for i in range(steps)])

    def grid(self, path) -> list[Tensor]:
        """Native jump times: the given fractions, then t_min."""
        return [path.fraction_to_t(f) for f in [*self.times, 0.0]]

    @torch.no_grad()
    def sample(self, denoiser, noise, cond=None):
        path = denoiser.path
        grid = self.grid(path)
        x = path.prior(noise)
        nfe = 0
        for t, r in zip(grid[:-1], grid[1:], strict=True):
            tb, rb = _batch_t(t, x), _batch_t(r, x)
            if hasattr(denoiser, "average_velocity"):
                u = denoiser.average_velocity(x, tb, rb, cond)
            else:
                u = denoiser.predict(x, tb, cond, kind="velocity")
            nfe += denoiser.evals_per_call
            x = x - (t - r).to(x) * u
        return Sample(x, nfe)


SAMPLERS: dict[str, type[Sampler]] = {
    "euler": EulerSampler,
    "heun": HeunSampler,
    "ddpm": DDPMSampler,
    "few-step": FewStepSampler,
    "flow-map": FlowMapSampler,
}


def make_sampler(name: str, **kwargs) -> Sampler:
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None
    return cls(**kwargs)
