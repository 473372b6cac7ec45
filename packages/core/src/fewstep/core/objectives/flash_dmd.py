"""Flash-DMD: timestep-aware distribution matching with a jointly trained reward term.

Chen, Huang, Liu, Zhu, Qu, Chen, Cheng, Sun, "Flash-DMD: Towards High-Fidelity Few-Step Image
Generation with Efficient Distillation and Joint Reinforcement Learning" (arXiv 2511.20549,
2025; CVPR 2026). No public code yet; this follows the paper's description.

Built on DMD2 (``dmd2``: student, fake score trained with the TTUR, backward simulation):

1. Timestep-aware distillation (stage one). DMD2 adds the distribution-matching (DM) gradient
   and the GAN gradient at every student step, where they conflict. Flash-DMD decouples them by
   the student's step: at high-noise steps (path fraction > ``split_frac``) the student gets
   only the DM loss (DMD eqs. 7-8, ``dmd2.dmd_loss``), which fixes global structure; at
   low-noise steps (fraction <= ``split_frac``) only an adversarial loss on the (nearly) clean
   sample, which sharpens detail.
   The paper's discriminator is a SAM-feature pixel-space GAN; ours is DMD2's ``GANHead`` on the
   fake score's features of the sample noised only to ``gan_t_frac`` (nearly clean), with the
   non-saturating losses of DMD2 eq. 4; the head trains with the fake score on real data. With
   ``gan_weight = 0`` (no data) every step uses the DM loss.
2. Joint reward training (stage two, from ``reward_start``). While distillation continues, the
   student also maximises a differentiable reward of its x0 prediction:
       L_student = L_distill - reward_weight * mean r(x0, c),
   the distillation loss acting as the regulariser that keeps the reward from being hacked.
   The paper optimises a latent reward model with an RL objective; we back-propagate the reward
   directly (the reward must be differentiable, e.g. a classifier's log-probability).

Not implemented: the paper's "stabilised" fake-score estimator and its latent reward model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.core.objectives.common import student_x0
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config, dm_term
from fewstep.core.objectives.preference import call_reward


@dataclass
class FlashDMDConfig(DMD2Config):
    split_frac: float = 0.5  # student steps at path fractions > this: DM loss; at or below: GAN
    gan_t_frac: float = 0.02  # path fraction the discriminator sees samples at (nearly clean)
    reward_weight: float = 1.0  # lambda: weight of -mean reward in the student loss (0 = off)
    reward_start: int = 0  # step from which the reward term is on (stage two)


class FlashDMD(DMD2):
    name = "flash_dmd"
    config_cls = FlashDMDConfig
    roles = ("student", "fake_score")
    needs_reward = True
    summary = "timestep-aware DM/GAN split plus a jointly trained reward term (Flash-DMD 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if not 0.0 <= cfg.split_frac <= 1.0 or not 0.0 <= cfg.gan_t_frac <= 1.0:
            raise ValueError(
                f"flash_dmd: split_frac and gan_t_frac must lie in [0, 1], got "
                f"{cfg.split_frac} and {cfg.gan_t_frac}"
            )
        if cfg.reward_weight < 0 or cfg.reward_start < 0:
            raise ValueError("flash_dmd: reward_weight and reward_start must be >= 0")

    def gan_times(self, batch, like):
        return self.path.fraction_to_t(self.config.gan_t_frac).to(like.device).expand(batch.size)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, critic = roles["student"], roles["fake_score"]
        fake = critic["score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x, t_x = student_x0(student, self.student_sampler(), batch, cfg.backward_simulation)
        # the step is shared by the batch (backward simulation draws one depth per batch)
        low_noise = cfg.gan_weight > 0 and float(t_x[0]) <= float(
            self.path.fraction_to_t(cfg.split_frac)
        )

        if "student" in update:
            if low_noise:  # stage one, low-noise step: adversarial loss only
                loss = cfg.gan_weight * self.gan_generator_loss(critic, x, batch)
                logs["gan_student"] = loss.item() / cfg.gan_weight
            else:  # high-noise step: distribution matching only
                loss, dm_logs = dm_term(self.teacher, fake, x, batch, cfg.t_range)
                logs.update(dm_logs)
            if cfg.reward_weight > 0 and step >= cfg.reward_start:  # stage two: joint reward
                r = call_reward(self.reward, x, batch.cond, self.name)
                logs["reward"] = r.mean().item()
                loss = loss - cfg.reward_weight * r.mean()
            losses["student"] = loss

        if "fake_score" in update:
            losses["fake_score"], critic_logs = self.critic_loss(critic, x.detach(), batch)
            logs.update(critic_logs)
        return losses, logs
