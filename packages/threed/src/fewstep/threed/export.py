"""Export Gaussians and radiance fields as open3d point clouds (PLY, PCD, XYZ, ... through
``open3d.io``), for viewers and tools that read point clouds rather than 3DGS PLY files.

- ``to_point_cloud(gaussians)``: one point per Gaussian at its mean, coloured by its
  view-independent (degree-0 SH) colour, optionally only Gaussians above an opacity.
- ``field_point_cloud(field)``: a field's density sampled on a regular grid over its scene box;
  the vertices whose density exceeds a threshold become points (no marching cubes: no mesh
  topology is needed to inspect a distilled field), coloured by the field's rgb averaged over
  a few view directions, with normals along minus the density gradient (open3d can mesh them
  with ``TriangleMesh.create_from_point_cloud_poisson``).

open3d is imported lazily (its import is slow and it is only needed here).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from fewstep.threed.fields import RadianceField
from fewstep.threed.gaussians import SH_C0, Gaussians


def _o3d():
    try:
        import open3d as o3d
    except ImportError as e:  # pragma: no cover - open3d is a dependency of fewstep-threed
        raise ImportError("point-cloud export needs open3d: pip install fewstep-threed") from e
    return o3d


def _cloud(points: Tensor, colors: Tensor, normals: Tensor | None = None):
    o3d = _o3d()
    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(points.detach().double().cpu().numpy())
    pcd.colors = o3d.utility.Vector3dVector(colors.detach().double().clamp(0, 1).cpu().numpy())
    if normals is not None:
        pcd.normals = o3d.utility.Vector3dVector(normals.detach().double().cpu().numpy())
    return pcd


def to_point_cloud(gaussians: Gaussians, min_opacity: float = 0.0):
    """Gaussians -> ``open3d.geometry.PointCloud``: means (N, 3) with the 3DGS degree-0 colour
    ``clamp(C0 * sh_dc + 0.5, 0, 1)``, keeping Gaussians with opacity >= ``min_opacity``."""
    with torch.no_grad():
        keep = gaussians.opacities >= min_opacity
        rgb = SH_C0 * gaussians.sh_dc[:, 0] + 0.5
        return _cloud(gaussians.means[keep], rgb[keep])


@torch.no_grad()
def field_point_cloud(
    field: RadianceField,
    resolution: int = 64,
    threshold: float = 5.0,
    n_dirs: int = 6,
    chunk: int = 65536,
):
    """Grid vertices (``resolution``^3 over the field's box) with density > ``threshold``
    as an ``open3d.geometry.PointCloud``; colours average the field's rgb over ``n_dirs``
    fixed directions (the +-x, +-y, +-z axes for 6), normals are -grad(density) normalised
    (central differences on the grid)."""
    if resolution < 3:
        raise ValueError(f"resolution must be >= 3, got {resolution}")
    lo, hi = field.aabb[0].float().cpu(), field.aabb[1].float().cpu()
    u = torch.linspace(0, 1, resolution)
    axes = [lo[i] + (hi[i] - lo[i]) * u for i in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    dev = field.aabb.device
    sigma = torch.cat([field.density(p.to(dev)).float().cpu() for p in grid.split(chunk)])
    vol = sigma.reshape(resolution, resolution, resolution)
    gx, gy, gz = torch.gradient(vol, spacing=[float(a[1] - a[0]) for a in axes])
    normals = -torch.stack([gx, gy, gz], -1).reshape(-1, 3)
    keep = sigma > threshold
    pts = grid[keep]
    normals = torch.nn.functional.normalize(normals[keep], dim=-1)
    eye = torch.eye(3)
    dirs = torch.cat([eye, -eye])[: max(1, min(n_dirs, 6))]
    rgb = torch.zeros(pts.shape[0], 3)
    for d in dirs:
        parts = [
            field(p.to(dev), d.expand(p.shape[0], 3).to(dev))[1].float().cpu()
            for p in pts.split(chunk)
        ]
        rgb += torch.cat(parts) if parts else torch.zeros(0, 3)
    return _cloud(pts, rgb / len(dirs), normals)


def save_point_cloud(path: str | Path, cloud) -> Path:
    """Write an open3d point cloud; the format follows the suffix (.ply, .pcd, .xyz, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _o3d().io.write_point_cloud(str(path), cloud):
        raise OSError(f"open3d could not write a point cloud to {path} (unsupported suffix?)")
    return path


def read_point_cloud(path: str | Path):
    """Read a point cloud with open3d; a missing or empty file is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no point cloud at {path}")
    return _o3d().io.read_point_cloud(str(path))
