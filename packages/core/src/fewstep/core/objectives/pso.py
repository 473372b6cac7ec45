"""Pairwise sample optimisation (PSO): preference fine-tuning of an already few-step student.

Miao, Yang, Lin, Wang, Liu, Wang, Qiu, "Tuning Timestep-Distilled Diffusion Model Using
Pairwise Sample Optimization" (ICLR 2025, arXiv 2410.03190).

Fine-tuning a timestep-distilled model with the plain diffusion loss blurs it. PSO instead
raises the *relative* likelihood of preferred samples over dispreferred ones, with the
Diffusion-DPO loss (Wallace et al., CVPR 2024, eq. 14) and a frozen copy of the initial
student as the reference:
    L = -log sigma(-beta [ (e_theta(x_w) - e_ref(x_w)) - (e_theta(x_l) - e_ref(x_l)) ]),
    e_m(x) = || x - x0_m(alpha_t x + sigma_t eps, t) ||^2     (mean over elements),
where the pair shares t and eps. The likelihood of a few-step student is that of its own
transitions, x_t -> x0 prediction at its own sampling times, so t is drawn from the student's
step times (a random step per pair) and the error is in x0, the quantity those transitions
use. Pairs (sec. 3.3):
    ``online``:  two samples of the current student per condition, ranked by the reward;
    ``offline``: a data sample (``batch.x``, the "training image") preferred over a sample of
                 the current student for the same condition (the "reference image").
Because the student's own samples appear in every pair, the update stays anchored to what the
student already produces, which keeps its few-step ability.

Limitation: at t_max of a path with alpha(t_max) = 0 (rectified flow) x_t holds no trace of
x0, so a one-step flow student only gets a shift of its outputs towards the winners; PSO is
meaningful there for students with two or more steps (or paths with alpha(t_max) > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, frozen_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.preference import (
    call_reward,
    dpo_logistic,
    finished_samples,
    per_sample_sq_error,
    rank_pairs,
    repeat_cond,
)

PAIRS = ("online", "offline")


@dataclass
class PSOConfig(ObjectiveConfig):
    beta: float = 100.0  # DPO temperature on the error difference (Diffusion-DPO uses 5000)
    pairs: Literal["online", "offline"] = "online"  # own samples ranked by reward, or data > own


def pso_margin(
    x0_w: Tensor, x0_l: Tensor, pred_w: Tensor, pred_l: Tensor, ref_w: Tensor, ref_l: Tensor
) -> Tensor:
    """Diffusion-DPO's margin for PSO, (B,): (e_ref(w) - e_theta(w)) - (e_ref(l) - e_theta(l)),
    with e the per-sample x0 error. Positive when the student, relative to the reference,
    explains the winner better than the loser. The loss is -log sigma(beta * margin)."""
    e = per_sample_sq_error
    return (e(x0_w, ref_w) - e(x0_w, pred_w)) - (e(x0_l, ref_l) - e(x0_l, pred_l))


class PSO(Objective):
    name = "pso"
    config_cls = PSOConfig
    roles = ("student",)
    frozen_roles = ("reference",)
    summary = "Diffusion-DPO pairs on a few-step student vs its frozen initial copy (Miao 2024)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.pairs not in PAIRS:
            raise ValueError(f"pso: pairs must be one of {PAIRS}, got {cfg.pairs!r}")
        if cfg.beta <= 0:
            raise ValueError(f"pso: beta must be > 0, got {cfg.beta}")
        if cfg.pairs == "online" and reward is None:
            raise ValueError(
                "pso with pairs='online' ranks the student's samples with a reward; "
                "pass reward=... (or use pairs='offline' with data)"
            )

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.config.pairs == "offline"

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        return {"student": student, "reference": frozen_copy(student)}

    def pairs(self, student: Denoiser, batch: Batch) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(x_w, x_l) finished samples without gradient, and logs."""
        sampler = self.student_sampler()
        if self.config.pairs == "offline":
            if batch.x is None:
                raise ValueError("pso with pairs='offline' needs data x in the batch")
            own, _ = finished_samples(student, sampler, batch)
            return batch.x, own, {}
        x, cond2 = finished_samples(student, sampler, batch, copies=2)
        with torch.no_grad():
            r = call_reward(self.reward, x, cond2, self.name)
        (x_a, x_b), (r_a, r_b) = x.chunk(2), r.chunk(2)
        x_w, x_l, _ = rank_pairs(x_a, x_b, r_a, r_b)
        return x_w, x_l, {"reward": r.mean().item(), "reward_gap": (r_a - r_b).abs().mean().item()}

    def losses(self, roles, batch, update, step):
        student, ref = roles["student"], roles["reference"]
        x_w, x_l, logs = self.pairs(student, batch)
        times = self.student_sampler().native_times(self.path)
        idx = batch.rng.randint(0, len(times))
        t = torch.stack([torch.as_tensor(tt, dtype=torch.float32) for tt in times])[idx]
        t = t.to(x_w.device)
        eps = batch.rng.randn_like(x_w).to(x_w)
        xw_t, xl_t = self.path.noise(x_w, t, eps), self.path.noise(x_l, t, eps)
        both = torch.cat([xw_t, xl_t])
        t2, cond2 = torch.cat([t, t]), repeat_cond(batch.cond)
        pred_w, pred_l = student.predict(both, t2, cond2, kind="x0").chunk(2)
        with torch.no_grad():
            ref_w, ref_l = ref.predict(both, t2, cond2, kind="x0").chunk(2)
        margin = pso_margin(x_w, x_l, pred_w, pred_l, ref_w, ref_l)
        loss, weight = dpo_logistic(margin, self.config.beta)
        logs.update(pso_margin=margin.mean().item(), dpo_weight=weight.mean().item())
        return {"student": loss.mean()}, logs
