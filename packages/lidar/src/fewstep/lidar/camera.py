"""Pinhole cameras on the vehicle: RGB images of a :class:`~fewstep.lidar.scenes.Scene` by ray
casting, and the sparse depth map that a LiDAR scan projects to.

Frames: the vehicle frame is the LiDAR sensor frame of :mod:`fewstep.lidar.sensor` (x forward,
y left, z up; a pose maps it to the world). Each camera uses OpenCV's convention (x right,
y down, z along the optical axis), looks horizontally at azimuth ``yaw`` (degrees,
counter-clockwise from x) and sits ``z_offset`` metres above the LiDAR. Intrinsics: square
pixels, ``fx = fy = (width / 2) / tan(fov_x / 2)``, principal point at the image centre. A point
(X, Y, Z) in the camera frame lands at the continuous pixel coordinate
``(u, v) = (fx X / Z + cx, fy Y / Z + cy)``; pixel (row i, column j) covers
``[j, j + 1) x [i, i + 1)``, so its centre is ``(j + 0.5, i + 0.5)`` (open3d's
``RaycastingScene.create_rays_pinhole`` casts through the same centres, with directions whose
optical-axis component is 1, so its ``t_hit`` is the z-depth).

Rendering (:func:`render`): colour = per-class RGB albedo x (ambient + diffuse |n . l|) under a
fixed sun, plus Gaussian texture noise of std ``noise`` per pixel; rays that hit nothing get
the sky colour. Depth is the z-depth of the hit (0 for sky).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewstep.lidar.scenes import INVALID_ID, Scene, o3d_module

# RGB albedo per SemanticKITTI class (made up, but distinct enough for a small CNN: dark road,
# grey sidewalk, red-ish cars, ...); unknown classes get DEFAULT_RGB
CLASS_RGB: dict[int, tuple[float, float, float]] = {
    40: (0.25, 0.25, 0.27),  # road
    48: (0.55, 0.55, 0.52),  # sidewalk
    72: (0.35, 0.5, 0.25),  # terrain
    50: (0.7, 0.6, 0.5),  # building
    10: (0.8, 0.15, 0.12),  # car
    80: (0.6, 0.6, 0.65),  # pole
    71: (0.4, 0.28, 0.15),  # trunk
    70: (0.15, 0.55, 0.15),  # vegetation
}
DEFAULT_RGB = (0.5, 0.5, 0.5)
SKY_RGB = (0.6, 0.75, 0.95)
_RGB_TABLE = np.array([CLASS_RGB.get(c, DEFAULT_RGB) for c in range(260)], dtype=np.float32)
_SUN = np.array([0.3, 0.2, 0.93]) / np.linalg.norm([0.3, 0.2, 0.93])  # towards the sun, world


@dataclass
class CameraConfig:
    yaws: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)  # azimuth of each view, degrees
    fov_x: float = 90.0  # horizontal field of view, degrees
    height: int = 32  # image rows
    width: int = 64  # image columns
    z_offset: float = -0.2  # camera height above the LiDAR, metres
    ambient: float = 0.35  # ambient light fraction
    noise: float = 0.03  # std of per-pixel Gaussian texture noise (colour units)

    def __post_init__(self):
        if not self.yaws:
            raise ValueError("CameraConfig needs at least one view (yaws)")
        if not 0.0 < self.fov_x < 180.0:
            raise ValueError(f"fov_x must lie in (0, 180) degrees, got {self.fov_x}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")


def intrinsics(cfg: CameraConfig) -> np.ndarray:
    """(3, 3) pinhole matrix K shared by every view."""
    f = (cfg.width / 2) / np.tan(np.deg2rad(cfg.fov_x) / 2)
    return np.array([[f, 0.0, cfg.width / 2], [0.0, f, cfg.height / 2], [0.0, 0.0, 1.0]])


def cam_to_vehicle(cfg: CameraConfig) -> np.ndarray:
    """(V, 4, 4) camera -> vehicle transforms, one per view (OpenCV camera axes)."""
    out = np.tile(np.eye(4), (len(cfg.yaws), 1, 1))
    for k, yaw in enumerate(np.deg2rad(np.asarray(cfg.yaws, dtype=np.float64))):
        c, s = np.cos(yaw), np.sin(yaw)
        # columns: camera x (right), y (down), z (forward) in vehicle axes
        out[k, :3, :3] = np.array([[s, 0.0, c], [-c, 0.0, s], [0.0, -1.0, 0.0]])
        out[k, 2, 3] = cfg.z_offset
    return out


def project(points: np.ndarray, cfg: CameraConfig) -> tuple[np.ndarray, np.ndarray]:
    """Vehicle-frame points (N, 3) -> (uv (V, N, 2) continuous pixel coords, z (V, N) depth).

    Points behind a camera get z <= 0 (their uv is meaningless)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {pts.shape}")
    k = intrinsics(cfg)
    veh_to_cam = np.linalg.inv(cam_to_vehicle(cfg))  # (V, 4, 4)
    cam = np.einsum("vij,nj->vni", veh_to_cam[:, :3, :3], pts) + veh_to_cam[:, None, :3, 3]
    z = cam[..., 2]
    safe = np.where(np.abs(z) < 1e-9, 1e-9, z)
    uv = np.stack([k[0, 0] * cam[..., 0] / safe + k[0, 2], k[1, 1] * cam[..., 1] / safe + k[1, 2]])
    return np.moveaxis(uv, 0, -1), z


def sparse_depth(points: np.ndarray, cfg: CameraConfig) -> np.ndarray:
    """(V, H, W) float32 depth map of vehicle-frame LiDAR points (N, 3): per pixel the nearest
    projected point's z-depth, 0 where no point lands (as BEVDepth's projected LiDAR depth)."""
    uv, z = project(points, cfg)
    out = np.full((len(cfg.yaws), cfg.height * cfg.width), np.inf, dtype=np.float64)
    for v in range(len(cfg.yaws)):
        col, row = np.floor(uv[v, :, 0]), np.floor(uv[v, :, 1])
        ok = (z[v] > 0) & (col >= 0) & (col < cfg.width) & (row >= 0) & (row < cfg.height)
        idx = (row[ok] * cfg.width + col[ok]).astype(np.int64)
        np.minimum.at(out[v], idx, z[v][ok])  # nearest point wins a shared pixel
    out[~np.isfinite(out)] = 0.0
    return out.reshape(len(cfg.yaws), cfg.height, cfg.width).astype(np.float32)


def render(
    scene: Scene,
    pose: np.ndarray,
    cfg: CameraConfig,
    rng: np.random.Generator | int | None = None,
) -> dict[str, np.ndarray]:
    """Images of ``scene`` from the vehicle at ``pose`` (4, 4) vehicle -> world.

    Returns ``dict(rgb (V, 3, H, W) float32 in [0, 1], depth (V, H, W) float32 z-depth of the
    hit (0 = sky), labels (V, H, W) uint32 semantic id (0 = sky))``."""
    o3d = o3d_module()
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"pose must be a (4, 4) vehicle-to-world matrix, got {pose.shape}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    k = o3d.core.Tensor(intrinsics(cfg))
    rays = []
    for c2v in cam_to_vehicle(cfg):
        world_to_cam = np.linalg.inv(pose @ c2v)
        rays.append(
            o3d.t.geometry.RaycastingScene.create_rays_pinhole(
                k, o3d.core.Tensor(world_to_cam), cfg.width, cfg.height
            ).numpy()
        )
    rays = np.stack(rays).reshape(-1, 6).astype(np.float32)  # (V H W, 6)
    hit = scene.raycasting_scene().cast_rays(o3d.core.Tensor(rays))
    gid = hit["geometry_ids"].numpy()
    ok = gid != INVALID_ID
    labels = np.zeros(len(gid), dtype=np.uint32)
    labels[ok] = scene.lookup(gid[ok], hit["primitive_ids"].numpy()[ok])[0]
    # the optical-axis component of each direction is 1, so t_hit is the z-depth
    depth = np.where(ok, hit["t_hit"].numpy(), 0.0)
    normals = hit["primitive_normals"].numpy().astype(np.float64)
    shade = cfg.ambient + (1.0 - cfg.ambient) * np.abs(normals @ _SUN)
    rgb = np.where(ok[:, None], _RGB_TABLE[np.minimum(labels, 259)] * shade[:, None], SKY_RGB)
    rgb = rgb + cfg.noise * gen.standard_normal(rgb.shape)
    shape = (len(cfg.yaws), cfg.height, cfg.width)
    return {
        "rgb": np.clip(rgb, 0.0, 1.0).reshape(*shape, 3).transpose(0, 3, 1, 2).astype(np.float32),
        "depth": depth.reshape(shape).astype(np.float32),
        "labels": labels.reshape(shape),
    }
