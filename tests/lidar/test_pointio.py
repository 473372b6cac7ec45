"""Point-cloud files by suffix, through open3d for PLY/PCD."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.lidar import pointio


@pytest.fixture
def cloud():
    rng = np.random.default_rng(0)
    return rng.standard_normal((200, 3)) * 20, rng.random((200, 3))


def test_ply_round_trip_exact_with_colors(tmp_path, cloud):
    pts, cols = cloud
    back, back_cols = pointio.read_points(
        pointio.write_points(tmp_path / "a.ply", pts, cols), colors=True
    )
    assert np.array_equal(back, pts)  # open3d writes PLY coordinates as doubles
    assert np.allclose(back_cols, cols, atol=1 / 255)  # colours are stored as 8-bit


def test_pcd_round_trip_float32(tmp_path, cloud):
    pts, _ = cloud
    back = pointio.read_points(pointio.write_points(tmp_path / "a.pcd", pts))
    assert back.shape == pts.shape
    assert np.array_equal(back, pts.astype(np.float32).astype(np.float64))  # PCD stores float32


def test_bin_and_npy_round_trip(tmp_path, cloud):
    pts, _ = cloud
    assert np.array_equal(pointio.read_points(pointio.write_points(tmp_path / "a.npy", pts)), pts)
    back = pointio.read_points(pointio.write_points(tmp_path / "a.bin", pts))
    assert np.array_equal(back, pts.astype(np.float32))


def test_bad_suffix_and_bad_files(tmp_path, cloud):
    pts, _ = cloud
    with pytest.raises(ValueError, match=r"'\.xyz'.*\.bin.*\.npy.*\.pcd.*\.ply"):
        pointio.write_points(tmp_path / "a.xyz", pts)
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        pointio.read_points(tmp_path / "missing.ply")
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="bad.ply"):
        pointio.read_points(bad)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        pointio.write_points(tmp_path / "a.ply", pts[:, :2])
