"""What every score-distillation method shares: the gradient-as-loss reparameterisation, the
time weightings w(t), and the method interface.

A method turns a batch of renders in the prior's image space, x (B, C, S, S), into a loss
per role. The "scene" role's loss is

    L = 0.5 * || x - sg(x - g) ||^2 / B,    so    dL/dx = g / B,

with g the method's per-image gradient (SDS: w(t) (eps_hat - eps), ...): the usual
reparameterisation (threestudio, DreamGaussian) that lets autograd carry g back through the
renderer to the scene parameters without a custom autograd function. Its value,
0.5 ||g||^2 / B, is only a magnitude to log, not an objective that decreases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fewstep.core.models import Denoiser, GuidedDenoiser
from fewstep.threed.prior import PriorAdapter, draw_fractions


def reparam_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 ||x - sg(x - grad)||^2 / B: its gradient w.r.t. x (B, ...) is grad / B."""
    if grad.shape != x.shape:
        raise ValueError(f"gradient {tuple(grad.shape)} must match the render {tuple(x.shape)}")
    target = (x - torch.nan_to_num(grad)).detach()
    return 0.5 * (x - target).pow(2).sum() / x.shape[0]


def _sigma2(a: Tensor, s: Tensor) -> Tensor:
    return s * s / (a * a + s * s)


def _uniform(a: Tensor, s: Tensor) -> Tensor:
    return torch.ones_like(s)


def _sigma_over_alpha(a: Tensor, s: Tensor) -> Tensor:
    return s / a.clamp_min(1e-4)


# w(t) from the path's (alpha, sigma) at t, broadcast shapes.
#   sigma2: s^2 / (a^2 + s^2) = 1 - abar_t on VP paths: DreamFusion's and ProlificDreamer's
#           w(t) = sigma_t^2 (threestudio's "sds" weighting), variance-normalised elsewhere;
#   uniform: 1 (Consistent3D's coarse stage, threestudio's "uniform");
#   sigma_over_alpha: s / a = sqrt((1 - abar_t) / abar_t), LucidDreamer's ISM and Dreamer XL's
#           TSM weighting.
WEIGHTINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sigma2": _sigma2,
    "uniform": _uniform,
    "sigma_over_alpha": _sigma_over_alpha,
}


def weight(name: str, a: Tensor, s: Tensor) -> Tensor:
    """w(t) named ``name`` (see WEIGHTINGS) from alpha, sigma."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; expected one of {list(WEIGHTINGS)}")
    return WEIGHTINGS[name](a, s)


class ScoreMethod(nn.Module):
    """Base class. Subclasses set ``name``, ``config_cls`` and implement ``loss``.

    ``loss(x, cond, step, total_steps, camera=None, generator=None)``: x (B, C, S, S) renders
    in prior space carrying the graph back to the scene; cond the prior's condition for each
    render (e.g. labels (B,)); camera (B, 4, 4) camera-to-world (VSD's critic reads it);
    every random draw comes from ``generator`` (CPU), so a step replays exactly.
    Returns (losses_by_role, logs): role "scene" always, "critic" for VSD.

    ``seed`` seeds what is drawn once per run (CDS's eps*, VSD's critic initialisation).
    Buffers (CDS's shared noise) and trainable roles (VSD's critic) are part of the module's
    state dict, so checkpoints restore them.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    roles: ClassVar[tuple[str, ...]] = ("scene",)

    def __init__(self, adapter: PriorAdapter, config: Any = None, seed: int = 0):
        super().__init__()
        self.seed = seed  # seeds what a method draws once for the whole run (CDS's eps*)
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(
                f"{self.name} needs a {self.config_cls.__name__}, got {type(self.config).__name__}"
            )
        self.adapter = adapter  # not a module: the frozen prior stays out of the state dict
        weight(self.config.weighting, torch.ones(1), torch.ones(1))  # validates the name

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "adapter":  # keep the prior's weights out of checkpoints
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters of this method's own roles (VSD: "critic"); none by default."""
        return {}

    def loss(
        self,
        x: Tensor,
        cond: Any,
        step: int,
        total_steps: int,
        camera: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        raise NotImplementedError

    # -- helpers shared by the methods
    def times(
        self, n: int, step: int, total: int, generator: torch.Generator | None, device
    ) -> tuple[Tensor, Tensor]:
        """(fractions (n,), native times (n,)) from the config's schedule."""
        frac = draw_fractions(self.config.schedule, n, step, total, generator)
        return frac, self.adapter.fractions_to_t(frac).to(device)

    def guided(self, scale: float) -> Denoiser:
        """The prior under CFG at ``scale`` as a core Denoiser (for ODE steps)."""
        if scale == 1.0:
            return self.adapter.denoiser
        return GuidedDenoiser(self.adapter.denoiser, scale, self.adapter.null_cond)


def randn(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn on CPU from ``generator`` (device-independent draws)."""
    return torch.randn(tuple(shape), generator=generator).to(like)


def grad_logs(grad: Tensor, frac: Tensor) -> dict[str, float]:
    return {"grad_norm": grad.flatten(1).norm(dim=1).mean().item(), "t": frac.mean().item()}
