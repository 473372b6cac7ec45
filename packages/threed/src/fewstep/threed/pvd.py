"""PVD: progressive volume distillation between radiance-field architectures.

Fang, Xu, Wang, Yang, Tian, Zhang, "One is All: Bridging the Gap Between Neural Radiance
Fields Architectures with Progressive Volume Distillation", AAAI 2023 (official code:
megvii-research/AAAI2023-PVD). A trained teacher field of any type teaches a student of any
other type by matching, stage by stage from shallow to deep (paper Sec. 3.2-3.3):

1. ``shallow``: the intermediate feature each architecture feeds its density/colour heads
   (their ``feature_sigma_color``: hash-grid and NeRF-MLP trunk outputs, TensoRF's density +
   appearance features); where a field has none (Plenoxels in the paper, ``VoxelField`` here)
   the shallow stage matches density only;
2. ``point``: density and colour of sampled points (``sigma_l``, ``color_l``), plus the decaying
   feature term;
3. ``render``: volume-rendered ray colours (``loss_rgb``) with the per-point terms kept.

The density-range constraint (paper Sec. 3.4, ``--sigma_clip_min -2 --sigma_clip_max 7``):
densities are compared in log space clipped to a range, ``clamp(log sigma, lo, hi)``, so empty
space (log sigma -> -inf) and opaque interiors (huge sigma, where any value above ~e^7 renders
the same) give finite, bounded losses. PVD clamps the pre-activation of its exp-activated
densities inside every network; our fields use softplus / trunc_exp activations that fields.py
owns, so the clip acts on log-density inside the losses, which is the same quantity for exp
activations and gives zero gradient outside the range as the paper's clamp does.

Points (paper Sec. 3.1 samples points along rays of random poses): rays through random pixels
of the given cameras, stratified samples along them inside the scene box, and extra points
uniform in the box with random directions (per-point losses only).

Where the speed comes from (paper Sec. 4, "10-20x faster than training from scratch"): the
per-point stages supervise density and colour of 3-D points directly, so they need no volume
rendering, and the teacher is fixed, so its answers can be computed once. With
``teacher_cache_points > 0`` (the default) the teacher is queried once, before the first step,
on a pool of points (``TeacherCache``: ray samples + uniform points, with its density, colour
and feature) and on a pool of rays (its rendered colours); every step then draws
``point_batch`` pool points for the per-point terms and, in stages with the ``rgb`` term,
``rays_per_step`` pool rays that only the student renders. No step queries the teacher, and a
per-point step costs one student forward/backward on its points. A share
``surface_fraction`` of each point batch is drawn in proportion to the teacher's compositing
weights (NeRF eq. 3) of the pool's ray samples, i.e. where its renders come from (PVD's
occupancy-pruned ray marcher puts its samples there too); the rest uniformly from the pool.
The cache build is counted in the log's clocks. ``teacher_cache_points = 0`` queries the
teacher live on each step's own rays and points (the per-point terms then read the ray samples
too), as before.

Feature dimensions differ between our field types (PVD sizes its networks so they agree); when
they differ, or the fields are of different classes, a learned linear map from the student's
feature to the teacher's (a FitNets regressor, Romero et al. 2015) is trained jointly in the
stages that use the feature loss and then dropped.

Intermediate feature each field type provides (``FEATURES``, read by introspection; fields.py
could grow a ``RadianceField.features(points) -> Tensor | None`` hook to replace it):

- ``MLPField``: the trunk output (width + 1; column 0 is the raw density);
- ``HashGridField``: the density MLP output (1 + geo_features; column 0 is log density);
- ``TensoRFField``: the VM density feature (1) and the appearance basis output (app_dim);
- ``VoxelField``: none (its grid values are density and colour logits themselves).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.threed.cameras import Cameras, rays
from fewstep.threed.fields import (
    HashGridField,
    MLPField,
    RadianceField,
    TensoRFField,
    positional_encoding,
)
from fewstep.threed.volume import (
    VolumeRenderConfig,
    background_color,
    composite,
    ray_aabb,
    render_field,
    sample_bins,
)

# ---------------------------------------------------------------------------------------------
# Intermediate features (introspection; no hook in fields.py yet)
# ---------------------------------------------------------------------------------------------


def _mlp_features(f: MLPField, points: Tensor) -> Tensor:
    return f.trunk_net(positional_encoding(f.normalize(points), f.config.n_freqs_pos))


def _hashgrid_features(f: HashGridField, points: Tensor) -> Tensor:
    x = f.normalize(points)
    return f.density_net(f.encoding((x + 1) / 2))


def _tensorf_features(f: TensoRFField, points: Tensor) -> Tensor:
    x = f.normalize(points)
    dens = sum(m.sum(-1) for m in f._vm(x, f.density_planes, f.density_lines))
    app = f.basis_net(torch.cat(f._vm(x, f.app_planes, f.app_lines), -1))
    return torch.cat([dens[:, None], app], -1)


# Field class -> function (field, points (N, 3)) -> the feature its heads read (N, D).
FEATURES: dict[type, Callable[[Any, Tensor], Tensor]] = {
    MLPField: _mlp_features,
    HashGridField: _hashgrid_features,
    TensoRFField: _tensorf_features,
}


def feature_fn(f: RadianceField) -> Callable[[Tensor], Tensor] | None:
    """The field's intermediate-feature function (points (N, 3) -> (N, D)), or None when its
    type exposes none (``VoxelField``, unknown subclasses)."""
    for cls in type(f).__mro__:
        if cls in FEATURES:
            fn = FEATURES[cls]
            return lambda p: fn(f, p)
    return None


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class PVDStage:
    """One stage of the schedule."""

    name: str  # label in the log ("shallow", "point", "render")
    steps: int  # optimisation steps in this stage
    losses: dict[str, float]  # loss name (a key of LOSSES) -> weight
    lr_scale: float = 1.0  # multiplies both learning rates in this stage (PVD: lr per stage)


def default_stages(shallow: int = 100, point: int = 200, render: int = 300) -> tuple:
    """PVD's three stages (their stage_iters 2000 / 5000 / 30000 at full scale). The feature
    weight also decays by ``feature_decay`` per step, as PVD's ``loss_rate_fea_sc``."""
    return (
        PVDStage("shallow", shallow, {"feature": 1.0}),
        PVDStage("point", point, {"feature": 1.0, "sigma": 1.0, "color": 1.0}),
        PVDStage("render", render, {"rgb": 1.0, "sigma": 0.1, "color": 0.1}),
    )


@dataclass
class PVDConfig:
    """Progressive volume distillation settings (defaults sized for CPU toy scenes)."""

    stages: tuple[PVDStage, ...] = field(default_factory=default_stages)  # run in order
    sigma_clip: tuple[float, float] = (-2.0, 7.0)  # log-density range of the losses (PVD's)
    feature_decay: float = 0.995  # feature-loss weight multiplier per step (PVD)
    feature_adapter: str = "auto"  # auto, linear or identity (see module docstring)
    rays_per_step: int = 512  # rays through random pixels of the cameras per step
    samples_per_ray: int = 32  # stratified samples per ray inside the scene box
    uniform_points: int = 2048  # live mode: extra uniform points per step (per-point losses)
    teacher_cache_points: int = 65536  # teacher answers precomputed once (0: query live)
    teacher_cache_rays: int = 4096  # rays whose teacher colour is precomputed (rgb term)
    cache_uniform_fraction: float = 0.25  # share of the point pool uniform in the box
    surface_fraction: float = 0.5  # share of each point batch drawn by teacher weight w_i
    point_batch: int = 8192  # pool points per step for the per-point terms (cached mode)
    lr_grid: float = 0.02  # Adam lr of grids / hash tables / VM factors (TensoRF's)
    lr_network: float = 5e-3  # Adam lr of MLP weights (and the feature adapter)
    background: str = "white"  # composited background of rendered rays
    eval_every: int = 50  # steps between held-out evaluations (0: only at the end)
    eval_samples: int = 64  # samples per ray when rendering held-out views
    seed: int = 0  # seeds ray / point sampling


def _check_cfg(cfg: PVDConfig, losses: dict) -> None:
    lo, hi = cfg.sigma_clip
    if not lo < hi:
        raise ValueError(f"sigma_clip must be (low, high) with low < high, got {cfg.sigma_clip}")
    if cfg.feature_adapter not in ADAPTERS:
        raise ValueError(
            f"feature_adapter {cfg.feature_adapter!r} unknown; expected one of {list(ADAPTERS)}"
        )
    if not cfg.stages:
        raise ValueError("PVDConfig.stages is empty; give at least one PVDStage")
    for st in cfg.stages:
        bad = sorted(set(st.losses) - set(losses))
        if bad:
            raise ValueError(
                f"stage {st.name!r} names unknown losses {bad}; known: {sorted(losses)}"
            )
        if st.steps < 0:
            raise ValueError(f"stage {st.name!r} has negative steps {st.steps}")
        if not st.lr_scale > 0:
            raise ValueError(f"stage {st.name!r} needs lr_scale > 0, got {st.lr_scale}")
    if cfg.teacher_cache_points < 0 or cfg.teacher_cache_rays < 0:
        raise ValueError(
            "teacher_cache_points / teacher_cache_rays must be >= 0, got "
            f"{cfg.teacher_cache_points} / {cfg.teacher_cache_rays}"
        )
    if not 0.0 <= cfg.surface_fraction <= 1.0:
        raise ValueError(f"surface_fraction must be in [0, 1], got {cfg.surface_fraction}")
    if not 0.0 <= cfg.cache_uniform_fraction <= 1.0:
        raise ValueError(
            f"cache_uniform_fraction must be in [0, 1], got {cfg.cache_uniform_fraction}"
        )


# ---------------------------------------------------------------------------------------------
# Losses (pure functions)
# ---------------------------------------------------------------------------------------------


def clipped_log_density(sigma: Tensor, clip: tuple[float, float]) -> Tensor:
    """PVD's density-range constraint: ``clamp(log sigma, lo, hi)`` (N,), computed as
    ``log(clamp(sigma, e^lo, e^hi))`` so sigma = 0 gives lo (not -inf) and huge or infinite
    sigma gives hi."""
    lo, hi = clip
    return torch.log(sigma.clamp(math.exp(lo), math.exp(hi)))


# Student log densities are floored here before the loss (sigma may underflow to 0).
LOG_SIGMA_FLOOR = math.log(1e-10)


def density_range_error(
    student_sigma: Tensor, teacher_sigma: Tensor, clip: tuple[float, float]
) -> Tensor:
    """Per-point log-density error (N,) under PVD's density-range constraint.

    The target is the teacher's clipped log density ``tau = clamp(log sigma_t, lo, hi)``.
    Where tau is inside the range the student matches it; where tau sits at a bound the
    student is only penalised on the wrong side of it (above ``lo`` where the teacher is
    empty, below ``hi`` where it is opaque), which is what clamping both networks does in
    PVD, except that a student initialised far below the floor (TensoRF's
    ``softplus(x - 10)`` starts at log sigma ~ -10) keeps a gradient towards occupied
    targets, where clamping it too would give none."""
    lo, hi = clip
    tau = clipped_log_density(teacher_sigma, clip)
    s = torch.log(student_sigma.clamp_min(math.exp(LOG_SIGMA_FLOOR)))
    s = torch.where(tau <= lo, s.clamp_min(lo), s)
    s = torch.where(tau >= hi, s.clamp_max(hi), s)
    return s - tau


def psnr(pred: Tensor, target: Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of images in [0, 1]: -10 log10(MSE) over all pixels."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = torch.mean((pred.detach().float() - target.detach().float()) ** 2)
    return float(-10.0 * torch.log10(mse.clamp_min(1e-12)))


@dataclass
class PVDBatch:
    """One step's query points: R rays x S samples first (ray-major), then U uniform points."""

    points: Tensor  # (R * S + U, 3) world points
    dirs: Tensor  # (R * S + U, 3) unit directions
    t: Tensor  # (R, S) sample distances along the rays
    deltas: Tensor  # (R, S) bin widths
    hit: Tensor  # (R,) bool, the ray meets the scene box
    n_rays: int  # R
    n_samples: int  # S


def _sigma_loss(s: dict, t: dict, batch: PVDBatch, cfg: PVDConfig) -> Tensor:
    """Stage-2 density term: mean squared ``density_range_error`` (PVD's ``loss_sigma``)."""
    return torch.mean(density_range_error(s["sigma"], t["sigma"], cfg.sigma_clip) ** 2)


def _color_loss(s: dict, t: dict, batch: PVDBatch, cfg: PVDConfig) -> Tensor:
    """Stage-2 colour term: MSE of per-point rgb (PVD's ``loss_color``), where the teacher's
    density is above the clip floor (colour in empty space is unobservable; PVD's ray
    marcher only visits occupied cells)."""
    w = (t["sigma"] > math.exp(cfg.sigma_clip[0])).to(s["rgb"].dtype)
    err = ((s["rgb"] - t["rgb"]) ** 2).mean(-1)
    return (w * err).sum() / w.sum().clamp_min(1.0)


def render_batch_rays(out: dict, batch: PVDBatch, background: str) -> Tensor:
    """Composite the ray part of a batch (NeRF eq. 3): rgb (R, 3) with the background."""
    R, S = batch.n_rays, batch.n_samples
    sigma = out["sigma"][: R * S].reshape(R, S) * batch.hit[:, None]
    rgb = out["rgb"][: R * S].reshape(R, S, 3)
    _, color, acc, _ = composite(sigma, rgb, batch.t.to(sigma), batch.deltas.to(sigma))
    return color + (1.0 - acc) * background_color(background, color)


def _rgb_loss(s: dict, t: dict, batch: PVDBatch, cfg: PVDConfig) -> Tensor:
    """Stage-3 term: MSE of volume-rendered ray colours (PVD's ``loss_rgb``)."""
    return torch.mean((s["ray_rgb"] - t["ray_rgb"]) ** 2)


def _feature_loss(s: dict, t: dict, batch: PVDBatch, cfg: PVDConfig) -> Tensor:
    """Stage-1 term: MSE between the (adapted) student feature and the teacher's
    (PVD's ``loss_fea_sc``)."""
    return torch.mean((s["feature"] - t["feature"]) ** 2)


@dataclass(frozen=True)
class PVDLoss:
    """A loss and the field outputs it reads."""

    fn: Callable[[dict, dict, PVDBatch, PVDConfig], Tensor]  # (student, teacher, batch, cfg)
    needs: frozenset  # of "feature", "sigma", "rgb", "ray_rgb"


# Loss name -> loss. Stage configs name these.
LOSSES: dict[str, PVDLoss] = {
    "feature": PVDLoss(_feature_loss, frozenset({"feature"})),
    "sigma": PVDLoss(_sigma_loss, frozenset({"sigma"})),
    "color": PVDLoss(_color_loss, frozenset({"sigma", "rgb"})),
    "rgb": PVDLoss(_rgb_loss, frozenset({"ray_rgb"})),
}


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation
# ---------------------------------------------------------------------------------------------


def sample_batch(
    cameras: Cameras,
    aabb: Tensor,
    n_rays: int,
    n_samples: int,
    n_uniform: int,
    g: torch.Generator,
    ray_cache: tuple[Tensor, Tensor] | None = None,
) -> PVDBatch:
    """Rays through ``n_rays`` random pixels of ``cameras`` with stratified samples inside
    ``aabb`` (2, 3), plus ``n_uniform`` points uniform in the box with random directions."""
    o_all, d_all = ray_cache if ray_cache is not None else _flat_rays(cameras)
    idx = torch.randint(0, o_all.shape[0], (n_rays,), generator=g)
    o, d = o_all[idx], d_all[idx]
    t_near, t_far, hit = ray_aabb(o, d, aabb)
    t, deltas = sample_bins(t_near, t_far, n_samples, stratified=True, generator=g)
    pts = (o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3)
    dirs = d[:, None].expand(n_rays, n_samples, 3).reshape(-1, 3)
    lo, hi = aabb[0], aabb[1]
    u = lo + (hi - lo) * torch.rand(n_uniform, 3, generator=g, dtype=lo.dtype)
    du = torch.nn.functional.normalize(torch.randn(n_uniform, 3, generator=g), dim=-1)
    return PVDBatch(
        torch.cat([pts, u]), torch.cat([dirs, du.to(dirs)]), t, deltas, hit, n_rays, n_samples
    )


def _flat_rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    o, d = rays(cameras)
    return o.reshape(-1, 3), d.reshape(-1, 3)


def _query(f: RadianceField, batch: PVDBatch, needs: set, features, adapter, background) -> dict:
    """The outputs ``needs`` names for every point of ``batch``."""
    out: dict[str, Tensor] = {}
    if "feature" in needs:
        feat = features(batch.points)
        out["feature"] = adapter(feat) if adapter is not None else feat
    if needs & {"rgb", "ray_rgb"}:
        out["sigma"], out["rgb"] = f(batch.points, batch.dirs)
    elif "sigma" in needs:
        out["sigma"] = f.density(batch.points)
    if "ray_rgb" in needs:
        out["ray_rgb"] = render_batch_rays(out, batch, background)
    return out


@dataclass
class TeacherCache:
    """The fixed teacher's answers, computed once before distillation (module docstring)."""

    points: Tensor  # (N, 3) world points: ray samples first, then uniform points
    dirs: Tensor  # (N, 3) unit directions the points are seen along
    sigma: Tensor  # (N,) teacher density
    rgb: Tensor  # (N, 3) teacher colour
    feature: Tensor | None  # (N, D) teacher intermediate feature (None: not cached)
    weight: Tensor  # (N,) teacher compositing weight w_i of ray samples (0 for uniform points)
    ray_o: Tensor  # (M, 3) ray origins
    ray_d: Tensor  # (M, 3) unit ray directions
    ray_rgb: Tensor  # (M, 3) teacher's rendered ray colour, background composited


# Points per teacher call while the cache is built (bounds memory, not results).
CACHE_CHUNK = 16384


@torch.no_grad()
def build_teacher_cache(
    teacher: RadianceField,
    cameras: Cameras,
    cfg: PVDConfig,
    g: torch.Generator,
    *,
    features: Callable[[Tensor], Tensor] | None = None,
    n_points: int | None = None,
    n_rays: int | None = None,
    ray_cache: tuple[Tensor, Tensor] | None = None,
) -> TeacherCache:
    """Query ``teacher`` once: ``n_points`` (default ``cfg.teacher_cache_points``) points, of
    which ``cfg.cache_uniform_fraction`` uniform in the box with random directions and the
    rest stratified samples (``cfg.samples_per_ray`` per ray) along rays through random pixels
    of ``cameras``, with density, colour and (``features`` given) feature; and ``n_rays``
    (default ``cfg.teacher_cache_rays``) random pixel rays rendered with ``cfg.eval_samples``
    bin midpoints."""
    n_points = cfg.teacher_cache_points if n_points is None else n_points
    n_rays = cfg.teacher_cache_rays if n_rays is None else n_rays
    o_all, d_all = ray_cache if ray_cache is not None else _flat_rays(cameras)
    aabb = teacher.aabb.detach()
    S = cfg.samples_per_ray
    n_uniform = int(round(n_points * cfg.cache_uniform_fraction))
    n_on_rays = n_points - n_uniform
    batch = sample_batch(cameras, aabb, -(-n_on_rays // S), S, n_uniform, g, (o_all, d_all))
    keep = torch.cat([torch.arange(n_on_rays), torch.arange(n_uniform) + batch.n_rays * S])
    pts, dirs = batch.points[keep], batch.dirs[keep]
    sig, rgb, feat = [], [], []
    for i in range(0, len(pts), CACHE_CHUNK):
        p, d = pts[i : i + CACHE_CHUNK], dirs[i : i + CACHE_CHUNK]
        a, b = teacher(p, d)
        sig.append(a)
        rgb.append(b)
        if features is not None:
            feat.append(features(p))
    weight = pts.new_zeros(len(pts))
    if n_on_rays > 0:
        # NeRF eq. 3 weights of the ray samples: where the teacher's renders come from, which
        # PVD's occupancy-pruned ray marcher concentrates its points on.
        full = batch.n_rays * S
        sig_r = torch.cat(sig)[:n_on_rays]
        sig_r = torch.cat([sig_r, sig_r.new_zeros(full - n_on_rays)]).reshape(batch.n_rays, S)
        w, _, _, _ = composite(
            sig_r * batch.hit[:, None], sig_r.new_zeros(batch.n_rays, S, 3), batch.t, batch.deltas
        )
        weight[:n_on_rays] = w.reshape(-1)[:n_on_rays]
    ridx = torch.randint(0, o_all.shape[0], (n_rays,), generator=g)
    ro, rd = o_all[ridx], d_all[ridx]
    colors = []
    n_chunk = max(1, CACHE_CHUNK // cfg.eval_samples)
    for i in range(0, n_rays, n_chunk):
        o, d = ro[i : i + n_chunk], rd[i : i + n_chunk]
        t_near, t_far, hit = ray_aabb(o, d, aabb)
        t, deltas = sample_bins(t_near, t_far, cfg.eval_samples)
        rb = PVDBatch(
            (o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3),
            d[:, None].expand(len(o), cfg.eval_samples, 3).reshape(-1, 3),
            t, deltas, hit, len(o), cfg.eval_samples,
        )  # fmt: skip
        a, b = teacher(rb.points, rb.dirs)
        colors.append(render_batch_rays({"sigma": a, "rgb": b}, rb, cfg.background))

    def cat(xs: list[Tensor], shape: tuple) -> Tensor:
        return torch.cat(xs) if xs else pts.new_zeros(shape)

    return TeacherCache(
        pts, dirs, cat(sig, (0,)), cat(rgb, (0, 3)), torch.cat(feat) if feat else None,
        weight, ro, rd, cat(colors, (0, 3)),
    )  # fmt: skip


def _cached_outputs(
    student: RadianceField,
    cache: TeacherCache,
    needs: set,
    cfg: PVDConfig,
    g: torch.Generator,
    s_feat,
    adapter,
) -> tuple[dict, dict, PVDBatch]:
    """Student outputs and the teacher's cached ones for one cached-mode step: ``rays_per_step``
    pool rays (stratified samples, rendered by the student only) where ``needs`` has
    ``ray_rgb``, and ``point_batch`` pool points for the per-point outputs."""
    s_out: dict[str, Tensor] = {}
    t_out: dict[str, Tensor] = {}
    batch = None
    if "ray_rgb" in needs:
        R, S = cfg.rays_per_step, cfg.samples_per_ray
        idx = torch.randint(0, len(cache.ray_o), (R,), generator=g)
        o, d = cache.ray_o[idx], cache.ray_d[idx]
        t_near, t_far, hit = ray_aabb(o, d, student.aabb.detach())
        t, deltas = sample_bins(t_near, t_far, S, stratified=True, generator=g)
        pts = (o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3)
        batch = PVDBatch(pts, d[:, None].expand(R, S, 3).reshape(-1, 3), t, deltas, hit, R, S)
        s_out["ray_rgb"] = _query(student, batch, {"ray_rgb"}, None, None, cfg.background)[
            "ray_rgb"
        ]
        t_out["ray_rgb"] = cache.ray_rgb[idx]
    point_needs = needs - {"ray_rgb"}
    if point_needs:
        idx = _draw_points(cache, cfg.point_batch, cfg.surface_fraction, g)
        empty = cache.points.new_zeros(0, 0)
        no_hit = torch.zeros(0, dtype=torch.bool)
        pb = PVDBatch(cache.points[idx], cache.dirs[idx], empty, empty, no_hit, 0, 0)
        out = _query(student, pb, point_needs, s_feat, adapter, cfg.background)
        for k in ("sigma", "rgb"):
            if k in out:
                s_out[k] = out[k]
                t_out[k] = getattr(cache, k)[idx]
        if "feature" in point_needs:
            s_out["feature"] = out["feature"]
            t_out["feature"] = cache.feature[idx]
        batch = batch or pb
    return s_out, t_out, batch


def _draw_points(cache: TeacherCache, n: int, surface: float, g: torch.Generator) -> Tensor:
    """Indices (n,) into the point pool: ``surface`` of them drawn with probability
    proportional to the teacher's compositing weight, the rest uniformly."""
    n_surf = int(round(n * surface)) if float(cache.weight.sum()) > 0 else 0
    idx = torch.randint(0, len(cache.points), (n - n_surf,), generator=g)
    if n_surf:
        surf = torch.multinomial(cache.weight, n_surf, replacement=True, generator=g)
        idx = torch.cat([idx, surf])
    return idx


def _set_stage_lr(opt: torch.optim.Adam, cfg: PVDConfig, scale: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * scale


@torch.no_grad()
def evaluate_views(
    f: RadianceField, cameras: Cameras, images: Tensor, samples: int = 64, background="white"
) -> float:
    """PSNR of ``f`` rendered at ``cameras`` against ``images`` (C, H, W, 3)."""
    was = f.training
    f.eval()
    out = render_field(f, cameras, VolumeRenderConfig(n_samples=samples, background=background))
    f.train(was)
    return psnr(out["image"], images)


def _optimizer(f: RadianceField, cfg: PVDConfig, extra: list[nn.Parameter]) -> torch.optim.Adam:
    groups = f.parameter_groups()
    params = [
        {"params": groups["grid"], "lr": cfg.lr_grid, "base_lr": cfg.lr_grid},
        {"params": groups["network"] + extra, "lr": cfg.lr_network, "base_lr": cfg.lr_network},
    ]
    return torch.optim.Adam([g for g in params if g["params"]], betas=(0.9, 0.99), eps=1e-15)


def _new_log() -> dict:
    return {
        "step": [], "time": [], "cpu_time": [], "stage": [], "loss": [], "losses": [], "eval": []
    }  # fmt: skip


def _maybe_eval(log, student, step, clocks, cfg, eval_views, final=False) -> None:
    if eval_views is None:
        return
    if not final and (cfg.eval_every <= 0 or step % cfg.eval_every):
        return
    if log["eval"] and log["eval"][-1]["step"] == step:
        return
    cams, imgs = eval_views
    p = evaluate_views(student, cams, imgs, cfg.eval_samples, cfg.background)
    log["eval"].append({"step": step, "time": clocks[0], "cpu_time": clocks[1], "psnr": p})


# ---------------------------------------------------------------------------------------------
# Distillation and the from-images baseline
# ---------------------------------------------------------------------------------------------


def _identity_adapter(ds: int, dt: int) -> nn.Module | None:
    if ds != dt:
        raise ValueError(
            f"feature_adapter='identity' needs equal feature sizes, got student {ds}, teacher {dt}"
        )
    return None


# Adapter policy -> (student dim, teacher dim, same class) -> module or None (identity).
ADAPTERS: dict[str, Callable[[int, int, bool], nn.Module | None]] = {
    "auto": lambda ds, dt, same: None if same and ds == dt else nn.Linear(ds, dt),
    "linear": lambda ds, dt, same: nn.Linear(ds, dt),
    "identity": lambda ds, dt, same: _identity_adapter(ds, dt),
}


def _resolve_stages(cfg: PVDConfig, has_features: bool) -> list[PVDStage]:
    """Where teacher or student has no feature, the feature term is dropped and a stage left
    with no loss matches density instead (PVD skips its stage 1 for Plenoxels; the brief's
    shallow fallback: density, then density and colour)."""
    if has_features:
        return list(cfg.stages)
    out = []
    for st in cfg.stages:
        losses = {k: v for k, v in st.losses.items() if k != "feature"}
        out.append(PVDStage(st.name, st.steps, losses or {"sigma": 1.0}, st.lr_scale))
    return out


def distill_volume(
    teacher: RadianceField,
    student: RadianceField,
    cameras: Cameras,
    cfg: PVDConfig | None = None,
    *,
    eval_views: tuple[Cameras, Tensor] | None = None,
    losses: dict[str, PVDLoss] | None = None,
) -> dict:
    """Distil ``teacher`` into ``student`` (any two field types) with PVD's staged losses.

    Rays are drawn through the pixels of ``cameras``; ``eval_views`` (cameras, images
    (C, H, W, 3)) are rendered every ``cfg.eval_every`` steps and at the end for the PSNR log.
    ``losses`` replaces the loss registry (tests pass instrumented copies).

    Returns a log: per step ``step``, ``time`` and ``cpu_time`` (training wall / process-CPU
    seconds so far, evaluation excluded), ``stage``, ``loss`` (weighted total) and ``losses``
    (each term); ``eval`` is a list of {step, time, cpu_time, psnr}; ``stages`` the schedule
    run; ``adapter`` whether a feature map was learned."""
    cfg = cfg or PVDConfig()
    losses = LOSSES if losses is None else losses
    _check_cfg(cfg, losses)
    if not torch.allclose(teacher.aabb, student.aabb.to(teacher.aabb)):
        raise ValueError(
            f"teacher and student must share a scene box; got {teacher.aabb.flatten().tolist()} "
            f"and {student.aabb.flatten().tolist()}"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    t_feat, s_feat = feature_fn(teacher), feature_fn(student)
    has_features = t_feat is not None and s_feat is not None
    stages = _resolve_stages(cfg, has_features)
    adapter = None
    if has_features and any("feature" in st.losses for st in stages):
        with torch.no_grad():
            u = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
            probe = teacher.aabb[0] + (teacher.aabb[1] - teacher.aabb[0]) * u.to(teacher.aabb)
            dt, ds = t_feat(probe).shape[-1], s_feat(probe).shape[-1]
        same = type(teacher) is type(student)
        adapter = ADAPTERS[cfg.feature_adapter](ds, dt, same)
    extra = list(adapter.parameters()) if adapter is not None else []
    opt = _optimizer(student, cfg, extra)
    teacher.eval()
    student.train()
    ray_cache = _flat_rays(cameras)
    aabb = teacher.aabb.detach()
    log = _new_log()
    log["stages"] = [
        {"name": s.name, "steps": s.steps, "losses": s.losses, "lr_scale": s.lr_scale}
        for s in stages
    ]
    log["adapter"] = adapter is not None
    clock, cpu, step, feat_w = 0.0, 0.0, 0, 1.0
    _maybe_eval(log, student, 0, (clock, cpu), cfg, eval_views)
    cache = None
    if cfg.teacher_cache_points > 0:
        # The teacher is fixed: query it once (counted in the clocks), never per step.
        t0, c0 = time.perf_counter(), time.process_time()
        run = [st for st in stages if st.steps > 0]
        per_point = any(set(st.losses) - {"rgb"} for st in run)
        cache = build_teacher_cache(
            teacher, cameras, cfg, g,
            features=t_feat if any("feature" in st.losses for st in run) else None,
            n_points=cfg.teacher_cache_points if per_point else 0,
            n_rays=cfg.teacher_cache_rays if any("rgb" in st.losses for st in run) else 0,
            ray_cache=ray_cache,
        )  # fmt: skip
        clock += time.perf_counter() - t0
        cpu += time.process_time() - c0
    log["cache_seconds"] = clock
    log["cache_cpu_seconds"] = cpu
    for st in stages:
        needs = set().union(*(losses[k].needs for k in st.losses))
        _set_stage_lr(opt, cfg, st.lr_scale)
        for _ in range(st.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            if cache is not None:
                s_out, t_out, batch = _cached_outputs(
                    student, cache, needs, cfg, g, s_feat, adapter
                )
            else:
                batch = sample_batch(
                    cameras, aabb, cfg.rays_per_step, cfg.samples_per_ray, cfg.uniform_points,
                    g, ray_cache,
                )  # fmt: skip
                with torch.no_grad():
                    t_out = _query(teacher, batch, needs, t_feat, None, cfg.background)
                s_out = _query(student, batch, needs, s_feat, adapter, cfg.background)
            total, terms = 0.0, {}
            for name, w in st.losses.items():
                term = losses[name].fn(s_out, t_out, batch, cfg)
                weight = w * feat_w if name == "feature" else w
                total = total + weight * term
                terms[name] = float(term.detach())
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"PVD stage {st.name!r} step {step}: non-finite loss {terms}"
                )
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            feat_w *= cfg.feature_decay
            step += 1
            clock += time.perf_counter() - t0
            cpu += time.process_time() - c0
            log["step"].append(step)
            log["time"].append(clock)
            log["cpu_time"].append(cpu)
            log["stage"].append(st.name)
            log["loss"].append(float(total.detach()))
            log["losses"].append(terms)
            _maybe_eval(log, student, step, (clock, cpu), cfg, eval_views)
    _maybe_eval(log, student, step, (clock, cpu), cfg, eval_views, final=True)
    return log


def train_from_images(
    student: RadianceField,
    images: Tensor,
    cameras: Cameras,
    cfg: PVDConfig | None = None,
    *,
    steps: int | None = None,
    eval_views: tuple[Cameras, Tensor] | None = None,
) -> dict:
    """The baseline: fit ``student`` to posed ``images`` (C, H, W, 3) with the photometric
    NeRF loss (MSE of rendered ray colours), with the same ray sampling, optimiser and
    learning rates as ``distill_volume``. ``steps`` defaults to the total of ``cfg.stages``.
    Returns a log of the same form (stage "images")."""
    cfg = cfg or PVDConfig()
    if images.shape != (len(cameras), cameras.height, cameras.width, 3):
        raise ValueError(
            f"images must be ({len(cameras)}, {cameras.height}, {cameras.width}, 3), "
            f"got {tuple(images.shape)}"
        )
    steps = sum(s.steps for s in cfg.stages) if steps is None else steps
    g = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(student, cfg, [])
    student.train()
    o_all, d_all = _flat_rays(cameras)
    target_all = images.reshape(-1, 3)
    aabb = student.aabb.detach()
    log = _new_log()
    log["stages"] = [{"name": "images", "steps": steps, "losses": {"rgb": 1.0}}]
    clock, cpu = 0.0, 0.0
    _maybe_eval(log, student, 0, (clock, cpu), cfg, eval_views)
    for step in range(1, steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = torch.randint(0, o_all.shape[0], (cfg.rays_per_step,), generator=g)
        o, d = o_all[idx], d_all[idx]
        t_near, t_far, hit = ray_aabb(o, d, aabb)
        t, deltas = sample_bins(t_near, t_far, cfg.samples_per_ray, stratified=True, generator=g)
        pts = (o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3)
        dirs = d[:, None].expand(cfg.rays_per_step, cfg.samples_per_ray, 3).reshape(-1, 3)
        batch = PVDBatch(pts, dirs, t, deltas, hit, cfg.rays_per_step, cfg.samples_per_ray)
        sigma, rgb = student(pts, dirs)
        pred = render_batch_rays({"sigma": sigma, "rgb": rgb}, batch, cfg.background)
        loss = torch.mean((pred - target_all[idx].to(pred)) ** 2)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_from_images step {step}: non-finite loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock += time.perf_counter() - t0
        cpu += time.process_time() - c0
        log["step"].append(step)
        log["time"].append(clock)
        log["cpu_time"].append(cpu)
        log["stage"].append("images")
        log["loss"].append(float(loss.detach()))
        log["losses"].append({"rgb": float(loss.detach())})
        _maybe_eval(log, student, step, (clock, cpu), cfg, eval_views)
    _maybe_eval(log, student, steps, (clock, cpu), cfg, eval_views, final=True)
    return log


def time_to_psnr(log: dict, target: float, clock: str = "time") -> float | None:
    """Training seconds at the first evaluation whose PSNR reaches ``target`` (None if none
    does); ``clock`` is "time" (wall) or "cpu_time" (this process's CPU seconds: on a shared
    machine with one torch thread, the figure other processes do not inflate). Resolution is
    the log's evaluation interval."""
    if clock not in ("time", "cpu_time"):
        raise ValueError(f"clock must be 'time' or 'cpu_time', got {clock!r}")
    for e in log.get("eval", []):
        if e["psnr"] >= target:
            return float(e[clock])
    return None


def steps_to_psnr(log: dict, target: float) -> int | None:
    """Step of the first evaluation whose PSNR reaches ``target`` (None if none does)."""
    for e in log.get("eval", []):
        if e["psnr"] >= target:
            return int(e["step"])
    return None


def best_psnr(log: dict) -> float:
    """Highest evaluated PSNR in a log (-inf without evaluations)."""
    return max((e["psnr"] for e in log.get("eval", [])), default=-math.inf)
