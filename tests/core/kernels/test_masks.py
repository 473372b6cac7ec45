"""Mask builders: BLADE's adaptive (ASA) mask, 3-D video tile masks and token orders."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.core.kernels import (
    asa_block_mask,
    attention,
    curve_order,
    inverse_permutation,
    tile_order,
    video_tile_mask,
)


def _clustered(n_clusters=8, per=32, d=32, seed=0):
    """Tokens in clusters of ``per`` consecutive positions: a query attends mostly to keys
    of its own cluster, which sits in one block of 32."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 3
    x = centres.repeat_interleave(per, 0) + 0.3 * torch.randn(n_clusters * per, d, generator=g)
    perm = torch.randperm(n_clusters, generator=g)  # queries look for another cluster's keys
    q = centres[perm].repeat_interleave(per, 0) + 0.3 * torch.randn(
        n_clusters * per, d, generator=g
    )
    return q[None, None], x[None, None], perm


def _block_mass(q, k, bs):
    """True attention mass of each (query block, key block) tile, (Nqb, Nkb)."""
    p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[0, 0]
    n = p.shape[0]
    return p.reshape(n // bs, bs, n // bs, bs).sum((1, 3)) / bs


def test_asa_keeps_the_blocks_that_hold_the_attention_mass():
    q, k, perm = _clustered()
    mask = asa_block_mask(q, k, block_size=32, threshold=0.9, min_retain=0.0, max_retain=1.0)
    assert mask.shape == (1, 1, 8, 8)
    assert torch.equal(mask[0, 0].nonzero()[:, 1], perm), (
        "each query block keeps its own key cluster"
    )
    true_mass = _block_mass(q, k, 32)
    captured = (true_mass * mask[0, 0]).sum(-1)
    assert captured.min() > 0.9
    # a random mask of the same density captures far less
    rand = torch.zeros(8, 8, dtype=torch.bool).scatter(-1, torch.randint(0, 8, (8, 1)), True)
    assert (true_mass * rand).sum(-1).mean() < 0.5


def test_asa_retain_ratio_bounds_and_threshold():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 200, 16), torch.randn(2, 3, 200, 16)  # diffuse attention
    nkb = math.ceil(200 / 16)
    for lo, hi in ((0.1, 0.3), (0.5, 0.5)):
        m = asa_block_mask(q, k, block_size=16, threshold=0.99, min_retain=lo, max_retain=hi)
        kept = m.sum(-1)
        assert kept.min() >= math.ceil(lo * nkb) and kept.max() <= math.ceil(hi * nkb)
    # diffuse attention needs many blocks for 99 % of the mass, a 20 % threshold few
    many = asa_block_mask(q, k, block_size=16, threshold=0.99, min_retain=0.0, max_retain=1.0)
    few = asa_block_mask(q, k, block_size=16, threshold=0.2, min_retain=0.0, max_retain=1.0)
    assert few.sum() < many.sum() and few.sum(-1).min() >= 1


def test_asa_causal_masks_keep_the_diagonal_and_no_future():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    m = asa_block_mask(q, k, block_size=16, causal=True, threshold=0.5, max_retain=0.2)
    nb = m.shape[-1]
    assert not (m & ~torch.ones(nb, nb, dtype=torch.bool).tril()).any()
    assert m.diagonal(dim1=-2, dim2=-1).all()
    out = attention(q, k, k, m, block_size=16, causal=True)
    assert torch.isfinite(out).all()


def test_asa_rejects_bad_settings():
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="min_retain <= max_retain"):
        asa_block_mask(q, q, block_size=16, min_retain=0.6, max_retain=0.3)
    with pytest.raises(ValueError, match="multiple of 16"):
        asa_block_mask(q, q, block_size=8)


def test_tile_order_puts_one_tile_in_each_block_and_inverts():
    grid, tile = (4, 8, 8), (2, 4, 4)
    perm = tile_order(grid, tile)
    assert torch.equal(perm.sort().values, torch.arange(256))
    t, h, w = (perm // 64).tolist(), (perm // 8 % 8).tolist(), (perm % 8).tolist()
    for block in range(256 // 32):
        sl = slice(block * 32, (block + 1) * 32)
        assert len({(a // 2, b // 4, c // 4) for a, b, c in zip(t[sl], h[sl], w[sl])}) == 1
    x = torch.randn(3, 256, 5)
    assert torch.equal(x[:, perm][:, inverse_permutation(perm)], x)
    with pytest.raises(ValueError, match="divisible by the tile"):
        tile_order((4, 6, 8), (2, 4, 4))


def test_video_tile_mask_windows():
    grid, tile = (4, 8, 8), (2, 4, 4)  # 2 x 2 x 2 tiles
    assert torch.equal(video_tile_mask(grid, tile, (1, 1, 1)), torch.eye(8, dtype=torch.bool))
    assert video_tile_mask(grid, tile, (3, 3, 3)).all()
    m = video_tile_mask((2, 16, 16), (2, 4, 4), (1, 3, 3))  # 1 x 4 x 4 tiles, 3 x 3 windows
    assert torch.equal(m, m.T)
    counts = m.sum(-1).view(4, 4)
    assert counts[1:3, 1:3].eq(9).all() and counts[0, 0] == 4 and counts[0, 1] == 6
    with pytest.raises(ValueError, match="odd"):
        video_tile_mask(grid, tile, (2, 1, 1))


@pytest.mark.parametrize("curve", ["hilbert", "morton"])
def test_curve_orders_are_permutations_and_hilbert_steps_to_neighbours(curve):
    perm = curve_order((8, 8, 8), curve)
    assert torch.equal(perm.sort().values, torch.arange(512))
    coords = torch.stack([perm // 64, perm // 8 % 8, perm % 8], -1)
    steps = (coords[1:] - coords[:-1]).abs().sum(-1)
    if curve == "hilbert":
        assert steps.eq(1).all(), "a Hilbert curve moves to a face neighbour at every step"
    # either curve keeps a block of 64 consecutive tokens within a small box
    span = coords.view(8, 64, 3).amax(1) - coords.view(8, 64, 3).amin(1)
    assert span.max() <= 3
    odd = curve_order((3, 5, 6), curve)
    assert torch.equal(odd.sort().values, torch.arange(90))
