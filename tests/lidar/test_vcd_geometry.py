"""Camera geometry and rendering (fewstep.lidar.camera), BEV box extraction and the detection
frames (fewstep.lidar.detection_data)."""

from __future__ import annotations

import numpy as np
import pytest


def _wall_scene(x: float = 10.0):
    """One vertical wall, the plane x = ``x`` (facing the vehicle), as a building."""
    from fewstep.lidar.scenes import scene_from_meshes, vertical_quad

    o3d_mesh = vertical_quad((-40.0, 40.0), 0.0, (-10.0, 10.0))
    # vertical_quad spans the plane y = const; rotate it into the plane x = const
    r = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    v = np.asarray(o3d_mesh.vertices) @ r.T
    v[:, 0] += x
    import open3d as o3d

    o3d_mesh.vertices = o3d.utility.Vector3dVector(v)
    return scene_from_meshes([(o3d_mesh, "building")])


def test_point_in_front_projects_to_principal_point_and_sideways_by_focal_length():
    from fewstep.lidar.camera import CameraConfig, intrinsics, project

    cfg = CameraConfig(yaws=(0.0, 90.0), height=16, width=32, fov_x=90.0, z_offset=-0.2)
    f = intrinsics(cfg)[0, 0]
    assert f == pytest.approx(16.0)  # (32 / 2) / tan(45 deg)
    pts = np.array([[10.0, 0.0, -0.2], [10.0, -2.0, -0.2], [10.0, 0.0, 0.8], [0.0, 10.0, -0.2]])
    uv, z = project(pts, cfg)
    assert uv[0, 0] == pytest.approx([16.0, 8.0]) and z[0, 0] == pytest.approx(10.0)
    assert uv[0, 1] == pytest.approx([16.0 + f * 2.0 / 10.0, 8.0])  # right of the car: u grows
    assert uv[0, 2] == pytest.approx([16.0, 8.0 - f * 1.0 / 10.0])  # above: v shrinks
    assert uv[1, 3] == pytest.approx([16.0, 8.0]) and z[1, 3] == pytest.approx(10.0)  # left view
    assert z[1, 0] == pytest.approx(0.0, abs=1e-9)  # beside the left camera: not in front


def test_rendered_depth_and_projected_lidar_depth_match_ray_cast_distance():
    from fewstep.lidar.camera import CameraConfig, render, sparse_depth
    from fewstep.lidar.sensor import LidarConfig, scan

    scene = _wall_scene(10.0)
    cam = CameraConfig(yaws=(0.0,), height=16, width=32, noise=0.0)
    img = render(scene, np.eye(4), cam, rng=0)
    assert img["rgb"].shape == (1, 3, 16, 32)
    # a fronto-parallel wall: every pixel's z-depth is the wall distance
    assert np.allclose(img["depth"], 10.0, atol=1e-4)
    lidar = LidarConfig(beams=16, horizontal_resolution=1.0, range_noise=0.0, dropout=0.0)
    d = sparse_depth(scan(scene, np.eye(4), lidar, rng=0)["points"], cam)
    hit = d > 0
    assert hit.sum() > 20
    assert np.allclose(d[hit], img["depth"][hit], atol=1e-3)


def test_camera_errors_are_clear():
    from fewstep.lidar.camera import CameraConfig, project, render

    with pytest.raises(ValueError, match="fov_x"):
        CameraConfig(fov_x=180.0)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        project(np.zeros((4, 2)), CameraConfig())
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        render(_wall_scene(), np.eye(3), CameraConfig())


def test_fit_bev_box_recovers_a_rotated_box():
    import open3d as o3d

    from fewstep.lidar.detection_data import fit_bev_box

    m = o3d.geometry.TriangleMesh.create_box(4.0, 1.8, 1.5).translate((-2.0, -0.9, 0.0))
    yaw = 0.3
    m.rotate(m.get_rotation_matrix_from_xyz((0.0, 0.0, yaw)), center=(0.0, 0.0, 0.0))
    m.translate((5.0, -3.0, 0.2))
    box = fit_bev_box(np.asarray(m.vertices))
    assert box == pytest.approx([5.0, -3.0, 1.8, 4.0, yaw], abs=1e-6)
    m.rotate(m.get_rotation_matrix_from_xyz((0.0, 0.0, np.pi)), center=(5.0, -3.0, 0.0))
    assert fit_bev_box(np.asarray(m.vertices))[4] == pytest.approx(yaw, abs=1e-6)  # half turn
    with pytest.raises(ValueError, match="vertices"):
        fit_bev_box(np.zeros((3, 3)))


def test_car_boxes_of_a_street_match_its_recipe(tiny_scene, tiny_scene_config):
    from fewstep.lidar.detection_data import car_boxes

    ids, boxes = car_boxes(tiny_scene)
    assert len(ids) == len([p for p in tiny_scene.pieces if p.name == "car"]) > 0
    lo, hi = tiny_scene_config.car_length
    assert np.all((boxes[:, 3] >= lo - 1e-6) & (boxes[:, 3] <= hi + 1e-6))
    assert boxes[:, 2] == pytest.approx(np.full(len(boxes), 1.8), abs=1e-6)  # body width
    assert boxes[:, 4] == pytest.approx(np.zeros(len(boxes)), abs=1e-6)  # parked along x
    assert np.abs(boxes[:, 1]) == pytest.approx(np.full(len(boxes), 2.9), abs=1e-6)


def test_to_frame_moves_and_turns_boxes():
    from fewstep.lidar.detection_data import to_frame

    boxes = np.array([[3.0, 1.0, 1.8, 4.0, 0.2]])
    w2v = np.eye(4)
    c, s = np.cos(-0.5), np.sin(-0.5)  # the vehicle yawed +0.5 at (1, 1)
    w2v[:2, :2] = [[c, -s], [s, c]]
    w2v[:2, 3] = -(w2v[:2, :2] @ np.array([1.0, 1.0]))
    out = to_frame(boxes, w2v)
    assert out[0, :2] == pytest.approx([2.0 * np.cos(0.5), -2.0 * np.sin(0.5)])
    assert out[0, 4] == pytest.approx(0.2 - 0.5)


@pytest.fixture(scope="module")
def tiny_data_config():
    from fewstep.lidar.camera import CameraConfig
    from fewstep.lidar.detection_data import DetectionDataConfig
    from fewstep.lidar.scenes import SceneConfig
    from fewstep.lidar.sensor import LidarConfig

    return DetectionDataConfig(
        scene=SceneConfig(length=40.0, n_buildings=2, n_cars=6, n_poles=1, n_trees=1, seed=5),
        lidar=LidarConfig(beams=16, horizontal_resolution=1.0, max_range=30.0),
        camera=CameraConfig(height=16, width=32),
        streets=1, held_out=1, samples_per_street=3, moving_fraction=1.0, min_points=1,
    )  # fmt: skip


def test_samples_hold_trajectories_consistent_with_car_motion(tiny_data_config):
    from fewstep.lidar.detection_data import TICK_HZ, street_samples

    cfg = tiny_data_config
    samples = street_samples(cfg, 0)
    assert len(samples) == cfg.samples_per_street
    s = samples[-1]
    t, v = cfg.history, len(cfg.camera.yaws)
    assert s["rgb"].shape == (t, v, 3, 16, 32) and s["depth"].shape == (t, v, 16, 32)
    assert np.allclose(s["past_to_cur"][0], np.eye(4), atol=1e-9)
    assert len(s["boxes"]) > 0
    assert s["traj"][:, 0] == pytest.approx(s["boxes"][:, :2])  # trajectory starts at now
    step = s["traj"][:, 0] - s["traj"][:, 1]  # motion over history_every ticks
    dt = cfg.history_every / TICK_HZ
    speeds = np.linalg.norm(step, axis=1) / dt
    parked = speeds < 1e-6
    lo, hi = cfg.car_speed
    assert np.all(parked | ((speeds >= lo - 1e-6) & (speeds <= hi + 1e-6)))
    assert np.all(np.abs(step[:, 1]) < 0.5 * dt)  # cars drive along the street
    assert cfg.grid.inside(s["boxes"][:, :2]).all()


def test_split_is_cached_and_seeded(tiny_data_config, tmp_path, monkeypatch):
    import torch

    from fewstep.lidar.detection_data import build_split, load_split

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    a = load_split(tiny_data_config, "test")
    assert len(list((tmp_path / "lidar-vcd-data").glob("*.safetensors"))) == 1
    b = load_split(tiny_data_config, "test")
    c = build_split(tiny_data_config, "test")
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    assert a["box_mask"].dtype == torch.bool and a["boxes"].shape[-1] == 5
    with pytest.raises(ValueError, match="split must be one of"):
        build_split(tiny_data_config, "val")
