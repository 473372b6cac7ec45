"""3-D Gaussian splatting: the Gaussian container, a differentiable renderer, densification
and the standard PLY format.

3DGS = Kerbl, Kopanas, Leimkühler, Drettakis, "3D Gaussian Splatting for Real-Time Radiance
Field Rendering", SIGGRAPH 2023. EWA = Zwicker, Pfister, van Baar, Gross, "EWA Volume
Splatting", IEEE Visualization 2001 / "EWA Splatting", TVCG 2002.

Why fewstep carries its own renderer: gsplat (the CUDA rasteriser nerfstudio uses) has no CPU
path, and fewstep's tests, demos and small distillation runs must work on CPU-only machines.
``rasterize_gaussians`` therefore dispatches through ``RASTERIZERS``: gsplat's
``rasterization`` when ``import gsplat`` works and the tensors live on CUDA, else the
pure-PyTorch renderer below, which follows the same math and conventions (a test marked
``gpu`` compares the two on one scene). The PyTorch renderer lists every (Gaussian, pixel)
pair inside each Gaussian's opacity-aware bounding box, so time and memory grow with the
total screen area the Gaussians cover: it is meant for small scenes (thousands of Gaussians,
images up to about 128 px), not for full-size 3DGS training.

Conventions: cameras are ``fewstep.threed.cameras.Cameras`` (OpenCV, camera-to-world);
quaternions are (w, x, y, z) and need not be normalised; images are channel-last
(C, H, W, 3), colours in [0, +inf) (SH colours are clamped at 0, not at 1), alpha in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.threed.cameras import Cameras

# ---------------------------------------------------------------------------------------------
# Spherical harmonics (real SH, the constants and sign conventions of 3DGS's eval_sh)
# ---------------------------------------------------------------------------------------------

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)
MAX_SH_DEGREE = 3


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients K = (degree + 1)^2 for degree 0..3."""
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"SH degree must be in 0..{MAX_SH_DEGREE}, got {degree}")
    return (degree + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    """Inverse of ``num_sh_bases``: K in {1, 4, 9, 16} -> degree."""
    d = round(math.sqrt(k)) - 1
    if (d + 1) ** 2 != k or not 0 <= d <= MAX_SH_DEGREE:
        raise ValueError(f"expected 1, 4, 9 or 16 SH coefficients per channel, got {k}")
    return d


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis functions at unit directions ``dirs`` (..., 3) -> (..., (degree+1)^2),
    ordered and signed as 3DGS's ``eval_sh`` (band by band, m = -l..l)."""
    num_sh_bases(degree)
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [
            SH_C2[0] * xy,
            SH_C2[1] * yz,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * xz,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * xy * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Colour from SH: coeffs (..., K, 3) with K >= (degree+1)^2, dirs (..., 3) (normalised
    here) -> (..., 3), without the +0.5 offset (see ``sh_to_color``)."""
    k = num_sh_bases(degree)
    if coeffs.shape[-2] < k:
        raise ValueError(f"SH degree {degree} needs {k} coefficients, got {coeffs.shape[-2]}")
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))  # (..., k)
    return (basis[..., None] * coeffs[..., :k, :]).sum(-2)


def sh_to_color(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """3DGS colour: ``max(eval_sh + 0.5, 0)`` (..., 3)."""
    return torch.clamp_min(eval_sh(degree, coeffs, dirs) + 0.5, 0.0)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """Degree-0 coefficient whose colour is ``rgb``: (rgb - 0.5) / C0."""
    return (rgb - 0.5) / SH_C0


# ---------------------------------------------------------------------------------------------
# Geometry: covariance, EWA projection
# ---------------------------------------------------------------------------------------------


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices (..., 3, 3) from quaternions (..., 4) in (w, x, y, z) order
    (normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    r = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return r.reshape(*quats.shape[:-1], 3, 3)


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """Sigma = R S S^T R^T (3DGS eq. 6): quats (N, 4), scales (N, 3) -> (N, 3, 3)."""
    m = quat_to_rotmat(quats) * scales[..., None, :]  # R S
    return m @ m.transpose(-1, -2)


@dataclass
class RasterConfig:
    """Rasterisation constants; the defaults are 3DGS's (gsplat: alpha_max 0.999)."""

    eps2d: float = 0.3  # low-pass dilation added to the 2-D covariance, pixels^2 (3DGS, gsplat)
    near_plane: float = 0.01  # Gaussians with camera depth z <= near_plane are culled
    far_plane: float = 1e10  # ... and z >= far_plane
    alpha_min: float = 1.0 / 255.0  # a Gaussian whose alpha at a pixel is below this is skipped
    alpha_max: float = 0.99  # alpha is clamped to this (3DGS; gsplat hard-codes 0.999)
    transmittance_min: float = 1e-4  # stop a pixel before its transmittance drops below this
    tile_size: int = 16  # tile side in pixels (gsplat backend only)


@dataclass
class Projection:
    """Screen-space Gaussians for C cameras and N Gaussians."""

    means2d: Tensor  # (C, N, 2) projected centres, pixels
    cov2d: Tensor  # (C, N, 2, 2) EWA covariance J W Sigma W^T J^T, before the low-pass
    conics: Tensor  # (C, N, 3) inverse of (cov2d + eps2d I) as (a, b, c): [[a, b], [b, c]]
    depths: Tensor  # (C, N) camera-space z
    radii: Tensor  # (C, N) int, ceil(3 sqrt(largest eigenvalue)) as 3DGS; 0 where culled
    valid: Tensor  # (C, N) bool, renderable and its 3-sigma disc overlaps the image
    renderable: Tensor  # (C, N) bool, between the near and far planes, invertible covariance


def project_gaussians(
    means: Tensor, covars: Tensor, cameras: Cameras, config: RasterConfig | None = None
) -> Projection:
    """EWA splatting of 3-D Gaussians into C pinhole cameras.

    means (N, 3), covars (N, 3, 3) in world space. The 2-D covariance is
    ``Sigma' = J W Sigma W^T J^T`` (3DGS eq. 5; Zwicker et al. 2002's local affine
    approximation of the projective map) with W the
    world-to-camera rotation and J the Jacobian of the perspective map
    ``(x, y, z) -> (fx x / z + cx, fy y / z + cy)`` at the camera-space mean,
    ``J = [[fx/z, 0, -fx x/z^2], [0, fy/z, -fy y/z^2]]``. As 3DGS/gsplat, x/z and y/z inside J
    are clamped to 1.3x the field of view so Gaussians far off-screen do not blow up.
    """
    cfg = config or RasterConfig()
    w2c = cameras.viewmats.to(means)
    R, t = w2c[:, :3, :3], w2c[:, :3, 3]
    mc = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # (C, N, 3)
    cov_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # (C, N, 3, 3)
    tx, ty, tz = mc.unbind(-1)
    in_front = (tz > cfg.near_plane) & (tz < cfg.far_plane)
    z = torch.where(in_front, tz, torch.ones_like(tz))  # keeps culled entries finite
    fx, fy = cameras.fx.to(means)[:, None], cameras.fy.to(means)[:, None]
    cx, cy = cameras.cx.to(means)[:, None], cameras.cy.to(means)[:, None]
    W, H = cameras.width, cameras.height
    tan_x, tan_y = 0.5 * W / fx, 0.5 * H / fy
    xz = torch.clamp(tx / z, min=-(cx / fx + 0.3 * tan_x), max=(W - cx) / fx + 0.3 * tan_x)
    yz = torch.clamp(ty / z, min=-(cy / fy + 0.3 * tan_y), max=(H - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * xz / z, zero, fy / z, -fy * yz / z], dim=-1)
    J = J.reshape(*z.shape, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2)  # (C, N, 2, 2)
    means2d = torch.stack([fx * tx / z + cx, fy * ty / z + cy], dim=-1)

    a = cov2d[..., 0, 0] + cfg.eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + cfg.eps2d
    det = a * c - b * b
    ok = in_front & (det > 0)
    det_safe = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(lam.clamp_min(0)))
        mx, my = means2d[..., 0], means2d[..., 1]
        on_screen = (mx + radius > 0) & (mx - radius < W) & (my + radius > 0) & (my - radius < H)
        valid = ok & on_screen
        radii = torch.where(valid, radius, torch.zeros_like(radius)).int()
    return Projection(means2d, cov2d, conics, tz, radii, valid, ok)


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch rasteriser: sparse (Gaussian, pixel) pairs, depth-sorted per pixel,
# front-to-back alpha compositing
# ---------------------------------------------------------------------------------------------


def _candidate_pairs(
    means2d: Tensor,
    cov_diag: Tensor,
    opacities: Tensor,
    depths: Tensor,
    valid: Tensor,
    width: int,
    height: int,
    cfg: RasterConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every (camera-Gaussian, pixel) pair that can reach alpha >= alpha_min.

    A Gaussian reaches alpha >= alpha_min only where d^T Sigma'^-1 d <= 2 ln(o / alpha_min),
    an ellipse whose bounding box has half-widths sqrt(2 ln(o / alpha_min) Sigma'_xx) and
    sqrt(2 ln(o / alpha_min) Sigma'_yy) (gsplat's opacity-aware bound), so enumerating the
    pixel centres in that box drops nothing the compositing would keep: like 3DGS's tiles, the
    box only saves work. Pairs come out grouped by Gaussian in front-to-back order per camera.

    means2d, cov_diag (C, N, 2); opacities (N,); depths, valid (C, N) (renderable).
    Returns gid (M,) into the flattened C * N Gaussians, pixel (M,) = (c * H + row) * W + col
    and the pixel centre xy (M, 2) = (col + 0.5, row + 0.5).
    """
    C, N = depths.shape
    device = means2d.device
    o = opacities[None].expand(C, N)
    ext2 = 2.0 * torch.log(torch.clamp(o / cfg.alpha_min, min=1.0))
    vis = valid & (o >= cfg.alpha_min)
    half = torch.sqrt(ext2[..., None] * cov_diag.clamp_min(0))  # (C, N, 2)
    lo = torch.ceil(means2d - half - 0.5)  # pixel centres col + 0.5 within [m - h, m + h]
    hi = torch.floor(means2d + half - 0.5)
    lim = torch.tensor([width - 1, height - 1], device=device, dtype=lo.dtype)
    lo, hi = torch.maximum(lo, torch.zeros_like(lo)), torch.minimum(hi, lim)
    vis = vis & (lo <= hi).all(-1)
    lo = torch.where(vis[..., None], lo, torch.zeros_like(lo)).long()
    hi = torch.where(vis[..., None], hi, torch.zeros_like(hi)).long()
    span = (hi - lo + 1) * vis[..., None]  # (C, N, 2)
    counts = span[..., 0] * span[..., 1]
    depth_key = torch.where(vis, depths, torch.full_like(depths, math.inf))
    order = torch.argsort(depth_key, dim=1, stable=True)
    flat = (order + torch.arange(C, device=device)[:, None] * N).flatten()
    cnt = counts.flatten()[flat]
    gid = torch.repeat_interleave(flat, cnt)
    start = torch.cumsum(cnt, 0) - cnt
    local = torch.arange(gid.numel(), device=device) - torch.repeat_interleave(start, cnt)
    span_f, lo_f = span.reshape(-1, 2), lo.reshape(-1, 2)
    wx = span_f[:, 0].index_select(0, gid).clamp_min(1)
    col = lo_f[:, 0].index_select(0, gid) + local % wx
    row = lo_f[:, 1].index_select(0, gid) + local // wx
    pixel = ((gid // N) * height + row) * width + col
    xy = torch.stack([col, row], -1).to(means2d.dtype) + 0.5
    return gid, pixel, xy


def _gaussian_alpha(pix_xy: Tensor, g: Tensor, cfg: RasterConfig) -> tuple[Tensor, Tensor]:
    """alpha = min(alpha_max, o exp(-1/2 d^T Sigma'^-1 d)) at pixel centres (3DGS Sec. 4's
    2-D Gaussian times opacity, with its forward kernel's clamp). Per pair: pix_xy (M, 2);
    g (M, 6) holds the projected mean (2), the conic (a, b, c) of [[a, b], [b, c]] and the
    opacity. Returns alpha (M,) and the exponent sigma (M,)."""
    dx, dy = pix_xy[:, 0] - g[:, 0], pix_xy[:, 1] - g[:, 1]
    sigma = 0.5 * (g[:, 2] * dx * dx + g[:, 4] * dy * dy) + g[:, 3] * dx * dy
    return torch.clamp_max(g[:, 5] * torch.exp(-sigma), cfg.alpha_max), sigma


def _rasterize_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    backgrounds: Tensor | None,
    sh_degree: int | None,
    cfg: RasterConfig,
) -> dict:
    """Front-to-back compositing per pixel over its depth-sorted Gaussians:
    ``C = sum_i c_i alpha_i T_i``, ``T_i = prod_{j<i} (1 - alpha_j)`` (3DGS eq. 3), skipping
    alpha < alpha_min and stopping before the Gaussian that would take T below
    transmittance_min (3DGS's forward kernel). T is computed as exp of a per-pixel cumulative
    sum of log(1 - alpha) in float64 over the sorted pairs."""
    C, N = len(cameras), means.shape[0]
    W, H = cameras.width, cameras.height
    proj = project_gaussians(means, covariance_3d(quats, scales), cameras, cfg)
    if proj.means2d.requires_grad:
        proj.means2d.retain_grad()  # densification statistics read its gradient (3DGS, gsplat)
    cols = _view_colors(means, colors, cameras, sh_degree)  # (C, N, D)
    D = cols.shape[-1]
    opac = opacities[None].expand(C, N)[..., None]
    ones = torch.ones_like(opac)
    # Per (camera, Gaussian): projected mean (2), conic (3), opacity (1) | colour (D), 1, depth.
    attrs = [proj.means2d, proj.conics, opac, cols, ones, proj.depths[..., None]]
    table = torch.cat(attrs, -1).reshape(C * N, 6 + D + 2)

    with torch.no_grad():
        cov_diag = torch.stack([proj.cov2d[..., 0, 0], proj.cov2d[..., 1, 1]], -1) + cfg.eps2d
        gid, pixel, xy = _candidate_pairs(
            proj.means2d, cov_diag, opacities, proj.depths, proj.renderable, W, H, cfg
        )
        a, s = _gaussian_alpha(xy, table[:, :6].index_select(0, gid), cfg)
        hit = torch.nonzero((a >= cfg.alpha_min) & (s >= 0)).flatten()
        pixel, perm = torch.sort(pixel.index_select(0, hit), stable=True)  # front-to-back
        keep = hit.index_select(0, perm)
        gid, xy = gid.index_select(0, keep), xy.index_select(0, keep)
        _, seg_counts = torch.unique_consecutive(pixel, return_counts=True)
        seg_start = torch.cumsum(seg_counts, 0) - seg_counts
        first = torch.repeat_interleave(seg_start, seg_counts)  # (M,) first pair of its pixel

    pairs = table.index_select(0, gid)  # (M, 6 + D + 2)
    alpha, _ = _gaussian_alpha(xy, pairs[:, :6], cfg)
    log_t = torch.log1p(-alpha.double())
    excl = torch.cumsum(log_t, 0) - log_t
    # Sum of log(1 - alpha_j) over the earlier pairs of the same pixel.
    trans = torch.exp(excl - excl.index_select(0, first)).to(alpha.dtype)
    with torch.no_grad():
        alive = trans * (1.0 - alpha) >= cfg.transmittance_min
    w = torch.where(alive, alpha * trans, torch.zeros_like(alpha))

    n_pix = C * H * W
    out = torch.zeros(n_pix, D + 2, dtype=means.dtype, device=means.device)
    out = out.index_add(0, pixel, w[:, None] * pairs[:, 6:]).reshape(C, H, W, D + 2)
    image, alpha_img, dep = out[..., :D], out[..., D : D + 1], out[..., D + 1 :]
    if backgrounds is not None:
        image = image + (1.0 - alpha_img) * backgrounds.to(image).reshape(-1, 1, 1, D)
    depth = dep / alpha_img.clamp_min(1e-10)
    return {
        "image": image,
        "alpha": alpha_img,
        "depth": depth,
        "meta": _meta(proj.means2d, proj.radii, proj.depths, W, H, C, "torch"),
    }


def _meta(means2d, radii, depths, W, H, C, backend) -> dict:
    return {
        "means2d": means2d,  # (C, N, 2) pixels; .grad after backward feeds GradientStats
        "radii": radii,  # (C, N) int pixels, 0 where not rendered
        "depths": depths,  # (C, N) camera-space z
        "width": W,
        "height": H,
        "n_cameras": C,
        "backend": backend,
    }


def _view_colors(means: Tensor, colors: Tensor, cameras: Cameras, sh_degree: int | None):
    """Per-camera colours (C, N, D): plain colours (N, D) broadcast, or 3DGS SH colours from
    (N, K, 3) evaluated along the camera-to-Gaussian direction."""
    C = len(cameras)
    if sh_degree is None:
        if colors.ndim != 2:
            raise ValueError(
                f"colors must be (N, D) without sh_degree, got {tuple(colors.shape)}; "
                "pass sh_degree for SH coefficients (N, K, 3)"
            )
        return colors[None].expand(C, *colors.shape)
    if colors.ndim != 3 or colors.shape[-1] != 3:
        raise ValueError(f"SH colors must be (N, K, 3), got {tuple(colors.shape)}")
    dirs = means[None] - cameras.centers.to(means)[:, None]  # (C, N, 3)
    return sh_to_color(sh_degree, colors[None].expand(C, *colors.shape), dirs)


def _rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    backgrounds: Tensor | None,
    sh_degree: int | None,
    cfg: RasterConfig,
) -> dict:
    """gsplat's CUDA ``rasterization`` (honours eps2d, near/far plane and tile size; its alpha
    clamp 0.999, alpha threshold 1/255 and transmittance stop 1e-4 are compiled in)."""
    from gsplat import rasterization

    C = len(cameras)
    cams = cameras.to(device=means.device, dtype=means.dtype)
    bg = None
    if backgrounds is not None:
        bg = backgrounds.to(means).reshape(-1, 3).expand(C, 3).contiguous()
    render, alpha, info = rasterization(
        means,
        quats,
        scales,
        opacities,
        colors,
        cams.viewmats,
        cams.Ks,
        cams.width,
        cams.height,
        near_plane=cfg.near_plane,
        far_plane=cfg.far_plane,
        eps2d=cfg.eps2d,
        sh_degree=sh_degree,
        packed=False,
        tile_size=cfg.tile_size,
        backgrounds=bg,
        render_mode="RGB+ED",
        rasterize_mode="classic",
    )
    if info["means2d"].requires_grad:
        info["means2d"].retain_grad()  # densification statistics read its gradient
    radii = info["radii"]
    if radii.ndim == 3:  # gsplat >= 1.5 returns per-axis radii
        radii = radii.max(-1).values
    meta = _meta(info["means2d"], radii.int(), info["depths"], cams.width, cams.height, C, "gsplat")
    return {"image": render[..., :-1], "alpha": alpha, "depth": render[..., -1:], "meta": meta}


def _gsplat_available() -> bool:
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


# Backend name -> rasteriser. "auto" picks gsplat on CUDA when it imports, else "torch".
RASTERIZERS: dict[str, Callable[..., dict]] = {
    "torch": _rasterize_torch,
    "gsplat": _rasterize_gsplat,
}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The rasteriser ``backend`` resolves to on ``device`` ("auto", "torch" or "gsplat")."""
    if backend == "auto":
        return "gsplat" if device.type == "cuda" and _gsplat_available() else "torch"
    if backend not in RASTERIZERS:
        raise ValueError(
            f"unknown backend {backend!r}; expected 'auto' or one of {list(RASTERIZERS)}"
        )
    if backend == "gsplat" and (device.type != "cuda" or not _gsplat_available()):
        raise RuntimeError(
            "backend='gsplat' needs `import gsplat` to work and CUDA tensors "
            f"(device is {device}); use backend='torch' or 'auto'"
        )
    return backend


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    *,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    config: RasterConfig | None = None,
    backend: str = "auto",
) -> dict:
    """Render N Gaussians into C cameras (the functional API, gsplat's argument order).

    means (N, 3); quats (N, 4) w,x,y,z; scales (N, 3) standard deviations (not logs);
    opacities (N,) in [0, 1]; colors (N, D) plain colours, or SH coefficients (N, K, 3) with
    ``sh_degree`` (colour = max(SH + 0.5, 0)); backgrounds (C, D) or (D,).
    Returns ``image`` (C, H, W, D), ``alpha`` (C, H, W, 1), ``depth`` (C, H, W, 1) expected
    camera-space z (accumulated depth / alpha, gsplat's "ED"), and ``meta`` with means2d,
    radii, depths for densification. Differentiable w.r.t. every input tensor.
    """
    n = means.shape[0]
    shapes = {
        "means": (means, (n, 3)),
        "quats": (quats, (n, 4)),
        "scales": (scales, (n, 3)),
        "opacities": (opacities, (n,)),
    }
    for name, (t, want) in shapes.items():
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if colors.shape[0] != n:
        raise ValueError(f"colors must have N={n} rows, got {tuple(colors.shape)}")
    cfg = config or RasterConfig()
    name = resolve_backend(backend, means.device)
    cams = cameras.to(device=means.device, dtype=means.dtype)
    return RASTERIZERS[name](
        means, quats, scales, opacities, colors, cams, backgrounds, sh_degree, cfg
    )


# ---------------------------------------------------------------------------------------------
# The Gaussian container
# ---------------------------------------------------------------------------------------------


class Gaussians(nn.Module):
    """N 3-D Gaussians as trainable parameters (the 3DGS parameterisation).

    Parameters: ``means`` (N, 3); ``log_scales`` (N, 3); ``quats`` (N, 4) w,x,y,z, unnormalised;
    ``opacity_logits`` (N,); ``sh_dc`` (N, 1, 3) and ``sh_rest`` (N, K-1, 3), kept apart as 3DGS
    does so they can take different learning rates; ``sh`` concatenates them to (N, K, 3).
    """

    def __init__(
        self,
        means: Tensor,
        log_scales: Tensor,
        quats: Tensor,
        opacity_logits: Tensor,
        sh: Tensor,
    ) -> None:
        super().__init__()
        n = means.shape[0]
        for name, t, want in [
            ("means", means, (n, 3)),
            ("log_scales", log_scales, (n, 3)),
            ("quats", quats, (n, 4)),
            ("opacity_logits", opacity_logits, (n,)),
        ]:
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if sh.ndim != 3 or sh.shape[0] != n or sh.shape[2] != 3:
            raise ValueError(f"sh must have shape ({n}, K, 3), got {tuple(sh.shape)}")
        sh_degree_from_bases(sh.shape[1])
        self.means = nn.Parameter(means.detach().clone())
        self.log_scales = nn.Parameter(log_scales.detach().clone())
        self.quats = nn.Parameter(quats.detach().clone())
        self.opacity_logits = nn.Parameter(opacity_logits.detach().clone())
        self.sh_dc = nn.Parameter(sh[:, :1].detach().clone())
        self.sh_rest = nn.Parameter(sh[:, 1:].detach().clone())

    PARAM_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        """Largest SH degree the coefficients hold."""
        return sh_degree_from_bases(1 + self.sh_rest.shape[1])

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def sh(self) -> Tensor:
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)

    def covariance(self) -> Tensor:
        """World-space covariances (N, 3, 3), R S S^T R^T (3DGS eq. 6)."""
        return covariance_3d(self.quats, self.scales)

    def param_dict(self) -> dict[str, nn.Parameter]:
        return {k: getattr(self, k) for k in self.PARAM_NAMES}

    @classmethod
    def from_points(
        cls,
        points: Tensor,
        colors: Tensor | None = None,
        *,
        sh_degree: int = 0,
        opacity: float = 0.1,
        scales: Tensor | None = None,
    ) -> Gaussians:
        """Gaussians at ``points`` (N, 3), colours (N, 3) in [0, 1] (default grey), identity
        rotations, opacity ``opacity``; scales default to 3DGS's initialisation, the root mean
        squared distance to the 3 nearest neighbours (isotropic)."""
        n = points.shape[0]
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
        if colors is None:
            colors = torch.full_like(points, 0.5)
        if scales is None:
            scales = _knn_scale(points)[:, None].expand(n, 3)
        sh = torch.zeros(n, num_sh_bases(sh_degree), 3, dtype=points.dtype, device=points.device)
        sh[:, 0] = rgb_to_sh0(colors)
        quats = torch.zeros(n, 4, dtype=points.dtype, device=points.device)
        quats[:, 0] = 1.0
        logit = torch.full((n,), math.log(opacity / (1 - opacity)), dtype=points.dtype)
        return cls(points, torch.log(scales), quats, logit.to(points.device), sh)

    @classmethod
    def init_random(
        cls,
        n: int,
        *,
        radius: float = 1.0,
        sh_degree: int = 0,
        opacity: float = 0.1,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Gaussians:
        """n Gaussians uniform in a ball of ``radius`` with uniform random colours (as
        DreamFusion-style 3DGS initialisations)."""
        d = torch.randn(n, 3, generator=generator, dtype=dtype)
        r = radius * torch.rand(n, 1, generator=generator, dtype=dtype) ** (1 / 3)
        points = F.normalize(d, dim=-1) * r
        colors = torch.rand(n, 3, generator=generator, dtype=dtype)
        return cls.from_points(points, colors, sh_degree=sh_degree, opacity=opacity)


def _knn_scale(points: Tensor, k: int = 3) -> Tensor:
    """sqrt(mean squared distance to the k nearest other points) (N,), in chunks."""
    n = points.shape[0]
    if n <= 1:
        return torch.full((n,), 0.01, dtype=points.dtype, device=points.device)
    k = min(k, n - 1)
    rows = max(1, (1 << 22) // n)
    out = []
    for s in range(0, n, rows):
        d2 = torch.cdist(points[s : s + rows], points).square()
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = math.inf
        out.append(d2.topk(k, dim=1, largest=False).values.mean(1))
    return torch.sqrt(torch.cat(out).clamp_min(1e-14))


def render_gaussians(
    gaussians: Gaussians,
    cameras: Cameras,
    background: Tensor | None = None,
    sh_degree: int | None = None,
    backend: str = "auto",
    config: RasterConfig | None = None,
) -> dict:
    """Render a ``Gaussians`` container (activations applied) into ``cameras``.

    ``sh_degree`` defaults to the container's; a lower one uses only the first bands (the 3DGS
    schedule that adds a band every 1000 steps). Returns the dict of ``rasterize_gaussians``:
    image (C, H, W, 3), alpha (C, H, W, 1), depth (C, H, W, 1), meta (radii, means2d, ...).
    """
    deg = gaussians.sh_degree if sh_degree is None else sh_degree
    if deg > gaussians.sh_degree:
        raise ValueError(f"sh_degree {deg} exceeds the container's degree {gaussians.sh_degree}")
    return rasterize_gaussians(
        gaussians.means,
        gaussians.quats,
        gaussians.scales,
        gaussians.opacities,
        gaussians.sh,
        cameras,
        sh_degree=deg,
        backgrounds=background,
        config=config,
        backend=backend,
    )


# ---------------------------------------------------------------------------------------------
# Densification (3DGS Sec. 5.2 / gaussian_model.densify_and_prune)
# ---------------------------------------------------------------------------------------------


@dataclass
class DensifyConfig:
    """Adaptive density control thresholds; defaults are 3DGS's."""

    grad_threshold: float = 0.0002  # mean view-space positional gradient norm (NDC) to densify
    percent_dense: float = 0.01  # clone if max scale <= this x scene extent, else split
    split_children: int = 2  # a split Gaussian becomes this many
    split_scale_factor: float = 0.8  # children's scales = parent's / (this x split_children)
    min_opacity: float = 0.005  # prune below this opacity
    max_screen_size: float | None = 20.0  # prune radii above this (pixels); None disables
    max_world_size: float = 0.1  # prune max scale above this x scene extent (with screen size)
    opacity_reset_value: float = 0.01  # ``reset_opacity`` caps opacities at this


class GradientStats:
    """Running view-space gradient statistics between densification steps (3DGS's
    ``xyz_gradient_accum``, ``denom``, ``max_radii2D``). Call ``update(meta)`` after every
    ``backward`` of a loss on ``render_gaussians(...)``."""

    def __init__(self, n: int, device: torch.device | str | None = None) -> None:
        self.reset(n, device)

    def reset(self, n: int, device: torch.device | str | None = None) -> None:
        self.grad_accum = torch.zeros(n, device=device)  # (N,) sum of NDC gradient norms
        self.count = torch.zeros(n, device=device)  # (N,) views in which it was visible
        self.max_radii = torch.zeros(n, device=device)  # (N,) largest screen radius, pixels

    @torch.no_grad()
    def update(self, meta: dict) -> None:
        """Accumulate ``|dL/d means2d|`` in NDC units (pixel gradient x W/2, H/2) times the
        number of cameras, as gsplat's default strategy does to match 3DGS's threshold."""
        m2d = meta["means2d"]
        if m2d.grad is None:
            raise RuntimeError("meta['means2d'] has no gradient: call update() after backward()")
        g = m2d.grad.detach().clone()
        g[..., 0] *= meta["width"] / 2.0 * meta["n_cameras"]
        g[..., 1] *= meta["height"] / 2.0 * meta["n_cameras"]
        radii = meta["radii"]
        vis = (radii > 0).to(g.dtype)
        dev = self.grad_accum.device
        self.grad_accum += (g.norm(dim=-1) * vis).sum(0).to(dev)
        self.count += vis.sum(0).to(dev)
        self.max_radii = torch.maximum(
            self.max_radii, radii.max(0).values.to(dev, self.max_radii.dtype)
        )

    def mean_grad(self) -> Tensor:
        return torch.nan_to_num(self.grad_accum / self.count, nan=0.0)


@dataclass
class DensifyResult:
    """What ``densify_and_prune`` did. ``source[i]`` is the old row that new row i came from;
    ``fresh[i]`` marks rows created by cloning or splitting (zero optimizer state)."""

    n_cloned: int  # Gaussians duplicated (small, high gradient)
    n_split: int  # Gaussians replaced by ``split_children`` smaller ones (large, high gradient)
    n_pruned: int  # rows removed after densification (low opacity / too large)
    source: Tensor = field(repr=False)  # (M,) long, index into the old Gaussians
    fresh: Tensor = field(repr=False)  # (M,) bool


@torch.no_grad()
def densify_and_prune(
    gaussians: Gaussians,
    stats: GradientStats,
    scene_extent: float,
    config: DensifyConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> DensifyResult:
    """3DGS adaptive density control, in place.

    Gaussians whose mean view-space gradient is >= grad_threshold are cloned if small
    (max scale <= percent_dense x extent) or split into ``split_children`` Gaussians sampled
    from the parent (scales / (0.8 x 2)) if large; then Gaussians with opacity < min_opacity, screen
    radius > max_screen_size or max scale > max_world_size x extent are pruned (the screen
    and world size tests as 3DGS applies them together). ``stats`` is reset to the new size.

    Optimizer state: the container's parameters are replaced by new ``nn.Parameter`` objects.
    If ``optimizer`` is given, its param groups are pointed at them and every per-row state
    tensor (Adam's exp_avg, exp_avg_sq) is re-indexed with ``source``, with zeros for fresh rows
    (as 3DGS's ``cat_tensors_to_optimizer`` / ``_prune_optimizer``); scalar state (step) is
    kept. Without it, rebuild the optimizer or use ``result.source`` / ``result.fresh``.
    """
    cfg = config or DensifyConfig()
    g = gaussians
    dev = g.means.device
    grads = stats.mean_grad().to(dev)
    scales = g.scales
    max_scale = scales.max(-1).values
    high = grads >= cfg.grad_threshold
    small = max_scale <= cfg.percent_dense * scene_extent
    clone, split = high & small, high & ~small
    keep_ids = torch.nonzero(~split).flatten()
    clone_ids = torch.nonzero(clone).flatten()
    split_ids = torch.nonzero(split).flatten()
    child_ids = split_ids.repeat(cfg.split_children)
    source = torch.cat([keep_ids, clone_ids, child_ids])
    fresh = torch.zeros(source.numel(), dtype=torch.bool, device=dev)
    fresh[keep_ids.numel() :] = True

    new = {k: v.detach()[source].clone() for k, v in g.param_dict().items()}
    n_child = child_ids.numel()
    if n_child:
        s = scales[child_ids]
        noise = torch.randn(n_child, 3, generator=generator, dtype=s.dtype).to(dev) * s
        rot = quat_to_rotmat(g.quats[child_ids])
        new["means"][-n_child:] = g.means[child_ids] + (rot @ noise[..., None])[..., 0]
        new["log_scales"][-n_child:] = torch.log(s / (cfg.split_scale_factor * cfg.split_children))

    opac = torch.sigmoid(new["opacity_logits"])
    prune = opac < cfg.min_opacity
    if cfg.max_screen_size is not None:
        radii = torch.zeros(source.numel(), device=dev)
        radii[: keep_ids.numel()] = stats.max_radii.to(dev)[keep_ids]
        new_max = torch.exp(new["log_scales"]).max(-1).values
        prune |= (radii > cfg.max_screen_size) | (new_max > cfg.max_world_size * scene_extent)
    source, fresh = source[~prune], fresh[~prune]
    new = {k: v[~prune] for k, v in new.items()}
    _replace_parameters(g, new, source, fresh, optimizer)
    stats.reset(len(g), stats.grad_accum.device)
    return DensifyResult(
        n_cloned=int(clone.sum()),
        n_split=int(split.sum()),
        n_pruned=int(prune.sum()),
        source=source,
        fresh=fresh,
    )


@torch.no_grad()
def reset_opacity(
    gaussians: Gaussians, value: float = 0.01, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """3DGS opacity reset: opacities become min(opacity, value); the optimizer state of the
    opacity parameter is zeroed (as 3DGS's ``replace_tensor_to_optimizer``)."""
    capped = torch.clamp_max(gaussians.opacities, value)
    logits = torch.log(capped / (1 - capped))
    n = len(gaussians)
    new = {k: v.detach() for k, v in gaussians.param_dict().items()}
    new["opacity_logits"] = logits
    src = torch.arange(n, device=logits.device)
    fresh = torch.zeros(n, dtype=torch.bool, device=logits.device)
    _replace_parameters(gaussians, new, src, fresh, optimizer, zero_state={"opacity_logits"})


def _replace_parameters(
    g: Gaussians,
    new: dict[str, Tensor],
    source: Tensor,
    fresh: Tensor,
    optimizer: torch.optim.Optimizer | None,
    zero_state: set[str] = frozenset(),
) -> None:
    old = g.param_dict()
    for name, value in new.items():
        p_old, p_new = old[name], nn.Parameter(value.contiguous())
        setattr(g, name, p_new)
        if optimizer is None:
            continue
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is not p_old:
                    continue
                group["params"][i] = p_new
                state = optimizer.state.pop(p_old, None)
                if not state:
                    continue
                for key, v in state.items():
                    if torch.is_tensor(v) and v.shape == p_old.shape:
                        v = torch.zeros_like(p_new) if name in zero_state else v[source].clone()
                        v[fresh] = 0
                    state[key] = v
                optimizer.state[p_new] = state


# ---------------------------------------------------------------------------------------------
# PLY (the layout 3DGS's save_ply writes and viewers read)
# ---------------------------------------------------------------------------------------------

_PLY_TYPES = {
    "float": "<f4",
    "float32": "<f4",
    "double": "<f8",
    "float64": "<f8",
    "uchar": "u1",
    "uint8": "u1",
    "int": "<i4",
    "int32": "<i4",
}


def ply_property_names(sh_degree: int) -> list[str]:
    """Vertex properties in 3DGS order: x y z nx ny nz f_dc_0..2 f_rest_* opacity scale_0..2
    rot_0..3 (f_rest holds all red coefficients, then green, then blue)."""
    n_rest = 3 * (num_sh_bases(sh_degree) - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def save_ply(path: str | Path, gaussians: Gaussians) -> None:
    """Write binary little-endian PLY in the 3DGS layout (raw logits / log-scales / unnormalised
    quaternions, as 3DGS stores them)."""
    g = gaussians
    n = len(g)
    with torch.no_grad():
        cols = [
            g.means,
            torch.zeros_like(g.means),
            g.sh_dc.transpose(1, 2).reshape(n, -1),
            g.sh_rest.transpose(1, 2).reshape(n, -1),
            g.opacity_logits[:, None],
            g.log_scales,
            g.quats,
        ]
        data = torch.cat([c.float().cpu() for c in cols], dim=1).numpy()
    names = ply_property_names(g.sh_degree)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names] + ["end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(np.ascontiguousarray(data, dtype="<f4").tobytes())


def load_ply(path: str | Path) -> Gaussians:
    """Read a 3DGS PLY (binary little endian, one ``vertex`` element) into ``Gaussians``."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file (no 'ply' magic line)")
        fmt, n, props = None, None, []
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header")
            words = line.decode("ascii").split()
            if not words or words[0] == "comment":
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                if words[1] != "vertex" or n is not None:
                    raise ValueError(f"{path}: expected one 'vertex' element, got {words[1]!r}")
                n = int(words[2])
            elif words[0] == "property":
                if words[1] == "list" or words[1] not in _PLY_TYPES:
                    raise ValueError(f"{path}: unsupported property {' '.join(words[1:])!r}")
                props.append((words[2], _PLY_TYPES[words[1]]))
        if fmt != "binary_little_endian":
            raise ValueError(f"{path}: expected format binary_little_endian, got {fmt!r}")
        if n is None:
            raise ValueError(f"{path}: no vertex element")
        arr = np.frombuffer(f.read(), dtype=np.dtype(props), count=n)
    names = {p for p, _ in props}
    n_rest = sum(1 for p in names if p.startswith("f_rest_"))
    if n_rest % 3:
        raise ValueError(f"{path}: {n_rest} f_rest_* properties is not a multiple of 3")
    deg = sh_degree_from_bases(1 + n_rest // 3)
    missing = [p for p in ply_property_names(deg) if p not in names and p[0] != "n"]
    if missing:
        raise ValueError(f"{path}: missing 3DGS properties {missing}")

    def cols(keys: list[str]) -> Tensor:
        if not keys:  # degree-0 files have no f_rest_* columns
            return torch.zeros(n, 0)
        return torch.from_numpy(np.stack([arr[k].astype(np.float32) for k in keys], axis=1))

    means = cols(["x", "y", "z"])
    dc = cols([f"f_dc_{i}" for i in range(3)])[:, None, :]
    rest = cols([f"f_rest_{i}" for i in range(n_rest)]).reshape(n, 3, -1).transpose(1, 2)
    return Gaussians(
        means=means,
        log_scales=cols(["scale_0", "scale_1", "scale_2"]),
        quats=cols(["rot_0", "rot_1", "rot_2", "rot_3"]),
        opacity_logits=cols(["opacity"])[:, 0],
        sh=torch.cat([dc, rest], dim=1),
    )
