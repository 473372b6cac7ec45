"""The denoiser protocol and its adapters.

A denoiser maps (x_t, t, cond) to a prediction in its declared parameterization on its
declared path. Objectives only ever call ``forward`` (raw prediction) or ``predict`` (any
parameterization), so the same loss works on an eps-prediction UNet and a
velocity-prediction transformer.

``t`` is always in the path's native unit with shape (B,); adapters map it to what the
network expects via ``path.network_time``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.paths import PREDICTIONS, Path


def _batch_t(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class Denoiser(nn.Module):
    """Base class: subclasses implement ``forward(x_t, t, cond) -> raw prediction``.

    ``evals_per_call`` is how many network evaluations one call costs (2 for CFG), used by
    samplers to count NFE.
    """

    evals_per_call: int = 1

    def __init__(self, path: Path, prediction: str):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        self.path = path
        self.prediction = prediction

    def predict(self, x_t: Tensor, t: Tensor | float, cond: Any = None, kind: str = "x0"):
        t = _batch_t(t, x_t)
        return self.path.convert(self(x_t, t, cond), self.prediction, kind, x_t, t)

    def x0_eps(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> tuple[Tensor, Tensor]:
        t = _batch_t(t, x_t)
        return self.path.to_x0_eps(self(x_t, t, cond), self.prediction, x_t, t)

    def features(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Intermediate features for discriminator heads (DMD2's GAN on the fake score)."""
        raise NotImplementedError(
            f"{type(self).__name__} exposes no features; use an adapter that does "
            "(DiffusersUNetDenoiser, or ModuleDenoiser with a feature_fn)"
        )


class ModuleDenoiser(Denoiser):
    """Adapter for a plain module ``net(x, network_time, cond) -> prediction``.

    ``precondition=True`` scales the input by 1/std(x_t) (EDM's c_in), useful on
    variance-exploding paths. ``feature_fn(net, x, time, cond)`` optionally exposes features.
    """

    def __init__(
        self,
        net: nn.Module,
        path: Path,
        prediction: str,
        precondition: bool = False,
        sigma_data: float = 1.0,
        feature_fn: Callable | None = None,
    ):
        super().__init__(path, prediction)
        self.net = net
        self.precondition = precondition
        self.sigma_data = sigma_data
        self.feature_fn = feature_fn

    def _input(self, x_t: Tensor, t: Tensor) -> Tensor:
        if not self.precondition:
            return x_t
        scale = self.path.input_scale(t, self.sigma_data).to(x_t)
        return x_t * scale.reshape(-1, *([1] * (x_t.ndim - 1)))

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        return self.net(self._input(x_t, t), self.path.network_time(t), cond)

    def features(self, x_t, t, cond=None):
        if self.feature_fn is None:
            return super().features(x_t, t, cond)
        t = _batch_t(t, x_t)
        return self.feature_fn(self.net, self._input(x_t, t), self.path.network_time(t), cond)


class DiffusersUNetDenoiser(Denoiser):
    """Adapter for diffusers ``UNet2DModel`` (cond = class labels, or None) and
    ``UNet2DConditionModel`` (cond = encoder hidden states, or a dict of keyword arguments
    such as ``{"encoder_hidden_states": ..., "added_cond_kwargs": ...}``).

    ``features`` returns the mid-block output (the bottleneck DMD2 puts its GAN head on).
    """

    def __init__(self, unet: nn.Module, path: Path, prediction: str):
        super().__init__(path, prediction)
        self.unet = unet
        self._conditional = hasattr(unet.config, "cross_attention_dim") and (
            unet.config.cross_attention_dim is not None
        )

    def _kwargs(self, cond: Any) -> dict:
        if cond is None:
            return {}
        if isinstance(cond, dict):
            return dict(cond)
        return {"encoder_hidden_states": cond} if self._conditional else {"class_labels": cond}

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        out = self.unet(x_t, self.path.network_time(t), **self._kwargs(cond), return_dict=False)
        return out[0]

    def features(self, x_t, t, cond=None):
        return _output_of(self.unet.mid_block, lambda: self(x_t, t, cond))


class DiffusersTransformerDenoiser(Denoiser):
    """Adapter for diffusers' latent transformers (SD3 / Flux / PixArt / SANA-style
    ``*Transformer2DModel``): ``cond`` is a dict of the model's keyword arguments besides
    ``hidden_states`` and ``timestep`` (``encoder_hidden_states``, ``pooled_projections``,
    ...) or a tensor of encoder hidden states.

    ``features`` mean-pools the image tokens after the middle transformer block (the
    transformer's bottleneck-equivalent for a GAN head)."""

    def __init__(self, transformer: nn.Module, path: Path, prediction: str):
        super().__init__(path, prediction)
        self.transformer = transformer

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        kwargs = dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        out = self.transformer(
            hidden_states=x_t, timestep=self.path.network_time(t), **kwargs, return_dict=False
        )
        return out[0]

    def features(self, x_t, t, cond=None):
        blocks = self.transformer.transformer_blocks
        out = _output_of(blocks[len(blocks) // 2], lambda: self(x_t, t, cond))
        # joint (text, image) blocks return a pair whose last member is the image stream
        tokens = out[-1] if isinstance(out, tuple) else out
        return tokens.mean(dim=1)


class _StopForward(Exception):
    pass


def _output_of(block: nn.Module, run: Callable[[], Any]) -> Any:
    """Call ``run()`` only until ``block`` has produced its output, and return that output:
    the layers after it would be wasted work (DMD2's classifier branch, too, runs only the
    UNet's encoder and mid block). Autograd keeps the graph up to the block."""
    captured: list[Any] = []

    def stop(module, inputs, out):
        captured.append(out)
        raise _StopForward

    handle = block.register_forward_hook(stop)
    try:
        run()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(block).__name__} did not run in the forward pass")
    return captured[0]


def _concat_cond(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _concat_cond(a[k], b[k]) for k in a}
    if isinstance(a, Tensor):
        return torch.cat([a, b], dim=0)
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}; expected Tensor or dict")


class GuidedDenoiser(Denoiser):
    """Classifier-free guidance as a wrapper (Ho & Salimans 2022, eq. 6):
    pred = uncond + w * (cond - uncond), with w=1 meaning no guidance.

    ``scale`` is a float or a (low, high) range from which each sample draws its own w
    (random guidance as in SNOOPI's PG-SB). ``null_cond(cond) -> cond`` builds the
    unconditional input; ``negative`` replaces it by a negative condition. Guidance is
    linear in the prediction, so applying it in any parameterization is exact.
    """

    def __init__(
        self,
        base: Denoiser,
        scale: float | tuple[float, float],
        null_cond: Callable[[Any], Any],
        negative: Any = None,
    ):
        super().__init__(base.path, base.prediction)
        self.base = base
        self.scale = scale
        self.null_cond = null_cond
        self.negative = negative
        self.generator: torch.Generator | None = None  # set to make random scales reproducible

    @property
    def evals_per_call(self) -> int:  # type: ignore[override]
        return 1 if self.scale == 1.0 else 2

    def _scale(self, x: Tensor) -> Tensor:
        if isinstance(self.scale, tuple):
            lo, hi = self.scale
            u = torch.rand(x.shape[0], generator=self.generator).to(x)
            return (lo + (hi - lo) * u).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tensor(float(self.scale), device=x.device, dtype=x.dtype)

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        if cond is None or self.scale == 1.0:
            return self.base(x_t, t, cond)
        uncond = self.negative if self.negative is not None else self.null_cond(cond)
        both = self.base(
            torch.cat([x_t, x_t]), torch.cat([t, t]), _concat_cond(cond, uncond)
        ).chunk(2)
        return both[1] + self._scale(x_t) * (both[0] - both[1])


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, parameter by parameter."""
    for pt, ps in zip(target.parameters(), source.parameters(), strict=True):
        pt.lerp_(ps.detach(), 1.0 - decay)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off and in eval mode (teachers, EMA targets)."""
    c = copy.deepcopy(module)
    c.requires_grad_(False)
    return c.eval()


def trainable_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients on (students and critics initialised from the teacher)."""
    c = copy.deepcopy(module)
    c.requires_grad_(True)
    return c.train()
