"""Block masks for block-sparse attention, and token orders that make them local.

A block mask is a boolean tensor ``(B or 1, H or 1, ceil(Nq / bs), ceil(Nk / bs))``: entry
``[b, h, i, j]`` says whether query block ``i`` attends to key block ``j`` (``bs`` tokens
each; the last block may be partial). Builders here:

- ``asa_block_mask``: BLADE's adaptive sparse attention (ASA) mask, estimated from the
  queries and keys of the step at hand;
- ``video_tile_mask``: a static mask for 3-D video token grids (each tile of frames × rows ×
  columns attends to a window of neighbouring tiles);
- ``tile_order`` / ``curve_order``: permutations of a (T, H, W) token grid so that tokens
  that are close in the video share a block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")


def causal_block_mask(n_q_blocks: int, n_k_blocks: int, device=None) -> Tensor:
    """(Nqb, Nkb) lower-triangular block mask: key blocks at or before each query block."""
    return torch.ones(n_q_blocks, n_k_blocks, dtype=torch.bool, device=device).tril()


def validate_block_mask(
    mask: Tensor, b: int, h: int, n_q: int, n_k: int, block_size: int, causal: bool
) -> Tensor:
    """The mask broadcast to (B, H, Nqb, Nkb), with causal blocks applied; raises if its
    shape does not fit or if some query block would attend to nothing (a NaN row)."""
    check_block_size(block_size)
    nqb, nkb = num_blocks(n_q, block_size), num_blocks(n_k, block_size)
    if mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got {mask.dtype}")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if (
        mask.dim() != 4
        or mask.shape[-2:] != (nqb, nkb)
        or mask.shape[0] not in (1, b)
        or (mask.shape[1] not in (1, h))
    ):
        raise ValueError(
            f"block_mask of shape {tuple(mask.shape)} does not fit: expected (B|1, H|1, {nqb}, "
            f"{nkb}) for {n_q} queries and {n_k} keys in blocks of {block_size} (B={b}, H={h})"
        )
    mask = mask.expand(b, h, nqb, nkb)
    if causal:
        if n_q != n_k:
            raise ValueError(f"causal attention needs as many queries as keys ({n_q} vs {n_k})")
        mask = mask & causal_block_mask(nqb, nkb, mask.device)
    where = "at or before the diagonal " if causal else ""
    message = (
        f"every query block must keep at least one key block {where}(a row with none "
        "would have no softmax normaliser)"
    )
    if mask.is_cuda:  # checked on the device: a host-side check would sync every layer
        torch._assert_async(mask.any(-1).all(), message)
    elif not bool(mask.any(-1).all()):
        raise ValueError(message)
    return mask


def _pooled_blocks(x: Tensor, block_size: int, samples: int) -> tuple[Tensor, Tensor]:
    """(B, H, N, D) -> (mean of ``samples`` evenly spaced tokens per block (B, H, nb, D),
    tokens per block (nb,)). Evenly spaced, not random: the mask is a deterministic function
    of q and k, so a step and its recomputation agree."""
    n = x.shape[-2]
    nb = num_blocks(n, block_size)
    start = torch.arange(nb, device=x.device) * block_size
    length = (n - start).clamp(max=block_size)
    s = min(samples, block_size)
    frac = (torch.arange(s, device=x.device) + 0.5) / s
    idx = start[:, None] + (frac[None, :] * length[:, None]).long()  # (nb, s), inside the block
    pooled = x[..., idx.flatten(), :].unflatten(-2, (nb, s)).float().mean(-2)
    return pooled, length


def asa_block_mask(
    q: Tensor,
    k: Tensor,
    block_size: int = 64,
    threshold: float = 0.9,
    min_retain: float = 0.05,
    max_retain: float = 0.5,
    samples_per_block: int = 16,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """BLADE's adaptive sparse attention mask (Video-BLADE, ASA), (B, H, Nqb, Nkb) bool.

    Each block is summarised by the mean of a few of its tokens; the block attention mass is
    ``softmax_j(scale * qbar_i . kbar_j + log |block j|)`` (the log-size term counts a partial
    last block for the tokens it has). Per query block, key blocks are kept in order of mass
    until the kept mass reaches ``threshold``, with the count clamped to
    ``[ceil(min_retain * Nkb), ceil(max_retain * Nkb)]`` and at least one. Causal masks drop
    future blocks and always keep the diagonal block, so no query row is left empty.

    q: (B, H, Nq, D), k: (B, H, Nk, D).
    """
    check_block_size(block_size)
    if not 0.0 < threshold <= 1.0 or not 0.0 <= min_retain <= max_retain <= 1.0:
        raise ValueError(
            "expected 0 < threshold <= 1 and 0 <= min_retain <= max_retain <= 1, got "
            f"threshold={threshold}, min_retain={min_retain}, max_retain={max_retain}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qbar, _ = _pooled_blocks(q, block_size, samples_per_block)
    kbar, klen = _pooled_blocks(k, block_size, samples_per_block)
    nqb, nkb = qbar.shape[-2], kbar.shape[-2]
    logits = scale * qbar @ kbar.transpose(-1, -2) + klen.float().log()
    if causal:
        logits = logits.masked_fill(~causal_block_mask(nqb, nkb, q.device), float("-inf"))
    mass = logits.softmax(-1)
    order = mass.argsort(-1, descending=True)
    sorted_mass = mass.gather(-1, order)
    # blocks needed to reach the threshold: those whose preceding mass is still below it
    need = ((sorted_mass.cumsum(-1) - sorted_mass) < threshold).sum(-1, keepdim=True)
    lo, hi = max(1, math.ceil(min_retain * nkb)), max(1, math.ceil(max_retain * nkb))
    keep_n = need.clamp(lo, hi)
    keep_sorted = torch.arange(nkb, device=q.device) < keep_n
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if causal:
        mask = (mask & causal_block_mask(nqb, nkb, q.device)) | torch.eye(
            nqb, nkb, dtype=torch.bool, device=q.device
        )
    return mask


def _check_grid(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> None:
    if len(grid) != 3 or len(tile) != 3 or any(g % t for g, t in zip(grid, tile)):
        raise ValueError(
            f"the token grid (frames, rows, cols) {tuple(grid)} must be divisible by the tile "
            f"{tuple(tile)}"
        )


def tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> Tensor:
    """Permutation of a row-major (T, H, W) token grid into tile-major order: all tokens of
    tile (0, 0, 0) first, then tile (0, 0, 1), … With ``prod(tile) == block_size`` every
    attention block is exactly one tile. ``x[:, perm]`` reorders, ``x[:, inverse(perm)]``
    restores."""
    _check_grid(grid, tile)
    (t, h, w), (tt, th, tw) = grid, tile
    ids = torch.arange(t * h * w).view(t // tt, tt, h // th, th, w // tw, tw)
    return ids.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def inverse_permutation(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv


def video_tile_mask(
    grid: tuple[int, int, int], tile: tuple[int, int, int], window: tuple[int, int, int]
) -> Tensor:
    """Static (Nb, Nb) block mask for tokens in ``tile_order(grid, tile)``: each tile attends
    to the tiles within ``window`` tiles (frames, rows, cols; odd sizes, centred, clipped
    at the borders; sliding-tile attention). The block size is ``prod(tile)``."""
    _check_grid(grid, tile)
    if any(w < 1 or w % 2 == 0 for w in window):
        raise ValueError(f"window sizes must be odd and >= 1 (centred windows), got {window}")
    counts = [g // t for g, t in zip(grid, tile)]
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(c) for c in counts), indexing="ij"), -1
    ).reshape(-1, 3)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    return (diff <= torch.tensor(window) // 2).all(-1)


def _hilbert_index(coords: Tensor, bits: int) -> Tensor:
    """Hilbert-curve index of integer points (N, dims) with coordinates < 2**bits (Skilling,
    "Programming the Hilbert curve", 2004: axes -> transposed index, then bit interleave)."""
    x = coords.clone().long()
    dims = x.shape[1]
    m = 1 << (bits - 1)
    q = m
    while q > 1:  # inverse undo of excess work
        p = q - 1
        for i in range(dims):
            hi = (x[:, i] & q) != 0
            x[:, 0] = torch.where(hi, x[:, 0] ^ p, x[:, 0])
            t = (x[:, 0] ^ x[:, i]) & p
            t = torch.where(hi, torch.zeros_like(t), t)
            x[:, 0] ^= t
            x[:, i] ^= t
        q >>= 1
    for i in range(1, dims):  # Gray encode
        x[:, i] ^= x[:, i - 1]
    t = torch.zeros_like(x[:, 0])
    q = m
    while q > 1:
        t = torch.where((x[:, dims - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x ^= t[:, None]
    index = torch.zeros_like(x[:, 0])
    for b in range(bits - 1, -1, -1):  # interleave: the top bit of every axis first
        for i in range(dims):
            index = (index << 1) | ((x[:, i] >> b) & 1)
    return index


def curve_order(grid: tuple[int, int, int], curve: str = "hilbert") -> Tensor:
    """Permutation of a row-major (T, H, W) token grid along a space-filling curve
    (``hilbert`` or ``morton``), so that consecutive tokens — and hence blocks — are close in
    space and time for any grid size."""
    if curve not in ("hilbert", "morton"):
        raise ValueError(f"curve must be 'hilbert' or 'morton', got {curve!r}")
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1
    ).reshape(-1, len(grid))
    bits = max(1, math.ceil(math.log2(max(grid))))
    if curve == "hilbert":
        key = _hilbert_index(coords, bits)
    else:
        key = torch.zeros(len(coords), dtype=torch.long)
        for b in range(bits - 1, -1, -1):
            for i in range(coords.shape[1]):
                key = (key << 1) | ((coords[:, i] >> b) & 1)
    return key.argsort()
