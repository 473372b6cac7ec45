"""Volume rendering of radiance fields (NeRF, Mildenhall et al. 2020, eq. 3) with
Instant-NGP-style occupancy-grid skipping (Müller et al. 2022, Sec. 5.4 / App. E.2).

Rays are sampled in bins between their entry and exit of the scene box (or between fixed
near/far distances); per bin ``alpha_i = 1 - exp(-sigma_i delta_i)``, transmittance
``T_i = exp(-sum_{j<i} sigma_j delta_j)``, weight ``w_i = T_i alpha_i``; colour
``sum_i w_i c_i + (1 - sum_i w_i) background``.

Outputs follow the Gaussian renderer: image (C, H, W, 3), alpha (C, H, W, 1) and depth
(C, H, W, 1) as expected camera-space z (weighted distance / alpha, times the ray's cosine to
the optical axis).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.threed.cameras import Cameras, rays
from fewstep.threed.fields import DEFAULT_AABB, RadianceField

# Named backgrounds (RGB in [0, 1]).
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


@dataclass
class VolumeRenderConfig:
    """How rays are sampled and composited."""

    n_samples: int = 64  # samples (bins) per ray
    near: float | None = None  # with far: sample t in [near, far]; None: the field's scene box
    far: float | None = None  # see near
    stratified: bool = False  # one uniform sample per bin (NeRF eq. 2) instead of its midpoint
    background: str | tuple[float, float, float] = "white"  # "white", "black" or an RGB triple
    chunk: int = 8192  # rays per batch in render_field


def background_color(bg: str | tuple | Tensor, like: Tensor) -> Tensor:
    """(3,) background colour from a name in ``BACKGROUNDS`` or an RGB triple."""
    if isinstance(bg, str):
        if bg not in BACKGROUNDS:
            raise ValueError(f"unknown background {bg!r}; expected one of {list(BACKGROUNDS)}")
        bg = BACKGROUNDS[bg]
    t = torch.as_tensor(bg, dtype=like.dtype, device=like.device)
    if t.shape != (3,):
        raise ValueError(f"background must be an RGB triple, got shape {tuple(t.shape)}")
    return t


def ray_aabb(origins: Tensor, dirs: Tensor, aabb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slab intersection of rays (R, 3) with a box (2, 3): t_near, t_far (R,) clamped to
    t >= 0, and hit (R,) bool."""
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    inv = 1.0 / safe
    t0 = (aabb[0].to(origins) - origins) * inv
    t1 = (aabb[1].to(origins) - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    hit = t_far > t_near
    return t_near, torch.where(hit, t_far, t_near), hit


def sample_bins(
    t_near: Tensor,
    t_far: Tensor,
    n_samples: int,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Split [t_near, t_far] (R,) into n_samples equal bins; sample positions (R, S) at bin
    midpoints or uniformly within each bin (stratified, NeRF eq. 2) and bin widths (R, S)."""
    u = torch.linspace(0, 1, n_samples + 1, dtype=t_near.dtype, device=t_near.device)
    edges = t_near[:, None] + (t_far - t_near)[:, None] * u  # (R, S + 1)
    lo, hi = edges[:, :-1], edges[:, 1:]
    if stratified:
        r = torch.rand(lo.shape, generator=generator, dtype=lo.dtype).to(lo.device)
    else:
        r = torch.full_like(lo, 0.5)
    return lo + (hi - lo) * r, hi - lo


def composite(
    sigma: Tensor, rgb: Tensor, t: Tensor, deltas: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NeRF eq. 3 quadrature: sigma (R, S), rgb (R, S, 3), sample distances t and bin widths
    deltas (R, S) -> weights (R, S), colour (R, 3) without background, opacity (R, 1) and
    weighted distance (R, 1) (not normalised)."""
    tau = sigma * deltas
    alpha = 1.0 - torch.exp(-tau)
    excl = torch.cumsum(tau, -1) - tau
    w = torch.exp(-excl) * alpha
    color = (w[..., None] * rgb).sum(-2)
    return w, color, w.sum(-1, keepdim=True), (w * t).sum(-1, keepdim=True)


class OccupancyGrid:
    """A coarse grid of density over the scene box that marks cells worth sampling
    (Instant-NGP App. E.2; nerfacc's OccGridEstimator).

    ``update`` evaluates the density at one random point in each chosen cell, decays every
    cell by ``decay`` and keeps the max of decayed and new values (an EMA of the max). A cell
    is occupied when its value exceeds ``min(threshold, mean)``; until the first update every
    cell counts as occupied. Values are densities (inverse world units): a skipped cell of
    density below ``threshold`` could have contributed at most ``1 - exp(-threshold L)``
    opacity along a path of length L.
    """

    def __init__(
        self,
        aabb: tuple[float, ...] = DEFAULT_AABB,
        resolution: int = 32,
        decay: float = 0.95,
        threshold: float = 0.01,
        device: torch.device | str | None = None,
    ) -> None:
        self.aabb = torch.tensor(aabb, dtype=torch.float32, device=device).reshape(2, 3)
        self.resolution = resolution  # cells per axis
        self.decay = decay  # per-update decay of stored densities
        self.threshold = threshold  # density above which a cell is occupied (capped at the mean)
        self.density = torch.zeros(resolution, resolution, resolution, device=device)  # [x,y,z]
        self.n_updates = 0

    @property
    def binary(self) -> Tensor:
        """(R, R, R) bool occupancy, indexed [x, y, z]."""
        if self.n_updates == 0:
            return torch.ones_like(self.density, dtype=torch.bool)
        return self.density > min(self.threshold, float(self.density.mean()))

    def cell_of(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Integer cell (N, 3) of world points and whether they are inside the box (N,)."""
        lo, hi = self.aabb[0].to(points), self.aabb[1].to(points)
        x = (points - lo) / (hi - lo)
        inside = ((x >= 0) & (x <= 1)).all(-1)
        cell = (x * self.resolution).floor().long().clamp(0, self.resolution - 1)
        return cell, inside

    def occupied(self, points: Tensor) -> Tensor:
        """(N,) bool: inside the box and in an occupied cell."""
        cell, inside = self.cell_of(points)
        b = self.binary.to(points.device)
        return inside & b[cell[:, 0], cell[:, 1], cell[:, 2]]

    @torch.no_grad()
    def update(
        self,
        density_fn: Callable[[Tensor], Tensor],
        n_cells: int | None = None,
        generator: torch.Generator | None = None,
        samples_per_cell: int = 1,
        chunk: int = 65536,
    ) -> None:
        """One EMA update from ``density_fn(points (N, 3)) -> (N,)`` at random points in every
        cell (``n_cells=None``, Instant-NGP's warm-up) or in ``n_cells`` random cells; each
        cell takes the max over ``samples_per_cell`` points (Instant-NGP: 1 per update)."""
        r = self.resolution
        total = r**3
        if n_cells is None or n_cells >= total:
            cells = torch.arange(total)
        else:
            cells = torch.randperm(total, generator=generator)[:n_cells]
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], -1).float()
        jitter = torch.rand(samples_per_cell, *ijk.shape, generator=generator)
        x = ((ijk + jitter) / r).reshape(-1, 3)
        lo, hi = self.aabb[0].cpu(), self.aabb[1].cpu()
        pts = (lo + x * (hi - lo)).to(self.density.device)
        sig = torch.cat([density_fn(p).float().flatten() for p in pts.split(chunk)])
        sig = sig.reshape(samples_per_cell, -1).amax(0)
        flat = self.density.flatten() * self.decay
        cells = cells.to(flat.device)
        flat[cells] = torch.maximum(flat[cells], sig.to(flat))
        self.density = flat.reshape(r, r, r)
        self.n_updates += 1

    def occupancy_fraction(self) -> float:
        return float(self.binary.float().mean())


def render_rays(
    field: RadianceField,
    origins: Tensor,
    dirs: Tensor,
    config: VolumeRenderConfig | None = None,
    occupancy: OccupancyGrid | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """Volume-render rays (R, 3) with unit directions (R, 3).

    Returns rgb (R, 3) with the background, alpha (R, 1), distance (R, 1) expected distance of
    termination (weighted distance / alpha), weights (R, S), n_evaluated (samples the field was
    queried at) and n_samples (R * S). Samples outside the box, on rays that miss it, or in
    cells the occupancy grid marks empty are not evaluated (density 0 there).
    """
    cfg = config or VolumeRenderConfig()
    R, S = origins.shape[0], cfg.n_samples
    if (cfg.near is None) != (cfg.far is None):
        raise ValueError("set both near and far, or neither (then the scene box is used)")
    if cfg.near is not None:
        t_near = torch.full((R,), float(cfg.near), dtype=origins.dtype, device=origins.device)
        t_far = torch.full_like(t_near, float(cfg.far))
        hit = torch.ones(R, dtype=torch.bool, device=origins.device)
    else:
        t_near, t_far, hit = ray_aabb(origins, dirs, field.aabb)
    t, deltas = sample_bins(t_near, t_far, S, cfg.stratified, generator)
    pts = (origins[:, None, :] + t[..., None] * dirs[:, None, :]).reshape(R * S, 3)
    d = dirs[:, None, :].expand(R, S, 3).reshape(R * S, 3)
    mask = hit[:, None].expand(R, S).reshape(R * S)
    if occupancy is not None:
        mask = mask & occupancy.occupied(pts)
    idx = torch.nonzero(mask).flatten()
    sigma_e, rgb_e = field(pts.index_select(0, idx), d.index_select(0, idx))
    sigma = torch.zeros(R * S, dtype=sigma_e.dtype, device=pts.device).index_put((idx,), sigma_e)
    rgb = torch.zeros(R * S, 3, dtype=rgb_e.dtype, device=pts.device).index_put((idx,), rgb_e)
    w, color, acc, dist = composite(
        sigma.reshape(R, S), rgb.reshape(R, S, 3), t.to(sigma.dtype), deltas.to(sigma.dtype)
    )
    color = color + (1.0 - acc) * background_color(cfg.background, color)
    return {
        "rgb": color,
        "alpha": acc,
        "distance": dist / acc.clamp_min(1e-10),
        "weights": w,
        "n_evaluated": int(idx.numel()),
        "n_samples": R * S,
    }


def render_field(
    field: RadianceField,
    cameras: Cameras,
    config: VolumeRenderConfig | None = None,
    occupancy: OccupancyGrid | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """Render every pixel of ``cameras`` in chunks of ``config.chunk`` rays.

    Returns image (C, H, W, 3), alpha (C, H, W, 1), depth (C, H, W, 1) expected camera-space
    z, n_evaluated and n_samples (totals over chunks). Differentiable w.r.t. the field.
    """
    cfg = config or VolumeRenderConfig()
    o, d = rays(cameras)
    C, H, W = len(cameras), cameras.height, cameras.width
    forward = cameras.camera_to_world[:, None, None, :3, 2].expand(C, H, W, 3)
    cos = (d * forward).sum(-1).reshape(-1, 1)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    parts, n_eval, n_samp = [], 0, 0
    for s in range(0, o.shape[0], cfg.chunk):
        out = render_rays(
            field, o[s : s + cfg.chunk], d[s : s + cfg.chunk], cfg, occupancy, generator
        )
        parts.append(torch.cat([out["rgb"], out["alpha"], out["distance"]], -1))
        n_eval += out["n_evaluated"]
        n_samp += out["n_samples"]
    res = torch.cat(parts, 0)
    return {
        "image": res[:, :3].reshape(C, H, W, 3),
        "alpha": res[:, 3:4].reshape(C, H, W, 1),
        "depth": (res[:, 4:5] * cos.to(res)).reshape(C, H, W, 1),
        "n_evaluated": n_eval,
        "n_samples": n_samp,
    }
