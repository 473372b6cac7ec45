"""``fewstep distill threed-<sds|vsd|cds|tsm>``: class-to-3D by score distillation from a 2-D
prior (default: the digits teacher through ``fewstep.core.priors``).

A Gaussian scene is optimised so that its renders from random orbit cameras score well under
the prior for the requested class; the method config (``--method.*``) holds each paper's
guidance scale, time schedule and weighting. The run folder gets ``scene.ply`` (3DGS layout),
``turntable.png`` (renders) and ``turntable_prior.png`` (what the prior and its classifier see),
``metrics.json`` (classifier accuracy of the requested label over ``eval_views`` evenly spaced
views, mean confidence, wall time), ``loss.png`` and ``report.html``; checkpoints under
``checkpoints/`` let an interrupted run resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.core.priors import Prior2D
from fewstep.threed.distill3d import Distill3DConfig
from fewstep.threed.score.cds import CDSConfig
from fewstep.threed.score.sds import SDSConfig
from fewstep.threed.score.tsm import TSMConfig
from fewstep.threed.score.vsd import VSDConfig

SCENE_FILE = "scene.ply"

# Prior name -> loader, consulted before the ``fewstep.priors`` entry points (tests and
# users register in-process priors here).
PRIOR_LOADERS: dict[str, Callable[[], Prior2D]] = {}


def get_prior(name: str) -> Prior2D:
    """The prior ``name``: from ``PRIOR_LOADERS``, else ``fewstep.core.priors.load_prior``."""
    if name in PRIOR_LOADERS:
        return PRIOR_LOADERS[name]()
    from fewstep.core.priors import load_prior

    return load_prior(name)


@dataclass
class SceneInit:
    n_gaussians: int = 1000  # Gaussians at the start
    radius: float = 0.6  # they fill a ball of this radius around the origin
    opacity: float = 0.1  # initial opacity
    sh_degree: int = 0  # SH degree of the colours (0 = view-independent)


@dataclass
class _ScoreRecipeConfig:
    prior: str = "digits"  # 2-D prior (PRIOR_LOADERS or a fewstep.priors entry point)
    label: int = 3  # class every view should show
    scene: SceneInit = field(default_factory=SceneInit)  # Gaussian initialisation
    distill: Distill3DConfig = field(default_factory=Distill3DConfig)  # steps, cameras, lrs, seed
    eval_views: int = 16  # evenly spaced turntable views judged by the prior's classifier
    threads: int = 1  # torch CPU threads (0 = default); tiny renders run fastest on one
    device: str = "auto"  # cpu, cuda or auto
    progress: bool = False  # progress bar


@dataclass
class SDSRecipeConfig(_ScoreRecipeConfig):
    method: SDSConfig = field(default_factory=SDSConfig)  # DreamFusion SDS


@dataclass
class VSDRecipeConfig(_ScoreRecipeConfig):
    method: VSDConfig = field(default_factory=VSDConfig)  # ProlificDreamer VSD


@dataclass
class CDSRecipeConfig(_ScoreRecipeConfig):
    method: CDSConfig = field(default_factory=CDSConfig)  # Consistent3D CDS


@dataclass
class TSMRecipeConfig(_ScoreRecipeConfig):
    method: TSMConfig = field(default_factory=TSMConfig)  # Dreamer XL TSM


def _with_sh_bands(scene):
    """The scene with SH degree >= 1 (zero higher bands: identical colours). gaussians.load_ply
    cannot read degree-0 files (no f_rest_* columns), so runs save degree 1."""
    from fewstep.threed.gaussians import Gaussians

    if scene.sh_degree > 0:
        return scene
    n = len(scene)
    sh = torch.cat([scene.sh_dc, scene.sh_dc.new_zeros(n, 3, 3)], dim=1)
    return Gaussians(scene.means, scene.log_scales, scene.quats, scene.opacity_logits, sh)


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


@torch.no_grad()
def evaluate_views(scene, adapter, label: int, n_views: int, cfg: Distill3DConfig) -> dict:
    """Judge ``n_views`` evenly spaced turntable renders with the prior's classifier:
    accuracy of ``label``, mean probability of ``label``, and the predicted class per view.
    Also returns the renders (n, H, W, 3) and prior images (n, C, S, S) under "_images"."""
    from fewstep.threed.distill3d import turntable

    renders = turntable(scene, n_views, cfg)
    x = adapter.to_prior(renders)
    probs = adapter.classify(x).softmax(-1).cpu()
    pred = probs.argmax(-1)
    return {
        "view_accuracy": (pred == label).float().mean().item(),
        "mean_confidence": probs[:, label].mean().item(),
        "predicted": pred.tolist(),
        "_images": (renders.cpu(), x.cpu()),
    }


class ScoreRecipe:
    """Class-to-3D with one score-distillation method."""

    def __init__(self, method: str, config_cls: type, summary: str):
        self.method = method
        self.name = f"threed-{method}"
        self.config_cls = config_cls
        self.summary = summary

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    # -- pieces
    def _adapter(self, cfg):
        from fewstep.threed.prior import PriorAdapter

        prior = get_prior(cfg.prior)
        if prior.num_classes is not None and not 0 <= cfg.label < prior.num_classes:
            raise ValueError(
                f"label {cfg.label} is outside the prior's classes 0..{prior.num_classes - 1}"
            )
        return PriorAdapter(prior)

    def _score(self, cfg, adapter):
        from fewstep.threed.score import make_score

        return make_score(self.method, adapter, cfg.method, seed=cfg.distill.seed)

    # -- CLI commands
    def distill(self, cfg, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.threed.distill3d import distill_scene, init_gaussians, mean_seconds
        from fewstep.threed.gaussians import save_ply

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        device = _device(cfg.device)
        adapter = self._adapter(cfg)
        score = self._score(cfg, adapter)
        s = cfg.scene
        scene = init_gaussians(s.n_gaussians, s.radius, s.opacity, s.sh_degree, cfg.distill.seed)
        t0 = time.perf_counter()
        scene, log = distill_scene(
            scene, score, torch.tensor(cfg.label), cfg.distill, out_dir, device, cfg.progress
        )
        wall = time.perf_counter() - t0
        save_ply(out_dir / SCENE_FILE, _with_sh_bands(scene))
        metrics = self._evaluate(cfg, scene, adapter, out_dir)
        metrics.update(
            method=self.method,
            label=cfg.label,
            steps=cfg.distill.steps,
            n_gaussians=len(scene),
            wall_seconds=wall,
            seconds_per_step=mean_seconds(log),
            final_grad_norm=log[-1].get("grad_norm") if log else None,
        )
        self._plot(log, out_dir)
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _evaluate(self, cfg, scene, adapter, out_dir: Path) -> dict:
        from fewstep.core.report import save_image_grid

        res = evaluate_views(scene, adapter, cfg.label, cfg.eval_views, cfg.distill)
        renders, x = res.pop("_images")
        nrow = min(8, cfg.eval_views)
        save_image_grid(
            out_dir / "turntable.png", renders.permute(0, 3, 1, 2), nrow=nrow,
            value_range=(0.0, 1.0), upscale=2,
        )  # fmt: skip
        save_image_grid(
            out_dir / "turntable_prior.png", x, nrow=nrow,
            value_range=adapter.prior.value_range, upscale=4,
        )  # fmt: skip
        return res

    @staticmethod
    def _plot(log: list[dict], out_dir: Path) -> None:
        from fewstep.core.report import save_line_plot

        if not log:
            return
        series = {"grad norm": [(r["step"], r["grad_norm"]) for r in log if "grad_norm" in r]}
        if "critic_loss" in log[0]:
            series["critic loss"] = [(r["step"], r["critic_loss"]) for r in log]
        save_line_plot(out_dir / "loss.png", series, title="score distillation", xlabel="step")

    def load(self, run_dir: Path):
        """(config, scene from scene.ply, prior adapter) of a finished run."""
        from fewstep.core.rundir import load_run_config
        from fewstep.threed.gaussians import load_ply

        run_dir = Path(run_dir)
        cfg, _ = load_run_config(run_dir, self.config_cls)
        scene_file = run_dir / SCENE_FILE
        if not scene_file.exists():
            raise FileNotFoundError(f"{run_dir} has no {SCENE_FILE}: the run did not finish")
        return cfg, load_ply(scene_file), self._adapter(cfg)

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """Render ``n`` turntable views of the scene into a PNG grid (``steps`` is unused:
        a distilled scene renders in one pass)."""
        from fewstep.core.report import save_image_grid
        from fewstep.threed.distill3d import turntable

        cfg, scene, _ = self.load(run_dir)
        renders = turntable(scene, n, cfg.distill)
        out = Path(out) if out is not None else Path(run_dir) / f"views_{n}.png"
        return save_image_grid(
            out, renders.permute(0, 3, 1, 2), nrow=min(8, n), value_range=(0.0, 1.0), upscale=2
        )

    def evaluate(self, run_dir: Path) -> dict:
        cfg, scene, adapter = self.load(run_dir)
        res = evaluate_views(scene, adapter, cfg.label, cfg.eval_views, cfg.distill)
        res.pop("_images")
        return {"method": self.method, "label": cfg.label, **res}

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}: class {m['label']} to 3-D")
        cols = ["method", "label", "view_accuracy", "mean_confidence", "steps", "n_gaussians",
                "wall_seconds", "seconds_per_step"]  # fmt: skip
        rep.add_table("Views judged by the prior's classifier", [m], cols)
        rep.add_text("Predicted class per turntable view", str(m.get("predicted")))
        for name, title in (
            ("turntable.png", "Turntable renders"),
            ("turntable_prior.png", "What the prior sees (its image space)"),
            ("loss.png", "Gradient norm (and critic loss)"),
        ):
            if (run_dir / name).exists():
                rep.add_image(title, run_dir / name)
        return rep.write()


SDS = ScoreRecipe("sds", SDSRecipeConfig, "class-to-3D Gaussians by SDS (DreamFusion)")
VSD = ScoreRecipe("vsd", VSDRecipeConfig, "class-to-3D Gaussians by VSD (ProlificDreamer)")
CDS = ScoreRecipe("cds", CDSRecipeConfig, "class-to-3D Gaussians by CDS (Consistent3D)")
TSM = ScoreRecipe("tsm", TSMRecipeConfig, "class-to-3D Gaussians by TSM (Dreamer XL)")
