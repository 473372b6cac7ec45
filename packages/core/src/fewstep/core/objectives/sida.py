"""SiDA: Adversarial Score identity Distillation (SiD with an adversarial loss on real data).

Zhou, Zheng, Gu, Wang & Huang, "Adversarial Score identity Distillation: Rapidly Surpassing
the Teacher in One Step" (ICLR 2025, arXiv 2410.14919), sec. 3; official code
``mingyuanzhou/SiD``, ``sida/training/sida_loss.py`` (``generator_share_encoder_loss``,
``fakescore_discriminator_share_encoder_loss``) and ``sida_training_loop.py``.

SiD (``sid.py``) is data-free: its student can at best match the teacher's distribution.
SiDA adds real data through a discriminator that *is* the fake-score network's encoder, with
no new parameters: D(x_t, t) = mean over channels of the encoder features at x_t, one logit
per spatial position (``logits= x.mean(dim=1)`` on the UNet encoder output). With student
samples x_g, real samples x_r, one time t and one noise eps per sample:

- fake score / discriminator (``fakescore_discriminator_share_encoder_loss``): the SiD
  denoising loss on detached x_g plus

      L_D = (BCE(D(a x_r + s eps), 1) + BCE(D(a x_g + s eps), 0)) / 2,

  real and fake noised with the *same* t and eps (t from the fake score's training density);
- generator (``generator_share_encoder_loss``): SiD's loss plus lambda_adv times

      L_adv = BCE(D(x_t), 1) * mean_b 1 / w_b,   w_b = mean |x_g,b - y_real,b| (no gradient),

  on the same x_t = a x_g + s eps as SiD's loss. The BCE is the mean over the whole batch's
  logits (clamped to [-10, 10]) and only then divided by the per-sample SiD normaliser w:
  the paper's "adversarial loss batch-normalized within each GPU", which puts the batch's
  average fakeness into the per-sample SiD loss.

Weights. The code sums SiD's loss over elements with scale ``lsg`` = 100 and multiplies the
GAN term by the element count with scale ``lsg_gan`` = 0.01, so with both as per-element
means (as core's ``sid_generator_loss`` is) the paper's relative weight is
lambda_adv = 0.01 / 100 = 1e-4 (``adv_weight``; the code's extra factor 0.5 on both terms is
an overall scale Adam absorbs). The discriminator's loss enters the fake score's with
``disc_weight``. In the code it is weighted by EDM's lambda(sigma) and added to a denoising
loss summed over elements, which makes its relative weight depend on the data size and the
EDM parameterisation; here it is added unweighted to core's per-element denoising loss
(in the model's own parameterisation), so ``disc_weight`` is our normalisation, not a paper
number. ``fake_warmup_steps`` holds the generator while the fake score and D train (the
EDM2 script takes no generator step for its first 100k images); not taken over: its GAN term
switched on only after 200k images, and NaN filtering.

Ours, off by default: a trained head in place of the channel mean (``disc_head`` "linear"
or "pooled", ``SiDAHead``), for networks whose channel mean does not separate real from
generated samples within a short run, and more fake-score / D updates per generator update
(``fake_updates_per_student``, DMD2's two time-scale rule).

Multi-step students: as in few-step SiD, x_g is the x0-prediction at a random one of the
student's steps (``common.student_x0``), so the discriminator sees the uniform mixture of
the student's steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, _concat_cond
from fewstep.core.objectives.common import first, sample_shape
from fewstep.core.objectives.sid import SiD, SiDConfig

HEADS = ("channel_mean", "linear", "pooled")
HEAD = "sida_head"  # the fake score's submodule holding a trained discriminator head

# ------------------------------------------------------------------------- pure functions


def sida_logits(features: Tensor) -> Tensor:
    """D's logits from encoder features (B, C, ...): the mean over channels, one logit per
    position (B, ...) (``logits = x.mean(dim=1)`` in the SiDA networks)."""
    return features.mean(dim=1)


def sida_generator_adv_loss(
    x: Tensor, y_real: Tensor, logits: Tensor, clamp: float = 10.0
) -> Tensor:
    """SiDA's generator adversarial term: BCE(D, real) as the mean over all the batch's
    clamped logits, times the batch mean of 1 / w, w = mean|x - y_real| per sample without
    gradient (``generator_share_encoder_loss`` + the loop's per-sample sum / batch)."""
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        w = (x - y_real).abs().mean(dim=dims).clamp_min(1e-5)
    bce_real = F.softplus(-logits.clamp(-clamp, clamp)).mean()  # BCE with label 1
    return bce_real * (1.0 / w).mean()


def sida_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """(BCE(D(real), 1) + BCE(D(fake), 0)) / 2, each a mean over its logits."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


class SiDAHead(nn.Module):
    """A trained discriminator head on (B, C, ...) features: LayerNorm without affine (the
    features' scales differ by channel and drift as the fake score trains), then a linear
    map to one logit per position, or per sample after a mean over positions (``pool``).
    Zero-initialised: D starts at logit 0 (chance)."""

    def __init__(self, width: int, pool: bool):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.lin = nn.Linear(width, 1)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, feats: Tensor) -> Tensor:
        h = feats.movedim(1, -1)  # (B, ..., C)
        if self.pool:
            h = h.reshape(h.shape[0], -1, h.shape[-1]).mean(1)
        return self.lin(self.norm(h)).squeeze(-1)


# ----------------------------------------------------------------------------- objective


@dataclass
class SiDAConfig(SiDConfig):
    adv_weight: float = 1e-4  # lambda_adv: generator GAN term / per-element SiD loss (paper)
    disc_weight: float = 1.0  # D's loss added to the fake score's denoising loss (ours)
    logit_clamp: float = 10.0  # generator-side logits clamped to +- this (official code)
    # D's logits from the features: "channel_mean" (paper: no parameters, one logit per
    # position), or ours, a fresh head trained with the fake score at its own rate:
    # "linear" (LayerNorm + linear per position) or "pooled" (mean over positions, then
    # LayerNorm + linear: one logit per sample)
    disc_head: Literal["channel_mean", "linear", "pooled"] = "channel_mean"
    # steps in which only the fake score and D train (the generator waits for a D that
    # already separates; the EDM2 script takes no generator step before 100k images)
    fake_warmup_steps: int = 0
    # fake-score (and D) updates per generator update after the warm-up: 1 in SiD / SiDA;
    # > 1 is DMD2's two time-scale rule (Yin et al. 2024 sec. 4.1), for a D that must keep
    # up with the generator
    fake_updates_per_student: int = 1
    head_lr_scale: float = 1.0  # trained head ("linear", "pooled"): its lr / the fake score's lr


class SiDA(SiD):
    name = "sida"
    config_cls = SiDAConfig
    needs_data = True
    summary = "SiD + adversarial loss on real data, D = fake-score encoder (Zhou ICLR 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        if self.config.disc_head not in HEADS:
            raise ValueError(f"unknown disc_head {self.config.disc_head!r}; expected {HEADS}")
        if self.config.fake_updates_per_student < 1 or self.config.fake_warmup_steps < 0:
            raise ValueError("fake_updates_per_student must be >= 1, fake_warmup_steps >= 0")

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        """SiD's roles; a trained head becomes a submodule of the fake score (trained with
        it, saved with it), sized from its features on one example."""
        roles = super().build_roles(student, example)
        if self.config.disc_head != "channel_mean":
            fake = roles["fake_score"]
            x = torch.zeros(1, *sample_shape(example), device=example.rng.device)
            t = self.path.fraction_to_t(0.5).to(x.device).expand(1)
            with torch.no_grad():
                width = fake.features(x, t, first(example.cond)).shape[1]
            pool = self.config.disc_head == "pooled"
            fake.add_module(HEAD, SiDAHead(width, pool).to(x.device))
        return roles

    def schedule(self, step: int) -> list[str]:
        cfg = self.config
        after = step - cfg.fake_warmup_steps
        if after < 0 or after % cfg.fake_updates_per_student:
            return ["fake_score"]
        return super().schedule(step)

    def lr_scales(self, role: str, module: nn.Module) -> dict[str, float]:
        if role == "fake_score" and hasattr(module, HEAD):
            return {HEAD: self.config.head_lr_scale}
        return {}

    def discriminator_logits(self, fake: Denoiser, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """D(x_t) from the fake score's encoder features (``features``): their channel mean
        (paper) or the fake score's head."""
        feats = fake.features(x_t, t, cond)
        head = getattr(fake, HEAD, None)
        return sida_logits(feats) if head is None else head(feats)

    def discriminator_loss(self, fake: Denoiser, x_g: Tensor, batch: Batch) -> tuple[Tensor, dict]:
        """L_D on detached student samples x_g and the batch's real samples, noised with one
        shared t (the fake score's training density) and eps; one pass over both halves."""
        if batch.x is None:
            raise ValueError("sida needs real data in the batch (batch.x)")
        if batch.x.shape != x_g.shape:
            raise ValueError(f"real batch {tuple(batch.x.shape)} != samples {tuple(x_g.shape)}")
        path = fake.path
        t = path.sample_t(batch.size, batch.rng.rand()).to(x_g.device)
        eps = batch.rng.randn_like(x_g).to(x_g)
        x_t = torch.cat(
            [path.noise(x_g, t.to(x_g), eps), path.noise(batch.x.to(x_g), t.to(x_g), eps)]
        )
        cond = None if batch.cond is None else _concat_cond(batch.cond, batch.cond)
        fake_logits, real_logits = self.discriminator_logits(
            fake, x_t, torch.cat([t, t]), cond
        ).chunk(2)
        loss = sida_discriminator_loss(real_logits, fake_logits)
        logs = {
            "disc_loss": loss.item(),
            "disc_real_acc": (real_logits > 0).float().mean().item(),
            "disc_fake_acc": (fake_logits < 0).float().mean().item(),
        }
        return loss, logs

    def generator_extra(self, fake, x, x_t, t, y_real, batch):
        """lambda_adv L_adv on SiD's x_t (gradient through x_t into the student)."""
        cfg = self.config
        logits = self.discriminator_logits(fake, x_t, t, batch.cond)
        adv = sida_generator_adv_loss(x, y_real, logits, cfg.logit_clamp)
        return cfg.adv_weight * adv, {"adv_loss": adv.item()}

    def fake_score_extra(self, fake, x_g, batch):
        """disc_weight L_D, added to SiD's denoising loss of the fake score."""
        d_loss, logs = self.discriminator_loss(fake, x_g, batch)
        return self.config.disc_weight * d_loss, logs
