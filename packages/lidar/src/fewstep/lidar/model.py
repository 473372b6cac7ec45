"""A small point network for LiDiff-style local diffusion, wrapped as a core ``Denoiser``.

Local diffusion (LiDiff: Nunes et al., "Scaling Diffusion Models to Real-World 3D LiDAR Scene
Completion", CVPR 2024, Sec. 3.2, eqs. 4-6; code PRBonn/LiDiff ``models/models.py``): instead
of diffusing the whole scene towards one Gaussian at the origin, each point is noised around
its own position. The sample starts at the partial scan repeated ``repeat`` times, x_init, and
the variable that diffuses is the per-point offset y = x - x_init on a VP path:

    y_t = a_t y_0 + s_t eps,   i.e.   x_t = x_init + a_t (x_0 - x_init) + s_t eps,

so at t = T the cloud is the partial scan plus unit noise (LiDiff samples from
``x_init + randn``) and at t = 0 it is the completed scene. LiDiff trains with
``x_t = x_0 + s_t eps`` and samples on offsets from x_init; we keep the offset form in both,
which is the same process when x_0 is paired with its x_init point (see
:mod:`fewstep.lidar.teacher`). Every core sampler and objective then works on y unchanged.

The condition is one tensor, ``pack_cond(x_init, partial)`` = concat on the point axis
(B, N + P, 3), so core data sources, batching and objectives pass it through untouched; the
network splits it again (N is the sample's point count). LiDiff's network is a sparse
MinkUNet (MinkowskiEngine, CUDA); this one runs on CPU: a per-point MLP, features gathered
from the k nearest partial-scan points (local condition) plus a max-pooled partial-scan
feature (global condition), EdgeConv layers (Wang et al. 2019, DGCNN eq. 7-8, max
aggregation) over the k-NN graph of the noisy cloud, and a sinusoidal timestep embedding
added after every layer. It predicts eps per point (LiDiff predicts eps too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import VPDiscrete


@dataclass
class PointNetConfig:
    hidden: int = 64  # feature width of every layer
    layers: int = 2  # EdgeConv layers over the noisy cloud's k-NN graph
    k: int = 8  # neighbours in the noisy cloud's k-NN graph
    k_partial: int = 4  # nearest partial-scan points each point reads local features from
    time_dim: int = 32  # sinusoidal timestep embedding width
    scale: float = 10.0  # coordinates are divided by this (metres -> order one)


def pack_cond(x_init: Tensor, partial: Tensor) -> Tensor:
    """(B, N, 3), (B, P, 3) -> (B, N + P, 3): the starting cloud, then the partial scan."""
    if x_init.ndim != 3 or partial.ndim != 3 or x_init.shape[-1] != 3 or partial.shape[-1] != 3:
        raise ValueError(
            f"x_init and partial must be (B, N, 3) and (B, P, 3), got "
            f"{tuple(x_init.shape)} and {tuple(partial.shape)}"
        )
    return torch.cat([x_init, partial], dim=1)


def unpack_cond(cond: Tensor, n_points: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_cond` given the sample's point count N."""
    if cond is None or cond.ndim != 3 or cond.shape[1] <= n_points:
        shape = None if cond is None else tuple(cond.shape)
        raise ValueError(
            f"cond must be pack_cond(x_init (B, {n_points}, 3), partial (B, P>0, 3)), got {shape}"
        )
    return cond[:, :n_points], cond[:, n_points:]


def repeat_partial(partial: Tensor, repeat: int) -> Tensor:
    """LiDiff's starting cloud: (B, P, 3) -> (B, repeat * P, 3), the scan tiled ``repeat``x."""
    return partial.repeat(1, repeat, 1)


def local_noise(x0: Tensor, x_init: Tensor, a_t: Tensor, s_t: Tensor, eps: Tensor) -> Tensor:
    """x_t = x_init + a_t (x0 - x_init) + s_t eps (a_t, s_t broadcastable, e.g. (B, 1, 1))."""
    return x_init + a_t * (x0 - x_init) + s_t * eps


def knn(query: Tensor, points: Tensor, k: int) -> Tensor:
    """(B, Q, k) indices of the k nearest ``points`` (B, M, 3) to each ``query`` (B, Q, 3)."""
    k = min(k, points.shape[1])
    return torch.cdist(query, points).topk(k, dim=-1, largest=False).indices


def gather(feats: Tensor, idx: Tensor) -> Tensor:
    """feats (B, M, C), idx (B, Q, k) -> (B, Q, k, C)."""
    b, q, k = idx.shape
    flat = idx.reshape(b, q * k, 1).expand(-1, -1, feats.shape[-1])
    return feats.gather(1, flat).reshape(b, q, k, feats.shape[-1])


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of (B,) times -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half, 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


class EdgeConv(nn.Module):
    """h_i' = h_i + max_j MLP([h_i, h_j - h_i, (x_j - x_i)]) over the k-NN graph j of i."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = _mlp(2 * hidden + 3, hidden, hidden)

    def forward(self, h: Tensor, x: Tensor, idx: Tensor) -> Tensor:
        hj, xj = gather(h, idx), gather(x, idx)
        hi = h[:, :, None].expand_as(hj)
        e = self.mlp(torch.cat([hi, hj - hi, xj - x[:, :, None]], dim=-1))
        return h + e.max(dim=2).values


class LocalPointNet(nn.Module):
    """``net(y_t (B, N, 3), time (B,), cond (B, N + P, 3)) -> eps (B, N, 3)``."""

    def __init__(self, cfg: PointNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PointNetConfig()
        h = cfg.hidden
        self.partial_mlp = _mlp(3, h, h)
        self.local_mlp = _mlp(h + 3, h, h)
        self.point_mlp = _mlp(9, h, h)
        self.time_mlp = _mlp(cfg.time_dim, h, h)
        self.global_mlp = _mlp(h, h, h)
        self.edges = nn.ModuleList(EdgeConv(h) for _ in range(cfg.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.layers))
        self.out = _mlp(h, h, 3)

    def forward(self, y_t: Tensor, time: Tensor, cond: Tensor) -> Tensor:
        if y_t.ndim != 3 or y_t.shape[-1] != 3:
            raise ValueError(f"y_t must be (B, N, 3) offsets, got {tuple(y_t.shape)}")
        c = self.cfg
        x_init, partial = unpack_cond(cond, y_t.shape[1])
        x = (x_init + y_t) / c.scale  # the noisy cloud, in network units
        p = partial / c.scale
        fp = self.partial_mlp(p)  # (B, P, H)
        glob = self.global_mlp(fp.max(dim=1).values)[:, None]  # (B, 1, H)
        idx = knn(x, p, c.k_partial)
        rel = gather(p, idx) - x[:, :, None]
        local = self.local_mlp(torch.cat([gather(fp, idx), rel], dim=-1)).max(dim=2).values
        temb = self.time_mlp(timestep_embedding(time, c.time_dim))[:, None]  # (B, 1, H)
        h = self.point_mlp(torch.cat([x, y_t, x_init / c.scale], dim=-1)) + local + glob + temb
        graph = knn(x, x, c.k + 1)[..., 1:]  # drop each point itself
        for edge, norm in zip(self.edges, self.norms):
            h = edge(norm(h), x, graph) + temb
        return self.out(h)


def lidiff_path(beta_start: float = 3.5e-5, beta_end: float = 0.007, steps: int = 1000):
    """LiDiff's schedule (``config/config.yaml``: linear betas 3.5e-5 .. 0.007, 1000 steps).
    Its abar(T) ~ 0.03, so the prior at T keeps ~0.17 of the offset; LiDiff starts sampling
    at x_init + eps all the same, and so do core samplers (``path.prior`` drops it)."""
    return VPDiscrete(
        schedule="linear", num_train_timesteps=steps, beta_start=beta_start, beta_end=beta_end
    )


def make_denoiser(cfg: PointNetConfig | None = None, path=None) -> ModuleDenoiser:
    """The point network as a core eps-prediction ``Denoiser`` on the offsets y."""
    return ModuleDenoiser(LocalPointNet(cfg), path or lidiff_path(), "eps")
