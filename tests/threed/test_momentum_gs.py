"""Momentum-GS: the momentum teacher update, block weights, round-robin scheduling, the
Scaffold-style decoding, and a tiny training run whose loss falls."""

import copy
import math

import pytest
import torch
from torch import nn

from fewstep.threed.gaussians import render_gaussians
from fewstep.threed.momentum_gs import (
    TOY_AABB,
    BlockAnchors,
    GaussianDecoder,
    MomentumGS,
    MomentumGSConfig,
    active_blocks,
    block_weights,
    consistency_loss,
    decode_gaussians,
    image_psnr,
    momentum_update_,
    partition_blocks,
    render_block_data,
    scene_points,
    ssim,
    toy_block_scene,
    train_momentum_gs,
    worker_blocks,
)
from fewstep.threed.volume import VolumeRenderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_momentum_update_is_exact():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    t = copy.deepcopy(s)
    for p in t.parameters():
        p.data.normal_()
    before = [p.detach().clone() for p in t.parameters()]
    momentum_update_(t, s, 0.9)
    for pt, pb, ps in zip(t.parameters(), before, s.parameters()):
        torch.testing.assert_close(pt, 0.9 * pb + 0.1 * ps, rtol=0, atol=1e-7)
    momentum_update_(t, s, 0.0)  # m = 0 copies the student
    for pt, ps in zip(t.parameters(), s.parameters()):
        assert torch.equal(pt, ps)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update_(t, s, 1.5)


def test_block_weights_follow_the_formula():
    p = torch.tensor([25.0, 20.0, 15.0])
    s = torch.tensor([0.9, 0.8, 0.6])
    w = block_weights(p, s, 10.0)
    ref = [
        2 - math.exp(-((25 - pk) ** 2 + (9 - 10 * sk) ** 2) / 200)
        for pk, sk in zip(p.tolist(), s.tolist())
    ]
    torch.testing.assert_close(w, torch.tensor(ref), rtol=1e-6, atol=1e-6)
    assert w[0] == 1.0  # the best block
    assert w[0] < w[1] < w[2] < 2.0  # lower PSNR (and SSIM) -> higher weight


def test_round_robin_covers_every_block():
    owned = worker_blocks(5, 2)
    assert owned == [[0, 2, 4], [1, 3]]
    seen = set()
    for turn in range(3):
        act = active_blocks(turn, owned)
        assert len(act) == 2 and len(set(act)) == 2  # one block per worker per turn
        seen |= set(act)
    assert seen == set(range(5))
    for bad in (0, 5, 6):
        with pytest.raises(ValueError, match="more blocks than workers"):
            worker_blocks(5, bad)


def test_partition_and_overlap():
    blocks = partition_blocks(TOY_AABB, (2, 2), 0.2)
    assert len(blocks) == 4
    p = torch.tensor([[0.1, 0.5, 0.0], [-0.1, 0.5, 0.0]])
    own = torch.stack([b.contains(p) for b in blocks])
    assert own.sum(0).tolist() == [1, 1]  # cells tile the box
    shared = torch.stack([b.contains(p, b.margin) for b in blocks])
    assert shared.sum(0).tolist() == [2, 2]  # anchors near a seam belong to both blocks


def test_decode_matches_scaffold_formulas():
    torch.manual_seed(0)
    a = BlockAnchors(torch.rand(5, 3), feat_dim=8, n_offsets=3, voxel=0.1)
    with torch.no_grad():
        a.offsets.normal_()
        a.log_scales.normal_(std=0.2)
    dec = GaussianDecoder(8, 3, 16)
    cam = torch.tensor([0.0, 0.0, 3.0])
    raw, g = decode_gaussians(a, dec, cam)
    view = torch.nn.functional.normalize(a.positions - cam, dim=-1)
    ref = dec(a.features, view)
    keep = ref["opacity"] > 0
    means = a.positions[:, None] + a.offsets * a.log_scales.exp()[:, None]
    torch.testing.assert_close(g["means"], means.reshape(-1, 3)[keep])
    scales = a.log_scales.exp().repeat_interleave(3, 0) * torch.sigmoid(ref["scale_logits"])
    torch.testing.assert_close(g["scales"], scales[keep])
    assert (g["opacities"] > 0).all()
    assert float(consistency_loss(raw, dec(a.features, view), keep).detach()) == 0.0


def test_ssim_identity_and_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 16, 16, 3)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1))) < 0.8


@pytest.fixture(scope="module")
def tiny_run():
    cfg = MomentumGSConfig(
        blocks=(2, 2), workers=2, steps=40, block_interval=5, eval_every=10, weight_warmup=10,
        anchor_voxel=0.3, feat_dim=8, n_offsets=3, hidden=16,
    )  # fmt: skip
    scene = toy_block_scene(resolution=24)
    blocks = partition_blocks(TOY_AABB, cfg.blocks, cfg.overlap)
    rc = VolumeRenderConfig(n_samples=32)
    data = render_block_data(scene, blocks, 3, 1, 16, rc)
    pts, _ = scene_points(scene, cfg.anchor_voxel)
    torch.manual_seed(0)
    model = MomentumGS.from_points(pts, blocks, cfg)
    cams = [d.test_cameras for d in data]
    from fewstep.threed.recipes.pvd import _cat_cameras

    test_cams = _cat_cameras(cams)
    test_img = torch.cat([d.test_images for d in data])
    init = image_psnr(model.render_merged(test_cams), test_img)
    teacher0 = copy.deepcopy(model.teacher)
    log = train_momentum_gs(model, data, cfg)
    return model, log, init, test_cams, test_img, teacher0


def test_training_loss_falls_and_every_block_trains(tiny_run):
    model, log, init, cams, img, _ = tiny_run
    first, last = sum(log["loss"][:8]) / 8, sum(log["loss"][-8:]) / 8
    assert last < 0.8 * first, (first, last)
    assert {b for bs in log["blocks"] for b in bs} == {0, 1, 2, 3}
    assert all(len(set(bs)) == 2 for bs in log["blocks"])  # W = 2 slots, distinct blocks
    assert image_psnr(model.render_merged(cams), img) > init + 1.0
    assert len(log["evals"]) == 4 and len(log["weights"]) == 4
    assert all(1.0 <= w < 2.0 for w in log["weights"])


def test_teacher_decoder_follows_student_by_momentum(tiny_run):
    model, _, _, _, _, teacher0 = tiny_run
    for pt, p0, ps in zip(
        model.teacher.parameters(), teacher0.parameters(), model.decoder.parameters()
    ):
        assert not pt.requires_grad
        assert not torch.equal(pt, p0)  # moved
        assert not torch.equal(pt, ps)  # but lags behind the student


def test_merged_gaussians_render(tiny_run):
    model, _, init, cams, img, _ = tiny_run
    g = model.merged_gaussians()
    out = render_gaussians(g, cams, background=torch.ones(3))
    assert torch.isfinite(out["image"]).all()
    assert image_psnr(out["image"], img) > init
    assert (torch.stack([b.contains(g.means) for b in model.blocks]).sum(0) >= 1).all()


def test_single_block_baseline_is_allowed():
    assert worker_blocks(1, 1) == [[0]]
    assert active_blocks(3, [[0]]) == [0]
    with pytest.raises(ValueError, match="more blocks than workers"):
        worker_blocks(1, 2)


def _tiny_data(blocks, size=12):
    scene = toy_block_scene(resolution=20)
    rc = VolumeRenderConfig(n_samples=24)
    return scene, render_block_data(scene, blocks, 2, 1, size, rc)


def test_block_weighting_switch(monkeypatch):
    """With every block weight forced to 5, the first weighted iteration's loss is 5x the
    unweighted run's (identical until then); ``block_weighting=False`` ignores the weights."""
    import fewstep.threed.momentum_gs as mgs

    monkeypatch.setattr(mgs, "block_weights", lambda p, s, sigma: torch.full_like(p, 5.0))
    losses = {}
    for on in (True, False):
        cfg = MomentumGSConfig(
            blocks=(2, 1), workers=1, steps=3, block_interval=1, eval_every=2, weight_warmup=2,
            anchor_voxel=0.5, feat_dim=4, n_offsets=2, hidden=8, block_weighting=on,
        )  # fmt: skip
        blocks = partition_blocks(TOY_AABB, cfg.blocks, cfg.overlap)
        scene, data = _tiny_data(blocks)
        pts, _ = scene_points(scene, cfg.anchor_voxel)
        torch.manual_seed(0)
        model = MomentumGS.from_points(pts, blocks, cfg)
        losses[on] = train_momentum_gs(model, data, cfg)["loss"]
    assert losses[True][:2] == pytest.approx(losses[False][:2])
    assert losses[True][2] == pytest.approx(5.0 * losses[False][2], rel=1e-5)
