"""BLADE: adaptive block-sparse attention in a few-step video student, trained jointly with
trajectory distribution matching.

Gu, Li, Hu and Zhuang, "Video-BLADE: Block-Sparse Attention Meets Step Distillation for
Efficient Video Generation" (arXiv 2508.10774); code Tacossp/VIDEO-BLADE
(``train_cogvideo_tdm.py --use_sparsity true``, retain ratios 0.05-0.15).

The two pieces of the paper, and where they live:

- ASA, adaptive block-sparse attention: each attention layer of the student builds its own
  block mask at every call from its own queries and keys (pooled block scores, key blocks
  kept in order of attention mass until ``threshold`` of it is covered, the count clamped to
  ``[min_retain, max_retain]`` of the key blocks). The mask is core's ``asa_block_mask``; the
  student calls it through ``VideoDiT.use_sparse_attention(mask_fn=...)`` with tokens in
  tile order (``tile_order``: each block one compact space-time tile; the paper orders tokens
  along a 3-D Gilbert curve, which is the same tiling when the grid divides evenly).
- Sparsity-aware step distillation: the student is distilled with TDM (core's
  ``objectives.tdm``, Luo et al. 2025) *with its sparse attention on* — its trajectory
  rollouts and the differentiated step both run the masked attention, so it learns to
  generate well under the sparsity it will sample with, instead of being sparsified after
  distillation. The real score (teacher, under CFG) and the fake score stay dense, as in the
  reference code (only the student carries the sparse attention processors).
  ``SparseTDM`` is TDM plus that guarantee: it refuses a student step in which no sparse mask
  was applied, logs the density the student trained at, and optionally anneals
  ``max_retain`` from dense to the target over ``warmup_steps`` (our option; 0 = the paper:
  sparse from the first step).

Measurement: ``layer_densities`` (kept fraction of (query block, key block) tiles per layer,
what the mask function produced, averaged over batch and heads), ``attention_flops`` (exact
FLOPs of the kept tiles) and ``dit_flops`` (a whole forward of the DiT), from which the
recipe reports attention FLOPs saved and end-to-end FLOPs against the dense teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fewstep.core.kernels import asa_block_mask
from fewstep.core.models import Denoiser, ModuleDenoiser, trainable_copy
from fewstep.core.objectives.tdm import TDM
from fewstep.video.dit import VideoDiT, VideoDiTConfig


@dataclass
class ASAConfig:
    block_size: int = 16  # tokens per attention block (a multiple of 16; = tile volume)
    tile: tuple[int, ...] = (1, 4, 4)  # tile in patches (frames, rows, cols); () = row-major
    threshold: float = 0.9  # attention mass each query block's kept key blocks must cover
    min_retain: float = 0.05  # at least this fraction of key blocks per query block
    max_retain: float = 0.5  # at most this fraction (the sparsity ceiling)
    samples_per_block: int = 16  # tokens pooled per block for the block scores
    warmup_steps: int = 0  # max_retain falls linearly from 1 (dense) to max_retain; 0 = none


def check_asa(cfg: ASAConfig, grid: tuple[int, int, int]) -> None:
    """Fail before training on settings the kernels would reject later."""
    if cfg.block_size < 16 or cfg.block_size % 16:
        raise ValueError(f"asa.block_size must be a positive multiple of 16, got {cfg.block_size}")
    if cfg.tile:
        if len(cfg.tile) != 3 or math.prod(cfg.tile) != cfg.block_size:
            raise ValueError(
                f"asa.tile {tuple(cfg.tile)} must be 3 sizes (frames, rows, cols) in patches "
                f"whose product is asa.block_size {cfg.block_size}"
            )
        if any(g % t for g, t in zip(grid, cfg.tile, strict=True)):
            raise ValueError(f"the token grid {grid} must be divisible by asa.tile {cfg.tile}")
    if not 0.0 < cfg.threshold <= 1.0 or not 0.0 <= cfg.min_retain <= cfg.max_retain <= 1.0:
        raise ValueError(
            "expected 0 < asa.threshold <= 1 and 0 <= asa.min_retain <= asa.max_retain <= 1, "
            f"got {cfg.threshold}, {cfg.min_retain}, {cfg.max_retain}"
        )
    if cfg.warmup_steps < 0:
        raise ValueError(f"asa.warmup_steps must be >= 0, got {cfg.warmup_steps}")


def max_retain_at(cfg: ASAConfig, step: int) -> float:
    """The sparsity ceiling at training ``step``: linear from 1 (dense) to ``max_retain``
    over ``warmup_steps``, then ``max_retain``."""
    if cfg.warmup_steps <= 0 or step >= cfg.warmup_steps:
        return cfg.max_retain
    frac = step / cfg.warmup_steps
    return 1.0 + frac * (cfg.max_retain - 1.0)


@dataclass
class MaskStats:
    """What the mask function produced since the last ``reset``."""

    calls: int = 0  # mask_fn calls (one per attention layer per forward)
    kept_t: list[Tensor] = field(default_factory=list)  # kept tile fraction of each call, 0-d
    masks: list[Tensor] | None = None  # the masks themselves, when recording

    @property
    def kept(self) -> list[float]:
        """Kept tile fraction of each call (read once, so CUDA syncs only here)."""
        return [float(k) for k in self.kept_t]

    def density(self) -> float:
        """Mean kept fraction over the calls (1.0 when no call happened: dense)."""
        kept = self.kept
        return sum(kept) / len(kept) if kept else 1.0


class ASAMask:
    """``mask_fn(q, k) -> (B, H, Nqb, Nkb)`` for ``VideoDiT.use_sparse_attention``: core's
    ``asa_block_mask`` with an ``ASAConfig`` (``max_retain`` settable, for the schedule),
    counting its calls and the kept fraction of each."""

    def __init__(self, cfg: ASAConfig):
        self.cfg = cfg
        self.max_retain = cfg.max_retain
        self.stats = MaskStats()

    def reset(self, record_masks: bool = False) -> MaskStats:
        """Start fresh statistics (and keep the masks themselves when ``record_masks``)."""
        self.stats = MaskStats(masks=[] if record_masks else None)
        return self.stats

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        c = self.cfg
        mask = asa_block_mask(
            q, k, block_size=c.block_size, threshold=c.threshold,
            min_retain=min(c.min_retain, self.max_retain), max_retain=self.max_retain,
            samples_per_block=c.samples_per_block,
        )  # fmt: skip
        self.stats.calls += 1
        self.stats.kept_t.append(mask.float().mean())
        if self.stats.masks is not None:
            self.stats.masks.append(mask)
        return mask


def sparsify(student: Denoiser, cfg: ASAConfig) -> ASAMask:
    """Turn on ASA in every attention layer of ``student`` (a ``ModuleDenoiser`` over a
    full-attention ``VideoDiT``) and return its mask function."""
    net = getattr(student, "net", None)
    if not isinstance(net, VideoDiT):
        raise TypeError(
            f"BLADE needs a ModuleDenoiser over a VideoDiT, got {type(student).__name__} "
            f"over {type(net).__name__}"
        )
    check_asa(cfg, net.grid)
    mask = ASAMask(cfg)
    tile = tuple(cfg.tile) if cfg.tile else None
    net.use_sparse_attention(cfg.block_size, mask_fn=mask, tile=tile)
    return mask


def sparse_student(teacher: ModuleDenoiser, cfg: ASAConfig) -> tuple[ModuleDenoiser, ASAMask]:
    """(trainable copy of the teacher with ASA on, its mask function)."""
    student = trainable_copy(teacher)
    return student, sparsify(student, cfg)


def student_mask(student: Denoiser) -> ASAMask | None:
    """The ASA mask function a student's DiT calls, or None when its attention is dense."""
    net = getattr(student, "net", None)
    fn = getattr(net, "sparse", {}).get("mask_fn")
    return fn if isinstance(fn, ASAMask) else None


@torch.no_grad()
def layer_densities(student: Denoiser, x_t: Tensor, t: Tensor, cond=None) -> list[float]:
    """Kept fraction of attention tiles in each layer (in depth order) for one forward of
    ``student`` at (x_t, t, cond): the mean over batch, heads and tiles of the mask each
    layer used. (B, T, C, H, W), (B,) -> [depth floats]."""
    mask = student_mask(student)
    if mask is None:
        raise ValueError("the student has no ASA mask function: its attention is dense")
    stats = mask.reset()
    student(x_t, t, cond)
    return list(stats.kept)


# ------------------------------------------------------------------------------- FLOPs


def _block_lengths(n: int, block_size: int, device=None) -> Tensor:
    nb = -(-n // block_size)
    start = torch.arange(nb, device=device) * block_size
    return (n - start).clamp(max=block_size).double()


def attention_flops(mask: Tensor, n_q: int, n_k: int, block_size: int, head_dim: int) -> Tensor:
    """(B,) FLOPs of block-sparse attention per sample: each kept tile (query block i, key
    block j) of each head costs 2 |i| |j| D for S = Q K^T and 2 |i| |j| D for P V (one
    multiply-add = 2 FLOPs; the softmax's O(|i| |j|) is left out, as in FlashAttention's
    count). ``mask`` (B, H, Nqb, Nkb) bool; a dense mask gives 4 H Nq Nk D."""
    lq = _block_lengths(n_q, block_size, mask.device)
    lk = _block_lengths(n_k, block_size, mask.device)
    area = lq[:, None] * lk[None, :]  # (Nqb, Nkb) token pairs per tile
    return 4.0 * head_dim * (mask.double() * area).sum((-3, -2, -1))


def dit_flops(cfg: VideoDiTConfig, densities: list[float] | None = None) -> dict[str, float]:
    """FLOPs of one forward of a full-attention ``VideoDiT`` per sample, linear layers and
    attention (per-sample adaLN projections included; norms, GELU and softmax left out).
    ``densities`` (per layer, fraction of attention tiles kept; None = dense) scale each
    layer's attention. Returns {"total", "attention", "dense_attention"}."""
    if cfg.attention != "full":
        raise ValueError("dit_flops counts full-attention DiTs")
    n = math.prod(cfg.grid())
    d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    patch_dim = cfg.channels * math.prod(cfg.patch)
    dens = [1.0] * cfg.depth if densities is None else list(densities)
    if len(dens) != cfg.depth:
        raise ValueError(f"densities has {len(dens)} entries for a DiT of depth {cfg.depth}")
    per_token = 2 * (3 * d * d + d * d + 2 * d * hidden)  # qkv, out, MLP of one block
    linear = cfg.depth * n * per_token + 2 * 2 * n * d * patch_dim  # + patch embed and head
    linear += 2 * (2 * d * d) + cfg.depth * 2 * d * 6 * d + 2 * d * 2 * d  # time MLP, adaLN
    dense_attn = 4.0 * n * n * d  # all heads: 4 N^2 (D / H) H
    attn = sum(dense_attn * r for r in dens)
    return {
        "total": float(linear + attn),
        "attention": float(attn),
        "dense_attention": float(dense_attn * cfg.depth),
    }


# ---------------------------------------------------------------------------- training


class SparseTDM(TDM):
    """TDM (core ``objectives.tdm``) on a student whose attention is ASA-sparse: the
    sparsity-aware step distillation of Video-BLADE. Before each step it sets the mask's
    ``max_retain`` from the schedule (``max_retain_at``); after it, it logs the density the
    student's attention ran at (``attn_density``, mean kept tile fraction over the student's
    forwards of the step) and raises if a student update ran without any sparse mask (a
    student that trains dense while claiming to be sparse)."""

    name = "blade-tdm"

    def __init__(self, teacher, asa: ASAConfig, config=None, reward=None):
        super().__init__(teacher, config, reward)
        self.asa = asa

    def losses(self, roles, batch, update, step):
        mask = student_mask(roles["student"])
        if mask is None:
            raise RuntimeError(
                "BLADE's student has dense attention: call blade.sparsify(student, asa) "
                "before training (sparsity-aware distillation trains the sparse student)"
            )
        mask.max_retain = max_retain_at(self.asa, step)
        stats = mask.reset()
        losses, logs = super().losses(roles, batch, update, step)
        if "student" in update and stats.calls == 0:
            raise RuntimeError(f"step {step}: the student update ran without its sparse mask")
        logs["attn_density"] = stats.density()
        logs["max_retain"] = mask.max_retain
        return losses, logs


__all__ = [
    "ASAConfig",
    "ASAMask",
    "MaskStats",
    "SparseTDM",
    "attention_flops",
    "check_asa",
    "dit_flops",
    "layer_densities",
    "max_retain_at",
    "sparse_student",
    "sparsify",
    "student_mask",
]
