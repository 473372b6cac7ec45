"""The few-step student sampler with inference-time noise modulation.

Xie et al., "Distilled Protein Backbone Generation" (2025; ``generate_distilled_proteina.py``
and ``training/sid_utils.py`` of LY-Xie/SiD_Protein): a K-step generator G(x_t, t) -> x0 is
run on a fixed time grid; before each step the current clean estimate is re-noised to that
step's time, with the fresh noise multiplied by ``noise_scale``:

    x_{t_k} = (1 - t_k) x0_hat_{k-1} + t_k * noise_scale * eps_k,    x0_hat_{-1} = 0,
    x0_hat_k = G(x_{t_k}, t_k),                                        output x0_hat_{K-1}

(core time, t = 0 data; the paper writes interpolate(noise_scale * x_0, x_g, t_P) with
t_P = 1 - t). The paper found this modulation essential (noise_scale 0.45 at inference in
its scripts); training rollouts use noise_scale 1. With ``noise_scale = 1`` this is plain
multistep sampling (core's ``FewStepSampler`` on the same times).

Time grid (paper): t_P = 1 - 10^(-2 s / 400) at s = round(linspace(30, 400, K)), i.e.
t = 10^(-2 s / 400): log-spaced from t = 0.708 down to t = 0.01; a one-step generator uses
t_P = 0.37 (t = 0.63) and no modulation (``generate_onestep``; the recipe sets scale 1).
The first step's input is t_0 * noise_scale * eps (the clean estimate starts at 0, the
centred mean). All noise is centred.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.samplers import FewStepSampler, Sample, Sampler
from fewstep.protein.model import centre


def paper_times(
    steps: int,
    first: int = 30,
    last: int = 400,
    total: int = 400,
    decades: float = 2.0,
    one_step_t: float = 0.63,
) -> list[float]:
    """The student's K core times (decreasing): t = 10^(-decades * s / total) at
    s = round(linspace(first, last, K)); ``one_step_t`` for K = 1 (paper: t_P = 0.37)."""
    if steps < 1:
        raise ValueError(f"student steps must be >= 1, got {steps}")
    if steps == 1:
        return [float(one_step_t)]
    s = torch.round(torch.linspace(first, last, steps, dtype=torch.float64))
    return (10.0 ** (-decades * s / total)).tolist()


def thin_times(times: Sequence[float], steps: int) -> list[float]:
    """``steps`` of a student's trained times for inference: the first ``steps - 1`` and the
    last. A student sampled on fewer of its own times: the grid's low-noise end changes
    least from step to step (paper grid, K = 20: ..., 0.0195, 0.0157, 0.0124, 0.01), and the
    final step at the smallest t is kept because it sets the bond lengths (BENCHMARKS.md,
    session 14: the K = 20 student on 18 times keeps its clash rate, Rg and SSE; on 16,
    keeping the last step gives 0.10 bond outliers, its first 16 times 0.18). Times off the
    trained grid do worse (paper grid for K = 16: clash 0.52 vs 0.37 on 16 of the K = 20
    times)."""
    times = [float(t) for t in times]
    if not 1 <= steps <= len(times) or (steps == 1 and len(times) > 1):
        raise ValueError(
            f"inference steps must be in 2..{len(times)} (the trained times) or the one "
            f"step of a one-step student; got {steps}"
        )
    return times if steps == len(times) else times[: steps - 1] + times[-1:]


class NoiseModulatedSampler(Sampler):
    """K-step sampler with noise modulation (module docstring). ``times`` are native core
    times (decreasing, in (0, 1]); duck-types core's ``FewStepSampler`` (``native_times``,
    ``rollout``) so core's objectives can use it for backward simulation."""

    name = "noise_modulated"

    def __init__(
        self,
        times: Sequence[float],
        noise_scale: float = 0.45,
        generator: torch.Generator | None = None,
    ):
        times = [float(t) for t in times]
        if not times or any(not 0.0 < t <= 1.0 for t in times):
            raise ValueError(f"student times must be a non-empty list in (0, 1], got {times}")
        if any(b >= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"student times must strictly decrease, got {times}")
        if noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        self.times, self.noise_scale, self.generator = times, float(noise_scale), generator

    def native_times(self, path) -> list[Tensor]:
        return [torch.tensor(t) for t in self.times]

    def renoise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t * noise_scale * eps (rectified flow, scaled noise)."""
        t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0)
        return (1 - t) * x0 + t * self.noise_scale * eps

    def rollout(
        self,
        denoiser: Denoiser,
        noise: Tensor,
        cond=None,
        upto: int | None = None,
        fresh: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None, int]:
        """Run the first ``upto`` steps from ``noise`` (B, L, 3). Returns (x, t, nfe): the
        re-noised state at ``times[upto]`` (t None and x the clean output once all ran).
        ``fresh(like)`` draws the later noise (default: the sampler's generator); every
        noise is centred."""
        ts = self.native_times(denoiser.path)
        upto = len(ts) if upto is None else upto
        if fresh is None:

            def fresh(like):
                return torch.randn(like.shape, generator=self.generator).to(like)

        x = self.renoise(torch.zeros_like(noise), _batch_t(ts[0], noise), centre(noise))
        nfe = 0
        for i in range(upto):
            x = denoiser.predict(x, _batch_t(ts[i], x), cond, kind="x0")
            nfe += denoiser.evals_per_call
            if i + 1 < len(ts):
                x = self.renoise(x, _batch_t(ts[i + 1], x), centre(fresh(x)))
        return x, (ts[upto] if upto < len(ts) else None), nfe

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, noise: Tensor, cond=None) -> Sample:
        x, _, nfe = self.rollout(denoiser, noise, cond)
        return Sample(x, nfe)


def _plain(times: Sequence[float], noise_scale: float = 1.0, generator=None) -> Sampler:
    """Core's multistep sampler on the same times (no modulation; rectified-flow times are
    path fractions). ``noise_scale`` must be 1."""
    if noise_scale != 1.0:
        raise ValueError("the 'plain' sampler has no noise modulation; use noise_scale=1")
    return FewStepSampler(list(times), generator=generator)


# name -> factory(times, noise_scale, generator): swap the student's sampler by name
STUDENT_SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "noise_modulated": NoiseModulatedSampler,
    "plain": _plain,
}


def make_student_sampler(
    name: str, times: Sequence[float], noise_scale: float, generator=None
) -> Sampler:
    try:
        factory = STUDENT_SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown student sampler {name!r}; expected one of {sorted(STUDENT_SAMPLERS)}"
        ) from None
    return factory(times, noise_scale, generator)
