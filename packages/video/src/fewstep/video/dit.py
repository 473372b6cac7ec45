"""A small spatio-temporal diffusion transformer for video (DiT, Peebles and Xie 2023, with
3-D patches as in Latte / Open-Sora): patchify (frames × rows × cols), adaLN-Zero blocks
conditioned on time and class, full or factorised (space then time) attention, unpatchify.

Attention goes through ``fewstep.core.kernels.attention`` only — Triton on CUDA, PyTorch
elsewhere, block-sparse when the model holds a block mask (a static video tile mask, or a
mask function such as BLADE's adaptive ASA evaluated on each layer's queries and keys) — so
``torch.func.jvp`` of the model uses the fused attention tangent on GPU.

``net(x (B, T, C, H, W), time (B,), labels (B,) or None) -> (B, T, C, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.core.kernels import attention, inverse_permutation, tile_order

MaskFn = Callable[[Tensor, Tensor], Tensor]  # (q, k) -> block mask


@dataclass
class VideoDiTConfig:
    frames: int = 8  # frames per clip
    size: int = 32  # frame height and width
    channels: int = 3  # colour channels
    patch: tuple[int, int, int] = (2, 4, 4)  # patch extent in (frames, rows, cols)
    dim: int = 128  # token width
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / dim
    attention: str = "full"  # full (one attention over all tokens) or factorised (space, time)
    num_classes: int = 10  # class labels (0 = unconditional); label num_classes = null (CFG)
    time_scale: float = 1.0  # network time (core's rectified flow: t x 1000) times this, embedded

    def grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.patch
        if self.frames % pt or self.size % ph or self.size % pw:
            raise ValueError(
                f"frames {self.frames} and size {self.size} must be divisible by the patch "
                f"{self.patch}"
            )
        return self.frames // pt, self.size // ph, self.size // pw


def _sincos(n: int, dim: int) -> Tensor:
    """(n, dim) fixed sinusoidal positions."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / max(dim // 2, 1))
    return torch.cat([(pos * freq).sin(), (pos * freq).cos()], -1)


def positions_3d(grid: tuple[int, int, int], dim: int) -> Tensor:
    """(t * h * w, dim) sinusoidal embedding, a third of the channels per axis (row-major)."""
    d = dim // 3 // 2 * 2
    t, h, w = grid
    parts = [
        _sincos(t, d)[:, None, None].expand(t, h, w, d),
        _sincos(h, d)[None, :, None].expand(t, h, w, d),
        _sincos(w, dim - 2 * d)[None, None].expand(t, h, w, dim - 2 * d),
    ]
    return torch.cat(parts, -1).reshape(t * h * w, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.backend = "auto"  # core's attention dispatch backend (benchmarks pin one)

    def forward(self, x: Tensor, block_mask: Tensor | None = None, mask_fn: MaskFn | None = None,
                block_size: int = 64) -> Tensor:  # fmt: skip
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if mask_fn is not None:
            with torch.no_grad():
                block_mask = mask_fn(q.detach(), k.detach())
        y = attention(q, k, v, block_mask, block_size=block_size, backend=self.backend)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """adaLN-Zero transformer block; factorised blocks attend within frames, then across
    frames at each spatial position."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads)
        self.temporal = Attention(d, cfg.heads) if cfg.attention == "factorised" else None
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor, grid, sparse: dict) -> Tensor:
        s1, g1, a1, s2, g2, a2 = self.ada(c).chunk(6, -1)
        h = _modulate(self.norm1(x), s1, g1)
        if self.temporal is None:
            h = self.attn(h, **sparse)
        else:
            b, (t, hh, ww), d = x.shape[0], grid, x.shape[-1]
            h = self.attn(h.reshape(b * t, hh * ww, d)).reshape(b, t, hh * ww, d)
            h = h.transpose(1, 2).reshape(b * hh * ww, t, d)
            h = self.temporal(h).reshape(b, hh * ww, t, d).transpose(1, 2).reshape(b, -1, d)
        x = x + a1[:, None] * h
        return x + a2[:, None] * self.mlp(_modulate(self.norm2(x), s2, g2))


class VideoDiT(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        if cfg.attention not in ("full", "factorised"):
            raise ValueError(f"attention must be 'full' or 'factorised', got {cfg.attention!r}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} must be divisible by heads {cfg.heads}")
        self.cfg, self.grid = cfg, cfg.grid()
        pt, ph, pw = cfg.patch
        self.patch_dim = cfg.channels * pt * ph * pw
        self.embed = nn.Linear(self.patch_dim, cfg.dim)
        self.register_buffer("pos", positions_3d(self.grid, cfg.dim), persistent=False)
        self.time = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.label = nn.Embedding(cfg.num_classes + 1, cfg.dim) if cfg.num_classes else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.head = nn.Linear(cfg.dim, self.patch_dim)
        for m in (self.final_ada[1], self.head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        # sparse attention (full-attention models): a static block mask over tokens in
        # ``order``, or a per-layer mask function; see ``use_sparse_attention``
        self.register_buffer("order", None, persistent=False)
        self.register_buffer("order_inv", None, persistent=False)  # inverse of ``order``
        self.sparse: dict = {}

    def use_sparse_attention(
        self,
        block_size: int,
        block_mask: Tensor | None = None,
        mask_fn: MaskFn | None = None,
        tile: tuple[int, int, int] | None = None,
    ) -> None:
        """Make every attention block-sparse. Tokens are reordered tile-major (``tile`` in
        patches, volume = ``block_size``) when given, so each block is a space-time tile;
        ``block_mask`` is fixed (e.g. ``video_tile_mask``), ``mask_fn(q, k)`` is computed at
        each layer (e.g. ``asa_block_mask``). ``use_sparse_attention(0)`` restores dense."""
        if self.cfg.attention != "full":
            raise ValueError("block-sparse attention applies to attention='full' models")
        if block_size == 0:
            self.order, self.order_inv, self.sparse = None, None, {}
            return
        if tile is not None and math.prod(tile) != block_size:
            raise ValueError(
                f"tile {tile} holds {math.prod(tile)} tokens; block_size is {block_size}"
            )
        # buffers on the model's device, so each forward indexes without a host copy
        order = tile_order(self.grid, tile).to(self.pos.device) if tile is not None else None
        self.order = order
        self.order_inv = inverse_permutation(order) if order is not None else None
        self.sparse = {"block_mask": block_mask, "mask_fn": mask_fn, "block_size": block_size}

    def patchify(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        pt, ph, pw = self.cfg.patch
        x = x.reshape(b, t // pt, pt, c, h // ph, ph, w // pw, pw)
        return x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(b, -1, self.patch_dim)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        b = tokens.shape[0]
        (gt, gh, gw), (pt, ph, pw), c = self.grid, self.cfg.patch, self.cfg.channels
        x = tokens.reshape(b, gt, gh, gw, c, pt, ph, pw).permute(0, 1, 5, 4, 2, 6, 3, 7)
        return x.reshape(b, gt * pt, c, gh * ph, gw * pw)

    def tokens(
        self, x: Tensor, time: Tensor, labels: Tensor | None = None, upto: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(tokens (B, N, dim) in patch order after the first ``upto`` blocks (None: all),
        conditioning vector c (B, dim))."""
        cfg = self.cfg
        if tuple(x.shape[1:]) != (cfg.frames, cfg.channels, cfg.size, cfg.size):
            raise ValueError(
                f"expected clips (B, {cfg.frames}, {cfg.channels}, {cfg.size}, {cfg.size}), "
                f"got {tuple(x.shape)}"
            )
        h = self.embed(self.patchify(x)) + self.pos
        c = self.time(_sincos_batch(time * cfg.time_scale, cfg.dim))
        if self.label is not None:
            if labels is None:
                labels = torch.full((len(x),), cfg.num_classes, device=x.device)
            c = c + self.label(labels.long())
        if self.order is not None:
            h = h[:, self.order]
        for block in self.blocks[:upto]:
            h = block(h, c, self.grid, self.sparse)
        if self.order is not None:
            h = h[:, self.order_inv]
        return h, c

    def forward(self, x: Tensor, time: Tensor, labels: Tensor | None = None) -> Tensor:
        h, c = self.tokens(x, time, labels)
        shift, scale = self.final_ada(c).chunk(2, -1)
        return self.unpatchify(self.head(_modulate(self.final_norm(h), shift, scale)))


def _sincos_batch(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    arg = t.float()[:, None] * freq
    return torch.cat([arg.sin(), arg.cos()], -1)
