"""Meshes from fields and Gaussians, geometry metrics and turntable GIFs, on open3d.

- ``mesh_from_volume(values, aabb, level, inside)``: marching cubes (Lorensen & Cline 1987, as
  ``skimage.measure.marching_cubes``) on a regular grid of values over a box, returned as an
  ``open3d.geometry.TriangleMesh`` with outward-facing triangles and vertex normals.
- ``mesh_from_field(field, resolution, level)``: the field's density sampled on the grid,
  the ``level`` iso-surface (inside = density above it), vertex colours from the field's rgb
  averaged over the six axis directions (or from ``color_fn``).
- ``mesh_from_gaussians(gaussians, resolution, level)``: the Gaussians' density splatted on a
  grid, ``D(x) = sum_i o_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i))`` (3DGS eq. 4 without
  projection), then marching cubes at ``level`` (an opacity-weighted density; 0.5 is the
  half-occupancy surface of an opaque cluster). Splatting rather than open3d's Poisson
  reconstruction because Poisson needs oriented normals, which Gaussians do not carry.
- ``save_mesh`` / ``read_mesh``: ``open3d.io`` (PLY, OBJ, OFF, GLB, STL by suffix).
- ``chamfer(a, b, n)``: symmetric Chamfer distance, the mean of the two directed mean
  nearest-neighbour Euclidean distances ``1/2 (mean_a d(a, B) + mean_b d(b, A))`` between
  ``n`` points sampled uniformly on each surface (open3d ``sample_points_uniformly``;
  distances by open3d ``compute_point_cloud_distance``). Unsquared, so two concentric spheres
  of radii r1, r2 are exactly |r1 - r2| apart.
- ``normal_consistency(a, b, n)``: mean |cos| between each sampled point's normal and its
  nearest neighbour's on the other surface, averaged over both directions (Occupancy
  Networks, Mescheder et al. 2019, sec. 4); 1 for identical surfaces.
- ``turntable_gif(render_fn, n_views, path)``: ``render_fn(azimuth_deg) -> (H, W, 3)`` in
  [0, 1] for evenly spaced azimuths, written as a looping GIF by PIL.

open3d and scikit-image are imported lazily (slow imports, only needed here).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.threed.fields import RadianceField

# Which side of the iso-level is the object: "above" (densities, occupancies) or "below"
# (signed distances, negative inside) -> skimage's gradient_direction giving outward faces
# (checked by the tests: vertex normals point away from a sphere's centre).
INSIDE = {"above": "ascent", "below": "descent"}


def _o3d():
    try:
        import open3d as o3d
    except ImportError as e:  # pragma: no cover - open3d is a dependency of fewstep-threed
        raise ImportError("meshes need open3d: pip install fewstep-threed") from e
    return o3d


def _aabb(aabb: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(torch.as_tensor(aabb, dtype=torch.float64).reshape(-1).cpu(), dtype=np.float64)
    if a.shape != (6,):
        raise ValueError(f"aabb must be 6 numbers (min xyz, max xyz), got shape {a.shape}")
    lo, hi = a[:3], a[3:]
    if not (hi > lo).all():
        raise ValueError(f"aabb max must exceed min on every axis, got {a.tolist()}")
    return lo, hi


def grid_points(aabb: Any, resolution: int) -> Tensor:
    """Vertices of a ``resolution``^3 grid spanning the box, (R, R, R, 3) indexed [x, y, z]."""
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    lo, hi = _aabb(aabb)
    axes = [torch.linspace(float(lo[i]), float(hi[i]), resolution) for i in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def mesh_from_volume(
    values: Tensor | np.ndarray,
    aabb: Any,
    level: float,
    inside: str = "above",
    colors_fn: Callable[[Tensor], Tensor] | None = None,
):
    """Marching cubes on ``values`` (R, R, R) indexed [x, y, z] at the vertices of a grid
    spanning ``aabb`` -> ``open3d.geometry.TriangleMesh`` in world units, triangles wound
    outward, vertex normals computed; ``colors_fn(vertices (V, 3)) -> (V, 3)`` in [0, 1]
    colours the vertices. ``inside``: "above" (density) or "below" (SDF)."""
    from skimage.measure import marching_cubes

    if inside not in INSIDE:
        raise ValueError(f"inside must be one of {sorted(INSIDE)}, got {inside!r}")
    vol = np.asarray(torch.as_tensor(values).detach().double().cpu())
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"values must be a cubic (R, R, R) grid, got shape {vol.shape}")
    if not (vol.min() < level < vol.max()):
        raise ValueError(
            f"level {level} is outside the values' range [{vol.min():.4g}, {vol.max():.4g}]: "
            "no surface to extract"
        )
    lo, hi = _aabb(aabb)
    spacing = tuple((hi - lo) / (vol.shape[0] - 1))
    verts, faces, _, _ = marching_cubes(
        vol, level=level, spacing=spacing, gradient_direction=INSIDE[inside]
    )
    verts = verts + lo
    o3d = _o3d()
    mesh = o3d.geometry.TriangleMesh()
    mesh.vertices = o3d.utility.Vector3dVector(verts)
    mesh.triangles = o3d.utility.Vector3iVector(faces.astype(np.int32))
    mesh.compute_vertex_normals()
    if colors_fn is not None:
        with torch.no_grad():
            c = colors_fn(torch.as_tensor(verts, dtype=torch.float32))
        mesh.vertex_colors = o3d.utility.Vector3dVector(c.double().clamp(0, 1).cpu().numpy())
    return mesh


@torch.no_grad()
def field_rgb(field: RadianceField, points: Tensor, chunk: int = 65536) -> Tensor:
    """The field's colour at ``points`` (N, 3) averaged over the six axis view directions."""
    dev = field.aabb.device
    eye = torch.eye(3)
    out = torch.zeros(points.shape[0], 3)
    for d in torch.cat([eye, -eye]):
        parts = [
            field(p.to(dev), d.expand(p.shape[0], 3).to(dev))[1].float().cpu()
            for p in points.split(chunk)
        ]
        out += torch.cat(parts) if parts else torch.zeros(0, 3)
    return out / 6.0


@torch.no_grad()
def mesh_from_field(
    field: RadianceField,
    resolution: int = 64,
    level: float = 5.0,
    color_fn: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 65536,
):
    """The ``level`` iso-surface of the field's density over its scene box (inside = denser)
    as an open3d mesh; vertex colours are ``color_fn(vertices)`` or the field's rgb
    averaged over the six axis directions."""
    pts = grid_points(field.aabb.cpu().reshape(-1), resolution).reshape(-1, 3)
    dev = field.aabb.device
    sigma = torch.cat([field.density(p.to(dev)).float().cpu() for p in pts.split(chunk)])
    vol = sigma.reshape(resolution, resolution, resolution)
    colors = color_fn or (lambda v: field_rgb(field, v, chunk))
    return mesh_from_volume(vol, field.aabb.cpu().reshape(-1), level, "above", colors)


@torch.no_grad()
def gaussian_density(gaussians, points: Tensor, chunk: int = 4096) -> Tensor:
    """Opacity-weighted Gaussian density ``sum_i o_i exp(-1/2 d_i^T Sigma_i^-1 d_i)`` at
    ``points`` (P, 3) -> (P,). Dense over all Gaussians (chunks of points): for the small
    models of tests and demos."""
    mu = gaussians.means.detach().float().cpu()
    inv = torch.linalg.inv(gaussians.covariance().detach().float().cpu())  # (N, 3, 3)
    op = gaussians.opacities.detach().float().cpu()
    out = []
    for p in points.float().split(chunk):
        d = p[:, None, :] - mu[None]  # (P, N, 3)
        m = torch.einsum("pni,nij,pnj->pn", d, inv, d)
        out.append((op[None] * torch.exp(-0.5 * m)).sum(-1))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def mesh_from_gaussians(
    gaussians, resolution: int = 48, level: float = 0.5, aabb: Any = None, pad: float = 0.1
):
    """Marching cubes on the splatted Gaussian density (``gaussian_density``) at ``level``
    over ``aabb`` (default: the means' bounding box grown by ``pad`` and 3 standard
    deviations); vertex colours are the nearest Gaussian's degree-0 SH colour."""
    from fewstep.threed.gaussians import SH_C0

    mu = gaussians.means.detach().float().cpu()
    if len(mu) == 0:
        raise ValueError("mesh_from_gaussians: no Gaussians")
    if aabb is None:
        reach = 3 * gaussians.scales.detach().float().cpu().amax() + pad
        aabb = torch.cat([mu.amin(0) - reach, mu.amax(0) + reach])
    pts = grid_points(aabb, resolution).reshape(-1, 3)
    vol = gaussian_density(gaussians, pts).reshape(resolution, resolution, resolution)
    rgb = (SH_C0 * gaussians.sh_dc.detach().float().cpu()[:, 0] + 0.5).clamp(0, 1)

    def colors(v: Tensor) -> Tensor:
        return rgb[torch.cdist(v, mu).argmin(-1)]

    return mesh_from_volume(vol, aabb, level, "above", colors)


def save_mesh(path: str | Path, mesh) -> Path:
    """Write an open3d triangle mesh; the format follows the suffix (.ply, .obj, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _o3d().io.write_triangle_mesh(str(path), mesh, write_vertex_normals=True):
        raise OSError(f"open3d could not write a mesh to {path} (unsupported suffix?)")
    return path


def read_mesh(path: str | Path):
    """Read a triangle mesh with open3d; a missing file or one without triangles is an error
    naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no mesh at {path}")
    mesh = _o3d().io.read_triangle_mesh(str(path))
    if len(mesh.triangles) == 0:
        raise ValueError(f"{path} holds no triangles (not a mesh, or unreadable)")
    return mesh


def _points_with_normals(x: Any, n: int, seed: int, need_normals: bool):
    """An open3d point cloud from a mesh (``n`` uniform samples with triangle normals), a
    point cloud, or an (N, 3) array/tensor of points."""
    o3d = _o3d()
    if isinstance(x, o3d.geometry.TriangleMesh):
        if len(x.triangles) == 0:
            raise ValueError("mesh has no triangles to sample")
        o3d.utility.random.seed(seed)
        return x.sample_points_uniformly(number_of_points=n, use_triangle_normal=True)
    if isinstance(x, o3d.geometry.PointCloud):
        pcd = x
    else:
        a = np.asarray(torch.as_tensor(x).detach().double().cpu())
        if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0:
            raise ValueError(f"points must be a non-empty (N, 3) array, got shape {a.shape}")
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(a))
    if need_normals and not pcd.has_normals():
        raise ValueError(
            "normal_consistency needs normals: pass meshes or point clouds with normals"
        )
    return pcd


def chamfer(a: Any, b: Any, n: int = 20000, seed: int = 0) -> float:
    """Symmetric Chamfer distance ``1/2 (mean_{p in A} min_{q in B} |p - q| + mean_{q in B}
    min_{p in A} |p - q|)``; meshes are sampled with ``n`` uniform points (seeded), point
    clouds / (N, 3) arrays are used as they are."""
    pa = _points_with_normals(a, n, seed, False)
    pb = _points_with_normals(b, n, seed + 1, False)
    dab = np.asarray(pa.compute_point_cloud_distance(pb))
    dba = np.asarray(pb.compute_point_cloud_distance(pa))
    return float(0.5 * (dab.mean() + dba.mean()))


def normal_consistency(a: Any, b: Any, n: int = 20000, seed: int = 0) -> float:
    """Mean |cos| between normals of nearest-neighbour pairs, averaged over A -> B and B -> A
    (nearest neighbours by scipy's cKDTree); inputs as in ``chamfer`` but with normals."""
    from scipy.spatial import cKDTree

    pa = _points_with_normals(a, n, seed, True)
    pb = _points_with_normals(b, n, seed + 1, True)
    xa, xb = np.asarray(pa.points), np.asarray(pb.points)
    na, nb = np.asarray(pa.normals), np.asarray(pb.normals)
    na = na / np.linalg.norm(na, axis=1, keepdims=True).clip(1e-12)
    nb = nb / np.linalg.norm(nb, axis=1, keepdims=True).clip(1e-12)
    _, iab = cKDTree(xb).query(xa)
    _, iba = cKDTree(xa).query(xb)
    cab = np.abs((na * nb[iab]).sum(1)).mean()
    cba = np.abs((nb * na[iba]).sum(1)).mean()
    return float(0.5 * (cab + cba))


def turntable_gif(
    render_fn: Callable[[float], Tensor],
    n_views: int,
    path: str | Path,
    duration_ms: int = 120,
    upscale: int = 1,
) -> Path:
    """Render ``n_views`` frames at azimuths ``360 k / n_views`` (degrees) with
    ``render_fn(azimuth) -> (H, W, 3)`` in [0, 1] and write a looping GIF (PIL)."""
    from PIL import Image

    if n_views < 1:
        raise ValueError(f"turntable_gif needs n_views >= 1, got {n_views}")
    frames = []
    for k in range(n_views):
        with torch.no_grad():
            img = torch.as_tensor(render_fn(360.0 * k / n_views)).detach().float().cpu()
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"render_fn must return (H, W, 3) images, got {tuple(img.shape)}")
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        im = Image.fromarray(arr, "RGB")
        if upscale > 1:
            im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
        frames.append(im)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.gif")
    frames[0].save(
        tmp, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0, format="GIF"
    )
    tmp.replace(path)
    return path
