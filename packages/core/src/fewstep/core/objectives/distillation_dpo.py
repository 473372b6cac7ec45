"""Distillation-DPO: score distillation with preference pairs of student samples.

Zhao, Zhang, Yang, Li, Wu, Xu, Wei, Gu, Sun, "Diffusion Distillation With Direct Preference
Optimization For Efficient 3D LiDAR Scene Completion" (arXiv 2504.11447, 2025); reference code
happyw1nd/DistillationDPO (``trains/DistillationDPO.py``).

As in the paper: the student generates two samples per condition from different noises, a
(possibly non-differentiable) reward ranks them into a winner x_w and a loser x_l, and two
auxiliary diffusion models ("fake scores" phi_w, phi_l, initialised from the teacher) are
trained with the teacher's denoising loss on the winners and on the losers. They estimate the
scores of the student's winner and loser distributions p_w, p_l, so the DMD gradient of each
half is available (DMD eq. 7):
    grad KL(p_k || p_T) = E_t,eps[ (s_phi_k(x_t) - s_T(x_t)) dx/dtheta ],   k in {w, l},
computed, as in ``dmd2.dmd_loss``, from x0-predictions with DMD's per-sample normalisation.

The student minimises a distillation term plus a DPO (Bradley-Terry) term on these halves:
    L = lambda (KL_w + KL_l) - log sigma(beta m),   m = r_w(x_w) - r_l(x_l),
with the implicit rewards r_k(x) = log p_k(x) / p_T(x) (the log-ratio to the teacher, the
reference model, as in DPO). The margin m is estimated, without gradient, with Diffusion-DPO's
ELBO surrogate on the same noised samples: r_k(x) ~ ||eps - eps_T(x_t)||^2 - ||eps - eps_k(x_t)||^2
(mean over elements). Its gradient, through the DMD estimates, is
    (lambda - c) grad KL_w + (lambda + c) grad KL_l,     c = beta sigma(-beta m),
i.e. the student's losing half is pulled to the teacher harder than its winning half: the
stationary student over-weights what wins, p ~ p_T / (2 (1 - F(reward))) at c = lambda, and
the logistic weight c fades once winners' log-ratio exceeds losers' by a few 1/beta (DPO's
KL-regularised tilt). ``distillation_dpo_loss`` implements this for any tensors (images,
point clouds).

Options for when the preference term measures nothing (all off by default; LiDAR, session
13): ``candidates`` > 2 ranks the best against the worst of several completions (wider reward
gaps than a random pair), ``min_gap`` drops the preference weight of near-tied pairs, and
``beta_scales_weight = False`` decouples beta (how fast c fades with the margin) from the
size of c, which ``dmd_weight`` then sets relative to the DM term.

Sign note: the public code's generator loss uses the opposite signs (winners pulled to the
teacher, losers pushed away) and, as written, has zero gradient (its surrogate multiplies the
score difference by x_t - x, which does not depend on x). Pulling the winner half to the
teacher removes exactly what makes it win (its score exceeds the student's in the direction
of higher reward), so we use the signs derived above; the test suite checks that the public
signs do not raise the reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import denoising_loss, sample_times, unguided
from fewstep.core.objectives.dmd2 import dmd_loss
from fewstep.core.objectives.preference import (
    best_worst,
    call_reward,
    dpo_logistic,
    per_sample_sq_error,
    rank_pairs,
    student_candidates,
    student_pairs,
)

RANKS = ("prediction", "finished")  # what the reward ranks and the loss acts on (``rank``)


@dataclass
class DistillationDPOConfig(ObjectiveConfig):
    beta: float = 1.0  # DPO temperature on the implicit-reward margin
    dmd_weight: float = 1.0  # lambda: weight of the DMD (distillation) term on both halves
    fake_updates_per_student: int = 2  # TTUR: auxiliary-score updates per student update
    t_range: tuple[float, float] = (0.02, 0.98)  # DM-loss times as fractions of the path
    backward_simulation: bool = True  # multi-step: train on the student's own rollouts
    # > 0: a pair's second start noise is this times the first (the public code: 1.1);
    # 0: two independent noises
    shared_noise_scale: float = 0.0
    # what a pair is: "prediction": the x0-predictions at a random step of the two rollouts
    # (DMD2's backward simulation); "finished": the finished samples, with gradient through
    # the last step (the public code's one-step generator, ``p_sample_with_final_step_grad``).
    # "finished" diverged on the 4-step LiDAR student (Chamfer 2.1 after 300 steps: the
    # earlier steps share the network and get no direct signal; session 12)
    rank: str = "prediction"
    # completions per condition; > 2: the pair is the best and the worst of them by reward
    # (wider reward gaps; the highest- and lowest-scored of N as in Yuan et al., "Self-
    # Rewarding Language Models", 2024, sec. 2.3). The paper and its code use 2. Only the
    # chosen pair gets gradient
    candidates: int = 2
    # pairs whose reward gap r_w - r_l is below this get no preference weight (c = 0: their
    # halves keep the plain DM term lambda), as Diffusion-DPO drops tied pairs from its data
    # (Wallace et al. 2024, sec. 5). In reward units (metres of Chamfer for LiDAR). 0 = all
    min_gap: float = 0.0
    # True: the logistic weight is c = beta sigma(-beta m) (DPO's gradient); False: c =
    # sigma(-beta m), so beta only sets how fast c fades with the margin and dmd_weight alone
    # sets the preference term's size relative to the DM term (identical at beta = 1)
    beta_scales_weight: bool = True


def distillation_dpo_loss(
    x_w: Tensor,
    x_l: Tensor,
    x0_real_w: Tensor,
    x0_fake_w: Tensor,
    x0_real_l: Tensor,
    x0_fake_l: Tensor,
    margin: Tensor,
    beta: float,
    dmd_weight: float = 1.0,
    pair_weight: Tensor | None = None,
    scale_by_beta: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Distillation-DPO's student loss for one batch of pairs.

    x_w, x_l: (B, ...) winning / losing student samples (with gradient). x0_real_k, x0_fake_k:
    (B, ...) teacher and auxiliary-score x0-predictions at the noised x_k (no gradient).
    margin: (B,) estimate of r_w(x_w) - r_l(x_l) (see the module docstring). pair_weight:
    optional (B,) factor on c per pair (0 drops a pair's preference, ``min_gap``);
    scale_by_beta: see ``dpo_logistic``.
    Returns a surrogate whose gradient wrt x_w is (dmd_weight - c) times DMD's (``dmd_loss``)
    and wrt x_l (dmd_weight + c) times DMD's, c = beta sigma(-beta margin) per pair (sigma(-beta
    margin) without ``scale_by_beta``; times ``pair_weight``), and logs."""
    if x_w.shape != x_l.shape or margin.shape != (x_w.shape[0],):
        raise ValueError(
            f"distillation_dpo_loss: x_w {tuple(x_w.shape)} and x_l {tuple(x_l.shape)} must "
            f"match and margin must be ({x_w.shape[0]},), got {tuple(margin.shape)}"
        )
    dpo, c = dpo_logistic(margin, beta, scale_by_beta)
    if pair_weight is not None:
        c = c * pair_weight.to(c)
    c = c.reshape(-1, *([1] * (x_w.ndim - 1))).to(x_w)
    # scaling (x0_fake - x0_real) by a scales DMD's gradient by a (its normaliser ignores x0_fake)
    a_w, a_l = dmd_weight - c, dmd_weight + c
    loss_w, g_w = dmd_loss(x_w, x0_real_w, x0_real_w + a_w * (x0_fake_w - x0_real_w))
    loss_l, g_l = dmd_loss(x_l, x0_real_l, x0_real_l + a_l * (x0_fake_l - x0_real_l))
    logs = {
        "dpo_loss": dpo.mean().item(),
        "dpo_weight": c.mean().item(),
        "margin": margin.mean().item(),
        # fraction of pairs whose auxiliary scores already rank the winner higher (m > 0);
        # about 1/2 while they cannot tell the winners' distribution from the losers'
        "margin_agree": (margin > 0).float().mean().item(),
        "dm_grad_norm_win": g_w.mean().item(),
        "dm_grad_norm_lose": g_l.mean().item(),
    }
    return loss_w + loss_l, logs


class DistillationDPO(Objective):
    name = "distillation_dpo"
    config_cls = DistillationDPOConfig
    roles = ("student", "fake_score")
    needs_reward = True
    summary = "DMD on reward-ranked student pairs with a DPO logistic on the halves (Zhao 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.rank not in RANKS:
            raise ValueError(f"distillation_dpo: rank must be one of {RANKS}, got {cfg.rank!r}")
        if cfg.beta <= 0 or cfg.dmd_weight < 0 or cfg.fake_updates_per_student < 1:
            raise ValueError(
                "distillation_dpo: beta must be > 0, dmd_weight >= 0 and "
                f"fake_updates_per_student >= 1; got {cfg.beta}, {cfg.dmd_weight}, "
                f"{cfg.fake_updates_per_student}"
            )
        if cfg.candidates < 2 or cfg.min_gap < 0:
            raise ValueError(
                "distillation_dpo: candidates must be >= 2 and min_gap >= 0; got "
                f"{cfg.candidates}, {cfg.min_gap}"
            )
        if cfg.candidates > 2 and cfg.shared_noise_scale > 0:
            raise ValueError("distillation_dpo: shared_noise_scale pairs 2 noises, not candidates")
        # (reward gap, margin) of each ranked pair at every student update, for diagnosis
        self.pair_records: list[tuple[float, float]] = []

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        score = unguided(self.teacher)
        critics = nn.ModuleDict({"win": trainable_copy(score), "lose": trainable_copy(score)})
        return {"student": student, "fake_score": critics}

    def schedule(self, step: int) -> list[str]:
        if step % self.config.fake_updates_per_student == 0:
            return ["student", "fake_score"]
        return ["fake_score"]

    def pairs(self, student: Denoiser, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_w, x_l, reward gap r_w - r_l (B,), every candidate's reward) for B pairs; x_w,
        x_l carry gradient when enabled."""
        cfg = self.config
        if cfg.candidates > 2:
            return self._best_worst_pairs(student, batch)
        x, _, cond2 = student_pairs(
            student, self.student_sampler(), batch, cfg.backward_simulation,
            cfg.shared_noise_scale, finished=cfg.rank == "finished",
        )  # fmt: skip
        with torch.no_grad():
            r = call_reward(self.reward, x.detach(), cond2, self.name)
        x_a, x_b = x.chunk(2)
        r_a, r_b = r.chunk(2)
        x_w, x_l, _ = rank_pairs(x_a, x_b, r_a, r_b)
        return x_w, x_l, (r_a - r_b).abs(), r

    def _best_worst_pairs(self, student: Denoiser, batch: Batch):
        """``candidates`` completions per condition (the same step as ``pairs``), ranked
        without gradient; the best and the worst are predicted again with gradient."""
        cfg, n = self.config, self.config.candidates
        x_t, t, cond = student_candidates(
            student, self.student_sampler(), batch, n, cfg.backward_simulation,
            finished=cfg.rank == "finished",
        )  # fmt: skip
        with torch.no_grad():
            x = student.predict(x_t, t, cond, kind="x0")
            r = call_reward(self.reward, x, cond, self.name)
        w, lo = best_worst(r, n)
        # rows w, lo hold candidates of conditions 0..B-1 in order: batch.cond lines up
        x_w = student.predict(x_t[w], t[w], batch.cond, kind="x0")
        x_l = student.predict(x_t[lo], t[lo], batch.cond, kind="x0")
        return x_w, x_l, r[w] - r[lo], r

    def losses(self, roles, batch, update, step):
        cfg, path = self.config, self.path
        student, critics = roles["student"], roles["fake_score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x_w, x_l, gap, r = self.pairs(student, batch)
        logs["reward"] = r.mean().item()
        logs["reward_gap"] = gap.mean().item()

        if "student" in update:
            t = sample_times(path, batch, cfg.t_range)
            eps = batch.rng.randn_like(x_w).to(x_w)
            xw_t = path.noise(x_w.detach(), t, eps)  # the pair shares t and eps (Diffusion-DPO)
            xl_t = path.noise(x_l.detach(), t, eps)
            with torch.no_grad():
                real_w = self.teacher.predict(xw_t, t, batch.cond, kind="x0")
                real_l = self.teacher.predict(xl_t, t, batch.cond, kind="x0")
                fake_w = critics["win"].predict(xw_t, t, batch.cond, kind="x0")
                fake_l = critics["lose"].predict(xl_t, t, batch.cond, kind="x0")

                def err(x0, x_t):  # ||eps - eps_hat||^2 per sample
                    return per_sample_sq_error(path.to_x0_eps(x0, "x0", x_t, t)[1], eps)

                margin = (err(real_w, xw_t) - err(fake_w, xw_t)) - (
                    err(real_l, xl_t) - err(fake_l, xl_t)
                )
            keep = (gap >= cfg.min_gap).float() if cfg.min_gap > 0 else None
            loss, extra = distillation_dpo_loss(
                x_w, x_l, real_w, fake_w, real_l, fake_l, margin, cfg.beta, cfg.dmd_weight,
                keep, cfg.beta_scales_weight,
            )  # fmt: skip
            logs.update(extra)
            if keep is not None:
                logs["pref_kept"] = keep.mean().item()
            if len(self.pair_records) < 100_000:
                self.pair_records += list(zip(gap.tolist(), margin.tolist()))
            losses["student"] = loss

        if "fake_score" in update:
            lw = denoising_loss(critics["win"], x_w.detach(), batch.cond, batch)
            ll = denoising_loss(critics["lose"], x_l.detach(), batch.cond, batch)
            logs["fake_win_loss"], logs["fake_lose_loss"] = lw.item(), ll.item()
            losses["fake_score"] = lw + ll
        return losses, logs
