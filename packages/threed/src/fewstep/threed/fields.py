"""Radiance fields with one interface: ``field(points (N, 3), dirs (N, 3)) -> (density (N,),
rgb (N, 3))``; ``field.density(points)`` gives the density alone (occupancy grids use it).

Points are world coordinates; each field covers an axis-aligned scene box ``aabb`` (grid
fields return zero density outside it), directions are unit vectors, density is >= 0 in
inverse world units, rgb is in [0, 1].

- ``MLPField``: NeRF (Mildenhall et al. 2020), positional encoding (eq. 4) and an MLP.
- ``HashGridField``: Instant-NGP (Müller et al. 2022), multi-resolution hash encoding (Sec. 3,
  eq. 3-4) with trilinear interpolation, written in PyTorch, and tiny MLPs.
- ``TensoRFField``: TensoRF (Chen et al. 2022), vector-matrix (VM) decomposition (Sec. 3.2).
- ``VoxelField``: a dense grid of density and colour, trilinearly interpolated (as DVGO /
  Plenoxels without SH).

``FIELDS`` maps names to (class, config class); ``make_field(name, **config)`` builds one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.threed.gaussians import num_sh_bases, sh_basis

DEFAULT_AABB = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)


@dataclass
class FieldConfig:
    """Shared by every field."""

    aabb: tuple[float, ...] = DEFAULT_AABB  # scene box (xmin, ymin, zmin, xmax, ymax, zmax)


class _TruncExp(torch.autograd.Function):
    """exp with its gradient clamped at exp(15) (Instant-NGP's density activation)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


def positional_encoding(x: Tensor, n_freqs: int, include_input: bool = True) -> Tensor:
    """NeRF eq. 4: (x, sin(2^k pi x), cos(2^k pi x)) for k < n_freqs; x (N, d) ->
    (N, d (include_input) + 2 d n_freqs)."""
    freqs = (2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device)) * math.pi
    xf = (x[..., None, :] * freqs[:, None]).flatten(-2)  # (N, n_freqs * d)
    parts = [x] if include_input else []
    return torch.cat([*parts, torch.sin(xf), torch.cos(xf)], dim=-1)


def _mlp(n_in: int, width: int, n_hidden: int, n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_hidden):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if n_hidden else n_in, n_out))
    return nn.Sequential(*layers)


class RadianceField(nn.Module):
    """Base class: scene box handling and the ``(points, dirs) -> (density, rgb)`` contract."""

    def __init__(self, config: FieldConfig) -> None:
        super().__init__()
        if len(config.aabb) != 6:
            raise ValueError(f"aabb must be 6 numbers (min xyz, max xyz), got {config.aabb}")
        aabb = torch.tensor(config.aabb, dtype=torch.float32).reshape(2, 3)
        if not bool((aabb[1] > aabb[0]).all()):
            raise ValueError(f"aabb max must exceed min on every axis, got {config.aabb}")
        self.config = config
        self.register_buffer("aabb", aabb)

    def normalize(self, points: Tensor) -> Tensor:
        """World points (N, 3) -> box coordinates in [-1, 1]^3 (outside the box: beyond)."""
        lo, hi = self.aabb[0].to(points), self.aabb[1].to(points)
        return 2.0 * (points - lo) / (hi - lo) - 1.0

    def inside(self, points: Tensor) -> Tensor:
        """(N,) bool: points within the scene box."""
        x = self.normalize(points)
        return (x.abs() <= 1.0).all(-1)

    def density(self, points: Tensor) -> Tensor:
        """Density (N,) >= 0 at world points (N, 3)."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split into ``network`` (weights of linear layers: the MLPs and TensoRF's
        basis matrix) and ``grid`` (everything else: grids, hash tables, VM factors), which the
        papers train at different learning rates (TensoRF: 0.02 grid, 1e-3 network)."""
        linear = {id(p) for m in self.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
        net = [p for p in self.parameters() if id(p) in linear]
        grid = [p for p in self.parameters() if id(p) not in linear]
        return {"grid": grid, "network": net}

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        """points (N, 3), unit dirs (N, 3) -> density (N,), rgb (N, 3) in [0, 1]."""
        raise NotImplementedError

    @staticmethod
    def _check(points: Tensor, dirs: Tensor | None = None) -> None:
        if points.ndim != 2 or points.shape[-1] != 3:
            raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
        if dirs is not None and dirs.shape != points.shape:
            raise ValueError(
                f"dirs must match points {tuple(points.shape)}, got {tuple(dirs.shape)}"
            )


# ---------------------------------------------------------------------------------------------
# NeRF MLP
# ---------------------------------------------------------------------------------------------


@dataclass
class MLPFieldConfig(FieldConfig):
    """NeRF's MLP, scaled down (NeRF: 10 / 4 frequencies, 8 layers of 256)."""

    n_freqs_pos: int = 6  # positional-encoding frequencies for positions (box coords in [-1, 1])
    n_freqs_dir: int = 2  # positional-encoding frequencies for directions
    width: int = 64  # hidden width of the trunk
    depth: int = 3  # hidden layers of the trunk
    color_width: int = 32  # hidden width of the view-dependent colour head
    density_bias: float = -1.0  # density = softplus(raw + bias) (Mip-NeRF's softplus, not ReLU)


class MLPField(RadianceField):
    """NeRF (Mildenhall et al. 2020, Sec. 5.1 / Fig. 7): density from the encoded position,
    colour from a trunk feature and the encoded view direction."""

    def __init__(self, config: MLPFieldConfig | None = None) -> None:
        cfg = config or MLPFieldConfig()
        super().__init__(cfg)
        n_pos = 3 + 6 * cfg.n_freqs_pos
        n_dir = 3 + 6 * cfg.n_freqs_dir
        self.trunk_net = _mlp(n_pos, cfg.width, cfg.depth, cfg.width + 1)
        self.color_net = _mlp(cfg.width + n_dir, cfg.color_width, 1, 3)

    def _trunk(self, points: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk_net(positional_encoding(self.normalize(points), self.config.n_freqs_pos))
        return F.softplus(h[:, 0] + self.config.density_bias), h[:, 1:]

    def density(self, points: Tensor) -> Tensor:
        self._check(points)
        return self._trunk(points)[0]

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        self._check(points, dirs)
        sigma, feat = self._trunk(points)
        d = positional_encoding(dirs, self.config.n_freqs_dir)
        return sigma, torch.sigmoid(self.color_net(torch.cat([feat, d], -1)))


# ---------------------------------------------------------------------------------------------
# Instant-NGP hash grid
# ---------------------------------------------------------------------------------------------

# Instant-NGP's spatial hash primes (eq. 4; pi_1 = 1 for cache coherence).
HASH_PRIMES = (1, 2654435761, 805459861)


@dataclass
class HashGridFieldConfig(FieldConfig):
    """Instant-NGP's hash encoding (its defaults: 16 levels, 2^19 entries, N_max 2048)."""

    n_levels: int = 8  # L, resolution levels
    n_features: int = 2  # F, features per level
    log2_table_size: int = 14  # log2 T, hash table entries per level
    base_resolution: int = 16  # N_min, coarsest grid resolution
    max_resolution: int = 256  # N_max, finest grid resolution
    hidden: int = 32  # hidden width of the density and colour MLPs (NGP: 64)
    geo_features: int = 15  # features passed from the density MLP to the colour MLP
    init_scale: float = 1e-4  # table entries start uniform in [-init_scale, init_scale]


class HashGridEncoding(nn.Module):
    """Multi-resolution hash encoding (Müller et al. 2022, Sec. 3): per level l the grid
    resolution is ``N_l = floor(N_min b^l)`` with ``b = exp((ln N_max - ln N_min) / (L - 1))``
    (eq. 2-3); a point's 8 surrounding vertices are looked up (dense indexing where the level
    has at most T vertices, else the hash ``xor_i(x_i pi_i) mod T`` of eq. 4 in uint32
    arithmetic) and trilinearly interpolated; the L feature vectors are concatenated."""

    def __init__(self, cfg: HashGridFieldConfig) -> None:
        super().__init__()
        L, T = cfg.n_levels, 2**cfg.log2_table_size
        if L < 1 or cfg.max_resolution < cfg.base_resolution:
            raise ValueError("need n_levels >= 1 and max_resolution >= base_resolution")
        b = math.exp((math.log(cfg.max_resolution) - math.log(cfg.base_resolution)) / max(L - 1, 1))
        res = [int(math.floor(cfg.base_resolution * b**level)) for level in range(L)]
        sizes = [min(T, (r + 1) ** 3) for r in res]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.n_levels, self.n_features, self.table_size = L, cfg.n_features, T
        self.register_buffer("resolutions", torch.tensor(res, dtype=torch.long))
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long))
        self.register_buffer("offsets", torch.tensor(offsets[:-1], dtype=torch.long))
        self.register_buffer("hashed", torch.tensor([(r + 1) ** 3 > T for r in res]))
        table = torch.empty(offsets[-1], cfg.n_features).uniform_(-cfg.init_scale, cfg.init_scale)
        self.table = nn.Parameter(table)

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features

    def forward(self, x01: Tensor) -> Tensor:
        """x01 (N, 3) in [0, 1]^3 -> features (N, L * F)."""
        res = self.resolutions.to(x01.dtype)
        pos = x01.clamp(0, 1)[:, None, :] * res[None, :, None]  # (N, L, 3)
        p0 = torch.floor(pos).clamp(max=res[None, :, None] - 1)
        frac = pos - p0
        base = p0.long()  # (N, L, 3)
        r1 = (self.resolutions + 1)[None, :]
        ids, ws = [], []
        for corner in range(8):  # corner bits (x, y, z) = (corner >> 2, corner >> 1, corner) & 1
            bits = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
            v = [base[..., i] + bits[i] for i in range(3)]  # (N, L) each
            h = (
                v[0]
                ^ ((v[1] * HASH_PRIMES[1]) & 0xFFFFFFFF)
                ^ ((v[2] * HASH_PRIMES[2]) & 0xFFFFFFFF)
            )
            dense = v[0] + r1 * (v[1] + r1 * v[2])
            ids.append(torch.where(self.hashed[None, :], h % self.table_size, dense))
            w = [frac[..., i] if bits[i] else 1 - frac[..., i] for i in range(3)]
            ws.append(w[0] * w[1] * w[2])
        idx = torch.stack(ids, -1) + self.offsets[None, :, None]  # (N, L, 8)
        w = torch.stack(ws, -1)  # (N, L, 8) trilinear weights
        feats = self.table.index_select(0, idx.flatten()).reshape(*idx.shape, self.n_features)
        return (w[..., None].to(feats.dtype) * feats).sum(2).flatten(1)  # (N, L * F)


class HashGridField(RadianceField):
    """Instant-NGP field (Müller et al. 2022, Sec. 5.4): hash encoding -> density MLP (one
    hidden layer; density = trunc_exp of its first output) -> colour MLP (two hidden layers)
    on the remaining features and the SH encoding of the view direction (16 coefficients)."""

    def __init__(self, config: HashGridFieldConfig | None = None) -> None:
        cfg = config or HashGridFieldConfig()
        super().__init__(cfg)
        self.encoding = HashGridEncoding(cfg)
        self.density_net = _mlp(self.encoding.out_dim, cfg.hidden, 1, 1 + cfg.geo_features)
        self.color_net = _mlp(cfg.geo_features + num_sh_bases(3), cfg.hidden, 2, 3)

    def _geo(self, points: Tensor) -> tuple[Tensor, Tensor]:
        x = self.normalize(points)
        h = self.density_net(self.encoding((x + 1) / 2))
        inside = (x.abs() <= 1).all(-1)
        sigma = torch.where(inside, trunc_exp(h[:, 0]), torch.zeros_like(h[:, 0]))
        return sigma, h[:, 1:]

    def density(self, points: Tensor) -> Tensor:
        self._check(points)
        return self._geo(points)[0]

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        self._check(points, dirs)
        sigma, geo = self._geo(points)
        rgb = torch.sigmoid(self.color_net(torch.cat([geo, sh_basis(3, dirs)], -1)))
        return sigma, rgb


# ---------------------------------------------------------------------------------------------
# TensoRF vector-matrix factorisation
# ---------------------------------------------------------------------------------------------


@dataclass
class TensoRFFieldConfig(FieldConfig):
    """TensoRF-VM (its defaults: 16 / 48 components per mode, 300^3 final resolution)."""

    resolution: int = 64  # grid resolution per axis of every plane and line
    density_components: int = 8  # R_sigma, components per plane/line pair (per mode)
    app_components: int = 16  # R_c, appearance components per mode
    app_dim: int = 27  # output of the appearance basis matrix B
    hidden: int = 64  # hidden width of the colour MLP (TensoRF: 128)
    n_freqs_dir: int = 2  # positional-encoding frequencies of the view direction
    n_freqs_feat: int = 2  # positional-encoding frequencies of the appearance feature
    density_shift: float = -10.0  # density = softplus(feature + shift) (TensoRF)
    init_scale: float = 0.1  # factors start as init_scale * N(0, 1)


class TensoRFField(RadianceField):
    """TensoRF-VM (Chen et al. 2022, Sec. 3.2 and 4): a 3-D feature grid as a sum of vector-matrix
    outer products over the three axis modes,
    ``sigma(x) = sum_r sum_m v_r^m(x_m) M_r^{m'}(x_{m'})``; appearance uses the same
    factorisation with R_c components per mode, a basis matrix B to ``app_dim`` features and
    an MLP with the encoded view direction. Planes and lines are bilinearly / linearly
    interpolated (trilinear overall)."""

    # (plane axes, line axis) per mode: XY with Z, XZ with Y, YZ with X.
    MODES = (((0, 1), 2), ((0, 2), 1), ((1, 2), 0))

    def __init__(self, config: TensoRFFieldConfig | None = None) -> None:
        cfg = config or TensoRFFieldConfig()
        super().__init__(cfg)
        r, s = cfg.resolution, cfg.init_scale

        def factors(n: int) -> tuple[nn.ParameterList, nn.ParameterList]:
            planes = nn.ParameterList([nn.Parameter(s * torch.randn(1, n, r, r)) for _ in range(3)])
            lines = nn.ParameterList([nn.Parameter(s * torch.randn(1, n, r, 1)) for _ in range(3)])
            return planes, lines

        self.density_planes, self.density_lines = factors(cfg.density_components)
        self.app_planes, self.app_lines = factors(cfg.app_components)
        self.basis_net = nn.Linear(3 * cfg.app_components, cfg.app_dim, bias=False)
        n_in = cfg.app_dim * (1 + 2 * cfg.n_freqs_feat) + 3 * (1 + 2 * cfg.n_freqs_dir)
        self.color_net = _mlp(n_in, cfg.hidden, 2, 3)

    def _vm(self, x: Tensor, planes: nn.ParameterList, lines: nn.ParameterList) -> list[Tensor]:
        """Per mode, the component-wise products v(x_m) * M(x_m') (N, R)."""
        out = []
        for (pa, la), plane, line in zip(self.MODES, planes, lines):
            # grid_sample's grid is (x -> width, y -> height): plane[h = axis pa[1], w = pa[0]].
            gp = x[:, list(pa)].to(plane.dtype)[None, :, None, :]  # (1, N, 1, 2)
            gl = torch.stack([torch.zeros_like(x[:, la]), x[:, la]], -1).to(line.dtype)
            p = F.grid_sample(plane, gp, mode="bilinear", align_corners=True)  # (1, R, N, 1)
            v = F.grid_sample(line, gl[None, :, None, :], mode="bilinear", align_corners=True)
            out.append((p * v)[0, :, :, 0].t())  # (N, R)
        return out

    def _sigma(self, x: Tensor) -> Tensor:
        feat = sum(m.sum(-1) for m in self._vm(x, self.density_planes, self.density_lines))
        inside = (x.abs() <= 1).all(-1)
        sigma = F.softplus(feat + self.config.density_shift)
        return torch.where(inside, sigma, torch.zeros_like(sigma))

    def density(self, points: Tensor) -> Tensor:
        self._check(points)
        return self._sigma(self.normalize(points))

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        self._check(points, dirs)
        x = self.normalize(points)
        app = self.basis_net(torch.cat(self._vm(x, self.app_planes, self.app_lines), -1))
        cfg = self.config
        h = torch.cat(
            [
                positional_encoding(app, cfg.n_freqs_feat),
                positional_encoding(dirs.to(app.dtype), cfg.n_freqs_dir),
            ],
            -1,
        )
        return self._sigma(x), torch.sigmoid(self.color_net(h))


# ---------------------------------------------------------------------------------------------
# Dense voxel grid
# ---------------------------------------------------------------------------------------------


@dataclass
class VoxelFieldConfig(FieldConfig):
    """A dense grid of raw density and colour logits at its vertices."""

    resolution: int = 32  # vertices per axis
    density_init: float = -2.0  # initial raw density (density = softplus(raw))


class VoxelField(RadianceField):
    """Dense voxel grid with view-independent colour: raw density and colour logits at R^3
    vertices spanning the box, trilinearly interpolated and then activated (density =
    softplus(raw), rgb = sigmoid(logits)); activating after interpolation gives sharp
    boundaries (DVGO's "post-activation", Sun et al. 2022)."""

    def __init__(self, config: VoxelFieldConfig | None = None) -> None:
        cfg = config or VoxelFieldConfig()
        super().__init__(cfg)
        r = cfg.resolution
        # Stored as (1, 4, Z, Y, X): grid_sample's layout for (x, y, z) sample coordinates.
        grid = torch.zeros(1, 4, r, r, r)
        grid[:, 0] = cfg.density_init
        self.grid = nn.Parameter(grid)

    @classmethod
    def from_grids(
        cls, density: Tensor, rgb: Tensor, config: VoxelFieldConfig | None = None
    ) -> VoxelField:
        """A field with given vertex values: density (R, R, R) >= 0 and rgb (R, R, R, 3) in
        (0, 1), both indexed [x, y, z]; values are stored as inverse activations."""
        r = density.shape[0]
        if density.shape != (r, r, r) or rgb.shape != (r, r, r, 3):
            raise ValueError(
                f"expected density (R, R, R) and rgb (R, R, R, 3), got {tuple(density.shape)} "
                f"and {tuple(rgb.shape)}"
            )
        cfg = config or VoxelFieldConfig()
        field = cls(VoxelFieldConfig(**{**_asdict(cfg), "resolution": r}))
        raw = torch.where(density > 20, density, torch.log(torch.expm1(density.clamp_min(1e-6))))
        logits = torch.logit(rgb.clamp(1e-4, 1 - 1e-4))
        grid = torch.cat([raw[..., None], logits], -1).permute(3, 2, 1, 0)  # (4, z, y, x)
        with torch.no_grad():
            field.grid.copy_(grid[None].to(field.grid.dtype))
        return field

    def _sample(self, x: Tensor) -> Tensor:
        g = x.to(self.grid.dtype)[None, :, None, None, :]  # (1, N, 1, 1, 3)
        v = F.grid_sample(self.grid, g, mode="bilinear", align_corners=True)  # (1, 4, N, 1, 1)
        return v[0, :, :, 0, 0].t()  # (N, 4)

    def density(self, points: Tensor) -> Tensor:
        self._check(points)
        x = self.normalize(points)
        sigma = F.softplus(self._sample(x)[:, 0])
        return torch.where((x.abs() <= 1).all(-1), sigma, torch.zeros_like(sigma))

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        self._check(points, dirs)
        x = self.normalize(points)
        v = self._sample(x)
        sigma = F.softplus(v[:, 0])
        sigma = torch.where((x.abs() <= 1).all(-1), sigma, torch.zeros_like(sigma))
        return sigma, torch.sigmoid(v[:, 1:])


def toy_voxel_scene(resolution: int = 24, density: float = 30.0) -> VoxelField:
    """A procedural scene for tests and demos (no data ships with fewstep): in the box
    [-1, 1]^3, a sphere of radius 0.55 at the origin coloured by its surface normal
    (rgb = 0.5 + 0.45 n) and a red cube of half-size 0.25 centred at (0.35, 0.35, 0.3), both
    of constant ``density``, empty elsewhere; stored in a ``VoxelField`` of ``resolution``^3
    vertices."""
    ax = torch.linspace(-1, 1, resolution)
    p = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1)  # [x, y, z]
    sphere = p.norm(dim=-1) < 0.55
    cube = (p - torch.tensor([0.35, 0.35, 0.3])).abs().amax(-1) < 0.25
    sigma = torch.where(sphere | cube, density, 0.0)
    rgb = (0.5 + 0.45 * F.normalize(p, dim=-1)).clamp(0.05, 0.95)
    rgb[cube] = torch.tensor([0.9, 0.2, 0.1])
    return VoxelField.from_grids(sigma, rgb)


def _asdict(cfg: Any) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


# Field name -> (field class, its config class).
FIELDS: dict[str, tuple[type[RadianceField], type[FieldConfig]]] = {
    "mlp": (MLPField, MLPFieldConfig),
    "hashgrid": (HashGridField, HashGridFieldConfig),
    "tensorf": (TensoRFField, TensoRFFieldConfig),
    "voxel": (VoxelField, VoxelFieldConfig),
}


def make_field(name: str, **config: Any) -> RadianceField:
    """Build a registered field: ``make_field("hashgrid", n_levels=4)``."""
    if name not in FIELDS:
        raise KeyError(f"unknown field {name!r}; expected one of {sorted(FIELDS)}")
    cls, cfg_cls = FIELDS[name]
    valid = {f.name for f in fields(cfg_cls)}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise TypeError(f"{name} field got unknown config keys {unknown}; valid: {sorted(valid)}")
    return cls(cfg_cls(**config))
