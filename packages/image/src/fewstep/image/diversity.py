"""Diversity distillation: the teacher takes the first (high-noise) steps, the student the rest
(Gandikota & Bau 2025, "Distilling Diversity and Control in Diffusion Models", sec. 5).

Their diffusion-target visualisation shows that the first, high-noise steps decide the
layout and so the diversity of a sample, and that distilled students collapse there; handing
only those steps to the base model restores (and can exceed) the base model's diversity at
nearly the student's cost. Here the teacher runs its first ``k`` Euler (DDIM) steps on its own
grid, reaching time t_k; the student then predicts x0 at t_k and continues along its own
few-step times below t_k (x0, re-noise with fresh noise), as ``FewStepSampler`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.metrics import diversity
from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.samplers import EulerSampler, Sample, Sampler, _step_to


@dataclass
class HybridSample(Sample):
    teacher_nfe: int = 0  # network evaluations per sample spent by the teacher
    student_nfe: int = 0  # ... and by the student


class DiversitySampler(Sampler):
    """``sample(student, noise, cond)``: ``k`` Euler steps of ``teacher`` on its grid
    (``teacher_steps`` uniform steps, or explicit native ``teacher_times``), then the student
    from the time reached along its ``student_times`` (path fractions, 1 = noise) that lie
    below it. ``k = 0`` is the student's ``FewStepSampler(student_times)``; ``k`` = all teacher
    steps is the teacher's ``EulerSampler``. NFE = teacher's + student's, each counted from the
    denoiser's ``evals_per_call`` (2 for a CFG teacher)."""

    name = "diversity"

    def __init__(
        self,
        teacher: Denoiser,
        k: int,
        teacher_steps: int = 25,
        student_times: Sequence[float] = (1.0,),
        teacher_times: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
    ):
        if k < 0:
            raise ValueError(f"teacher steps k must be >= 0, got {k}")
        if not student_times:
            raise ValueError("DiversitySampler needs at least one student time")
        self.teacher, self.k = teacher, k
        self.euler = EulerSampler(teacher_steps, teacher_times)
        self.student_times = list(student_times)
        self.generator = generator

    def _fresh(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.generator).to(like)

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, noise: Tensor, cond=None) -> HybridSample:
        teacher, student, path = self.teacher, denoiser, self.teacher.path
        ts = [path.fraction_to_t(f) for f in self.student_times]
        grid = self.euler.grid(path)
        k = min(self.k, len(grid) - 1)
        t_nfe = 0
        if k == 0:  # the student from noise: sigma(t0) * noise, as FewStepSampler starts
            x = path.noise(torch.zeros_like(noise), _batch_t(ts[0], noise), noise)
        else:
            x = path.prior(noise)
            for t, t_next in zip(grid[:k], grid[1 : k + 1], strict=True):
                x0, eps = teacher.x0_eps(x, _batch_t(t, x), cond)
                t_nfe += teacher.evals_per_call
                x = _step_to(path, x0, eps, t_next)
            if grid[k] is None:  # the teacher reached data
                return HybridSample(x, t_nfe, teacher_nfe=t_nfe, student_nfe=0)
            ts = [grid[k]] + [t for t in ts if float(t) < float(grid[k])]
        s_nfe = 0
        for i, t in enumerate(ts):
            x = student.predict(x, _batch_t(t, x), cond, kind="x0")
            s_nfe += student.evals_per_call
            if i + 1 < len(ts):
                x = path.noise(x, _batch_t(ts[i + 1], x), self._fresh(x))
        return HybridSample(x, t_nfe + s_nfe, teacher_nfe=t_nfe, student_nfe=s_nfe)


def per_prompt_diversity(samples: Tensor) -> float:
    """Mean over prompts of the mean pairwise L2 distance between a prompt's samples across
    seeds (core ``metrics.diversity``): ``samples`` (P prompts, S seeds, ...), S >= 2."""
    if samples.ndim < 3 or samples.shape[1] < 2:
        raise ValueError(
            f"expected samples shaped (prompts, seeds >= 2, ...), got {tuple(samples.shape)}"
        )
    return sum(diversity(s.flatten(1)) for s in samples) / samples.shape[0]
