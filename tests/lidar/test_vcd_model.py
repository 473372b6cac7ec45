"""VCD detector and losses (fewstep.lidar.vcd): BEV geometry, warping, targets and decoding,
the distillation terms' sign and masks, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.lidar.detection_data import BEVGrid

GRID = BEVGrid(x_range=(-4.0, 4.0), y_range=(-2.0, 2.0), cell=0.5)  # 16 x 8 cells


def test_sample_bev_at_cell_centres_reads_the_cells():
    from fewstep.lidar.vcd import cell_centres, sample_bev

    feat = torch.randn(2, 3, *GRID.shape)
    xy = cell_centres(GRID).reshape(1, -1, 2).expand(2, -1, -1)
    got = sample_bev(feat, xy, GRID)  # (2, nx ny, 3)
    assert torch.allclose(got, feat.flatten(2).transpose(1, 2), atol=1e-5)


def test_warp_to_current_compensates_ego_motion():
    from fewstep.lidar.vcd import warp_to_current

    feat = torch.zeros(1, 1, *GRID.shape)
    feat[0, 0, 8, 4] = 1.0  # a past-frame cell at x = 0.25, y = 0.25
    past_to_cur = torch.eye(4)[None]
    assert torch.allclose(warp_to_current(feat, past_to_cur, GRID), feat, atol=1e-6)
    past_to_cur[0, 0, 3] = -1.0  # the ego drove 1 m forward: old points are 1 m further back
    out = warp_to_current(feat, past_to_cur, GRID)
    assert out[0, 0, 6, 4] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)


def test_frustum_cells_put_the_optical_axis_in_front():
    from fewstep.lidar.camera import CameraConfig
    from fewstep.lidar.vcd import DetectorConfig, depth_centres, frustum_cells

    cam = CameraConfig(yaws=(0.0,), height=4, width=4, z_offset=0.0)
    det = DetectorConfig(depth_bins=4, depth_range=(0.6, 3.6), downsample=1)
    grid = BEVGrid(x_range=(0.0, 4.0), y_range=(-2.0, 2.0), cell=1.0)
    cells = frustum_cells(cam, det, grid).reshape(4, 4, 4)  # (D, h, w)
    # pixel (row 1, column 2) has its centre at (2.5, 1.5): slightly right of the axis
    # (u > cx) -> y < 0 ... at depth z, y = -(2.5 - 2) / f z with f = 2
    for k, z in enumerate(depth_centres(det)):
        y = -0.25 * z
        assert cells[k, 1, 2] == int(np.floor(z)) * 4 + int(np.floor(y + 2.0))


def test_encode_then_decode_recovers_boxes():
    from fewstep.lidar.vcd import centre_cells, decode, heatmap_target, reg_target

    boxes = torch.tensor([[[1.3, -0.7, 1.8, 4.2, 0.3], [-2.6, 1.1, 1.7, 3.9, -0.2]]])
    valid = torch.tensor([[True, True]])
    heat = heatmap_target(boxes, valid, GRID, sigma=0.5)
    assert heat.max() == 1.0 and (heat == 1).sum() == 2
    reg = torch.zeros(1, 6, *GRID.shape)
    idx, _ = centre_cells(boxes, GRID)
    reg[0, :, idx[0, :, 0], idx[0, :, 1]] = reg_target(boxes, GRID)[0].T
    logits = torch.where(heat == 1, torch.tensor(5.0), torch.tensor(-5.0))
    out = decode({"heat": logits, "reg": reg}, GRID, max_boxes=5, threshold=0.5)[0]
    out = out[np.argsort(-out[:, 0])]
    assert out[:, :5] == pytest.approx(boxes[0].double().numpy(), abs=1e-5)


def test_focal_loss_prefers_the_target():
    from fewstep.lidar.vcd import focal_loss, heatmap_target

    boxes, valid = torch.tensor([[[0.3, 0.2, 1.8, 4, 0]]]), torch.tensor([[True]])
    target = heatmap_target(boxes, valid, GRID, 0.5)
    good = torch.logit(target.clamp(1e-3, 1 - 1e-3))
    assert focal_loss(good, target) < focal_loss(torch.zeros_like(target), target)
    assert focal_loss(good, target) < focal_loss(-good, target)


def test_feature_distillation_pulls_the_apprentice_to_the_expert_inside_the_mask_only():
    from fewstep.lidar.vcd import box_mask, feature_distill_loss

    boxes = torch.tensor([[[1.0, 0.0, 1.0, 2.0, 0.0]]])
    mask = box_mask(boxes, torch.tensor([[True]]), GRID)  # x in [0, 2], y in [-.5, .5]
    assert mask[0, 8:12, 3:5].eq(1).all() and mask.sum() == 8
    f_exp = torch.randn(1, 4, *GRID.shape)
    f_app = f_exp.clone()
    assert feature_distill_loss(f_app, f_exp, mask) == 0
    outside = f_app.clone()
    outside[..., 0, 0] += 3.0  # a cell far from the box
    assert feature_distill_loss(outside, f_exp, mask) == 0
    inside = f_app.clone()
    inside[0, :, 9, 3] += 2.0  # one foreground cell off by 2 in every channel
    assert feature_distill_loss(inside, f_exp, mask) == pytest.approx(4.0 / 8)
    # one gradient step moves the apprentice towards the expert (sign), the expert is fixed
    x = inside.clone().requires_grad_(True)
    e = f_exp.clone().requires_grad_(True)
    feature_distill_loss(x, e, mask).backward()
    assert e.grad is None or e.grad.abs().sum() == 0
    stepped = x.detach() - 0.5 * x.grad
    assert feature_distill_loss(stepped, f_exp, mask) < feature_distill_loss(inside, f_exp, mask)


def test_trajectory_distillation_reads_only_the_trajectory_points():
    from fewstep.lidar.vcd import cell_centres, trajectory_distill_loss

    f_exp = torch.randn(1, 4, *GRID.shape)
    c = cell_centres(GRID)
    traj = torch.stack([c[9, 3], c[6, 3]])[None, None]  # (1, 1, T=2, 2) at cell centres
    valid = torch.tensor([[True]])
    app = f_exp.clone()
    app[0, :, 0, 7] += 5.0  # off the trajectory
    assert trajectory_distill_loss(app, f_exp, traj, valid, GRID) == pytest.approx(0.0, abs=1e-9)
    app[0, :, 6, 3] += 2.0  # the past position: (2^2 per channel) / T
    assert trajectory_distill_loss(app, f_exp, traj, valid, GRID) == pytest.approx(2.0, abs=1e-5)
    assert trajectory_distill_loss(app, f_exp, traj, torch.tensor([[False]]), GRID) == 0


def _tiny_detector(lidar: bool, norm: str = "batch"):
    from fewstep.lidar.camera import CameraConfig
    from fewstep.lidar.vcd import BEVDetector, DetectorConfig

    cam = CameraConfig(yaws=(0.0, 180.0), height=8, width=16)
    det = DetectorConfig(enc_channels=4, channels=3, bev_channels=4, depth_bins=4,
                         lidar_depth=lidar, norm=norm)  # fmt: skip
    return BEVDetector(det, cam, GRID, history=2)


def test_detector_shapes_and_the_expert_depth_prior():
    torch.manual_seed(0)
    expert, apprentice = _tiny_detector(True), _tiny_detector(False)
    rgb, p = torch.rand(2, 2, 2, 3, 8, 16), torch.eye(4).expand(2, 2, 4, 4)
    depth = torch.zeros(2, 2, 2, 8, 16)
    depth[..., 2:4, :] = 6.0
    out = apprentice(rgb, p)
    assert out["bev"].shape == (2, 4, 16, 8) and out["heat"].shape == (2, 1, 16, 8)
    assert out["reg"].shape == (2, 6, 16, 8)
    a = expert(rgb, p, depth)["bev"]
    b = expert(rgb, p, depth * 0)["bev"]
    assert not torch.allclose(a, b)  # the LiDAR depth changes what the expert sees
    with pytest.raises(ValueError, match="LiDAR depth"):
        expert(rgb, p)
    with pytest.raises(ValueError, match="frames per sample"):
        apprentice(rgb[:, :1], p[:, :1])


def test_detector_config_errors_are_clear():
    from fewstep.lidar.camera import CameraConfig
    from fewstep.lidar.vcd import BEVDetector, DetectorConfig, feature_distill_loss

    with pytest.raises(ValueError, match="depth_bins"):
        DetectorConfig(depth_bins=1)
    with pytest.raises(ValueError, match="divisible"):
        BEVDetector(DetectorConfig(downsample=3), CameraConfig(height=8, width=16), GRID, 1)
    with pytest.raises(ValueError, match="mask"):
        feature_distill_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(4, 4))


def _distill_setup(norm: str):
    """A tiny VCDConfig on GRID, four synthetic samples with one car each, a frozen random
    expert and an apprentice init (seed 1)."""
    from fewstep.lidar.camera import CameraConfig
    from fewstep.lidar.detection_data import DetectionDataConfig
    from fewstep.lidar.recipes.vcd import Schedule, VCDConfig

    cam = CameraConfig(yaws=(0.0, 180.0), height=8, width=16)
    cfg = VCDConfig(data=DetectionDataConfig(camera=cam, grid=GRID))
    g = torch.Generator().manual_seed(0)
    n = 4
    boxes = torch.tensor([[[1.0, 0.5, 1.8, 4.0, 0.0]], [[-2.0, -0.5, 1.8, 4.0, 0.3]],
                          [[2.5, 1.0, 1.8, 3.5, 0.0]], [[-1.0, 0.0, 1.8, 4.0, -0.2]]])  # fmt: skip
    traj = torch.stack([boxes[..., :2], boxes[..., :2] + torch.tensor([0.8, 0.0])], 2)
    data = {"rgb": torch.rand(n, 2, 2, 3, 8, 16, generator=g),
            "depth": torch.rand(n, 2, 2, 8, 16, generator=g) * 6,
            "past_to_cur": torch.eye(4).expand(n, 2, 4, 4).clone(), "boxes": boxes,
            "traj": traj, "box_mask": torch.ones(n, 1, dtype=torch.bool)}  # fmt: skip
    torch.manual_seed(0)
    expert = _tiny_detector(True, norm).eval().requires_grad_(False)
    torch.manual_seed(1)
    init = _tiny_detector(False, norm).state_dict()
    return cfg, data, expert, init, Schedule(steps=30, batch_size=4, lr=1e-2, log_every=1)


def _gaps(model, expert, data, cfg) -> tuple[float, float]:
    """(foreground feature gap, trajectory gap) of the apprentice to the expert."""
    from fewstep.lidar.recipes.vcd import _forward
    from fewstep.lidar.vcd import box_mask, feature_distill_loss, trajectory_distill_loss

    with torch.no_grad():
        fa, fe = _forward(model.eval(), data)["bev"], _forward(expert, data)["bev"]
        mask = box_mask(data["boxes"], data["box_mask"], GRID, cfg.weights.fg_margin)
        feat = feature_distill_loss(fa, fe, mask)
        traj = trajectory_distill_loss(fa, fe, data["traj"], data["box_mask"], GRID)
    return float(feat), float(traj)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_distillation_terms_pull_the_apprentice_to_the_expert(norm):
    """Training with the VCD terms (same init, batches and steps) leaves the apprentice's BEV
    features much closer to the expert's on the foreground and along the trajectories than
    the detection loss alone; weight 0 on both terms reproduces the baseline exactly. Fails if
    either term is dropped from the training loss or its weight is ignored."""
    from dataclasses import replace

    from fewstep.lidar.recipes.vcd import LossWeights, train_detector

    cfg, data, expert, init, sched = _distill_setup(norm)
    gaps = {}
    # weight 10: on this tiny random problem the detection loss alone moves the features
    # away from the (random) expert's about as fast as weight 1 pulls them back
    for name, w in [("none", None), ("both", (10.0, 10.0)), ("zero", (0.0, 0.0)),
                    ("feature", (10.0, 0.0)), ("trajectory", (0.0, 10.0))]:  # fmt: skip
        model = _tiny_detector(False, norm)
        model.load_state_dict(init)
        c = cfg if w is None else replace(cfg, weights=LossWeights(feature=w[0], trajectory=w[1]))
        train_detector(model, data, c, sched, None if w is None else expert)
        gaps[name] = _gaps(model, expert, data, cfg)
    assert gaps["zero"] == gaps["none"]
    assert gaps["both"][0] < 0.5 * gaps["none"][0] and gaps["both"][1] < 0.5 * gaps["none"][1]
    assert gaps["feature"][0] < 0.5 * gaps["none"][0]  # each term alone pulls its own gap
    assert gaps["trajectory"][1] < 0.5 * gaps["none"][1]


def test_batch_norm_option_builds_normalised_blocks():
    from torch import nn

    n_bn = [sum(isinstance(m, nn.BatchNorm2d) for m in _tiny_detector(False, nm).modules())
            for nm in ("batch", "none")]  # fmt: skip
    assert n_bn == [8, 0]  # 4 encoder blocks (one strided) + 4 BEV blocks
    with pytest.raises(ValueError, match="norm"):
        from fewstep.lidar.vcd import DetectorConfig

        DetectorConfig(norm="layer")


def test_training_is_deterministic():
    """The same config, init and seed give bit-identical weights (sessions 9 and 11 differed
    only through the CPU's kernels: AVX2 vs AVX-512, see BENCHMARKS.md "LiDAR VCD")."""
    from fewstep.lidar.recipes.vcd import train_detector

    cfg, data, expert, init, sched = _distill_setup("batch")
    states = []
    for _ in range(2):
        model = _tiny_detector(False)
        model.load_state_dict(init)
        train_detector(model, data, cfg, sched, expert)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
