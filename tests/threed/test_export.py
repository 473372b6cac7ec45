"""open3d export of Gaussians and fields, written with open3d.io and read back."""

import numpy as np
import pytest
import torch

from fewstep.threed.export import (
    field_point_cloud,
    read_point_cloud,
    save_point_cloud,
    to_point_cloud,
)
from fewstep.threed.fields import VoxelField, toy_voxel_scene
from fewstep.threed.gaussians import Gaussians


def test_gaussians_round_trip_through_ply(tmp_path):
    torch.manual_seed(0)
    pts = torch.rand(50, 3)
    cols = torch.rand(50, 3) * 0.8 + 0.1
    g = Gaussians.from_points(pts, cols, opacity=0.5)
    with torch.no_grad():
        g.opacity_logits[:10] = -10.0  # nearly transparent
    path = save_point_cloud(tmp_path / "g.ply", to_point_cloud(g, min_opacity=0.1))
    back = read_point_cloud(path)
    assert len(back.points) == 40
    np.testing.assert_allclose(np.asarray(back.points), pts[10:].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(back.colors), cols[10:].numpy(), atol=1 / 255 + 1e-6)


def test_field_point_cloud_finds_the_occupied_region(tmp_path):
    scene = toy_voxel_scene(resolution=24)
    cloud = field_point_cloud(scene, resolution=24, threshold=5.0)
    p = np.asarray(cloud.points)
    sphere = np.linalg.norm(p, axis=1) < 0.6
    cube = (np.abs(p - np.array([0.35, 0.35, 0.3])) < 0.3).all(1)
    assert len(p) > 100 and (sphere | cube).all()  # only occupied vertices
    out = read_point_cloud(save_point_cloud(tmp_path / "f.pcd", cloud))
    assert len(out.points) == len(p) and out.has_normals() and out.has_colors()
    # red cube points are red
    red = np.asarray(out.colors)[cube & ~sphere]
    assert (red[:, 0] > 0.7).all() and (red[:, 1] < 0.4).all()
    # normals on the sphere's boundary (where the density changes) point outwards
    n = np.asarray(out.normals)
    edge = sphere & ~cube & (np.linalg.norm(n, axis=1) > 0.5)
    assert edge.sum() > 50
    assert (np.sum(n[edge] * p[edge], 1) > 0).all()


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no point cloud"):
        read_point_cloud(tmp_path / "missing.ply")
    with pytest.raises(ValueError, match="resolution"):
        field_point_cloud(VoxelField(), resolution=2)
