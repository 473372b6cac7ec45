"""Pinhole cameras, look-at poses, orbit sampling and ray generation.

Conventions used everywhere in ``fewstep.threed``:

- ``Cameras.camera_to_world`` is a camera-to-world 4x4 matrix in the **OpenCV** convention:
  camera +x right, +y down, +z forward (the optical axis). ``Cameras.viewmats`` is its inverse
  (world-to-camera), the ``viewmats`` argument of gsplat's ``rasterization``.
- nerfstudio / NeRF / Blender store camera-to-world in the **OpenGL** convention (+x right,
  +y up, +z backwards, the camera looks along -z). The two differ by flipping the camera's y and
  z axes: ``c2w_gl = c2w_cv @ diag(1, -1, -1, 1)``; the flip is its own inverse.
- World up is +z (nerfstudio's world convention).
- Pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)`` in image coordinates, so its
  centre is at ``(col + 0.5, row + 0.5)``; a camera-space point ``(x, y, z)`` projects to
  ``(fx x / z + cx, fy y / z + cy)``. gsplat and nerfstudio use the same convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# Flips the camera's y and z axes: OpenCV <-> OpenGL (its own inverse).
_CV_GL_FLIP = (1.0, -1.0, -1.0, 1.0)


def opencv_to_opengl(c2w: Tensor) -> Tensor:
    """Camera-to-world (..., 4, 4) from OpenCV (y down, z forward) to OpenGL (y up, z back)."""
    flip = torch.tensor(_CV_GL_FLIP, dtype=c2w.dtype, device=c2w.device)
    return c2w * flip  # scales columns: c2w @ diag(flip)


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    """Camera-to-world (..., 4, 4) from OpenGL/nerfstudio to OpenCV; inverse of the above."""
    return opencv_to_opengl(c2w)


def _as_batch(x: Tensor | float, n: int, like: Tensor) -> Tensor:
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"expected a scalar or a tensor of shape ({n},), got {tuple(t.shape)}")
    return t.clone()


@dataclass
class Cameras:
    """A batch of C pinhole cameras that share one image size.

    Attributes: camera_to_world (C, 4, 4) OpenCV convention; fx, fy, cx, cy (C,) in pixels;
    width, height: image size in pixels.
    """

    camera_to_world: Tensor  # (C, 4, 4) camera-to-world, OpenCV convention (+z forward, +y down)
    fx: Tensor  # (C,) focal length along x, pixels
    fy: Tensor  # (C,) focal length along y, pixels
    cx: Tensor  # (C,) principal point x, pixels (image centre: width / 2)
    cy: Tensor  # (C,) principal point y, pixels (image centre: height / 2)
    width: int  # image width in pixels
    height: int  # image height in pixels

    def __post_init__(self) -> None:
        c2w = self.camera_to_world
        if c2w.ndim == 2:
            c2w = c2w[None]
        if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
            raise ValueError(f"camera_to_world must be (C, 4, 4), got {tuple(c2w.shape)}")
        self.camera_to_world = c2w
        n = c2w.shape[0]
        self.fx = _as_batch(self.fx, n, c2w)
        self.fy = _as_batch(self.fy, n, c2w)
        self.cx = _as_batch(self.cx, n, c2w)
        self.cy = _as_batch(self.cy, n, c2w)
        self.width, self.height = int(self.width), int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_fov(
        cls, camera_to_world: Tensor, fov_deg: float | Tensor, width: int, height: int
    ) -> Cameras:
        """Cameras with a vertical field of view (degrees), square pixels, centred principal
        point: ``fy = fx = 0.5 * height / tan(fov / 2)``."""
        c2w = camera_to_world if camera_to_world.ndim == 3 else camera_to_world[None]
        fov = torch.as_tensor(fov_deg, dtype=c2w.dtype, device=c2w.device)
        f = 0.5 * height / torch.tan(torch.deg2rad(fov) / 2)
        return cls(c2w, f, f, width / 2.0, height / 2.0, width, height)

    @classmethod
    def from_opengl(
        cls,
        camera_to_world_gl: Tensor,
        fx: Tensor | float,
        fy: Tensor | float,
        cx: Tensor | float,
        cy: Tensor | float,
        width: int,
        height: int,
    ) -> Cameras:
        """From nerfstudio/NeRF camera-to-world matrices (OpenGL convention)."""
        return cls(opengl_to_opencv(camera_to_world_gl), fx, fy, cx, cy, width, height)

    # -- views ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.camera_to_world.shape[0]

    def __getitem__(self, idx: int | slice | Tensor) -> Cameras:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return replace(
            self,
            camera_to_world=self.camera_to_world[idx],
            fx=self.fx[idx],
            fy=self.fy[idx],
            cx=self.cx[idx],
            cy=self.cy[idx],
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on another device / dtype."""
        return replace(
            self,
            camera_to_world=self.camera_to_world.to(device=device, dtype=dtype),
            fx=self.fx.to(device=device, dtype=dtype),
            fy=self.fy.to(device=device, dtype=dtype),
            cx=self.cx.to(device=device, dtype=dtype),
            cy=self.cy.to(device=device, dtype=dtype),
        )

    @property
    def device(self) -> torch.device:
        return self.camera_to_world.device

    @property
    def dtype(self) -> torch.dtype:
        return self.camera_to_world.dtype

    @property
    def viewmats(self) -> Tensor:
        """World-to-camera (C, 4, 4), OpenCV convention (gsplat's ``viewmats``)."""
        return rigid_inverse(self.camera_to_world)

    @property
    def camera_to_world_opengl(self) -> Tensor:
        """Camera-to-world (C, 4, 4) in the OpenGL / nerfstudio convention."""
        return opencv_to_opengl(self.camera_to_world)

    @property
    def centers(self) -> Tensor:
        """Camera centres in world coordinates (C, 3)."""
        return self.camera_to_world[:, :3, 3]

    @property
    def Ks(self) -> Tensor:  # noqa: N802 - the usual name for intrinsics matrices
        """Intrinsics (C, 3, 3): [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]."""
        K = torch.zeros(len(self), 3, 3, dtype=self.dtype, device=self.device)
        K[:, 0, 0], K[:, 1, 1] = self.fx, self.fy
        K[:, 0, 2], K[:, 1, 2] = self.cx, self.cy
        K[:, 2, 2] = 1.0
        return K

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """World points (N, 3) -> pixel coordinates (C, N, 2) and camera-space depth z (C, N)."""
        w2c = self.viewmats
        pc = torch.einsum("cij,nj->cni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
        z = pc[..., 2]
        u = self.fx[:, None] * pc[..., 0] / z + self.cx[:, None]
        v = self.fy[:, None] * pc[..., 1] / z + self.cy[:, None]
        return torch.stack([u, v], dim=-1), z


def rigid_inverse(m: Tensor) -> Tensor:
    """Inverse of rigid transforms (..., 4, 4): [R t]^-1 = [R^T, -R^T t]."""
    R, t = m[..., :3, :3], m[..., :3, 3:]
    out = torch.zeros_like(m)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


def look_at(
    eye: Tensor, target: Tensor | None = None, up: tuple[float, float, float] = (0.0, 0.0, 1.0)
) -> Tensor:
    """Camera-to-world (..., 4, 4), OpenCV convention, placing cameras at ``eye`` (..., 3) with
    the optical axis (+z) through ``target`` (..., 3; default origin) and image "up" (-y) as
    close to world ``up`` as possible. Where the view direction is parallel to ``up`` (looking
    straight down or up) another world axis stands in for ``up``."""
    if target is None:
        target = torch.zeros_like(eye)
    target = target.to(eye).expand_as(eye)
    forward = target - eye
    norm = forward.norm(dim=-1, keepdim=True)
    if bool((norm < 1e-12).any()):
        raise ValueError("look_at: eye and target coincide; the view direction is undefined")
    forward = forward / norm
    up_t = torch.tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    right = torch.linalg.cross(forward, up_t, dim=-1)
    # Fallback up axis where forward is (anti)parallel to up.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    if bool(degenerate.any()):
        alt = torch.tensor((0.0, 1.0, 0.0) if abs(up[1]) < 0.9 else (1.0, 0.0, 0.0))
        alt_right = torch.linalg.cross(forward, alt.to(eye).expand_as(eye), dim=-1)
        right = torch.where(degenerate, alt_right, right)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right, dim=-1)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2] = right, down, forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


Range = float | tuple[float, float]


@dataclass
class OrbitJitter:
    """Per-camera uniform perturbations (+/- each value) added to orbit cameras, as in the
    camera augmentation of DreamFusion-style score distillation. All zero: no jitter."""

    azimuth_deg: float = 0.0  # +/- azimuth offset, degrees
    elevation_deg: float = 0.0  # +/- elevation offset, degrees
    radius: float = 0.0  # +/- distance offset, world units
    fov_deg: float = 0.0  # +/- vertical field-of-view offset, degrees
    target: float = 0.0  # +/- offset of the look-at target along each world axis


def _sample(r: Range, n: int, g: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    if isinstance(r, tuple):
        lo, hi = r
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=dtype)
    return torch.full((n,), float(r), dtype=dtype)


def _pm(a: float, n: int, g: torch.Generator | None, dtype: torch.dtype, d: int = 0) -> Tensor:
    shape = (n,) if d == 0 else (n, d)
    if a == 0.0:
        return torch.zeros(shape, dtype=dtype)
    return a * (2 * torch.rand(shape, generator=g, dtype=dtype) - 1)


def orbit_cameras(
    n: int,
    radius: Range = 3.0,
    elevation: Range = 15.0,
    fov: Range = 40.0,
    size: int | tuple[int, int] = 64,
    *,
    random: bool = False,
    jitter: OrbitJitter | None = None,
    generator: torch.Generator | None = None,
    target: tuple[float, float, float] = (0.0, 0.0, 0.0),
    azimuth_start: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Cameras:
    """n cameras on a sphere around ``target`` (z up), all looking at it.

    ``random=False`` is a turntable: azimuths ``azimuth_start + 360 k / n``. ``random=True``
    draws azimuths uniformly in [0, 360). ``radius``, ``elevation`` (degrees above the xy plane)
    and ``fov`` (vertical, degrees) are each a value or a ``(low, high)`` range drawn uniformly
    per camera; ``jitter`` adds uniform perturbations on top. ``size`` is ``S`` or ``(W, H)``.
    Every draw uses ``generator`` so a seed reproduces the cameras.
    """
    if n <= 0:
        raise ValueError(f"orbit_cameras needs n >= 1, got {n}")
    g = generator
    if random:
        azimuth = 360.0 * torch.rand(n, generator=g, dtype=torch.float64)
    else:
        azimuth = azimuth_start + 360.0 * torch.arange(n, dtype=torch.float64) / n
    rad = _sample(radius, n, g, torch.float64)
    elev = _sample(elevation, n, g, torch.float64)
    fovs = _sample(fov, n, g, torch.float64)
    tgt = torch.tensor(target, dtype=torch.float64).expand(n, 3).clone()
    if jitter is not None:
        azimuth = azimuth + _pm(jitter.azimuth_deg, n, g, torch.float64)
        elev = elev + _pm(jitter.elevation_deg, n, g, torch.float64)
        rad = rad + _pm(jitter.radius, n, g, torch.float64)
        fovs = fovs + _pm(jitter.fov_deg, n, g, torch.float64)
        tgt = tgt + _pm(jitter.target, n, g, torch.float64, d=3)
    if bool((rad <= 0).any()):
        raise ValueError("orbit_cameras: radius (after jitter) must stay positive")
    az, el = torch.deg2rad(azimuth), torch.deg2rad(elev)
    eye = tgt + rad[:, None] * torch.stack(
        [torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], dim=-1
    )
    c2w = look_at(eye, tgt)
    w, h = (size, size) if isinstance(size, int) else size
    cams = Cameras.from_fov(c2w, fovs, w, h)
    return cams.to(device=device, dtype=dtype)


def fov_to_focal(fov_deg: float, size: int) -> float:
    """Focal length (pixels) for a field of view (degrees) across ``size`` pixels."""
    return 0.5 * size / math.tan(math.radians(fov_deg) / 2)


def pixel_grid(width: int, height: int, dtype=torch.float32, device=None) -> Tensor:
    """Pixel-centre image coordinates (H, W, 2) as (u, v) = (col + 0.5, row + 0.5)."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    """World-space rays through every pixel centre.

    Returns origins (C, H, W, 3) and unit directions (C, H, W, 3); distance along a ray is
    world distance.
    """
    uv = pixel_grid(cameras.width, cameras.height, cameras.dtype, cameras.device)
    x = (uv[None, ..., 0] - cameras.cx[:, None, None]) / cameras.fx[:, None, None]
    y = (uv[None, ..., 1] - cameras.cy[:, None, None]) / cameras.fy[:, None, None]
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # (C, H, W, 3), OpenCV camera
    R = cameras.camera_to_world[:, :3, :3]
    d = torch.einsum("cij,chwj->chwi", R, d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = cameras.centers[:, None, None, :].expand_as(d)
    return o, d
