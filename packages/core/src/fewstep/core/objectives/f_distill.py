"""f-distill: one-step distillation by f-divergence distribution matching.

Xu, Nie & Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching"
(2025). With p the teacher's and q the student's marginal at noise level t and the density
ratio r = p_t / q_t, the gradient of D_f(p || q_theta) is (their Thm. 1)

    grad_theta D_f = -E_{t, z, eps}[ h(r(x_t)) (s_p(x_t) - s_q(x_t)) d x_t / d theta ],
    h(r) = r^2 f''(r),

the DMD / VSD gradient (reverse KL, h = 1) weighted per sample. Their table of f and h:

    reverse KL   f = -log r                        h = 1
    forward KL   f = r log r                       h = r
    JS           f = r log r - (1+r) log((1+r)/2)  h = r / (1 + r)
    Jeffreys     f = (r - 1) log r                 h = r + 1

The ratio comes from a discriminator D(x_t) = sigmoid(logit) trained to tell noised real
data (label 1) from noised student samples (label 0), so r = D / (1 - D) = exp(logit): here
DMD2's ``GANHead`` on the fake score's features, trained with the fake score (DMD2 sec.
4.2). Like the paper (and NVIDIA FastGen's implementation) the logit is clamped to
[-10, 10] before exponentiation and h is normalised by its batch mean, which keeps the
gradient's scale that of DMD and only redistributes it over samples. The student loss adds
DMD2's non-saturating GAN generator term, which the paper keeps.

Everything else is DMD2 (fake score trained on student samples with the teacher's denoising
loss, two time-scale updates, backward simulation for multi-step students), which this
objective inherits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.objectives.common import noised, sample_times
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config, dmd_loss

# ----------------------------------------------------------------------------- divergences


@dataclass(frozen=True)
class FDivergence:
    """An f-divergence D_f(p || q) = E_q[f(p/q)] through its weighting h(r) = r^2 f''(r)
    and h's first two derivatives (Uni-Instruct's gradient needs them)."""

    name: str
    h: Callable[[Tensor], Tensor]  # r^2 f''(r)
    dh: Callable[[Tensor], Tensor]  # h'(r)
    d2h: Callable[[Tensor], Tensor]  # h''(r)


def _const(c: float) -> Callable[[Tensor], Tensor]:
    return lambda r: torch.full_like(r, c)


DIVERGENCES: dict[str, FDivergence] = {
    "reverse_kl": FDivergence("reverse_kl", _const(1.0), _const(0.0), _const(0.0)),
    "forward_kl": FDivergence("forward_kl", lambda r: r, _const(1.0), _const(0.0)),
    "js": FDivergence(
        "js", lambda r: r / (1 + r), lambda r: (1 + r) ** -2, lambda r: -2 * (1 + r) ** -3
    ),
    "jeffreys": FDivergence("jeffreys", lambda r: r + 1, _const(1.0), _const(0.0)),
}


def get_divergence(name: str) -> FDivergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown f-divergence {name!r}; expected one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[name]


def density_ratio(logits: Tensor, max_logit: float = 10.0) -> Tensor:
    """r = p_teacher / q_student = exp(logit) of a real-vs-fake discriminator, (B,), with
    the logit clamped to [-max_logit, max_logit] (no gradient)."""
    return logits.detach().float().clamp(-max_logit, max_logit).exp()


def f_weights(ratio: Tensor, divergence: str, normalize: bool = True) -> Tensor:
    """Per-sample weights h(r) (B,), divided by their batch mean when ``normalize``."""
    h = get_divergence(divergence).h(ratio)
    if normalize:
        h = h / (h.mean() + 1e-6)
    return h


# ----------------------------------------------------------------------------- objective


@dataclass
class FDistillConfig(DMD2Config):
    divergence: str = "js"  # f: reverse_kl, forward_kl, js or jeffreys (paper's best: js)
    normalize_weights: bool = True  # divide h(r) by its batch mean (paper)
    max_logit: float = 10.0  # clamp of the discriminator logit before r = exp(logit)
    gan_weight: float = 1e-2  # student GAN loss weight (the head also estimates r: must be > 0)


class FDistill(DMD2):
    name = "f_distill"
    config_cls = FDistillConfig
    summary = "DMD gradient weighted by h(density ratio) for an f-divergence (Xu 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        get_divergence(self.config.divergence)  # validates the name
        if self.config.gan_weight <= 0:
            raise ValueError(
                "f_distill estimates the density ratio with the GAN head, so it needs "
                f"gan_weight > 0 (and real data); got gan_weight={self.config.gan_weight}"
            )

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, critic = roles["student"], roles["fake_score"]
        fake = critic["score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x = self.generate(student, batch)
        if "student" in update:
            t = sample_times(self.path, batch, cfg.t_range)
            x_t, _ = noised(self.path, x.detach(), t, batch)
            with torch.no_grad():
                x0_real = self.teacher.predict(x_t, t, batch.cond, kind="x0")
                x0_fake = fake.predict(x_t, t, batch.cond, kind="x0")
                logits = critic["head"](fake.features(x_t, t, batch.cond))
                h = f_weights(density_ratio(logits, cfg.max_logit), cfg.divergence)
                h = h.to(x).reshape(-1, *([1] * (x.ndim - 1)))
            # h (x0_fake - x0_real) through DMD's loss: the gradient is h w (x0_fake - x0_real)
            loss, gnorm = dmd_loss(x, x0_real, x0_real + h * (x0_fake - x0_real))
            logs.update(dm_loss=loss.item(), dm_grad_norm=gnorm.mean().item())
            logs.update(h_min=h.min().item(), h_max=h.max().item())
            # GAN generator term on a fresh noising of the (differentiable) student sample
            gan = self.gan_generator_loss(critic, x, batch)
            logs["gan_student"] = gan.item()
            losses["student"] = loss + cfg.gan_weight * gan
        if "fake_score" in update:  # DMD2's critic: denoising loss + GAN classification
            losses["fake_score"], critic_logs = self.critic_loss(critic, x.detach(), batch)
            logs.update(critic_logs)
        return losses, logs
