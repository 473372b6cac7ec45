"""TDM: trajectory distribution matching.

Luo, Hu, Sun, Cai and Tang, "Learning Few-Step Diffusion Models by Trajectory Distribution
Matching" (ICCV 2025, arXiv 2503.06674); reference code Luo-Yihong/TDM
(``train_tdm_demo.py``).

A K-step student samples deterministically at fractions 1 = f_0 > ... > f_{K-1} (and
f_K = 0): at t_k it predicts (x0^, eps^) and moves along its own trajectory by the DDIM step
x_{t_{k+1}} = alpha_{k+1} x0^ + sigma_{k+1} eps^ (the last step outputs x0^). TDM matches
this trajectory to the teacher's *at the distribution level*, data-free: the student's
intermediate state x_{t_{k+1}} should be distributed as the teacher's marginal at t_{k+1}.

Per sample a step k is drawn and x_{t_k} is taken from the student's own trajectory (run
from noise without gradient). The step's output state x_mid (at t_{k+1}, or at a random time
in [t_{k+1}, t_k) with ``random_mid``, the code's regulariser) is diffused to tau >= t_mid,

    x_tau = (alpha_tau / alpha_mid) x_mid + sigma_{tau|mid} eps
          = alpha_tau x0^ + sigma_tau eps_mix,
    eps_mix = (alpha_tau sigma_mid / alpha_mid eps^ + sigma_{tau|mid} eps) / sigma_tau,

and the student's x0^ gets DMD's gradient w (x0_fake(x_tau) - x0_real(x_tau)) (DMD eqs. 7-8;
the code's "coop" target x0^ + (x0_real - x0_fake) with the same normaliser). The
sampling-steps-aware objective decouples the targets of different steps: with
``separate_intervals`` step k is matched only on tau in [t_mid, t_k], disjoint across steps,
so one fake score serves all steps without knowing the step (otherwise tau in [t_mid, T]).

The fake score is trained on the same diffused intermediate states with the student's x0^
as target, weighted by min(SNR(tau), ``snr_clip``) and, with ``importance_weight``, by the
code's per-sample ratio exp(-mean(eps_mix^2) / 2) / exp(-mean(eps^2) / 2), which corrects
for eps_mix not being a fresh Gaussian (x_tau is built from the student's own eps^). For
K = 1 this is DMD2 with min-SNR-weighted x0 regression. Real scores come from the teacher
as given (a ``GuidedDenoiser`` for CFG, as the code does); the fake score is unguided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.objectives.common import sample_shape, step_fractions
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config, dmd_loss
from fewstep.core.objectives.phased_dmd import diffuse_from
from fewstep.core.samplers import EulerSampler, Sampler


@dataclass
class TDMConfig(DMD2Config):
    student_steps: int = 4  # K deterministic student steps (when student_times is empty)
    separate_intervals: bool = True  # step k matched on tau in [t_mid, t_k]; else [t_mid, T]
    random_mid: bool = False  # match the trajectory at a random time in [t_{k+1}, t_k)
    importance_weight: bool = True  # the code's correction for the non-Gaussian eps_mix
    snr_clip: float = 5.0  # fake-score x0 loss weight min(SNR(tau), snr_clip)


@dataclass
class TrajectoryDraw:
    """One draw of (step, matching time) per sample and the diffused intermediate state."""

    x0_hat: Tensor  # (B, ...) the student's x0 at its step k (with gradient when asked)
    tau: Tensor  # (B,) native matching times
    x_tau: Tensor  # (B, ...) the diffused intermediate state
    eps_mix: Tensor  # (B, ...) its effective noise: x_tau = alpha_tau x0^ + sigma_tau eps_mix
    eps: Tensor  # (B, ...) the fresh noise of the diffusion
    step: Tensor  # (B,) long: the student step k


class TDM(DMD2):
    name = "tdm"
    config_cls = TDMConfig
    roles = ("student", "fake_score")
    summary = "distribution matching along the student's few-step trajectory (Luo 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        self.fractions()  # checks student_steps / student_times
        if cfg.snr_clip <= 0:
            raise ValueError(f"snr_clip must be > 0, got {cfg.snr_clip}")
        if cfg.gan_weight > 0:
            raise ValueError("tdm has no GAN head; set gan_weight=0 (or use dmd2)")

    def fractions(self) -> list[float]:
        return step_fractions(self.name, self.config.student_steps, self.config.student_times)

    def student_sampler(self) -> Sampler:
        """Deterministic: the student's DDIM steps with its own eps (TDM's sampler)."""
        return EulerSampler(times=[float(self.path.fraction_to_t(f)) for f in self.fractions()])

    @torch.no_grad()
    def trajectory(self, student: Denoiser, noise: Tensor, cond) -> list[Tensor]:
        """The student's states at its K step times, from noise (K - 1 evaluations)."""
        ts = [self.path.fraction_to_t(f) for f in self.fractions()]
        x = self.path.noise(torch.zeros_like(noise), _batch_t(ts[0], noise), noise)
        states = [x]
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            x0, eps = student.x0_eps(x, _batch_t(t, x), cond)
            x = self.path.noise(x0, _batch_t(t_next, x), eps)
            states.append(x)
        return states

    def draw(
        self, student: Denoiser, states: list[Tensor], batch: Batch, grad: bool
    ) -> TrajectoryDraw:
        cfg, path = self.config, self.path
        n = states[0].shape[0]
        dev = states[0].device
        k = batch.rng.randint(0, len(states)).to(dev)
        x_k = torch.stack(states)[k, torch.arange(n, device=dev)]
        fr = torch.tensor([*self.fractions(), 0.0], device=dev)
        f_k, f_next = fr[k], fr[k + 1]
        f_mid = f_next
        if cfg.random_mid:
            f_mid = f_next + batch.rng.rand().to(dev) * (f_k - f_next)
        hi = f_k if cfg.separate_intervals else torch.ones_like(f_k)
        lo = f_mid.clamp_min(cfg.t_range[0])
        hi = torch.maximum(hi.clamp_max(cfg.t_range[1]), lo)
        f_tau = lo + (hi - lo) * batch.rng.rand().to(dev)
        t_k, t_mid, tau = (path.fraction_to_t(f).to(dev) for f in (f_k, f_mid, f_tau))
        with torch.set_grad_enabled(grad):
            x0_hat, eps_hat = student.x0_eps(x_k, t_k, batch.cond)
        x0_d, eps_d = x0_hat.detach(), eps_hat.detach()
        a_m, s_m = path.coeffs(t_mid, x_k)
        clean = (f_mid == 0).reshape(a_m.shape)  # the last step outputs x0^ itself
        a_m = torch.where(clean, torch.ones_like(a_m), a_m)
        s_m = torch.where(clean, torch.zeros_like(s_m), s_m)
        eps = batch.rng.randn_like(x_k).to(x_k)
        x_tau, a_ts, s_ts = diffuse_from(path, a_m * x0_d + s_m * eps_d, a_m, s_m, tau, eps)
        s_tau = path.coeffs(tau, x_k)[1]
        eps_mix = (a_ts * s_m * eps_d + s_ts * eps) / s_tau
        return TrajectoryDraw(x0_hat, tau, x_tau, eps_mix, eps, k)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, fake = roles["student"], roles["fake_score"]["score"]
        cond = batch.cond
        noise = batch.rng.randn(*sample_shape(batch))
        states = self.trajectory(student, noise, cond)
        losses, logs = {}, {}

        if "student" in update:
            d = self.draw(student, states, batch, grad=True)
            with torch.no_grad():
                x0_real = self.teacher.predict(d.x_tau, d.tau, cond, kind="x0")
                x0_fake = fake.predict(d.x_tau, d.tau, cond, kind="x0")
            loss, gnorm = dmd_loss(d.x0_hat, x0_real, x0_fake)
            losses["student"] = loss
            logs["dm_loss"] = loss.item()
            logs["dm_grad_norm"] = gnorm.mean().item()

        if "fake_score" in update:
            d = self.draw(student, states, batch, grad=False)
            dims = tuple(range(1, d.x_tau.ndim))
            a_t, s_t = self.path.coeffs(d.tau, d.x_tau)
            weight = (a_t / s_t).square().flatten().clamp_max(cfg.snr_clip)
            if cfg.importance_weight:
                log_ratio = -0.5 * (d.eps_mix.square().mean(dims) - d.eps.square().mean(dims))
                weight = weight * log_ratio.exp()
            x0_f = fake.predict(d.x_tau, d.tau, cond, kind="x0")
            err = (x0_f - d.x0_hat).square().mean(dims)
            loss = (weight * err).mean()
            losses["fake_score"] = loss
            logs["fake_score_loss"] = loss.item()
        return losses, logs
