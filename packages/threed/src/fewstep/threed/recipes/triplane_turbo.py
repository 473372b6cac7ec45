"""``fewstep distill threed-triplane-turbo``: a class-to-triplane generator in K steps, adapted
from the 2-D prior's own denoiser and trained by progressive rendering distillation
(TriplaneTurbo, Ma et al. CVPR 2025; see ``fewstep.threed.triplane_turbo``), with no 3-D data.

One generator serves every class of the prior (amortised). The run folder gets
``student.safetensors`` (only what was trained: the PETA adapters and the decoders; the frozen
base comes from the prior again at load time) with ``student.json``, ``metrics.json``
(classifier accuracy per class over ``eval_views`` turntable views, seconds per generated
object, seconds per mesh, parameter counts), ``turntable.png`` / ``turntable_prior.png`` (one
row per class), ``turntable.gif`` (all classes side by side), ``meshes/class_<k>.ply`` and
``.obj`` (marching cubes on the density, read back by open3d), ``loss.png`` and
``report.html``; checkpoints under ``checkpoints/`` let an interrupted run resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.threed.distill3d import CameraConfig
from fewstep.threed.recipes.score import get_prior
from fewstep.threed.score.sds import SDSConfig
from fewstep.threed.triplane_turbo import GeneratorConfig, TurboTrainConfig

MESH_DIR = "meshes"


def _default_cameras() -> CameraConfig:
    return CameraConfig(views=4, size=16)


@dataclass
class TriplaneTurboConfig:
    prior: str = "digits"  # 2-D prior (recipes.score.PRIOR_LOADERS or a fewstep.priors entry)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # K, adapters, triplane
    train: TurboTrainConfig = field(default_factory=TurboTrainConfig)  # steps, objects, lrs
    method: SDSConfig = field(default_factory=SDSConfig)  # score distillation of every step
    cameras: CameraConfig = field(default_factory=_default_cameras)  # views per object, size
    eval_views: int = 16  # evenly spaced turntable views judged by the prior's classifier
    eval_seed: int = 0  # noise seed of the evaluated objects
    mesh_resolution: int = 64  # marching-cubes grid per axis
    mesh_level: float = 3.0  # density iso-level of the exported meshes
    gif_views: int = 24  # frames of the turntable GIF
    threads: int = 1  # torch CPU threads (0 = default); tiny renders run fastest on one
    device: str = "auto"  # cpu, cuda or auto
    progress: bool = False  # progress bar


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _render_cfg(cfg: TriplaneTurboConfig):
    from fewstep.threed.distill3d import Distill3DConfig

    return Distill3DConfig(cameras=cfg.cameras, field_samples=cfg.train.field_samples)


def _trained_state(gen) -> dict[str, torch.Tensor]:
    """The generator's trained tensors: adapters and decoders (not the frozen base)."""
    keep = {id(p) for p in [*gen.adapter_parameters(), *gen.decoder_parameters()]}
    return {k: p.detach() for k, p in gen.named_parameters() if id(p) in keep}


def build_generator(cfg: TriplaneTurboConfig):
    """(generator at init, prior adapter) for a config; the prior must be class-conditional."""
    from fewstep.threed.prior import PriorAdapter
    from fewstep.threed.triplane_turbo import TriplaneGenerator

    prior = get_prior(cfg.prior)
    if prior.num_classes is None:
        raise ValueError(
            f"threed-triplane-turbo needs a class-conditional prior; {cfg.prior!r} has no classes"
        )
    adapter = PriorAdapter(prior)
    gen = TriplaneGenerator(prior.denoiser, adapter.sample_shape, cfg.generator)
    return gen, adapter


@torch.no_grad()
def evaluate_generator(gen, adapter, cfg: TriplaneTurboConfig, device: str = "cpu") -> dict:
    """Generate one object per class (seed ``eval_seed``), timed, and judge ``eval_views``
    turntable renders of each with the prior's classifier. Returns per-class view accuracy
    and confidence, their means, seconds per object (batched over the classes, and one object
    alone), and under "_images" the renders (C, V, H, W, 3) and prior images, "_planes" the
    triplanes."""
    from fewstep.threed.distill3d import turntable
    from fewstep.threed.triplane_turbo import generate

    gen.eval().to(device)
    n = adapter.prior.num_classes
    labels = torch.arange(n, device=device)
    generate(gen, labels[:1], generator=torch.Generator().manual_seed(cfg.eval_seed))  # warm-up
    t0 = time.perf_counter()
    planes = generate(gen, labels, generator=torch.Generator().manual_seed(cfg.eval_seed))
    batched = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    generate(gen, labels[:1], generator=torch.Generator().manual_seed(cfg.eval_seed))
    single = time.perf_counter() - t0
    rcfg = _render_cfg(cfg)
    accs, confs, preds, renders, xs = [], [], [], [], []
    for c in range(n):
        r = turntable(gen.field(planes[c]), cfg.eval_views, rcfg)
        x = adapter.to_prior(r)
        probs = adapter.classify(x).softmax(-1).cpu()
        p = probs.argmax(-1)
        accs.append((p == c).float().mean().item())
        confs.append(probs[:, c].mean().item())
        preds.append(p.tolist())
        renders.append(r.cpu())
        xs.append(x.cpu())
    return {
        "view_accuracy": sum(accs) / n,
        "mean_confidence": sum(confs) / n,
        "per_class_accuracy": accs,
        "per_class_confidence": confs,
        "predicted": preds,
        "seconds_per_object": batched,
        "seconds_single_object": single,
        "_images": (torch.stack(renders), torch.stack(xs)),
        "_planes": planes,
    }


def export_meshes(gen, planes: torch.Tensor, out_dir: Path, resolution: int, level: float):
    """Marching-cubes meshes of each object's density at ``level`` as PLY and OBJ; returns
    (seconds per mesh, per-class triangle counts; 0 where the density never crosses level)."""
    from fewstep.threed.geometry_eval import mesh_from_field, save_mesh

    out_dir.mkdir(parents=True, exist_ok=True)
    tris, t0 = [], time.perf_counter()
    for c in range(planes.shape[0]):
        try:
            mesh = mesh_from_field(gen.field(planes[c]), resolution, level)
        except ValueError:  # no surface at this level
            tris.append(0)
            continue
        save_mesh(out_dir / f"class_{c}.ply", mesh)
        save_mesh(out_dir / f"class_{c}.obj", mesh)
        tris.append(len(mesh.triangles))
    return (time.perf_counter() - t0) / max(planes.shape[0], 1), tris


def turntable_gif_of(gen, planes: torch.Tensor, cfg: TriplaneTurboConfig, path: Path) -> Path:
    """A looping GIF, every class side by side, ``gif_views`` frames around the turntable."""
    from fewstep.threed.cameras import orbit_cameras
    from fewstep.threed.distill3d import background_values, render_views
    from fewstep.threed.geometry_eval import turntable_gif

    c, rcfg = cfg.cameras, _render_cfg(cfg)

    def frame(az: float) -> torch.Tensor:
        cams = orbit_cameras(1, c.radius, c.eval_elevation, c.fov, c.size, azimuth_start=az)
        bg = background_values("black", 1, None)
        imgs = [render_views(gen.field(p), cams, bg, rcfg)["image"][0] for p in planes]
        return torch.cat(imgs, dim=1)

    return turntable_gif(frame, cfg.gif_views, path, upscale=4)


class TriplaneTurboRecipe:
    name = "threed-triplane-turbo"
    summary = "class-to-triplane generator in K steps by progressive rendering distillation"
    config_cls = TriplaneTurboConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    def distill(self, cfg: TriplaneTurboConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.rundir import save_student
        from fewstep.threed.distill3d import CHECKPOINTS
        from fewstep.threed.triplane_turbo import count_parameters, train_generator

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        device = _device(cfg.device)
        gen, adapter = build_generator(cfg)
        t0 = time.perf_counter()
        log = train_generator(
            gen, adapter, cfg.method, cfg.train, _render_cfg(cfg), adapter.prior.num_classes,
            ckpt_dir=out_dir / CHECKPOINTS, device=device, progress=cfg.progress,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        counts = count_parameters(gen)
        save_student(out_dir, {"generator": _trained_state(gen)},
                     {"steps": gen.config.steps, **counts})  # fmt: skip
        metrics = self._evaluate(cfg, gen, adapter, out_dir, device)
        metrics.update(
            steps=gen.config.steps,
            train_steps=cfg.train.train_steps,
            wall_seconds=wall,
            seconds_per_train_step=sum(r["seconds"] for r in log) / max(len(log), 1),
            parameters=counts,
            trainable_fraction=(counts["adapter"] + counts["decoder"]) / counts["base_frozen"],
        )
        self._plot(log, out_dir, gen.config.steps)
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _evaluate(self, cfg, gen, adapter, out_dir: Path, device: str) -> dict:
        from fewstep.core.report import save_image_grid

        res = evaluate_generator(gen, adapter, cfg, device)
        renders, x = res.pop("_images")
        planes = res.pop("_planes")
        n, V = renders.shape[:2]
        save_image_grid(
            out_dir / "turntable.png", renders.flatten(0, 1).permute(0, 3, 1, 2), nrow=V,
            value_range=(0.0, 1.0), upscale=2,
        )  # fmt: skip
        save_image_grid(
            out_dir / "turntable_prior.png", x.flatten(0, 1), nrow=V,
            value_range=adapter.prior.value_range, upscale=4,
        )  # fmt: skip
        turntable_gif_of(gen, planes, cfg, out_dir / "turntable.gif")
        mesh_s, tris = export_meshes(gen, planes, out_dir / MESH_DIR, cfg.mesh_resolution,
                                     cfg.mesh_level)  # fmt: skip
        res.update(seconds_per_mesh=mesh_s, mesh_triangles=tris)
        return res

    @staticmethod
    def _plot(log: list[dict], out_dir: Path, K: int) -> None:
        from fewstep.core.report import save_line_plot

        if not log:
            return
        series = {
            f"SDS grad norm, step {k + 1}": [(r["step"], r[f"grad_norm_{k}"]) for r in log]
            for k in range(K)
        }
        save_line_plot(out_dir / "loss.png", series, title="progressive rendering distillation",
                       xlabel="train step")  # fmt: skip

    def load(self, run_dir: Path):
        """(config, trained generator, prior adapter) of a finished run."""
        from fewstep.core.rundir import load_run_config, load_student

        run_dir = Path(run_dir)
        cfg, _ = load_run_config(run_dir, self.config_cls)
        state, _ = load_student(run_dir, "generator")
        gen, adapter = build_generator(cfg)
        missing = set(_trained_state(gen)) - set(state)
        if missing:
            raise ValueError(f"{run_dir}: the saved generator lacks {sorted(missing)[:5]}")
        gen.load_state_dict(state, strict=False)
        return cfg, gen.eval(), adapter

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """``n`` objects (classes 0, 1, ... cycling) in ``steps`` progressive steps (default
        K), 8 turntable views each, as a PNG grid (one row per object)."""
        from fewstep.core.report import save_image_grid
        from fewstep.threed.distill3d import turntable
        from fewstep.threed.triplane_turbo import generate

        cfg, gen, adapter = self.load(run_dir)
        labels = torch.arange(n) % adapter.prior.num_classes
        planes = generate(gen, labels, steps, torch.Generator().manual_seed(cfg.eval_seed))
        rows = [turntable(gen.field(p), 8, _render_cfg(cfg)) for p in planes]
        out = Path(out) if out is not None else Path(run_dir) / f"samples_{n}.png"
        imgs = torch.cat(rows).permute(0, 3, 1, 2)
        return save_image_grid(out, imgs, nrow=8, value_range=(0.0, 1.0), upscale=2)

    def evaluate(self, run_dir: Path) -> dict:
        cfg, gen, adapter = self.load(run_dir)
        res = evaluate_generator(gen, adapter, cfg)
        res.pop("_images")
        res.pop("_planes")
        return res

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, "fewstep threed-triplane-turbo: class to triplane in K steps")
        cols = ["steps", "train_steps", "view_accuracy", "mean_confidence", "seconds_per_object",
                "seconds_single_object", "seconds_per_mesh", "wall_seconds",
                "trainable_fraction"]  # fmt: skip
        rep.add_table("Generator (views judged by the prior's classifier)", [m], cols)
        per_class = [
            {"class": c, "view_accuracy": a, "mean_confidence": p, "mesh_triangles": t}
            for c, (a, p, t) in enumerate(zip(m["per_class_accuracy"],
                                              m["per_class_confidence"], m["mesh_triangles"]))
        ]  # fmt: skip
        rep.add_table("Per class", per_class,
                      ["class", "view_accuracy", "mean_confidence", "mesh_triangles"])  # fmt: skip
        for name, title in (
            ("turntable.png", "Turntable renders (one row per class)"),
            ("turntable_prior.png", "What the prior sees (its image space)"),
            ("turntable.gif", "Turntable, all classes"),
            ("loss.png", "SDS gradient norm per progressive step"),
        ):
            if (run_dir / name).exists():
                rep.add_image(title, run_dir / name)
        return rep.write()


TRIPLANE_TURBO = TriplaneTurboRecipe()
