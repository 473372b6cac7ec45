"""geometry_eval: marching cubes meshes, Chamfer / normal consistency, mesh I/O, GIF turntables."""

import numpy as np
import open3d as o3d
import pytest
import torch

from fewstep.threed.fields import VoxelField
from fewstep.threed.gaussians import Gaussians
from fewstep.threed.geometry_eval import (
    chamfer,
    grid_points,
    mesh_from_field,
    mesh_from_gaussians,
    mesh_from_volume,
    normal_consistency,
    read_mesh,
    save_mesh,
    turntable_gif,
)

AABB = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)


def sphere(r: float):
    return o3d.geometry.TriangleMesh.create_sphere(radius=r, resolution=60)


def test_chamfer_identical_is_zero_and_normal_consistency_one():
    m = sphere(0.5)
    # the same mesh, sampled with the same seed on both sides: identical point sets
    pts = np.asarray(m.sample_points_uniformly(2000).points)
    assert chamfer(pts, pts) == 0.0
    assert chamfer(m, m, n=4000) < 0.02  # independent samples of one surface: spacing only
    assert normal_consistency(m, m, n=4000) == pytest.approx(1.0, abs=0.01)


def test_chamfer_of_concentric_spheres_is_radius_difference():
    d = chamfer(sphere(0.5), sphere(0.7), n=20000)
    # nearest points on concentric spheres are radial: |r1 - r2| up to tessellation/sampling
    assert d == pytest.approx(0.2, abs=0.01)
    # a wrong reduction (squared, or summed directions) would give 0.04 or 0.4
    assert normal_consistency(sphere(0.5), sphere(0.7), n=5000) > 0.98


def test_normal_consistency_detects_rotated_normals():
    m = sphere(0.5)
    pcd = m.sample_points_uniformly(3000, use_triangle_normal=True)
    n = np.asarray(pcd.normals)
    pcd.normals = o3d.utility.Vector3dVector(np.cross(n, [0.0, 0.0, 1.0]) + 1e-9)  # tangent
    assert normal_consistency(m, pcd, n=3000) < 0.8
    with pytest.raises(ValueError, match="needs normals"):
        normal_consistency(m, np.asarray(pcd.points))


def test_marching_cubes_on_sphere_sdf_has_the_right_radius_and_outward_normals():
    p = grid_points(AABB, 48)
    sdf = p.norm(dim=-1) - 0.6
    mesh = mesh_from_volume(sdf, AABB, 0.0, inside="below")
    v = np.asarray(mesh.vertices)
    assert np.abs(np.linalg.norm(v, axis=1) - 0.6).max() < 0.01
    n = np.asarray(mesh.vertex_normals)
    assert ((n * v).sum(1) > 0).mean() > 0.99  # outward
    # same surface from a density field (inside above the level)
    mesh2 = mesh_from_volume(-sdf, AABB, 0.0, inside="above")
    assert chamfer(np.asarray(mesh.vertices), np.asarray(mesh2.vertices)) < 1e-6
    assert ((np.asarray(mesh2.vertex_normals) * np.asarray(mesh2.vertices)).sum(1) > 0).all()
    with pytest.raises(ValueError, match="outside the values' range"):
        mesh_from_volume(sdf, AABB, 5.0, inside="below")
    with pytest.raises(ValueError, match="inside must be one of"):
        mesh_from_volume(sdf, AABB, 0.0, inside="outside")


def test_mesh_from_field_sphere_radius_and_colours():
    p = grid_points(AABB, 33)
    density = 20.0 * torch.sigmoid((0.5 - p.norm(dim=-1)) / 0.05)
    rgb = torch.zeros(33, 33, 33, 3)
    rgb[..., 0] = 0.8
    rgb[..., 1] = 0.3
    rgb[..., 2] = 0.1
    field = VoxelField.from_grids(density, rgb)
    mesh = mesh_from_field(field, resolution=40, level=10.0)
    r = np.linalg.norm(np.asarray(mesh.vertices), axis=1)
    assert np.abs(r - 0.5).mean() < 0.02
    c = np.asarray(mesh.vertex_colors)
    np.testing.assert_allclose(c.mean(0), [0.8, 0.3, 0.1], atol=0.01)
    ref = sphere(0.5)
    assert chamfer(mesh, ref, n=5000) < 0.03
    assert normal_consistency(mesh, ref, n=5000) > 0.95


def test_mesh_from_gaussians_blob_and_roundtrip(tmp_path):
    # a dense ball of small opaque Gaussians of radius 0.4
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(600, 3, generator=g)
    pts = 0.4 * pts / pts.norm(dim=-1, keepdim=True) * torch.rand(600, 1, generator=g) ** (1 / 3)
    gs = Gaussians.from_points(pts)
    with torch.no_grad():
        gs.log_scales.fill_(np.log(0.06))
        gs.opacity_logits.fill_(4.0)
    mesh = mesh_from_gaussians(gs, resolution=32, level=0.5)
    r = np.linalg.norm(np.asarray(mesh.vertices), axis=1)
    assert 0.35 < r.mean() < 0.55
    path = save_mesh(tmp_path / "m.ply", mesh)
    back = read_mesh(path)
    assert len(back.triangles) == len(mesh.triangles)
    np.testing.assert_allclose(np.asarray(back.vertices), np.asarray(mesh.vertices), atol=1e-5)
    assert back.has_vertex_colors()
    with pytest.raises(FileNotFoundError, match="no mesh at"):
        read_mesh(tmp_path / "missing.ply")


def test_turntable_gif(tmp_path):
    from PIL import Image

    def render(az):
        img = torch.zeros(8, 10, 3)
        img[..., 0] = az / 360.0
        return img

    path = turntable_gif(render, 4, tmp_path / "t.gif")
    im = Image.open(path)
    assert im.format == "GIF" and im.n_frames == 4 and im.size == (10, 8)
    with pytest.raises(ValueError, match="n_views >= 1"):
        turntable_gif(render, 0, tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        turntable_gif(lambda a: torch.zeros(4, 4), 2, tmp_path / "y.gif")
