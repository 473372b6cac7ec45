"""Pieces shared by the preference objectives (PSO, Distillation-DPO, Flash-DMD's reward term):
checked reward calls, win/lose pairs of student samples, and the DPO logistic.

Pairs follow Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", CVPR 2024): for each condition two samples are drawn, the reward ranks them, and
the Bradley-Terry likelihood sigma(beta * margin) of the observed ranking is maximised, where
the margin is a difference of implicit rewards (log-likelihood ratios to a reference model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.objectives.common import sample_shape
from fewstep.core.samplers import FewStepSampler

Reward = Callable[[Tensor, Any], Tensor]


def call_reward(reward: Reward | None, x0: Tensor, cond: Any, who: str) -> Tensor:
    """``reward(x0, cond)`` checked to be finite scores of shape (B,)."""
    if reward is None:
        raise ValueError(
            f"{who} needs a reward function reward(x0, cond) -> (B,) scores (higher is better)"
        )
    r = reward(x0, cond)
    if not isinstance(r, Tensor) or r.shape != (x0.shape[0],):
        got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"{who}: reward must return a tensor of shape ({x0.shape[0]},), got {got}")
    if not torch.isfinite(r.detach()).all():
        raise ValueError(f"{who}: reward returned non-finite scores")
    return r


def repeat_cond(cond: Any, n: int = 2) -> Any:
    """A batched condition (tensor, dict of tensors, or None) repeated ``n`` times along the
    batch: sample i of copy k sits at row k * B + i."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: repeat_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, Tensor):
        return torch.cat([cond] * n, dim=0)
    raise TypeError(f"cannot repeat a condition of type {type(cond).__name__}")


def rank_pairs(x_a: Tensor, x_b: Tensor, r_a: Tensor, r_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Order each pair (x_a[i], x_b[i]) by reward: (x_win, x_lose, a_won (B,) bool).

    Ties go to ``x_a``. Works on tensors with or without gradient."""
    a_won = r_a >= r_b
    m = a_won.reshape(-1, *([1] * (x_a.ndim - 1)))
    return torch.where(m, x_a, x_b), torch.where(m, x_b, x_a), a_won


def dpo_logistic(margin: Tensor, beta: float, scale_by_beta: bool = True) -> tuple[Tensor, Tensor]:
    """DPO's Bradley-Terry loss -log sigma(beta * margin) per pair and its derivative
    magnitude beta * sigma(-beta * margin) (the weight a pair's gradient gets; it vanishes once
    the preferred sample's implicit reward exceeds the other's by a few 1/beta).

    ``scale_by_beta=False`` returns sigma(-beta * margin) instead (in (0, 1), 1/2 at margin 0):
    beta then only sets how fast the weight fades with the margin, not its size, so a large
    beta for tiny margins does not also multiply the preference term's weight (DPO's gradient,
    Rafailov et al. 2023 eq. 7, ties both to beta).

    margin: (B,). Returns (loss (B,), weight (B,)); the weight is detached."""
    loss = F.softplus(-beta * margin)
    weight = torch.sigmoid(-beta * margin).detach()
    return loss, (beta * weight if scale_by_beta else weight)


def per_sample_sq_error(a: Tensor, b: Tensor) -> Tensor:
    """mean over all but the batch dimension of (a - b)^2: (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def student_candidates(
    student: Denoiser,
    sampler: FewStepSampler,
    batch: Batch,
    n: int = 2,
    backward_simulation: bool = True,
    shared_noise_scale: float = 0.0,
    finished: bool = False,
) -> tuple[Tensor, Tensor, Any]:
    """The states ``n`` student rollouts per condition reach before the step that is ranked,
    without gradient: (x_t (n B, ...), t (n B,), cond repeated n times); rows j B + i are
    candidate j of condition i. ``student.predict(x_t, t, cond, kind="x0")`` gives the
    candidates (see ``student_pairs`` for the step, the noises and ``finished``)."""
    shape = sample_shape(batch)
    noises = [batch.rng.randn(*shape) for _ in range(n)]
    if shared_noise_scale > 0:
        if n != 2:
            raise ValueError(f"shared_noise_scale pairs two noises, got {n} candidates")
        noises[1] = shared_noise_scale * noises[0]
    noise = torch.cat(noises)
    cond = repeat_cond(batch.cond, n)
    times = sampler.native_times(student.path)
    if finished:
        k = len(times) - 1
    elif len(times) > 1 and backward_simulation:
        k = batch.rng.shared_randint(0, len(times))
    else:
        k = 0

    def fresh(like):
        return torch.cat([batch.rng.randn_like(h) for h in like.chunk(n)]).to(like)

    with torch.no_grad():
        x_t, t, _ = sampler.rollout(student, noise, cond, upto=k, fresh=fresh)
    return x_t, t.expand(x_t.shape[0]).to(x_t), cond


def student_pairs(
    student: Denoiser,
    sampler: FewStepSampler,
    batch: Batch,
    backward_simulation: bool = True,
    shared_noise_scale: float = 0.0,
    finished: bool = False,
) -> tuple[Tensor, Tensor, Any]:
    """Two student samples per condition: (x (2B, ...), t (2B,), cond repeated twice). Rows
    i and B + i form pair i. With gradient when enabled. The two start noises are independent,
    or, with ``shared_noise_scale`` s > 0, the second is s times the first (Distillation-DPO's
    code pairs ``noise`` with ``1.1 * noise``).

    As ``common.student_x0``: a multi-step student predicts from its own state at a random one
    of its steps (shared by the batch), reached without gradient (DMD2 backward simulation).
    ``finished``: always its last step instead, so ``x`` is the finished sample the sampler
    returns, with gradient through the last step only (Distillation-DPO's code,
    ``p_sample_with_final_step_grad``: pairs of complete completions are ranked and the loss
    is taken at them)."""
    x_t, t, cond = student_candidates(
        student, sampler, batch, 2, backward_simulation, shared_noise_scale, finished
    )
    return student.predict(x_t, t, cond, kind="x0"), t, cond


def best_worst(r: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rows of the best and the worst of ``n`` candidates per condition: r (n B,) rewards laid
    out as ``student_candidates`` (row j B + i); returns (rows_w (B,), rows_l (B,)). Ties go
    to the lower candidate index."""
    if r.ndim != 1 or r.shape[0] % n:
        raise ValueError(f"best_worst: rewards must be (n B,) with n = {n}, got {tuple(r.shape)}")
    per = r.reshape(n, -1)  # (n, B)
    b = per.shape[1]
    base = torch.arange(b, device=r.device)
    return per.argmax(dim=0) * b + base, per.argmin(dim=0) * b + base


@torch.no_grad()
def finished_samples(
    student: Denoiser, sampler: FewStepSampler, batch: Batch, copies: int = 1
) -> tuple[Tensor, Any]:
    """``copies`` complete student samples per condition (every step run, no gradient):
    (x (copies * B, ...), cond repeated ``copies`` times). Noise from the batch's generator."""
    shape = sample_shape(batch)
    noise = torch.cat([batch.rng.randn(*shape) for _ in range(copies)])
    cond = repeat_cond(batch.cond, copies)

    def fresh(like):
        return torch.cat([batch.rng.randn_like(h) for h in like.chunk(copies)]).to(like)

    x, _, _ = sampler.rollout(student, noise, cond, fresh=fresh)
    return x, cond
