"""VSD: variational score distillation with a LoRA critic (one-step students).

Wang et al., "ProlificDreamer: High-Fidelity and Diverse Text-to-3D Generation with
Variational Score Distillation" (NeurIPS 2023), eqs. 9-10; Nguyen & Tran, "SwiftBrush:
One-Step Text-to-Image Diffusion Model with Variational Score Distillation" (CVPR 2024),
which applies the same loss to an image-free one-step student; Nguyen et al., "SNOOPI:
Supercharged One-step Diffusion Distillation with Proper Guidance" (2024), PG-SB.

The critic eps_phi is the frozen teacher plus a LoRA (Hu et al. 2022) injected with peft
into its Linear / Conv layers; only the LoRA weights train, with the denoising loss on
detached student samples (eq. 10). The student x = G(z) gets the gradient (eq. 9)

    grad_x = w(t) (eps_teacher(x_t, t, c) - eps_phi(x_t, t, c)),   x_t = a x + s eps,

written once against the path conversions (both networks' eps-predictions). w(t) is
ProlificDreamer's 1 - abar_t = s^2 on VP paths, and its variance-normalised form
s^2 / (a^2 + s^2) on others (``weighting="sigma2"``), or 1 (``"uniform"``).

PG-SB (SNOOPI sec. 4.1): with a conditional teacher each sample draws one CFG scale
kappa ~ U(lo, hi) that guides both the teacher and the LoRA critic, which broadens both
distributions and stabilises the loss across backbones; the critic then trains with
null-condition dropout so that it has an unconditional branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.classifier_free import drop_cond, guided_predict, null_cond_of
from fewstep.core.objectives.common import (
    denoising_loss,
    noised,
    sample_times,
    student_x0,
    unguided,
)

LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def lora_targets(module: nn.Module, names: Sequence[str] = ()) -> list[str]:
    """Names of the layers to adapt: ``names`` (exact names or name suffixes) if given,
    else every Linear / Conv layer of ``module``."""
    layers = [n for n, m in module.named_modules() if isinstance(m, LORA_LAYERS)]
    if not names:
        return layers
    chosen = [n for n in layers if any(n == k or n.endswith("." + k) for k in names)]
    if not chosen:
        raise ValueError(
            f"no Linear/Conv layer matches lora_targets {list(names)}; layers: {layers[:20]}"
        )
    return chosen


def lora_critic(teacher: Denoiser, rank: int, alpha: float, targets: Sequence[str]) -> Denoiser:
    """A copy of the teacher with frozen weights and trainable LoRA adapters (peft)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:  # pragma: no cover - the test environment has peft
        raise ImportError(
            "objective 'vsd' needs peft for its LoRA critic: pip install 'fewstep-core[lora]'"
        ) from err
    critic = trainable_copy(teacher)
    critic.requires_grad_(False)
    names = lora_targets(critic, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0)
    critic = inject_adapter_in_model(config, critic)
    for n, p in critic.named_parameters():
        p.requires_grad_("lora_" in n)
    return critic


def vsd_weight(a: Tensor, s: Tensor, weighting: str) -> Tensor:
    """w(t): s^2 / (a^2 + s^2) (= 1 - abar_t on VP paths, ProlificDreamer) or 1."""
    if weighting == "sigma2":
        return s * s / (a * a + s * s)
    if weighting == "uniform":
        return torch.ones_like(s)
    raise ValueError(f"unknown VSD weighting {weighting!r}; expected 'sigma2' or 'uniform'")


def vsd_loss(x: Tensor, eps_real: Tensor, eps_fake: Tensor, weight: Tensor) -> Tensor:
    """Surrogate whose gradient wrt x is weight (eps_real - eps_fake) / numel (eq. 9)."""
    grad = torch.nan_to_num(weight * (eps_real - eps_fake)).detach()
    return (grad * x).sum() / x.numel()


@dataclass
class VSDConfig(ObjectiveConfig):
    lora_rank: int = 8  # LoRA rank of the critic
    lora_alpha: float = 8.0  # LoRA scaling numerator (scale = alpha / rank)
    lora_targets: tuple[str, ...] = ()  # layer names (or suffixes) to adapt; () = all Linear/Conv
    weighting: Literal["sigma2", "uniform"] = "sigma2"  # w(t)
    t_range: tuple[float, float] = (0.02, 0.98)  # VSD times as fractions of the path
    fake_updates_per_student: int = 1  # critic updates per student update
    pg_scale_range: tuple[float, float] | None = None  # PG-SB: kappa ~ U(lo, hi); None = off
    critic_cond_dropout: float = 0.1  # null-condition rate of the critic under PG-SB
    null_label: int | None = None  # unconditional label when the teacher is no GuidedDenoiser
    backward_simulation: bool = True  # multi-step students: their own rollouts (DMD2 sec. 4.4)


class VSD(Objective):
    name = "vsd"
    config_cls = VSDConfig
    roles = ("student", "fake_score")
    summary = "variational score distillation with a LoRA critic, PG-SB (Wang 2023; Nguyen 2024)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        vsd_weight(torch.ones(1), torch.ones(1), cfg.weighting)  # validates the name
        if cfg.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {cfg.lora_rank}")
        self.null_cond = null_cond_of(teacher, cfg.null_label)
        if cfg.pg_scale_range is not None:
            lo, hi = cfg.pg_scale_range
            if hi < lo:
                raise ValueError(f"pg_scale_range must be (lo, hi) with lo <= hi, got {(lo, hi)}")
            if self.null_cond is None:
                raise ValueError(
                    "PG-SB (pg_scale_range) needs a conditional teacher and its null "
                    "condition: pass a GuidedDenoiser teacher or set null_label"
                )

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        cfg = self.config
        critic = lora_critic(
            unguided(self.teacher), cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets
        )
        return {"student": student, "fake_score": critic}

    def schedule(self, step: int) -> list[str]:
        if step % self.config.fake_updates_per_student == 0:
            return ["student", "fake_score"]
        return ["fake_score"]

    def eps_pair(self, critic: Denoiser, x_t: Tensor, t: Tensor, batch: Batch):
        """(teacher eps, critic eps) at x_t, both guided by one PG-SB scale per sample."""
        cfg = self.config
        if cfg.pg_scale_range is None or batch.cond is None:
            real = self.teacher.predict(x_t, t, batch.cond, kind="eps")
            return real, critic.predict(x_t, t, batch.cond, kind="eps")
        lo, hi = cfg.pg_scale_range
        kappa = (lo + (hi - lo) * batch.rng.rand()).to(x_t)
        base = unguided(self.teacher)
        real = guided_predict(base, x_t, t, batch.cond, kappa, self.null_cond, kind="eps")
        fake = guided_predict(critic, x_t, t, batch.cond, kappa, self.null_cond, kind="eps")
        return real, fake

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, critic = roles["student"], roles["fake_score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x, _ = student_x0(student, self.student_sampler(), batch, cfg.backward_simulation)

        if "student" in update:
            t = sample_times(self.path, batch, cfg.t_range)
            x_t, _ = noised(self.path, x.detach(), t, batch)
            with torch.no_grad():
                eps_real, eps_fake = self.eps_pair(critic, x_t, t, batch)
                a, s = self.path.coeffs(t, x)
                w = vsd_weight(a, s, cfg.weighting)
            loss = vsd_loss(x, eps_real, eps_fake, w)
            logs["vsd_grad_norm"] = (w * (eps_real - eps_fake)).flatten(1).norm(dim=1).mean().item()
            losses["student"] = loss

        if "fake_score" in update:
            dropout = cfg.critic_cond_dropout if cfg.pg_scale_range is not None else 0.0
            cond = drop_cond(batch.cond, self.null_cond, dropout, batch)
            loss = denoising_loss(critic, x.detach(), cond, batch)
            logs["fake_score_loss"] = loss.item()
            losses["fake_score"] = loss
        return losses, logs
