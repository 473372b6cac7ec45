"""SDS: score distillation sampling.

Poole, Jain, Barron, Mildenhall, "DreamFusion: Text-to-3D using 2D Diffusion" (ICLR 2023),
eq. 3: with x = g(theta) a render, t ~ U(0.02, 0.98), eps ~ N(0, I) and
x_t = alpha_t x + sigma_t eps,

    grad_theta L_SDS = E_{t, eps}[ w(t) (eps_hat(x_t; y, t) - eps) dx/dtheta ],

where eps_hat is the prior's eps prediction under classifier-free guidance (DreamFusion uses
a scale of 100) and the U-Net Jacobian is omitted. w(t) = sigma_t^2 (= 1 - abar_t on VP paths,
threestudio's default); the per-image gradient is applied through ``reparam_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fewstep.threed.prior import TimeSchedule
from fewstep.threed.score.base import ScoreMethod, grad_logs, randn, reparam_loss, weight


@dataclass
class SDSConfig:
    guidance_scale: float = 100.0  # CFG scale of the prior (DreamFusion: 100)
    weighting: str = "sigma2"  # w(t), a WEIGHTINGS name (DreamFusion: sigma_t^2)
    schedule: TimeSchedule = field(default_factory=TimeSchedule)  # t ~ U(0.02, 0.98)


def sds_gradient(eps_hat, eps, w):
    """w(t) (eps_hat - eps): the SDS gradient on the render (eq. 3), shapes (B, ...)."""
    return w * (eps_hat - eps)


class SDS(ScoreMethod):
    name = "sds"
    config_cls = SDSConfig

    def loss(self, x, cond, step, total_steps, camera=None, generator=None):
        """Draws, in order: t fractions (B,), then eps like x."""
        cfg, path = self.config, self.adapter.path
        frac, t = self.times(x.shape[0], step, total_steps, generator, x.device)
        eps = randn(x.shape, generator, x)
        with torch.no_grad():
            x_t = path.noise(x.detach(), t, eps)
            eps_hat = self.adapter.predict(x_t, t, cond, "eps", cfg.guidance_scale)
            a, s = self.adapter.coeffs(t, x)
            grad = sds_gradient(eps_hat, eps, weight(cfg.weighting, a, s))
        return {"scene": reparam_loss(x, grad)}, grad_logs(grad, frac)
