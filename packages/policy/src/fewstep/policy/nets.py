"""The diffusion-policy network: a 1-D temporal U-Net over the action sequence with FiLM
conditioning on the observations and the noise level (Chi et al. 2023, "Diffusion Policy",
sec. 3.2 and their ConditionalUnet1D).

The noise level may differ per position of the action sequence (Streaming Diffusion Policy,
Høeg et al. 2024): ``t`` is (B,) or (B, T); every position's level is embedded sinusoidally
and the embeddings of the whole sequence are mixed by an MLP into one FiLM vector, as SDP's
TEDi U-Net does. A (B,) level is the same level at every position (the ordinary policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class UnetConfig:
    down_dims: tuple[int, ...] = (32, 64)  # channels per resolution (DP uses 256, 512, 1024)
    time_embed_dim: int = 32  # sinusoidal embedding width of one position's noise level
    kernel_size: int = 5  # temporal convolution width
    groups: int = 8  # GroupNorm groups


def sinusoidal(t: Tensor, dim: int) -> Tensor:
    """(...,) -> (..., dim) transformer-style embedding of noise levels."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / (half - 1))
    arg = t.float()[..., None] * freq
    return torch.cat([arg.sin(), arg.cos()], -1)


class ConvBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, cin: int, cout: int, k: int, groups: int):
        super().__init__(
            nn.Conv1d(cin, cout, k, padding=k // 2), nn.GroupNorm(groups, cout), nn.Mish()
        )


class FiLMResBlock(nn.Module):
    """Two conv blocks; the conditioning vector predicts a per-channel scale and bias
    applied after the first (FiLM, Perez et al. 2018)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, k: int, groups: int):
        super().__init__()
        self.b1, self.b2 = ConvBlock(cin, cout, k, groups), ConvBlock(cout, cout, k, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, bias = self.film(cond)[..., None].chunk(2, dim=1)
        return self.b2(scale * self.b1(x) + bias) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """``net(x (B, T, A), t (B,) or (B, T), obs (B, obs_cond_dim)) -> (B, T, A)``."""

    def __init__(self, action_dim: int, horizon: int, obs_cond_dim: int, cfg: UnetConfig):
        super().__init__()
        if horizon % (2 ** (len(cfg.down_dims) - 1)):
            raise ValueError(
                f"horizon {horizon} must be divisible by 2^{len(cfg.down_dims) - 1} for "
                f"{len(cfg.down_dims)} resolutions"
            )
        self.horizon, self.cfg = horizon, cfg
        e = cfg.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(horizon * e, 4 * e), nn.Mish(), nn.Linear(4 * e, e))
        cond_dim = e + obs_cond_dim
        dims = [action_dim, *cfg.down_dims]
        k, g = cfg.kernel_size, cfg.groups
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dims) - 2
            self.down.append(nn.ModuleList([
                FiLMResBlock(cin, cout, cond_dim, k, g),
                FiLMResBlock(cout, cout, cond_dim, k, g),
                nn.Identity() if last else nn.Conv1d(cout, cout, 3, stride=2, padding=1),
            ]))  # fmt: skip
        mid = dims[-1]
        self.mid = nn.ModuleList([FiLMResBlock(mid, mid, cond_dim, k, g) for _ in range(2)])
        self.up = nn.ModuleList()
        for cin, cout in reversed(list(zip(dims[1:-1], dims[2:]))):
            self.up.append(nn.ModuleList([
                FiLMResBlock(2 * cout, cin, cond_dim, k, g),
                FiLMResBlock(cin, cin, cond_dim, k, g),
                nn.ConvTranspose1d(cin, cin, 4, stride=2, padding=1),
            ]))  # fmt: skip
        self.out = nn.Sequential(
            ConvBlock(dims[1], dims[1], k, g), nn.Conv1d(dims[1], action_dim, 1)
        )

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        b, horizon, _ = x.shape
        if horizon != self.horizon:
            raise ValueError(f"expected action sequences of {self.horizon} steps, got {horizon}")
        t = t.expand(b) if t.ndim == 0 else t
        levels = t[:, None].expand(b, horizon) if t.ndim == 1 else t
        emb = self.time_mlp(sinusoidal(levels, self.cfg.time_embed_dim).flatten(1))
        cond = torch.cat([emb, obs.flatten(1).to(emb)], -1)
        h, skips = x.transpose(1, 2), []
        for r1, r2, down in self.down:
            h = r2(r1(h, cond), cond)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, cond)
        for r1, r2, up in self.up:
            h = up(r2(r1(torch.cat([h, skips.pop()], 1), cond), cond))
        return self.out(h).transpose(1, 2)
