"""Guidance scale as a network input: the students of guidance distillation.

A guidance-distilled student takes the CFG scale w as an extra input and predicts in one pass
what the teacher predicts in two (Meng et al., "On Distillation of Guided Diffusion Models",
CVPR 2023, sec. 3.1: a Fourier embedding of w added to the time embedding; the same design as
FLUX-dev's and diffusers' ``guidance_embeds``).

``GuidanceEmbedded(base)`` does this without touching the base network's code: during each
forward it hooks the submodule that produces the time embedding (auto-detected: ``time_mlp``
of the toy ``ToyMLP``, ``time_embedding`` of diffusers ``UNet2DModel`` /
``UNet2DConditionModel``) and adds a learned MLP embedding of w to its output. The MLP's last
layer starts at zero, so the wrapped student starts equal to the base network at every w.

Conditions: ``{"cond": c, "guidance": w}`` with w a float or a (B,) tensor, or a plain ``c``,
which uses the wrapper's ``default_scale``. ``FixedGuidance(student, w)`` packs w for every
call, so any sampler draws the student at a chosen scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.models import Denoiser

# names of time-embedding submodules recognised by ``find_time_embedding`` (last name part)
TIME_EMBEDDING_NAMES: tuple[str, ...] = ("time_mlp", "time_embedding")


def pack_guidance(cond: Any, w: Tensor | float) -> dict[str, Any]:
    """The condition of a guidance-input denoiser: ``{"cond": cond, "guidance": w}``."""
    return {"cond": cond, "guidance": w}


def split_guidance(cond: Any, like: Tensor, default: float) -> tuple[Any, Tensor]:
    """(inner condition, (B,) float scales) from a packed or a plain condition."""
    if isinstance(cond, dict) and "guidance" in cond:
        inner, w = cond.get("cond"), cond["guidance"]
    else:
        inner, w = cond, default
    w = torch.as_tensor(w, dtype=torch.float32, device=like.device)
    if w.ndim == 0:
        w = w.expand(like.shape[0])
    if w.shape != (like.shape[0],):
        raise ValueError(
            f"guidance scale must be a float or a ({like.shape[0]},) tensor, got {tuple(w.shape)}"
        )
    return inner, w


def scale_frequencies(n: int, low: float = 0.05, high: float = 20.0) -> Tensor:
    """(n,) angular frequencies, geometric in [low, high] (periods ~0.3 to ~125 in w)."""
    return torch.exp(torch.linspace(math.log(low), math.log(high), n))


def fourier_features(v: Tensor, freqs: Tensor) -> Tensor:
    """(B,) scalars -> (B, 2F) features [sin(f v), cos(f v)]."""
    arg = v.float()[:, None] * freqs.to(v.device)[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class ScaleEmbedding(nn.Module):
    """MLP(Fourier(w)) -> (B, dim), zero at initialisation (last layer zeroed)."""

    def __init__(self, dim: int, features: int = 16, hidden: int = 128):
        super().__init__()
        self.register_buffer("freqs", scale_frequencies(features), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * features, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, w: Tensor) -> Tensor:
        return self.mlp(fourier_features(w, self.freqs).to(self.mlp[0].weight.dtype))


def find_time_embedding(module: nn.Module) -> str:
    """Name of the (shallowest) submodule called ``time_mlp`` or ``time_embedding``."""
    found = [n for n, _ in module.named_modules() if n.rsplit(".", 1)[-1] in TIME_EMBEDDING_NAMES]
    if not found:
        raise ValueError(
            f"no time-embedding submodule named one of {TIME_EMBEDDING_NAMES} in "
            f"{type(module).__name__}; pass embed_module='<dotted name>' (and embed_dim if it "
            "has no nn.Linear)"
        )
    return min(found, key=lambda n: n.count("."))


def _out_features(module: nn.Module, name: str) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"cannot size the guidance embedding: {name!r} holds no nn.Linear; pass embed_dim"
        )
    return linears[-1].out_features


class GuidanceEmbedded(Denoiser):
    """``base`` with a learned, zero-initialised embedding of the guidance scale added to the
    output of its time-embedding submodule ``embed_module`` (a dotted name inside ``base``;
    auto-detected when None). The output must be (B, embed_dim)."""

    def __init__(
        self,
        base: Denoiser,
        embed_module: str | None = None,
        embed_dim: int | None = None,
        features: int = 16,
        hidden: int = 128,
        default_scale: float = 1.0,
    ):
        super().__init__(base.path, base.prediction)
        self.base = base
        self.embed_module = embed_module or find_time_embedding(base)
        target = base.get_submodule(self.embed_module)
        dim = embed_dim or _out_features(target, self.embed_module)
        self.guidance_embedding = ScaleEmbedding(dim, features, hidden)
        self.default_scale = default_scale
        p = next(base.parameters(), None)
        if p is not None:
            self.guidance_embedding.to(p.device)

    def forward(self, x_t, t, cond=None):
        inner, w = split_guidance(cond, x_t, self.default_scale)
        emb = self.guidance_embedding(w)

        def add(_module, _inputs, out):
            if not isinstance(out, Tensor) or out.shape[0] != emb.shape[0]:
                raise ValueError(
                    f"time embedding {self.embed_module!r} returned "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; "
                    f"expected a ({emb.shape[0]}, {emb.shape[1]}) tensor"
                )
            return out + emb.reshape(*emb.shape, *([1] * (out.ndim - 2))).to(out.dtype)

        handle = self.base.get_submodule(self.embed_module).register_forward_hook(add)
        try:
            return self.base(x_t, t, inner)
        finally:
            handle.remove()


class FixedGuidance(Denoiser):
    """A guidance-input denoiser evaluated at one scale ``w`` (what samplers use)."""

    def __init__(self, inner: Denoiser, w: float):
        super().__init__(inner.path, inner.prediction)
        self.inner = inner
        self.w = float(w)

    def forward(self, x_t, t, cond=None):
        return self.inner(x_t, t, pack_guidance(cond, self.w))
