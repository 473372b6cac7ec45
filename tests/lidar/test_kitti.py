"""SemanticKITTI layout: bit-exact round trips, the pose convention, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.lidar import kitti


def test_scan_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    scan = (rng.standard_normal((1000, 4)) * 50).astype(np.float32)
    scan[0] = [np.float32(1e-30), -0.0, np.float32(3.4e38), 0.123456789]
    path = kitti.write_scan(tmp_path / "velodyne" / "000000.bin", scan)
    back = kitti.read_scan(path)
    assert back.dtype == np.float32 and back.shape == (1000, 4)
    assert np.array_equal(back.view(np.uint32), scan.view(np.uint32))
    assert path.read_bytes() == scan.astype("<f4").tobytes()


def test_scan_with_separate_remission(tmp_path):
    pts = np.arange(12, dtype=np.float32).reshape(4, 3)
    rem = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    back = kitti.read_scan(kitti.write_scan(tmp_path / "a.bin", pts, rem))
    assert np.array_equal(back[:, :3], pts) and np.array_equal(back[:, 3], rem)
    with pytest.raises(ValueError, match="remission"):
        kitti.write_scan(tmp_path / "b.bin", np.zeros((4, 4)), rem)


def test_truncated_scan_is_refused_naming_the_file(tmp_path):
    path = kitti.write_scan(tmp_path / "000007.bin", np.ones((10, 4), np.float32))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="000007.bin"):
        kitti.read_scan(path)


def test_labels_round_trip_is_bit_exact_and_split_16_16(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 2**32, size=500, dtype=np.uint64).astype(np.uint32)
    raw[0] = (5 << 16) | 40  # instance 5 of road
    src = tmp_path / "src.label"
    raw.astype("<u4").tofile(src)
    sem, inst = kitti.read_labels(src)
    assert (sem[0], inst[0]) == (40, 5)
    out = kitti.write_labels(tmp_path / "labels" / "000000.label", sem, inst)
    assert out.read_bytes() == src.read_bytes()


def test_labels_count_mismatch_names_the_file(tmp_path):
    path = kitti.write_labels(tmp_path / "000003.label", np.full(9, 40))
    with pytest.raises(ValueError, match="000003.label.*9 labels.*10 points"):
        kitti.read_labels(path, n_points=10)
    with pytest.raises(ValueError, match="65535"):
        kitti.write_labels(tmp_path / "x.label", np.array([70000]))


def test_poses_and_calib_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(2)
    poses = np.tile(np.eye(4), (7, 1, 1))
    poses[:, :3, :] = rng.standard_normal((7, 3, 4)) * [[1, 1, 1, 100]]
    back = kitti.read_poses(kitti.write_poses(tmp_path / "poses.txt", poses))
    assert np.array_equal(back, poses)
    calib = {"P0": rng.standard_normal((3, 4)), "Tr": poses[3]}
    got = kitti.read_calib(kitti.write_calib(tmp_path / "calib.txt", calib))
    assert np.array_equal(got["P0"][:3], calib["P0"]) and np.array_equal(got["Tr"], poses[3])


def test_bad_pose_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "poses.txt"
    path.write_text("1 0 0 0 0 1 0 0 0 0 1 0\n1 0 0\n")
    with pytest.raises(ValueError, match="poses.txt line 2"):
        kitti.read_poses(path)


def test_camera_pose_convention_by_hand():
    """KITTI: velodyne pose = inv(Tr) P Tr. A camera moving 1 m along its optical axis (z)
    is the velodyne moving 1 m forward (x); a camera yawing left (about -y_cam, since y_cam
    points down) is the velodyne yawing left about +z."""
    tr = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    forward = np.eye(4)
    forward[2, 3] = 1.0
    v = kitti.camera_to_velodyne_poses(forward[None], tr)[0]
    assert np.allclose(v[:3, 3], [1, 0, 0]) and np.allclose(v[:3, :3], np.eye(3))
    a = 0.3
    yaw_cam = np.eye(4)  # rotation by -a about the camera's y axis
    yaw_cam[[0, 0, 2, 2], [0, 2, 0, 2]] = [np.cos(a), -np.sin(a), np.sin(a), np.cos(a)]
    v = kitti.camera_to_velodyne_poses(yaw_cam[None], tr)[0]
    expect = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    assert np.allclose(v[:3, :3], expect)
    rng = np.random.default_rng(0)
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, :3, 3] = rng.standard_normal((3, 3))
    assert np.allclose(
        kitti.camera_to_velodyne_poses(kitti.velodyne_to_camera_poses(poses, tr), tr), poses
    )


def _write_sequence(seq, n=3, labels=True):
    rng = np.random.default_rng(0)
    for i in range(n):
        kitti.write_scan(seq / "velodyne" / f"{i:06d}.bin", rng.standard_normal((20 + i, 3)))
        if labels:
            kitti.write_labels(seq / "labels" / f"{i:06d}.label", np.full(20 + i, 50))
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 2, 3] = np.arange(n)  # camera forward
    kitti.write_poses(seq / "poses.txt", poses)
    tr = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    kitti.write_calib(seq / "calib.txt", {"P0": np.eye(4)[:3], "Tr": tr})


def test_kitti_sequence_items(tmp_path):
    _write_sequence(tmp_path / "sequences" / "05")
    seq = kitti.KittiSequence(tmp_path, 5)
    assert len(seq) == 3
    item = seq[2]
    assert item["points"].shape == (22, 3) and item["remission"].shape == (22,)
    assert item["labels"].shape == (22,) and np.all(item["labels"] == 50)
    assert np.allclose(item["pose"][:3, 3], [2, 0, 0]) and item["frame"] == "000002"
    with pytest.raises(IndexError):
        seq[3]


def test_kitti_sequence_without_labels(tmp_path):
    _write_sequence(tmp_path, labels=False)
    assert kitti.KittiSequence(tmp_path)[0]["labels"] is None


def test_kitti_sequence_errors_name_the_file(tmp_path):
    seq = tmp_path / "00"
    _write_sequence(seq)
    (seq / "calib.txt").unlink()
    with pytest.raises(FileNotFoundError, match="calib.txt"):
        kitti.KittiSequence(seq)
    _write_sequence(seq)
    kitti.write_poses(seq / "poses.txt", np.tile(np.eye(4), (2, 1, 1)))
    with pytest.raises(ValueError, match="poses.txt.*2 poses for 3 scans"):
        kitti.KittiSequence(seq)
    _write_sequence(seq)
    kitti.write_labels(seq / "labels" / "000001.label", np.full(5, 50))
    with pytest.raises(ValueError, match="000001.label"):
        kitti.KittiSequence(seq)[1]


def test_label_ids_are_semantic_kitti():
    ids = kitti.LABEL_IDS
    assert (ids["road"], ids["sidewalk"], ids["building"], ids["car"]) == (40, 48, 50, 10)
    assert (ids["pole"], ids["vegetation"], ids["trunk"], ids["terrain"]) == (80, 70, 71, 72)
