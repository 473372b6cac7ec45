"""Triplane radiance fields: three axis-aligned feature planes, bilinearly sampled at a point's
projections and decoded by a small MLP (the tri-plane representation of EG3D, Chan et al. 2022,
"Efficient Geometry-aware 3D Generative Adversarial Networks"; what TriplaneTurbo's U-Net emits).

A point x in the scene box, normalised to [-1, 1]^3, is projected onto the xy, xz and yz planes
(``PLANE_AXES``); each plane (C, R, R) is sampled bilinearly at the projection (grid_sample,
``align_corners=True``: texel (0, 0) sits at (-1, -1) and texel (R-1, R-1) at (1, 1); outside
[-1, 1] the planes read zero), the three C-vectors are aggregated (``AGGREGATIONS``: summed as
EG3D, or concatenated so the decoder knows which plane each came from), and an MLP maps them
to a raw density and colour logits:

    sigma(x) = softplus(raw(x) + b(x)),   rgb(x) = sigmoid(logits(x)),

with ``b(x) = blob_density (1 - |x| / blob_radius)``, Magic3D's density blob (threestudio's
``blob_magic3d``), so an untrained triplane renders as a soft ball rather than nothing.

The planes of a ``TriplaneField`` are a plain tensor (a generator's output, carrying its
graph), the decoder a shared module: one decoder serves every object a generator makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.threed.fields import DEFAULT_AABB, FieldConfig, RadianceField

# (first, second) coordinate axis of each plane: xy, xz, yz. A plane's tensor is indexed
# [channel, row, col] with col along the first axis and row along the second.
PLANE_AXES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))
N_PLANES = len(PLANE_AXES)


def plane_coords(x: Tensor) -> Tensor:
    """Box coordinates (N, 3) in [-1, 1] -> their projections onto the planes (3, N, 2)."""
    if x.ndim != 2 or x.shape[-1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(x.shape)}")
    return torch.stack([x[:, list(ax)] for ax in PLANE_AXES])


def sample_planes(planes: Tensor, x: Tensor) -> Tensor:
    """Bilinear features of planes (3, C, R, R) at box coordinates x (N, 3) -> (3, N, C)."""
    if planes.ndim != 4 or planes.shape[0] != N_PLANES or planes.shape[-1] != planes.shape[-2]:
        raise ValueError(f"planes must be (3, C, R, R), got {tuple(planes.shape)}")
    grid = plane_coords(x.to(planes.dtype))[:, None]  # (3, 1, N, 2): (col, row) per point
    f = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return f[:, :, 0].transpose(1, 2)  # (3, N, C)


def bilinear_reference(plane: Tensor, uv: Tensor) -> Tensor:
    """The same sampling written out, for tests: plane (C, R, R), uv (N, 2) in [-1, 1] as
    (col, row) coordinates -> (N, C), weights (1 - a)(1 - b), a(1 - b), (1 - a) b, a b."""
    C, R, _ = plane.shape
    p = (uv + 1) / 2 * (R - 1)  # texel coordinates
    c0, r0 = p[:, 0].floor().long(), p[:, 1].floor().long()
    a, b = p[:, 0] - c0, p[:, 1] - r0
    out = torch.zeros(uv.shape[0], C, dtype=plane.dtype)
    for dc, dr, w in ((0, 0, (1 - a) * (1 - b)), (1, 0, a * (1 - b)), (0, 1, (1 - a) * b),
                      (1, 1, a * b)):  # fmt: skip
        c, r = c0 + dc, r0 + dr
        ok = (c >= 0) & (c < R) & (r >= 0) & (r < R)
        v = plane[:, r.clamp(0, R - 1), c.clamp(0, R - 1)].t()  # (N, C)
        out += torch.where(ok[:, None], w[:, None] * v, torch.zeros_like(v))
    return out


def _sum(f: Tensor) -> Tensor:
    return f.sum(0)


def _concat(f: Tensor) -> Tensor:
    return f.transpose(0, 1).reshape(f.shape[1], -1)


# Aggregation name -> (per-plane features (3, N, C) -> (N, D), D as a function of C).
AGGREGATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[int], int]]] = {
    "sum": (_sum, lambda c: c),  # EG3D
    "concat": (_concat, lambda c: N_PLANES * c),  # keeps which plane a feature came from
}


@dataclass
class TriplaneConfig(FieldConfig):
    """A triplane field and its decoder."""

    channels: int = 8  # feature channels per plane
    resolution: int = 16  # texels per plane side
    aggregate: str = "concat"  # how the three planes' features combine: sum or concat
    hidden: int = 32  # decoder MLP width
    n_hidden: int = 1  # decoder hidden layers
    blob_density: float = 5.0  # density blob added before softplus at the centre (0 = none)
    blob_radius: float = 0.5  # the blob's raw bias falls to 0 at this box radius


class TriplaneDecoder(nn.Module):
    """Aggregated plane features (N, D) -> raw density (N,) and colour logits (N, 3)."""

    def __init__(self, config: TriplaneConfig | None = None) -> None:
        super().__init__()
        cfg = config or TriplaneConfig()
        if cfg.aggregate not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregate {cfg.aggregate!r}; expected one of {sorted(AGGREGATIONS)}"
            )
        self.config = cfg
        d_in = AGGREGATIONS[cfg.aggregate][1](cfg.channels)
        layers: list[nn.Module] = []
        for i in range(cfg.n_hidden):
            layers += [nn.Linear(d_in if i == 0 else cfg.hidden, cfg.hidden), nn.SiLU()]
        layers.append(nn.Linear(cfg.hidden if cfg.n_hidden else d_in, 4))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.mlp(features)
        return out[:, 0], out[:, 1:]


class TriplaneField(RadianceField):
    """A radiance field from planes (3, C, R, R) and a (shared) ``TriplaneDecoder``; colour is
    view-independent. ``planes`` may carry a graph back to whatever produced them."""

    def __init__(self, planes: Tensor, decoder: TriplaneDecoder) -> None:
        cfg = decoder.config
        super().__init__(FieldConfig(aabb=cfg.aabb))
        want = (N_PLANES, cfg.channels)
        if planes.ndim != 4 or tuple(planes.shape[:2]) != want:
            raise ValueError(
                f"planes must be (3, {cfg.channels}, R, R) for this decoder, "
                f"got {tuple(planes.shape)}"
            )
        self.triplane_config = cfg
        self.planes = planes  # a plain attribute, not a parameter: the generator owns it
        self.decoder = decoder
        self.aabb = self.aabb.to(planes.device)

    def _raw(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.normalize(points)
        feats = AGGREGATIONS[self.triplane_config.aggregate][0](sample_planes(self.planes, x))
        raw, logits = self.decoder(feats)
        c = self.triplane_config
        if c.blob_density:
            raw = raw + c.blob_density * (1 - x.norm(dim=-1) / c.blob_radius)
        return x, raw, logits

    def density(self, points: Tensor) -> Tensor:
        self._check(points)
        x, raw, _ = self._raw(points)
        sigma = F.softplus(raw)
        return torch.where((x.abs() <= 1).all(-1), sigma, torch.zeros_like(sigma))

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        self._check(points, dirs)
        x, raw, logits = self._raw(points)
        sigma = torch.where((x.abs() <= 1).all(-1), F.softplus(raw), torch.zeros_like(raw))
        return sigma, torch.sigmoid(logits)


__all__ = [
    "AGGREGATIONS",
    "DEFAULT_AABB",
    "N_PLANES",
    "PLANE_AXES",
    "TriplaneConfig",
    "TriplaneDecoder",
    "TriplaneField",
    "bilinear_reference",
    "plane_coords",
    "sample_planes",
]
