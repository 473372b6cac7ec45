"""``fewstep distill threed-pvd`` and ``fewstep distill threed-momentum-gs``.

- ``threed-pvd``: a teacher field of one type (trained on posed views of a scene, cached by
  config hash) is distilled into a student of another type by PVD (``fewstep.threed.pvd``).
  Scenes: ``toy`` / ``clutter`` (procedural, ``fewstep.threed.scenes``, rendered from orbit
  cameras) or a nerfstudio ``transforms.json`` (every ``test_every``-th frame held out). The
  run folder gets ``student.safetensors`` + ``student.json`` (field type and config),
  ``metrics.json`` (held-out PSNR of the student against the teacher's renders and the ground
  truth, the teacher's, an untrained student's and a constant colour's, training seconds; with
  ``--baseline true`` the same student trained from the teacher's images for comparison),
  ``turntable.png``, ``psnr.png`` and ``report.html``.
- ``threed-momentum-gs``: Momentum-GS (``fewstep.threed.momentum_gs``) on the toy block scene;
  the run folder gets ``gaussians.ply`` (merged blocks, 3DGS layout), ``student.safetensors``
  (anchors, decoder, momentum decoder), ``metrics.json`` (held-out PSNR of the merged model,
  per-block PSNR and weights, seconds), ``turntable.png``, ``loss.png`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.threed.fields import DEFAULT_AABB
from fewstep.threed.momentum_gs import MomentumGSConfig

STUDENT_FILE = "student.safetensors"


# ---------------------------------------------------------------------------------------------
# PVD
# ---------------------------------------------------------------------------------------------


@dataclass
class SceneConfig:
    scene: str = "toy"  # procedural ("toy", "clutter": threed.scenes) or a transforms.json
    views: int = 24  # procedural: training views (random orbit)
    test_views: int = 8  # procedural: held-out views (turntable at another elevation)
    size: int = 32  # procedural: image size in pixels
    test_every: int = 8  # transforms.json: every n-th frame is held out
    aabb: tuple[float, ...] = DEFAULT_AABB  # scene box of teacher and student fields
    background: str = "white"  # white or black: composited background


@dataclass
class PVDRecipeConfig:
    scene: SceneConfig = field(default_factory=SceneConfig)  # which views
    teacher: str = "hashgrid"  # teacher field type: mlp, hashgrid, tensorf, voxel
    teacher_steps: int = 600  # teacher training steps on the scene's views (cached)
    student: str = "mlp"  # student field type (any other type)
    steps_shallow: int = 100  # PVD stage 1: intermediate features (or density)
    steps_point: int = 150  # PVD stage 2: per-point density and colour
    steps_render: int = 250  # PVD stage 3: rendered rays
    sigma_clip: tuple[float, float] = (-2.0, 7.0)  # log-density range of the losses (PVD)
    rays_per_step: int = 256  # rays per step
    samples_per_ray: int = 32  # samples per ray
    uniform_points: int = 2048  # live mode: extra uniform points per step (per-point losses)
    teacher_cache_points: int = 65536  # teacher answers computed once (0: query it every step)
    teacher_cache_rays: int = 4096  # rays whose teacher colour is computed once (rgb term)
    point_batch: int = 8192  # cached pool points per step for the per-point terms
    lr_grid: float = 0.02  # grids / hash tables / VM factors
    lr_network: float = 5e-3  # MLP weights
    eval_every: int = 50  # steps between held-out evaluations
    baseline: bool = False  # also train the student from the teacher's images (same budget)
    turntable: int = 8  # views in turntable.png
    threads: int = 1  # torch CPU threads (0: torch's default)
    seed: int = 0  # student initialisation and sampling


def _pvd_config(cfg: PVDRecipeConfig):
    from fewstep.threed.pvd import PVDConfig, default_stages

    return PVDConfig(
        stages=default_stages(cfg.steps_shallow, cfg.steps_point, cfg.steps_render),
        sigma_clip=tuple(cfg.sigma_clip),
        rays_per_step=cfg.rays_per_step,
        samples_per_ray=cfg.samples_per_ray,
        uniform_points=cfg.uniform_points,
        teacher_cache_points=cfg.teacher_cache_points,
        teacher_cache_rays=cfg.teacher_cache_rays,
        point_batch=cfg.point_batch,
        lr_grid=cfg.lr_grid,
        lr_network=cfg.lr_network,
        background=cfg.scene.background,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
    )


def load_scene(sc: SceneConfig):
    """(train cameras, train images, test cameras, test images, scene spec for the cache)."""
    from fewstep.threed.cameras import orbit_cameras
    from fewstep.threed.scenes import SCENES, make_scene
    from fewstep.threed.volume import VolumeRenderConfig, render_field

    if sc.scene in SCENES:
        g = torch.Generator().manual_seed(1)
        train = orbit_cameras(sc.views, 3.0, (-10.0, 50.0), size=sc.size, random=True, generator=g)
        test = orbit_cameras(sc.test_views, 3.0, 25.0, size=sc.size, azimuth_start=22.5)
        gt = make_scene(sc.scene)
        rc = VolumeRenderConfig(n_samples=64, background=sc.background)
        with torch.no_grad():
            tr_img = render_field(gt, train, rc)["image"]
            te_img = render_field(gt, test, rc)["image"]
        return train, tr_img, test, te_img, dataclasses.asdict(sc)
    from fewstep.threed.dataset import read_transforms
    from fewstep.threed.volume import BACKGROUNDS

    path = Path(sc.scene)
    if not path.exists():
        raise FileNotFoundError(
            f"scene {sc.scene!r} is neither a procedural scene {sorted(SCENES)} nor an "
            "existing transforms.json file/folder"
        )
    ds = read_transforms(path, background=BACKGROUNDS.get(sc.background))
    n = len(ds)
    if n < 2:
        raise ValueError(f"{path}: need at least 2 frames (one held out), got {n}")
    test_idx = torch.arange(0, n, max(sc.test_every, 1))
    mask = torch.ones(n, dtype=torch.bool)
    mask[test_idx] = False
    tr_idx = torch.nonzero(mask).flatten()
    if len(tr_idx) == 0:
        raise ValueError(f"{path}: test_every={sc.test_every} leaves no training frames")
    file = path / "transforms.json" if path.is_dir() else path
    spec = {**dataclasses.asdict(sc), "mtime": file.stat().st_mtime, "frames": n}
    return ds.cameras[tr_idx], ds.images[tr_idx], ds.cameras[test_idx], ds.images[test_idx], spec


def _make_field(name: str, aabb):
    from fewstep.threed.fields import make_field

    return make_field(name, aabb=tuple(aabb))


def load_teacher(cfg: PVDRecipeConfig, train, images, scene_spec, pcfg):
    """The teacher field trained on the scene's training views, from the cache if present."""
    from fewstep.core.cache import cached_module
    from fewstep.threed.pvd import train_from_images

    spec = {
        "scene": scene_spec,
        "teacher": cfg.teacher,
        "steps": cfg.teacher_steps,
        "rays": cfg.rays_per_step,
        "samples": cfg.samples_per_ray,
        "lr": [cfg.lr_grid, cfg.lr_network],
        "seed": cfg.seed,
    }
    torch.manual_seed(cfg.seed + 1000)
    teacher = _make_field(cfg.teacher, cfg.scene.aabb)

    def train_fn(f):
        t0 = time.perf_counter()
        log = train_from_images(f, images, train, pcfg, steps=cfg.teacher_steps)
        return {"train_seconds": time.perf_counter() - t0, "final_loss": log["loss"][-1]}

    teacher, info, cached = cached_module("threed/pvd-teacher", spec, teacher, train_fn)
    return teacher.eval(), info, cached


class PVDRecipe:
    name = "threed-pvd"
    summary = "progressive volume distillation between NeRF architectures (hash -> MLP, ...)"
    config_cls = PVDRecipeConfig

    def objective_defaults(self, objective: str) -> dict:
        return {}

    def distill(self, cfg: PVDRecipeConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_bytes, atomic_write_json
        from fewstep.threed.fields import FIELDS
        from fewstep.threed.pvd import distill_volume, evaluate_views, psnr, train_from_images
        from fewstep.threed.volume import VolumeRenderConfig, render_field

        for k in ("teacher", "student"):
            if getattr(cfg, k) not in FIELDS:
                raise ValueError(
                    f"unknown {k} field {getattr(cfg, k)!r}; expected one of {sorted(FIELDS)}"
                )
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        pcfg = _pvd_config(cfg)
        train, tr_img, test, te_img, spec = load_scene(cfg.scene)
        teacher, tinfo, cached = load_teacher(cfg, train, tr_img, spec, pcfg)
        rc = VolumeRenderConfig(n_samples=pcfg.eval_samples, background=cfg.scene.background)
        with torch.no_grad():
            t_test = render_field(teacher, test, rc)["image"]
        views = (test, t_test)
        torch.manual_seed(cfg.seed)
        student = _make_field(cfg.student, cfg.scene.aabb)
        metrics: dict = {
            "method": self.name,
            "teacher": cfg.teacher,
            "student": cfg.student,
            "teacher_cached": cached,
            "teacher_train_seconds": tinfo.get("train_seconds"),
            "teacher_psnr_vs_gt": evaluate_views(
                teacher, test, te_img, background=cfg.scene.background
            ),
            "init_psnr_vs_teacher": evaluate_views(
                student, *views, background=cfg.scene.background
            ),
            "const_psnr_vs_teacher": psnr(t_test.mean((0, 1, 2)).expand_as(t_test), t_test),
        }
        log = distill_volume(teacher, student, train, pcfg, eval_views=views)
        metrics.update(
            psnr_vs_teacher=log["eval"][-1]["psnr"],
            psnr_vs_gt=evaluate_views(student, test, te_img, background=cfg.scene.background),
            train_seconds=log["time"][-1] if log["time"] else 0.0,
            steps=len(log["step"]),
            stages=log["stages"],
            feature_adapter=log["adapter"],
            eval=log["eval"],
        )
        if cfg.baseline:
            from fewstep.threed.pvd import time_to_psnr

            with torch.no_grad():
                t_train = render_field(teacher, train, rc)["image"]
            torch.manual_seed(cfg.seed)
            base = _make_field(cfg.student, cfg.scene.aabb)
            blog = train_from_images(base, t_train, train, pcfg, eval_views=views)
            target = blog["eval"][-1]["psnr"]
            metrics["baseline"] = {
                "psnr_vs_teacher": target,
                "train_seconds": blog["time"][-1] if blog["time"] else 0.0,
                "eval": blog["eval"],
                "pvd_seconds_to_baseline_psnr": time_to_psnr(log, target),
                "baseline_seconds_to_its_psnr": time_to_psnr(blog, target),
            }
        from safetensors.torch import save

        state = {
            f"student.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()
        }
        atomic_write_bytes(out_dir / STUDENT_FILE, save(state))
        atomic_write_json(
            out_dir / "student.json",
            {"field": cfg.student, "config": dataclasses.asdict(student.config)},
        )
        atomic_write_json(out_dir / "metrics.json", metrics)
        self._turntable(cfg, student, out_dir / "turntable.png")
        self._plot(metrics, out_dir / "psnr.png")
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    # --- helpers ----------------------------------------------------------------------
    @staticmethod
    def _turntable(cfg: PVDRecipeConfig, f, path: Path, n: int | None = None) -> Path:
        from fewstep.core.report import save_image_grid
        from fewstep.threed.cameras import orbit_cameras
        from fewstep.threed.volume import VolumeRenderConfig, render_field

        n = n or cfg.turntable
        c = (torch.tensor(cfg.scene.aabb[:3]) + torch.tensor(cfg.scene.aabb[3:])) / 2
        ext = float((torch.tensor(cfg.scene.aabb[3:]) - torch.tensor(cfg.scene.aabb[:3])).norm())
        cams = orbit_cameras(n, 1.5 * ext, 20.0, size=cfg.scene.size, target=tuple(c.tolist()))
        with torch.no_grad():
            img = render_field(f, cams, VolumeRenderConfig(background=cfg.scene.background))[
                "image"
            ]
        return save_image_grid(path, img.permute(0, 3, 1, 2), value_range=(0.0, 1.0), upscale=2)

    @staticmethod
    def _plot(m: dict, path: Path) -> None:
        from fewstep.core.report import save_line_plot

        series = {"PVD": [(e["time"], e["psnr"]) for e in m["eval"]]}
        if "baseline" in m:
            series["from teacher images"] = [(e["time"], e["psnr"]) for e in m["baseline"]["eval"]]
        save_line_plot(
            path, series, title="held-out PSNR vs teacher", xlabel="training s", ylabel="dB"
        )

    def load(self, run_dir: Path):
        from safetensors.torch import load_file

        from fewstep.core.rundir import load_run_config

        run_dir = Path(run_dir)
        cfg, _ = load_run_config(run_dir, PVDRecipeConfig)
        meta = json.loads((run_dir / "student.json").read_text())
        student = _make_field(meta["field"], cfg.scene.aabb)
        state = load_file(str(run_dir / STUDENT_FILE))
        student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
        return cfg, student.eval()

    # --- CLI commands -----------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """A turntable of ``n`` views of the student."""
        cfg, student = self.load(run_dir)
        return self._turntable(cfg, student, out or Path(run_dir) / f"turntable_{n}.png", n)

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.threed.pvd import evaluate_views

        cfg, student = self.load(run_dir)
        _, _, test, te_img, _ = load_scene(cfg.scene)
        return {
            "psnr_vs_gt": evaluate_views(student, test, te_img, background=cfg.scene.background)
        }

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}: {m['teacher']} -> {m['student']}")
        rows = [
            {"model": f"teacher ({m['teacher']})", "PSNR vs GT": m["teacher_psnr_vs_gt"]},
            {"model": f"student ({m['student']}), PVD", "PSNR vs teacher": m["psnr_vs_teacher"],
             "PSNR vs GT": m["psnr_vs_gt"], "train s": m["train_seconds"]},
            {"model": "student, untrained", "PSNR vs teacher": m["init_psnr_vs_teacher"]},
            {"model": "constant colour", "PSNR vs teacher": m["const_psnr_vs_teacher"]},
        ]  # fmt: skip
        if "baseline" in m:
            b = m["baseline"]
            rows.insert(2, {"model": "student from teacher images", "PSNR vs teacher":
                            b["psnr_vs_teacher"], "train s": b["train_seconds"]})  # fmt: skip
        rep.add_table("Held-out views", rows)
        if m["psnr_vs_teacher"] <= m["init_psnr_vs_teacher"]:
            rep.add_warning("the distilled student is no better than the untrained one")
        rep.add_text("Stages", json.dumps(m["stages"]))
        for name, file in (("Student turntable", "turntable.png"), ("PSNR", "psnr.png")):
            if (run_dir / file).exists():
                rep.add_image(name, run_dir / file)
        return rep.write()


# ---------------------------------------------------------------------------------------------
# Momentum-GS
# ---------------------------------------------------------------------------------------------


@dataclass
class MomentumGSRecipeConfig:
    train: MomentumGSConfig = field(default_factory=MomentumGSConfig)  # blocks, workers, losses
    train_views: int = 6  # aerial training views per block
    test_views: int = 2  # held-out views per block
    size: int = 32  # image size
    threads: int = 1  # torch CPU threads (0: torch's default)


def _block_data(cfg: MomentumGSRecipeConfig):
    from fewstep.threed.momentum_gs import (
        TOY_AABB,
        partition_blocks,
        render_block_data,
        toy_block_scene,
    )
    from fewstep.threed.volume import VolumeRenderConfig

    scene = toy_block_scene()
    blocks = partition_blocks(TOY_AABB, cfg.train.blocks, cfg.train.overlap)
    rc = VolumeRenderConfig(n_samples=64, background=tuple(cfg.train.background))
    data = render_block_data(scene, blocks, cfg.train_views, cfg.test_views, cfg.size, rc,
                             cfg.train.seed)  # fmt: skip
    return scene, blocks, data


def _cat_cameras(cams):
    from fewstep.threed.cameras import Cameras

    return Cameras(
        torch.cat([c.camera_to_world for c in cams]),
        torch.cat([c.fx for c in cams]),
        torch.cat([c.fy for c in cams]),
        torch.cat([c.cx for c in cams]),
        torch.cat([c.cy for c in cams]),
        cams[0].width,
        cams[0].height,
    )


class MomentumGSRecipe:
    name = "threed-momentum-gs"
    summary = "Momentum-GS: block-wise Gaussians, shared decoder, momentum teacher decoder"
    config_cls = MomentumGSRecipeConfig

    def objective_defaults(self, objective: str) -> dict:
        return {}

    def _build(self, cfg):
        from fewstep.threed.momentum_gs import MomentumGS, scene_points

        scene, blocks, data = _block_data(cfg)
        pts, _ = scene_points(scene, cfg.train.anchor_voxel)
        torch.manual_seed(cfg.train.seed)
        return MomentumGS.from_points(pts, blocks, cfg.train), data

    def distill(self, cfg: MomentumGSRecipeConfig, obj_cfg, out_dir: Path) -> dict:
        from safetensors.torch import save

        from fewstep.core.io import atomic_write_bytes, atomic_write_json
        from fewstep.core.report import save_line_plot
        from fewstep.threed.gaussians import save_ply
        from fewstep.threed.momentum_gs import image_psnr, train_momentum_gs

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        model, data = self._build(cfg)
        test_cams = _cat_cameras([d.test_cameras for d in data])
        test_img = torch.cat([d.test_images for d in data])
        init = image_psnr(model.render_merged(test_cams), test_img)
        log = train_momentum_gs(model, data, cfg.train)
        merged = model.render_merged(test_cams)
        metrics = {
            "method": self.name,
            "blocks": len(model.blocks),
            "workers": cfg.train.workers,
            "anchors_per_block": [len(a) for a in model.anchors],
            "init_psnr": init,
            "psnr": image_psnr(merged, test_img),
            "const_psnr": image_psnr(test_img.mean((0, 1, 2)).expand_as(test_img), test_img),
            "block_psnr": log["evals"][-1]["psnr"] if log["evals"] else None,
            "block_weights": log["weights"],
            "loss_first": log["loss"][0],
            "loss_last": log["loss"][-1],
            "train_seconds": log["seconds"],
            "schedule": log["schedule"],
        }
        gauss = model.merged_gaussians()
        metrics["gaussians"] = len(gauss)
        save_ply(out_dir / "gaussians.ply", gauss)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(out_dir / STUDENT_FILE, save(state))
        atomic_write_json(out_dir / "metrics.json", metrics)
        self._grid(merged, out_dir / "turntable.png")
        save_line_plot(out_dir / "loss.png", {"loss": list(enumerate(log["loss"]))}, title="loss")
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    @staticmethod
    def _grid(images, path: Path) -> Path:
        from fewstep.core.report import save_image_grid

        return save_image_grid(path, images.permute(0, 3, 1, 2), value_range=(0.0, 1.0), upscale=2)

    def load(self, run_dir: Path):
        from safetensors.torch import load_file

        from fewstep.core.rundir import load_run_config

        run_dir = Path(run_dir)
        cfg, _ = load_run_config(run_dir, MomentumGSRecipeConfig)
        model, data = self._build(cfg)
        model.load_state_dict(load_file(str(run_dir / STUDENT_FILE)))
        return cfg, model, data

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """Renders of the merged model at the first ``n`` held-out views."""
        _, model, data = self.load(run_dir)
        cams = _cat_cameras([d.test_cameras for d in data])
        idx = slice(0, min(n, len(cams)))
        return self._grid(model.render_merged(cams[idx]), out or Path(run_dir) / f"views_{n}.png")

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.threed.momentum_gs import image_psnr

        _, model, data = self.load(run_dir)
        cams = _cat_cameras([d.test_cameras for d in data])
        return {
            "psnr": image_psnr(model.render_merged(cams), torch.cat([d.test_images for d in data]))
        }

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        rep.add_table(
            "Held-out views (all blocks merged)",
            [
                {"model": "Momentum-GS", "PSNR": m["psnr"], "train s": m["train_seconds"]},
                {"model": "before training", "PSNR": m["init_psnr"]},
                {"model": "constant colour", "PSNR": m["const_psnr"]},
            ],
        )
        psnrs = m["block_psnr"] or [None] * len(m["block_weights"])
        rows = [
            {"block": i, "anchors": a, "PSNR": p, "weight": w}
            for i, (a, p, w) in enumerate(zip(m["anchors_per_block"], psnrs, m["block_weights"]))
        ]
        rep.add_table("Blocks", rows)
        rep.add_text("Schedule (turn -> blocks, one per worker)", json.dumps(m["schedule"]))
        for name, file in (("Held-out renders", "turntable.png"), ("Loss", "loss.png")):
            if (run_dir / file).exists():
                rep.add_image(name, run_dir / file)
        return rep.write()


PVD = PVDRecipe()
MOMENTUM_GS = MomentumGSRecipe()
