"""The score-distillation loop: optimise a 3-D scene so that its renders from random orbit
cameras score well under a 2-D prior (DreamFusion's recipe, with any method of
``fewstep.threed.score``).

Each step: draw ``views`` cameras on an orbit (random azimuth, elevation in a range, fixed
radius), render the scene (Gaussians through ``render_gaussians``, any radiance field through
``render_field``), composite the background, map the renders into the prior's image space,
and apply the method's losses: "scene" to the scene's Adam (one learning rate per parameter
group, as 3DGS), "critic" (VSD) to the critic's Adam. Optional 3DGS densification and
pruning. Checkpoints (atomic, core's format) every N steps; a run resumes from the newest and
continues exactly: every random draw of a step comes from a generator seeded by (seed, step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.threed.cameras import Cameras, orbit_cameras
from fewstep.threed.fields import RadianceField
from fewstep.threed.gaussians import (
    DensifyConfig,
    Gaussians,
    GradientStats,
    densify_and_prune,
    render_gaussians,
)
from fewstep.threed.prior import PriorAdapter
from fewstep.threed.score.base import ScoreMethod
from fewstep.threed.volume import VolumeRenderConfig, render_field

CHECKPOINTS = "checkpoints"

# Named backgrounds; "random" draws one uniform grey level per view.
BACKGROUNDS = {"black": 0.0, "white": 1.0, "grey": 0.5}


@dataclass
class CameraConfig:
    """Orbit cameras around the origin (z up), all looking at it."""

    views: int = 4  # cameras (renders) per step: the prior's batch
    size: int = 32  # render side in pixels (downsampled to the prior's size)
    radius: float = 2.5  # camera distance
    elevation: tuple[float, float] = (-10.0, 30.0)  # elevation range, degrees
    fov: float = 40.0  # vertical field of view, degrees
    background: str = "black"  # black, white, grey or random (a grey level per view)
    eval_elevation: float = 10.0  # elevation of the turntable and evaluation views


@dataclass
class LRConfig:
    """Adam learning rates per parameter group (3DGS's groups; values for runs of a few
    hundred steps on small scenes, larger than 3DGS's 30k-step ones)."""

    means: float = 0.005  # Gaussian centres
    scales: float = 0.01  # log-scales
    quats: float = 0.005  # rotations
    opacity: float = 0.05  # opacity logits
    sh_dc: float = 0.02  # base colour (degree-0 SH)
    sh_rest: float = 0.001  # higher SH bands (3DGS: sh_dc / 20)
    field_grid: float = 0.02  # radiance fields: grids, hash tables, VM factors
    field_network: float = 1e-3  # radiance fields: MLP weights


@dataclass
class Distill3DConfig:
    steps: int = 300  # optimisation steps
    cameras: CameraConfig = field(default_factory=CameraConfig)  # camera sampling
    lr: LRConfig = field(default_factory=LRConfig)  # learning rates
    densify_every: int = 0  # 3DGS densify/prune period in steps (0 = off)
    densify_from: int = 50  # first step that may densify
    densify_until: int = 10**9  # last step that may densify
    densify_grad_threshold: float = 0.0002  # 3DGS's view-space gradient threshold
    scene_extent: float = 1.0  # scene radius for densification (clone vs split, pruning)
    max_gaussians: int = 20000  # no densification above this many Gaussians
    field_samples: int = 32  # radiance fields: samples per ray
    grad_clip: float = 0.0  # clip the scene gradient norm (0 = off)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end, with out_dir)
    seed: int = 0  # seeds every per-step draw (cameras, background, noise, times)
    backend: str = "auto"  # Gaussian rasteriser: auto, torch or gsplat


# --------------------------------------------------------------------------- rendering


def _render_gaussians(scene: Gaussians, cams: Cameras, cfg: Distill3DConfig) -> dict:
    return render_gaussians(scene, cams, None, backend=cfg.backend)


def _render_field(scene: RadianceField, cams: Cameras, cfg: Distill3DConfig) -> dict:
    vcfg = VolumeRenderConfig(n_samples=cfg.field_samples, background="black")
    return render_field(scene, cams, vcfg)


# Scene type -> renderer (scene, cameras, config) -> dict with image (C, H, W, 3) on a black
# background and alpha (C, H, W, 1).
RENDERERS: dict[type, Callable[[Any, Cameras, Distill3DConfig], dict]] = {
    Gaussians: _render_gaussians,
    RadianceField: _render_field,
}


def _renderer(scene: nn.Module):
    for cls, fn in RENDERERS.items():
        if isinstance(scene, cls):
            return fn
    raise TypeError(
        f"cannot render a {type(scene).__name__}; expected one of {[c.__name__ for c in RENDERERS]}"
    )


def background_values(name: str, n: int, generator: torch.Generator | None) -> Tensor:
    """(n, 3) background colours: a named grey, or a random grey level per view."""
    if name == "random":
        return torch.rand(n, 1, generator=generator).expand(n, 3)
    if name not in BACKGROUNDS:
        raise ValueError(
            f"unknown background {name!r}; expected random or one of {list(BACKGROUNDS)}"
        )
    return torch.full((n, 3), BACKGROUNDS[name])


def render_views(
    scene: nn.Module, cams: Cameras, background: Tensor, cfg: Distill3DConfig | None = None
) -> dict:
    """Render ``scene`` into ``cams`` over per-view backgrounds (C, 3): image (C, H, W, 3),
    alpha (C, H, W, 1) and the renderer's other outputs."""
    cfg = cfg or Distill3DConfig()
    device = next(scene.parameters()).device
    out = _renderer(scene)(scene, cams.to(device), cfg)
    bg = background.to(out["image"])[:, None, None, :]
    return {**out, "image": out["image"] + (1.0 - out["alpha"]) * bg}


def sample_cameras(cfg: CameraConfig, generator: torch.Generator | None) -> Cameras:
    """``cfg.views`` orbit cameras: azimuth U[0, 360), elevation U(range), fixed radius."""
    return orbit_cameras(
        cfg.views, cfg.radius, tuple(cfg.elevation), cfg.fov, cfg.size,
        random=True, generator=generator,
    )  # fmt: skip


def turntable(
    scene: nn.Module, n_views: int, cfg: Distill3DConfig | None = None, background: str = ""
) -> Tensor:
    """(n_views, H, W, 3) renders at evenly spaced azimuths (elevation ``eval_elevation``),
    over the config's background (black when that is random) or ``background``."""
    cfg = cfg or Distill3DConfig()
    c = cfg.cameras
    bg_name = background or (c.background if c.background != "random" else "black")
    cams = orbit_cameras(n_views, c.radius, c.eval_elevation, c.fov, c.size)
    with torch.no_grad():
        return render_views(scene, cams, background_values(bg_name, n_views, None), cfg)["image"]


# --------------------------------------------------------------------------- optimisers


def scene_param_groups(scene: nn.Module, lr: LRConfig) -> list[dict]:
    """Adam parameter groups: 3DGS's per-attribute groups, or a field's grid / network."""
    if isinstance(scene, Gaussians):
        rates = {
            "means": lr.means,
            "log_scales": lr.scales,
            "quats": lr.quats,
            "opacity_logits": lr.opacity,
            "sh_dc": lr.sh_dc,
            "sh_rest": lr.sh_rest,
        }
        return [{"params": [getattr(scene, k)], "lr": v, "name": k} for k, v in rates.items()]
    if isinstance(scene, RadianceField):
        groups = scene.parameter_groups()
        rates = {"grid": lr.field_grid, "network": lr.field_network}
        return [{"params": groups[k], "lr": v, "name": k} for k, v in rates.items() if groups[k]]
    raise TypeError(f"no parameter groups for a {type(scene).__name__}")


def make_optimizers(scene: nn.Module, score: ScoreMethod, cfg: Distill3DConfig) -> dict:
    opts = {"scene": torch.optim.Adam(scene_param_groups(scene, cfg.lr), eps=1e-15)}
    for role, params in score.role_parameters().items():
        lr = getattr(score.config, f"{role}_lr", 1e-3)
        opts[role] = torch.optim.Adam(params, lr=lr)
    return opts


class _StatsState:
    """Checkpoint adapter for densification statistics (state_dict / load_state_dict)."""

    def __init__(self, stats: GradientStats):
        self.stats = stats

    def state_dict(self) -> dict:
        s = self.stats
        return {"grad_accum": s.grad_accum, "count": s.count, "max_radii": s.max_radii}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self.stats, k, v.to(self.stats.grad_accum.device))


# ------------------------------------------------------------------------------- the loop


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw at ``step`` (resume replays it exactly)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1))


def _resume(ckpt_dir: Path, scene, score, cfg) -> tuple[int, list, dict, GradientStats | None]:
    """Load the newest checkpoint into scene and score; (next step, log, optimizers, stats)."""
    from safetensors.torch import load_file

    from fewstep.core.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return 0, [], make_optimizers(scene, score, cfg), _stats_for(scene, cfg)
    if isinstance(scene, Gaussians):  # densification changes the row count: match it first
        weights = load_file(str(path / "weights.safetensors"))
        for k in Gaussians.PARAM_NAMES:
            ref = getattr(scene, k)
            setattr(scene, k, nn.Parameter(weights[f"scene.{k}"].to(ref.device, ref.dtype)))
    opts = make_optimizers(scene, score, cfg)
    stats = _stats_for(scene, cfg)
    holders = dict(opts)
    if stats is not None:
        holders["stats"] = _StatsState(stats)
    state = load_checkpoint(path, {"scene": scene, "score": score}, holders)
    return state["step"] + 1, state.get("log", []), opts, stats


def _stats_for(scene, cfg) -> GradientStats | None:
    if cfg.densify_every > 0 and isinstance(scene, Gaussians):
        return GradientStats(len(scene), scene.means.device)
    return None


def _save(ckpt_dir: Path, step: int, scene, score, opts: dict, stats, log: list) -> None:
    from fewstep.core.checkpoint import save_checkpoint

    holders = dict(opts)
    if stats is not None:
        holders["stats"] = _StatsState(stats)
    save_checkpoint(ckpt_dir, step, {"scene": scene, "score": score}, holders, {"log": log})


def distill_scene(
    scene: nn.Module,
    score: ScoreMethod,
    cond: Any,
    cfg: Distill3DConfig | None = None,
    out_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """Optimise ``scene`` (Gaussians or a RadianceField) with ``score`` toward ``cond`` (the
    prior's condition for one render, e.g. a label tensor of shape (1,) or ()), for
    ``cfg.steps`` steps. With ``out_dir`` it checkpoints into ``out_dir/checkpoints`` every
    ``checkpoint_every`` steps and at the end, and resumes from the newest checkpoint there.

    Returns (scene, log): one dict per step (scene loss, gradient norm, mean t, ...). The
    scene is modified in place, except that resuming Gaussians replaces their parameters.
    """
    cfg = cfg or Distill3DConfig()
    _renderer(scene)  # an unsupported scene type fails here, naming the supported ones
    device = torch.device(device)
    adapter: PriorAdapter = score.adapter
    scene.to(device)
    score.to(device)
    adapter.denoiser.to(device)
    ckpt_dir = Path(out_dir) / CHECKPOINTS if out_dir is not None else None
    if ckpt_dir is not None:
        start, log, opts, stats = _resume(ckpt_dir, scene, score, cfg)
    else:
        start, log, opts, stats = 0, [], make_optimizers(scene, score, cfg), _stats_for(scene, cfg)
    conds = None
    if cond is not None:  # one condition for the scene, repeated for each view
        conds = torch.as_tensor(cond).reshape(-1)[:1].to(device).expand(cfg.cameras.views)

    it = range(start, cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"3-D {score.name}", dynamic_ncols=True)
    for step in it:
        t0 = time.perf_counter()
        gen = step_generator(cfg.seed, step)
        cams = sample_cameras(cfg.cameras, gen)
        bg = background_values(cfg.cameras.background, cfg.cameras.views, gen)
        out = render_views(scene, cams, bg, cfg)
        x = adapter.to_prior(out["image"])
        losses, logs = score.loss(
            x, conds, step, cfg.steps, camera=cams.camera_to_world.to(device), generator=gen
        )
        for role, loss in losses.items():
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite {role} loss at step {step}: {loss.item()}")
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(scene.parameters(), cfg.grad_clip)
        for o in opts.values():
            o.step()
        if stats is not None:
            stats.update(out["meta"])
            if (
                (step + 1) % cfg.densify_every == 0
                and cfg.densify_from <= step <= cfg.densify_until
                and len(scene) < cfg.max_gaussians
            ):
                dcfg = DensifyConfig(grad_threshold=cfg.densify_grad_threshold)
                densify_and_prune(scene, stats, cfg.scene_extent, dcfg, opts["scene"], gen)
        row = {"step": step, **{f"loss_{k}": v.item() for k, v in losses.items()}, **logs}
        row["seconds"] = time.perf_counter() - t0
        if isinstance(scene, Gaussians):
            row["n_gaussians"] = len(scene)
        log.append(row)
        last = step == cfg.steps - 1
        if ckpt_dir is not None and (
            last or (cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0)
        ):
            _save(ckpt_dir, step, scene, score, opts, stats, log)
    return scene, log


def init_gaussians(
    n: int, radius: float = 0.5, opacity: float = 0.1, sh_degree: int = 0, seed: int = 0
) -> Gaussians:
    """n Gaussians uniform in a ball (random colours), DreamFusion-style initialisation."""
    if n < 1:
        raise ValueError(f"need at least one Gaussian, got {n}")
    gen = torch.Generator().manual_seed(seed)
    return Gaussians.init_random(
        n, radius=radius, sh_degree=sh_degree, opacity=opacity, generator=gen
    )


def mean_seconds(log: list[dict]) -> float:
    """Mean wall time per step of a log (NaN for an empty log)."""
    return sum(r["seconds"] for r in log) / len(log) if log else math.nan
