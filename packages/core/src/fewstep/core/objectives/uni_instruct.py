"""Uni-Instruct: one-step distillation by the diffusion expansion of an f-divergence.

Wang, Bai, Zhang, Zhang, Luo & Sun, "Uni-Instruct: One-step Diffusion Model through Unified
Diffusion Divergence Instruction" (NeurIPS 2025).

Expansion (their Thm. 3.1). Teacher p and student q_theta diffused by the same forward SDE
(drift f(t) x, diffusion g(t)) keep the ratio r_t = p_t / q_t, and the de Bruijn identity
for f-divergences gives

    D_f(p_t || q_t) = int_t^T g(s)^2 / 2  E_{q_s}[ H(r_s) ||delta_s||^2 ] ds + D_f(p_T || q_T),
    H(r) = r^2 f''(r),   delta = s_p - s_q = grad log r,

so Uni-Instruct minimises  D_UI(theta) = int w(t) E_{q_t}[ H(r_t) ||delta_t||^2 ] dt.
Reverse KL (H = 1) is the Fisher divergence of SiD / SIM; forward KL, JS, ... weight it by
the density ratio.

Tractable gradient (their Thm. 3.2; the derivation below is ours, written from the public
abstract, project page and training code, so the arrangement of terms is our own). With
x_0 = G_theta(z), x_t = a x_0 + s eps, all networks frozen and v(x) = -2 H(r) delta:
(i) the measure's dependence on theta is a reparameterised derivative of a frozen function;
(ii) the fake score's dependence on theta is removed by the score identity
E_q[v . s_q] = E_{x_0, x_t}[v(x_t) . grad log k(x_t | x_0)] (SIM, Luo et al. 2024);
(iii) gradients of the frozen weights H(r(x)) use grad r = r delta, so no gradient of the
discriminator is needed. In the x0-prediction form y_real, y_fake of the scores (delta =
a (y_real - y_fake) / s^2, d = y_real - y_fake, u = y_fake - x_0) and with the time weight
w = s^4 / a^2 (what SiD and the official code use), grad D_UI = grad E[L] with

    L = (H - r H') ||d||^2 + 2 H d . u                                     ("Grad(SIM)")
        + sg[ (a^2 / s^2) (-r^2 H'' ||d||^2 + 2 r H' d . u) ] sg[d] . x_0   ("Grad(DI)")

where the gradient flows through x_0 and x_t (into both frozen score networks) and r, H(r)
and its derivatives carry none. Special cases, checked exactly on Gaussians in the tests:
reverse KL gives L = ||d||^2 + 2 d . u, i.e. twice SiD's loss at alpha = 0.5 (SIM); forward
KL (H = r) drops the ||d||^2 term and weights SiD's alpha = 1 loss by r, as the official
code does; and integrating the gradient over [t, T] with g^2 / 2 reproduces the f-distill /
Diff-Instruct / DMD gradient E[h(r) (s_q - s_p) . dx_t/dtheta] at t, which is how
Uni-Instruct contains the KL-based methods. The official code keeps the first line and, for
JS, the -r^2 H'' part of the second; we keep every term.

Practice follows the paper's code: per-sample normalisation 1 / mean|x_0 - y_real| (SiD),
the density ratio from a discriminator head on the fake score's features trained with the
fake score (r = exp(logit), DMD2's GAN head), r normalised by its batch mean (E_q[r] = 1),
and the non-saturating GAN generator term added with a small weight. The fake score is
DMD2's (denoising loss on student samples; here one update per student update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.objectives.common import noised, sample_times
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config
from fewstep.core.objectives.f_distill import FDivergence, density_ratio, get_divergence


def uni_instruct_terms(
    x: Tensor,
    y_real: Tensor,
    y_fake: Tensor,
    ratio: Tensor | None,
    a: Tensor,
    s: Tensor,
    divergence: FDivergence,
) -> Tensor:
    """Per-sample surrogate L (B,) whose gradient is that of the expanded f-divergence at
    one noise level, in the x0 form with time weight s^4 / a^2 (module docstring).

    x: student samples x_0 (B, ...) with gradient; y_real, y_fake: x0-predictions of the
    teacher and the fake score at x_t = a x_0 + s eps, with gradient through x_t only (the
    networks are frozen); ratio: p_t / q_t at x_t (B,), no gradient (None: all ones, fine
    for reverse KL); a, s: the path's coefficients broadcastable against x."""
    dims = tuple(range(1, x.ndim))
    r = torch.ones(x.shape[0], device=x.device) if ratio is None else ratio.detach()
    r = r.to(x).reshape(-1, *([1] * (x.ndim - 1)))
    h, dh, d2h = divergence.h(r), divergence.dh(r), divergence.d2h(r)
    d = y_real - y_fake
    u = y_fake - x
    d2 = d.pow(2).sum(dims, keepdim=True)
    du = (d * u).sum(dims, keepdim=True)
    sim = (h - r * dh) * d2 + 2 * h * du
    with torch.no_grad():
        coef = (a / s) ** 2 * (-(r**2) * d2h * d2 + 2 * r * dh * du)
        d_sg = d.detach()
    di = coef * (d_sg * x).sum(dims, keepdim=True)
    return (sim + di).flatten()


@dataclass
class UniInstructConfig(DMD2Config):
    divergence: str = "forward_kl"  # f: reverse_kl (= SiD/SIM), forward_kl, js, jeffreys
    fake_updates_per_student: int = 1  # the paper's code alternates 1:1
    gan_weight: float = 1e-2  # student GAN loss weight (paper code 0.01); > 0 unless reverse_kl
    normalize_ratio: bool = True  # divide r by its batch mean (E_q[r] = 1)
    max_logit: float = 10.0  # clamp of the discriminator logit before r = exp(logit)


class UniInstruct(DMD2):
    name = "uni_instruct"
    config_cls = UniInstructConfig
    summary = "expanded f-divergence over diffusion time, SIM + DI gradient (Wang 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        self.divergence = get_divergence(self.config.divergence)
        if self.config.divergence != "reverse_kl" and self.config.gan_weight <= 0:
            raise ValueError(
                f"uni_instruct with divergence {self.config.divergence!r} estimates the "
                "density ratio with the GAN head, so it needs gan_weight > 0 (and real data); "
                "only reverse_kl runs without one"
            )

    def ratio(self, critic, x_t: Tensor, t: Tensor, cond) -> Tensor | None:
        if "head" not in critic:
            return None
        with torch.no_grad():
            logits = critic["head"](critic["score"].features(x_t, t, cond))
            r = density_ratio(logits, self.config.max_logit)
            if self.config.normalize_ratio:
                r = r / r.mean().clamp_min(1e-6)
        return r

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, critic = roles["student"], roles["fake_score"]
        fake = critic["score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x = self.generate(student, batch)
        if "student" in update:
            t = sample_times(self.path, batch, cfg.t_range)
            x_t, _ = noised(self.path, x, t, batch)  # gradient flows through x_t
            a, s = self.path.coeffs(t, x)
            y_real = self.teacher.predict(x_t, t, batch.cond, kind="x0")
            y_fake = fake.predict(x_t, t, batch.cond, kind="x0")
            r = self.ratio(critic, x_t.detach(), t, batch.cond)
            terms = uni_instruct_terms(x, y_real, y_fake, r, a, s, self.divergence)
            with torch.no_grad():  # SiD's per-sample normalisation, per element
                w = (x - y_real).abs().flatten(1).mean(1).clamp_min(1e-5) * x[0].numel()
            loss = (terms / w).mean()
            logs["ui_loss"] = loss.item()
            if r is not None:
                logs.update(ratio_min=r.min().item(), ratio_max=r.max().item())
            if cfg.gan_weight > 0:
                gan = self.gan_generator_loss(critic, x, batch)
                logs["gan_student"] = gan.item()
                loss = loss + cfg.gan_weight * gan
            losses["student"] = loss
        if "fake_score" in update:  # DMD2's critic: denoising loss (+ GAN classification)
            losses["fake_score"], critic_logs = self.critic_loss(critic, x.detach(), batch)
            logs.update(critic_logs)
        return losses, logs
