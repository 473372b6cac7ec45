"""The spatio-temporal DiT: patches, adaLN-Zero, conditioning, and block-sparse attention
through core's kernels (a tile mask really cuts interactions; reordering alone changes
nothing)."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.kernels import asa_block_mask, video_tile_mask
from fewstep.video.dit import VideoDiT, VideoDiTConfig

SMALL = dict(frames=4, size=16, patch=(2, 4, 4), dim=32, depth=1, heads=2)  # grid 2 x 4 x 4


def _net(**kw):
    torch.manual_seed(0)
    net = VideoDiT(VideoDiTConfig(**{**SMALL, **kw}))
    # leave adaLN-Zero's zero start so outputs depend on the input
    for p in [net.head.weight, net.final_ada[1].weight, *(b.ada[1].weight for b in net.blocks)]:
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def _x(b=2):
    return torch.randn(b, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_patchify_round_trip_and_zero_init():
    net = VideoDiT(VideoDiTConfig(**SMALL))
    x = _x()
    assert torch.equal(net.unpatchify(net.patchify(x)), x)
    assert net(x, torch.rand(2), torch.tensor([1, 2])).abs().max() == 0  # adaLN-Zero start


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_conditioning_and_shapes(attention):
    net, x, t = _net(attention=attention), _x(), torch.full((2,), 0.5)
    out = net(x, t, torch.tensor([1, 1]))
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, torch.tensor([7, 7])))  # the label matters
    assert not torch.allclose(out, net(x, t + 0.3, torch.tensor([1, 1])))  # so does time
    with pytest.raises(ValueError, match=r"expected clips \(B, 4, 3, 16, 16\)"):
        net(torch.randn(2, 4, 3, 8, 8), t)


def test_tile_order_with_a_full_mask_is_dense_attention():
    net, x, t = _net(), _x(), torch.rand(2)
    dense = net(x, t)
    net.use_sparse_attention(16, block_mask=torch.ones(2, 2, dtype=torch.bool), tile=(1, 4, 4))
    torch.testing.assert_close(net(x, t), dense, atol=1e-5, rtol=1e-5)


def test_a_tile_mask_cuts_attention_between_tiles():
    """One layer on a 2 x 8 x 8 patch grid in tiles of 1 x 4 x 4 patches, each tile attending
    only to itself: changing the pixels of one tile leaves another tile's output unchanged;
    with dense attention it does not."""
    torch.manual_seed(0)
    net = _net(size=32)
    x, t = torch.randn(1, 4, 3, 32, 32), torch.rand(1)
    x2 = x.clone()
    x2[..., :16, :16] += 1.0  # patch rows 0-3, cols 0-3: the tiles (., 0, 0)
    net.use_sparse_attention(16, block_mask=video_tile_mask((2, 8, 8), (1, 4, 4), (1, 1, 1)),
                             tile=(1, 4, 4))  # fmt: skip
    far = (..., slice(16, 32), slice(16, 32))  # the tiles (., 1, 1)
    torch.testing.assert_close(net(x, t)[far], net(x2, t)[far])
    net.use_sparse_attention(0)
    assert not torch.allclose(net(x, t)[far], net(x2, t)[far])


def test_adaptive_mask_and_jvp():
    net, x, t = _net(), _x(), torch.rand(2)
    net.use_sparse_attention(16, mask_fn=lambda q, k: asa_block_mask(q, k, 16, 0.5), tile=(1, 4, 4))
    assert torch.isfinite(net(x, t)).all()
    net.use_sparse_attention(0)
    out, tangent = torch.func.jvp(lambda a: net(a, t), (x,), (torch.ones_like(x),))
    eps = 1e-3
    fd = (net(x + eps, t) - net(x - eps, t)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=2e-3, rtol=2e-2)
    with pytest.raises(ValueError, match="tile"):
        net.use_sparse_attention(16, tile=(2, 4, 4))


def test_time_embedding_is_smooth_in_the_path_time():
    """The teacher's DiT must see core's network time (t x 1000 on rectified flow) once: a
    second x 1000 made neighbouring times (t = 0.5 vs 0.5001) as far apart in the time
    embedding as t = 0.1 vs 0.9, and the teacher could not tell high noise from low."""
    from fewstep.video.teacher import VideoTeacherConfig, build_teacher

    teacher = build_teacher(VideoTeacherConfig())
    seen = []
    hook = teacher.net.time.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    cfg = teacher.net.cfg
    x = torch.zeros(4, cfg.frames, 3, cfg.size, cfg.size)
    with torch.no_grad():
        teacher(x, torch.tensor([0.5, 0.5001, 0.1, 0.9]))
    hook.remove()
    emb = seen[0]
    near, far = (emb[0] - emb[1]).norm(), (emb[2] - emb[3]).norm()
    assert near < 0.1 * far, (near, far)
