"""DMD2: improved distribution matching distillation.

Yin et al., "One-step Diffusion with Distribution Matching Distillation" (DMD, CVPR 2024)
and "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2, NeurIPS
2024).

Student G maps noise to x = G(z). Its gradient is the reverse-KL gradient
    grad_x KL(p_fake || p_real) ~ E_t,eps[ w(x) (x0_fake(x_t) - x0_real(x_t)) ]
(DMD eq. 7, with the real and fake scores written as x0-predictions), normalised per sample
by w = 1 / mean|x - x0_real(x_t)| (DMD eq. 8). The fake score is trained on detached
student samples with the teacher's own denoising loss, several times per student update
(DMD2 sec. 4.1, two time-scale update rule). An optional GAN head on the fake score's
bottleneck features separates noised real from noised student samples (DMD2 sec. 4.2,
eq. 4); it is trained with the fake score (same role) and its non-saturating loss is added
to the student's. A multi-step student is trained on its own backward-simulated inputs
(DMD2 sec. 4.4): run the student from noise, without gradient, to a random one of its
steps, then take the gradient step from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, _concat_cond, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    denoising_loss,
    first,
    gan_discriminator_loss,
    gan_generator_loss,
    noised,
    sample_shape,
    sample_times,
    student_x0,
    unguided,
)


@dataclass
class DMD2Config(ObjectiveConfig):
    fake_updates_per_student: int = 5  # TTUR: fake-score updates per student update
    t_range: tuple[float, float] = (0.02, 0.98)  # DM-loss times as fractions of the path
    gan_weight: float = 0.0  # student GAN loss weight (DMD2 uses 3e-3 on ImageNet; 0 = off)
    gan_critic_weight: float = 1.0  # weight of the head's classification loss for the critic
    gan_t_range: tuple[float, ...] = ()  # GAN times as path fractions; () = t_range (paper)
    gan_head_lr_scale: float = 1.0  # the freshly initialised head's lr / the fake score's lr
    backward_simulation: bool = True  # multi-step: train on the student's own rollouts
    fake_lora_rank: int = 0  # > 0: the fake score is the frozen teacher + LoRA (peft) adapters
    fake_lora_targets: tuple[str, ...] = ()  # layers to adapt (names or suffixes); () = all


class GANHead(nn.Module):
    """Logit from bottleneck features. Spatial features (B, C, H, W) go through DMD2's
    classification branch, stride-2 convolutions with GroupNorm and SiLU down to at most
    2 x 2 (so the head sees layout, not only channel means), then a mean over what is left
    and an MLP; flat features (B, D) go straight to the MLP."""

    def __init__(self, width: int, hidden: int = 128, spatial: tuple[int, ...] = ()):
        super().__init__()
        convs: list[nn.Module] = []
        size = min(spatial) if len(spatial) == 2 else 0
        while size > 2:
            norm = nn.GroupNorm(math.gcd(32, hidden), hidden)
            convs += [nn.Conv2d(width, hidden, 3, 2, 1), norm, nn.SiLU()]
            width, size = hidden, (size + 1) // 2
        self.convs = nn.Sequential(*convs)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feats: Tensor) -> Tensor:
        if feats.ndim == 4:
            feats = self.convs(feats)
        f = feats.flatten(2).mean(-1) if feats.ndim > 2 else feats
        return self.net(f).squeeze(-1)


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    """DMD's generator loss (DMD eqs. 7-8) as a surrogate whose gradient wrt x is
    w * (x0_fake - x0_real) / numel, with w = 1 / mean|x - x0_real| per sample.

    x, x0_real, x0_fake: (B, ...). Returns (loss, per-sample gradient norm)."""
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        w = 1.0 / (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((x0_fake - x0_real) * w)
    loss = 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")
    return loss, grad.flatten(1).norm(dim=1)


def dm_term(
    real: Denoiser, fake: Denoiser, x: Tensor, batch: Batch, t_range: tuple[float, float]
) -> tuple[Tensor, dict]:
    """DMD's distribution-matching term for samples x (with gradient): noise the detached x at
    times drawn from ``t_range`` (path fractions), take both scores' x0 there without
    gradient, and return (``dmd_loss``, logs {dm_loss, dm_grad_norm})."""
    path = real.path
    t = sample_times(path, batch, t_range)
    x_t, _ = noised(path, x.detach(), t, batch)
    with torch.no_grad():
        x0_real = real.predict(x_t, t, batch.cond, kind="x0")
        x0_fake = fake.predict(x_t, t, batch.cond, kind="x0")
    loss, gnorm = dmd_loss(x, x0_real, x0_fake)
    return loss, {"dm_loss": loss.item(), "dm_grad_norm": gnorm.mean().item()}


def gan_critic_loss(critic, path, x_fake: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, float]:
    """DMD2 eq. 4, critic side: non-saturating loss of the head on the fake score's features
    separating noised real data (batch.x) from noised student samples at times t.
    Returns (loss, fraction of real samples classified real)."""
    xf_t, _ = noised(path, x_fake, t, batch)
    xr_t, _ = noised(path, batch.x, t, batch)
    cond = None if batch.cond is None else _concat_cond(batch.cond, batch.cond)
    # one pass over both halves (the score has only per-sample normalisation)
    logits = critic["head"](
        critic["score"].features(torch.cat([xf_t, xr_t]), torch.cat([t, t]), cond)
    )
    lf, lr = logits.chunk(2)
    return gan_discriminator_loss(lr, lf), (lr > 0).float().mean().item()


class DMD2(Objective):
    name = "dmd2"
    config_cls = DMD2Config
    roles = ("student", "fake_score")
    summary = "distribution matching with a trained fake score, TTUR, GAN head (Yin 2024)"

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.config.gan_weight > 0

    def gan_times(self, batch: Batch, like: Tensor) -> Tensor:
        """(B,) native times the GAN head sees real and student samples at."""
        return sample_times(self.path, batch, self.config.gan_t_range or self.config.t_range)

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        cfg = self.config
        if cfg.fake_lora_rank > 0:  # memory: a LoRA critic, as VSD's (ProlificDreamer)
            from fewstep.core.objectives.vsd import lora_critic

            rank, targets = cfg.fake_lora_rank, cfg.fake_lora_targets
            score = lora_critic(unguided(self.teacher), rank, float(rank), targets)
        else:
            score = trainable_copy(unguided(self.teacher))
        critic = nn.ModuleDict({"score": score})
        if self.config.gan_weight > 0:
            x = torch.zeros(1, *sample_shape(example), device=example.rng.device)
            cond = first(example.cond)
            t = self.path.fraction_to_t(0.5).to(x.device).expand(1)
            with torch.no_grad():
                feats = score.features(x, t, cond)
            critic["head"] = GANHead(feats.shape[1], spatial=tuple(feats.shape[2:])).to(x.device)
        return {"student": student, "fake_score": critic}

    def lr_scales(self, role: str, module: nn.Module) -> dict[str, float]:
        if role == "fake_score" and "head" in module:
            if self.config.gan_head_lr_scale <= 0:
                raise ValueError(
                    f"gan_head_lr_scale must be > 0, got {self.config.gan_head_lr_scale}"
                )
            return {"head": self.config.gan_head_lr_scale}
        return {}

    def schedule(self, step: int) -> list[str]:
        if step % self.config.fake_updates_per_student == 0:
            return ["student", "fake_score"]
        return ["fake_score"]

    def generate(self, student: Denoiser, batch: Batch) -> Tensor:
        """Student samples (with gradient when enabled; see ``common.student_x0``)."""
        x, _ = student_x0(student, self.student_sampler(), batch, self.config.backward_simulation)
        return x

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, critic = roles["student"], roles["fake_score"]
        fake = critic["score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x = self.generate(student, batch)

        if "student" in update:
            loss, dm_logs = dm_term(self.teacher, fake, x, batch, cfg.t_range)
            logs.update(dm_logs)
            if cfg.gan_weight > 0:
                gan = self.gan_generator_loss(critic, x, batch)
                logs["gan_student"] = gan.item()
                loss = loss + cfg.gan_weight * gan
            losses["student"] = loss

        if "fake_score" in update:
            losses["fake_score"], critic_logs = self.critic_loss(critic, x.detach(), batch)
            logs.update(critic_logs)
        return losses, logs

    def gan_generator_loss(self, critic: nn.ModuleDict, x: Tensor, batch: Batch) -> Tensor:
        """The student's non-saturating GAN term softplus(-D(x_t)) on a fresh noising of its
        differentiable samples x at ``gan_times`` (DMD2 eq. 5)."""
        t_g = self.gan_times(batch, x)
        xg_t, _ = noised(self.path, x, t_g, batch)
        return gan_generator_loss(critic["head"](critic["score"].features(xg_t, t_g, batch.cond)))

    def critic_loss(self, critic: nn.ModuleDict, x_d: Tensor, batch: Batch) -> tuple[Tensor, dict]:
        """The fake score's denoising loss on detached student samples x_d, plus the GAN
        head's classification loss (DMD2 eq. 4) when ``gan_weight`` > 0."""
        cfg = self.config
        loss = denoising_loss(critic["score"], x_d, batch.cond, batch)
        logs = {"fake_score_loss": loss.item()}
        if cfg.gan_weight > 0:
            if batch.x is None:
                raise ValueError(f"{self.name} with gan_weight > 0 needs real data in the batch")
            t_g = self.gan_times(batch, x_d)
            d_loss, real_acc = gan_critic_loss(critic, self.path, x_d, t_g, batch)
            logs.update(gan_critic=d_loss.item(), gan_real_acc=real_acc)
            loss = loss + cfg.gan_critic_weight * d_loss
        return loss, logs
