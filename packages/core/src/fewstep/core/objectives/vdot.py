"""VDOT: distribution matching with an optimal-transport distance between real and fake scores.

Wang, Zhang, Xue, Qiao, Wang, Xu, Chen, "VDOT: Efficient Unified Video Creation via Optimal
Transport Distillation" (CVPR 2026, arXiv:2512.06802).

What is from the paper (abstract and summaries; the method section was not available to us):
the student is trained with distribution matching distillation (DMD, Yin et al. 2024) and,
*in addition* to the KL gradient, with a computational (entropic) optimal-transport distance
between the real and the fake score distributions, which adds geometric structure and avoids
the zero-forcing / vanishing gradients of reverse KL in the few-step regime. The fake score
is trained as in DMD2 (two time-scale updates). The paper also adds a discriminator on real
videos (DMD2's GAN head); it is not part of this objective (see ``dmd2``'s ``gan_weight``).

What is our reading (the equations below are ours):
at one noise level t per step (shared by the batch, so predictions are comparable), noise
the student samples x_i to x_t^i and take the real and fake x0-predictions r_i = x0_real(x_t^i)
and f_i = x0_fake(x_t^i) (a score difference at a common x_t is alpha / sigma^2 times the
x0 difference, so x0 space is score space up to a constant). The two batches are empirical
distributions F = {f_i} and R = {r_j}; their debiased entropic OT distance (Sinkhorn
divergence, Genevay et al. 2018; Feydy et al. 2019)
    S(F, R) = W_e(F, R) - W_e(F, F) / 2 - W_e(R, R) / 2,   W_e = <P*, C> of the e-entropic plan
with squared Euclidean cost C has, by the envelope theorem with the plans held fixed,
    dS / df_i = (2 / n) (T_FF(f_i) - T_FR(f_i)),   T_XY(f_i) = n sum_j P^XY_ij y_j,
the barycentric projections of f_i through the self plan and through the fake-to-real plan.
As in DMD, the score Jacobian is dropped and this prediction-space gradient is applied to the
sample: the OT term is DMD's surrogate (``dmd2.dmd_loss``, with its per-sample
normalisation) with x0_real := T_FR and x0_fake := T_FF. As e -> 0 and when the batch is
already matched (identity plan) T_FR(f_i) = r_i and T_FF(f_i) = f_i, so the term reduces to
DMD's gradient; at p_fake = p_real it is exactly zero (the debiasing removes the entropic
shrinkage). ``e`` is set relative to the mean cost (``ot_eps``), so it needs no tuning per
data scale. The OT term is computed per process on its local batch.

Student loss = dm_weight * DMD (per-sample times, DMD eqs. 7-8) + ot_weight * OT term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    denoising_loss,
    noised,
    sample_times,
    student_x0,
    unguided,
)
from fewstep.core.objectives.dmd2 import dmd_loss


@dataclass
class VDOTConfig(ObjectiveConfig):
    fake_updates_per_student: int = 5  # TTUR: fake-score updates per student update
    t_range: tuple[float, float] = (0.02, 0.98)  # DM/OT times as fractions of the path
    backward_simulation: bool = True  # multi-step: train on the student's own rollouts
    dm_weight: float = 1.0  # weight of the plain DMD (reverse-KL) term; 0 = OT only
    ot_weight: float = 1.0  # weight of the optimal-transport term
    ot_eps: float = 0.02  # entropic regularisation, relative to the mean transport cost
    ot_iters: int = 50  # Sinkhorn iterations (log domain)
    ot_debias: bool = True  # Sinkhorn divergence (subtract the self-transport terms)


# --------------------------------------------------------------------------- Sinkhorn


def sinkhorn_plan(cost: Tensor, eps: float, iters: int = 50) -> Tensor:
    """Entropic OT plans between uniform weights on n and m points, log-domain Sinkhorn
    (Cuturi 2013; Peyre & Cuturi 2019, sec. 4.4, eqs. 4.43-4.44):

        P = argmin_{P 1 = a, P^T 1 = b} <P, C> - eps H(P),   a = 1/n, b = 1/m,
        P_ij = a_i b_j exp(u_i + v_j - C_ij / eps),
        u <- -LSE_j(log b_j + v_j - C_ij / eps),   v <- -LSE_i(log a_i + u_i - C_ij / eps)

    (u, v are the dual potentials f / eps, g / eps). cost: (..., n, m), a batch of problems
    solved together. Returns P: (..., n, m); column sums are exact, row sums converge."""
    if cost.ndim < 2:
        raise ValueError(f"cost must be (..., n, m), got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    n, m = cost.shape[-2:]
    k = cost / -eps
    row, col = k - math.log(m), k - math.log(n)  # log b_j - C_ij / eps, log a_i - C_ij / eps
    v = torch.zeros_like(cost[..., :1, :])
    u = torch.zeros_like(cost[..., :, :1])
    for _ in range(iters):
        u = -torch.logsumexp(row + v, dim=-1, keepdim=True)
        v = -torch.logsumexp(col + u, dim=-2, keepdim=True)
    return torch.exp(row - math.log(n) + u + v)


def sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """(n, d), (m, d) -> (n, m) squared Euclidean distances |x|^2 + |y|^2 - 2 x.y (no
    (n, m, d) intermediate, so d may be a whole video latent)."""
    d = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.T
    return d.clamp_min(0.0)


def ot_projections(
    fake: Tensor, real: Tensor, eps: float = 0.02, iters: int = 50, debias: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Barycentric projections of the fake predictions through the entropic plans.

    fake, real: (n, ...) predictions. Returns (T_FR, T_FF, ot_cost): T_FR(f_i) =
    n sum_j P^FR_ij r_j, T_FF(f_i) = n sum_j P^FF_ij f_j (= f_i without ``debias``), both
    shaped like ``fake``, and <P^FR, C> (for logging). ``eps`` is relative to the mean cost.
    No gradient flows through this function."""
    with torch.no_grad():
        n = fake.shape[0]
        f, r = fake.flatten(1).float(), real.flatten(1).float()
        c_fr = sq_dists(f, r)
        e = eps * float(c_fr.mean().clamp_min(1e-12))
        costs = torch.stack([c_fr, sq_dists(f, f)]) if debias else c_fr[None]
        plans = sinkhorn_plan(costs, e, iters)  # both problems in one batched solve
        t_fr = n * plans[0] @ r
        t_ff = n * plans[1] @ f if debias else f
        cost = (plans[0] * c_fr).sum()
    return t_fr.to(fake).view_as(fake), t_ff.to(fake).view_as(fake), cost.to(fake)


# -------------------------------------------------------------------------- objective


class VDOT(Objective):
    name = "vdot"
    config_cls = VDOTConfig
    roles = ("student", "fake_score")
    summary = "DMD plus an entropic-OT (Sinkhorn) distance between real and fake scores (Wang 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.fake_updates_per_student < 1:
            raise ValueError(
                f"fake_updates_per_student must be >= 1, got {cfg.fake_updates_per_student}"
            )
        if cfg.dm_weight < 0 or cfg.ot_weight < 0 or cfg.dm_weight + cfg.ot_weight == 0:
            raise ValueError(
                "dm_weight and ot_weight must be >= 0 and not both 0, got "
                f"dm_weight={cfg.dm_weight}, ot_weight={cfg.ot_weight}"
            )
        if not cfg.ot_eps > 0 or cfg.ot_iters < 1:
            raise ValueError(
                f"ot_eps must be > 0 and ot_iters >= 1, got {cfg.ot_eps} and {cfg.ot_iters}"
            )
        lo, hi = cfg.t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {cfg.t_range}")

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        return {"student": student, "fake_score": trainable_copy(unguided(self.teacher))}

    def schedule(self, step: int) -> list[str]:
        if step % self.config.fake_updates_per_student == 0:
            return ["student", "fake_score"]
        return ["fake_score"]

    def predictions(self, fake: Denoiser, x: Tensor, t: Tensor, batch: Batch):
        """(x0_real, x0_fake) at a fresh noising of the detached samples x at times t."""
        x_t, _ = noised(self.path, x.detach(), t, batch)
        with torch.no_grad():
            return (
                self.teacher.predict(x_t, t, batch.cond, kind="x0"),
                fake.predict(x_t, t, batch.cond, kind="x0"),
            )

    def shared_time(self, batch: Batch) -> Tensor:
        """(B,) one time for the whole (global) batch, uniform over ``t_range``."""
        lo, hi = self.config.t_range
        u = batch.rng.shared_randint(0, 2**24) / 2**24
        t = self.path.fraction_to_t(lo + (hi - lo) * u).to(batch.rng.device)
        return t.expand(batch.size)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, fake = roles["student"], roles["fake_score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x, _ = student_x0(student, self.student_sampler(), batch, cfg.backward_simulation)

        if "student" in update:
            loss = x.new_zeros(())
            if cfg.dm_weight > 0:
                t = sample_times(self.path, batch, cfg.t_range)
                dm, gnorm = dmd_loss(x, *self.predictions(fake, x, t, batch))
                logs["dm_loss"] = dm.item()
                logs["dm_grad_norm"] = gnorm.mean().item()
                loss = loss + cfg.dm_weight * dm
            if cfg.ot_weight > 0:
                x0_real, x0_fake = self.predictions(fake, x, self.shared_time(batch), batch)
                t_fr, t_ff, cost = ot_projections(
                    x0_fake, x0_real, cfg.ot_eps, cfg.ot_iters, cfg.ot_debias
                )
                ot, gnorm = dmd_loss(x, t_fr, t_ff)
                logs["ot_loss"] = ot.item()
                logs["ot_cost"] = cost.item()
                logs["ot_grad_norm"] = gnorm.mean().item()
                loss = loss + cfg.ot_weight * ot
            losses["student"] = loss

        if "fake_score" in update:
            loss = denoising_loss(fake, x.detach(), batch.cond, batch)
            logs["fake_score_loss"] = loss.item()
            losses["fake_score"] = loss
        return losses, logs
