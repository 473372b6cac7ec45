"""Procedural scenes for benchmarks and tests (no data ships with fewstep).

- ``toy``: ``fields.toy_voxel_scene``, a sphere and a cube in a 24^3 voxel grid (easy: two
  smooth convex shapes, view-independent colour).
- ``clutter``: ``clutter_scene``, an analytic field that is hard to fit from a few images:
  dozens of small spheres and boxes packed so they occlude each other, thin rods (capsules)
  crossing them, a high-frequency checker albedo on every primitive and a view-dependent
  highlight (colour depends on the ray direction). It is the PVD benchmark's hard scene: the
  paper's speed-up (Fang et al., AAAI 2023, Sec. 4) comes from real scenes with detail and
  occlusion, where a student trained from rays through the training views needs many steps
  while volume distillation supervises density and colour at any 3-D point.

The clutter field is evaluated exactly at any point (density from signed distances, no grid),
so it can serve as a teacher itself or as the ground truth a trained teacher is fitted to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.threed.fields import FieldConfig, RadianceField, toy_voxel_scene


@dataclass
class ClutterSceneConfig(FieldConfig):
    """The clutter scene's generator settings (the field's box is ``aabb``)."""

    n_spheres: int = 16  # small spheres
    n_boxes: int = 12  # small axis-aligned boxes
    n_rods: int = 8  # thin capsules (segments with a small radius)
    size_range: tuple[float, float] = (0.1, 0.24)  # sphere radius / box half-size range
    rod_radius: float = 0.035  # capsule radius (about one pixel at 48 px from radius 3)
    rod_length: tuple[float, float] = (0.8, 1.6)  # capsule length range
    extent: float = 0.75  # primitive centres uniform in [-extent, extent]^3
    density: float = 60.0  # density inside a primitive (1/world units)
    softness: float = 0.01  # sigma = density * sigmoid(-sdf / softness): edge width
    texture_freq: tuple[float, float] = (2.5, 5.0)  # checker cycles per world unit, per primitive
    texture_contrast: float = 0.45  # albedo = colour * (1 - c + c * checker)
    highlight: float = 0.35  # amplitude of the view-dependent highlight
    highlight_power: float = 6.0  # sharpness of the highlight lobe
    seed: int = 0  # draws every primitive


def _box_sdf(p: Tensor, c: Tensor, h: Tensor) -> Tensor:
    """Signed distance (N, P) from points (N, 3) to axis-aligned boxes (centre c, half-size h)."""
    q = (p[:, None] - c[None]).abs() - h[None]
    outside = q.clamp_min(0).norm(dim=-1)
    inside = q.amax(-1).clamp_max(0)
    return outside + inside


def _capsule_sdf(p: Tensor, a: Tensor, b: Tensor, r: float) -> Tensor:
    """Signed distance (N, Q) from points (N, 3) to capsules (segments a-b, radius r)."""
    ab = b - a  # (Q, 3)
    ap = p[:, None] - a[None]  # (N, Q, 3)
    t = ((ap * ab[None]).sum(-1) / (ab * ab).sum(-1)[None]).clamp(0, 1)
    return (ap - t[..., None] * ab[None]).norm(dim=-1) - r


class ProceduralField(RadianceField):
    """The clutter scene as a radiance field (see the module docstring).

    Density: ``density * sigmoid(-d / softness)`` with d the smallest signed distance to any
    primitive (zero outside the box). Colour of the nearest primitive k:
    ``albedo_k(x) + highlight * ((1 + <-dir, h_k>) / 2)^power`` clipped to [0, 1], where
    ``albedo_k(x) = colour_k * (1 - c + c * checker_k(x))`` and ``checker_k`` is a smoothed 3-D
    checker of frequency f_k on axes rotated per primitive; h_k is a unit vector per primitive."""

    def __init__(self, config: ClutterSceneConfig | None = None) -> None:
        cfg = config or ClutterSceneConfig()
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed)

        def u(n: int, lo: float, hi: float, d: int = 1) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, d, generator=g)

        e = cfg.extent
        self.register_buffer("sphere_c", u(cfg.n_spheres, -e, e, 3))
        self.register_buffer("sphere_r", u(cfg.n_spheres, *cfg.size_range)[:, 0])
        self.register_buffer("box_c", u(cfg.n_boxes, -e, e, 3))
        self.register_buffer("box_h", u(cfg.n_boxes, *cfg.size_range, 3) * 0.8)
        mid = u(cfg.n_rods, -e, e, 3)
        axis = F.normalize(torch.randn(cfg.n_rods, 3, generator=g), dim=-1)
        half = u(cfg.n_rods, *cfg.rod_length) / 2
        self.register_buffer("rod_a", mid - half * axis)
        self.register_buffer("rod_b", mid + half * axis)
        n = cfg.n_spheres + cfg.n_boxes + cfg.n_rods
        # Saturated colours: random hue, high saturation (HSV -> RGB with s = 0.8, v = 0.9).
        hue = torch.rand(n, 1, generator=g)
        k = (torch.tensor([5.0, 3.0, 1.0]) + hue * 6) % 6
        self.register_buffer("colour", 0.9 - 0.72 * (torch.minimum(k, 4 - k).clamp(0, 1)))
        self.register_buffer("freq", u(n, *cfg.texture_freq)[:, 0])
        rot, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g))
        self.register_buffer("tex_axes", rot)  # (n, 3, 3) per-primitive checker axes
        self.register_buffer("light", F.normalize(torch.randn(n, 3, generator=g), dim=-1))

    def sdf(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Smallest signed distance (N,) to any primitive and that primitive's index (N,)."""
        d = torch.cat(
            [
                (points[:, None] - self.sphere_c[None]).norm(dim=-1) - self.sphere_r[None],
                _box_sdf(points, self.box_c, self.box_h),
                _capsule_sdf(points, self.rod_a, self.rod_b, self.config.rod_radius),
            ],
            -1,
        )
        return d.min(-1)

    def _sigma(self, points: Tensor, d: Tensor) -> Tensor:
        sigma = self.config.density * torch.sigmoid(-d / self.config.softness)
        return torch.where(self.inside(points), sigma, torch.zeros_like(sigma))

    def density(self, points: Tensor) -> Tensor:
        self._check(points)
        return self._sigma(points, self.sdf(points)[0])

    def albedo(self, points: Tensor, idx: Tensor) -> Tensor:
        """View-independent colour (N, 3) of primitive ``idx`` (N,) at ``points`` (N, 3)."""
        cfg = self.config
        local = torch.einsum("nij,nj->ni", self.tex_axes[idx], points)  # rotated coordinates
        waves = torch.sin(2 * math.pi * self.freq[idx, None] * local)  # (N, 3)
        checker = 0.5 + 0.5 * torch.tanh(4.0 * waves.prod(-1))  # smoothed 3-D checker in (0, 1)
        c = cfg.texture_contrast
        return self.colour[idx] * (1 - c + c * checker[:, None])

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        self._check(points, dirs)
        d, idx = self.sdf(points)
        cfg = self.config
        lobe = ((1 - (dirs * self.light[idx]).sum(-1)) / 2).clamp(0, 1) ** cfg.highlight_power
        rgb = (self.albedo(points, idx) + cfg.highlight * lobe[:, None]).clamp(0, 1)
        return self._sigma(points, d), rgb


def clutter_scene(**overrides) -> ProceduralField:
    """The clutter scene (``ClutterSceneConfig`` fields may be overridden, e.g. ``seed=1``)."""
    return ProceduralField(ClutterSceneConfig(**overrides))


# Scene name -> builder (no arguments): the benchmarks' ``--scene`` choices.
SCENES: dict[str, Callable[[], RadianceField]] = {
    "toy": toy_voxel_scene,
    "clutter": clutter_scene,
}


def make_scene(name: str) -> RadianceField:
    """A named procedural scene (``SCENES``)."""
    if name not in SCENES:
        raise KeyError(f"unknown scene {name!r}; expected one of {sorted(SCENES)}")
    return SCENES[name]()
