"""CDS: consistency distillation sampling, Consistent3D's deterministic (ODE) prior.

Wu, Zhou, Yi, Yuan, Zhang, "Consistent3D: Towards Consistent High-Fidelity Text-to-3D
Generation with Deterministic Sampling Prior" (CVPR 2024), sec. 4 (CDS loss and its
gradient); the form below follows the authors' ``compute_grad_consistency``
(sail-sg/Consistent3D, threestudio/models/guidance/stable_diffusion_guidance.py).

SDS perturbs the render with fresh noise each step, i.e. samples an SDE; CDS fixes one noise
eps* for the whole run (``shared_noise``) so that x_{t+dt} = alpha x + sigma eps* lies on a
deterministic probability-flow ODE trajectory, takes one ODE (DDIM) step of the guided prior
from t + dt to t, and uses the less noisy point to guide the noisier one:

    x_{t+dt} = alpha_{t+dt} x + sigma_{t+dt} eps*,
    x_hat_t  = DDIM(x_{t+dt}; t + dt -> t)  (the prior's eps and x0 at t + dt),
    grad_x   = w(t) (eps_hat(x_{t+dt}; y, t + dt) - sg(eps_hat(x_hat_t; y, t))).

The consistency loss || eps_hat(x_{t+dt}) - sg(eps_hat(x_hat_t)) ||^2 is differentiated
with the U-Net Jacobian dropped, as SDS does (it is SDS with eps replaced by the prior's own
one-step ODE prediction). Times: the less noisy t is annealed deterministically with sqrt
decay (700 -> 100 of 1000 in the coarse stage, ``anneal_t``), dt ~ U(100, 300) / 1000
(``end_gap``, ``perturb_factor``), t + dt capped at 0.98. CFG in the authors' convention is
eps_c + s (eps_c - eps_u) with s annealed 100 -> 50: our (uncond-based) scale s + 1, 101 -> 51.
Weighting: uniform (their coarse stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fewstep.core.objectives.common import ode_step
from fewstep.threed.prior import PriorAdapter, TimeSchedule
from fewstep.threed.score.base import ScoreMethod, grad_logs, randn, reparam_loss, weight


@dataclass
class CDSConfig:
    guidance_scale: float = 101.0  # CFG scale at the start (authors' 100 in their convention)
    guidance_scale_end: float = 51.0  # CFG scale at the end, linear in between (authors' 50)
    weighting: str = "uniform"  # w(t), a WEIGHTINGS name (Consistent3D coarse: uniform)
    schedule: TimeSchedule = field(
        default_factory=lambda: TimeSchedule(
            "sqrt", t_min=0.1, t_max=0.7, t_max_end=0.1, deterministic=True
        )
    )  # the less noisy time t: 0.7 -> 0.1 with sqrt decay
    gap: tuple[float, float] = (0.1, 0.3)  # dt ~ U(gap): the noisier time is t + dt
    t_cap: float = 0.98  # t + dt is capped here (sigma_max_percent)
    shared_noise: bool = True  # one eps* for the whole run and every view (the ODE prior)
    solver: str = "euler"  # ODE step t + dt -> t: euler (= DDIM) or heun


def cds_gradient(eps_noisy, eps_ode, w):
    """w(t) (eps_hat(x_{t+dt}) - eps_hat(x_hat_t)): the CDS gradient on the render, (B, ...)."""
    return w * (eps_noisy - eps_ode)


class CDS(ScoreMethod):
    name = "cds"
    config_cls = CDSConfig

    def __init__(self, adapter: PriorAdapter, config: CDSConfig | None = None, seed: int = 0):
        super().__init__(adapter, config, seed)
        lo, hi = self.config.gap
        if not 0.0 < lo <= hi:
            raise ValueError(f"gap must be (lo, hi) with 0 < lo <= hi, got {self.config.gap}")
        noise = torch.randn(1, *adapter.sample_shape, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("noise", noise)  # eps*, shared by every step and view

    def scale(self, step: int, total: int) -> float:
        p = min(max(step / max(total, 1), 0.0), 1.0)
        c = self.config
        return c.guidance_scale + (c.guidance_scale_end - c.guidance_scale) * p

    def loss(self, x, cond, step, total_steps, camera=None, generator=None):
        """Draws, in order: t fractions (B,) (none used when deterministic), gaps (B,), then
        eps like x unless the noise is shared."""
        cfg, path = self.config, self.adapter.path
        n = x.shape[0]
        frac, _ = self.times(n, step, total_steps, generator, x.device)
        lo, hi = cfg.gap
        gap = lo + (hi - lo) * torch.rand(n, generator=generator)
        frac_noisy = (frac + gap).clamp(max=cfg.t_cap)
        frac = torch.minimum(frac, frac_noisy - 1e-4)  # the ODE step always goes down
        t = self.adapter.fractions_to_t(frac).to(x.device)
        t_noisy = self.adapter.fractions_to_t(frac_noisy).to(x.device)
        eps = self.noise.expand_as(x) if cfg.shared_noise else randn(x.shape, generator, x)
        prior = self.guided(self.scale(step, total_steps))
        with torch.no_grad():
            x_noisy = path.noise(x.detach(), t_noisy, eps.to(x))
            eps_noisy = prior.predict(x_noisy, t_noisy, cond, kind="eps")
            x_ode = ode_step(prior, x_noisy, t_noisy, t, cond, cfg.solver)
            eps_ode = prior.predict(x_ode, t, cond, kind="eps")
            a, s = self.adapter.coeffs(t_noisy, x)  # w at the noisier time, as the authors
            grad = cds_gradient(eps_noisy, eps_ode, weight(cfg.weighting, a, s))
        logs = grad_logs(grad, frac_noisy)
        logs["guidance_scale"] = self.scale(step, total_steps)
        return {"scene": reparam_loss(x, grad)}, logs
