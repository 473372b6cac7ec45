"""``fewstep distill threed-prd``: progressive radiance distillation (``fewstep.threed.prd``)
on the procedural toy scene of known materials.

The teacher radiance field is the toy scene under its training light; a PBR student (albedo,
roughness and progress grids, learned lights) is fitted to the teacher's images through the
progress-map blend. The run folder gets ``student.safetensors`` (grid and lights),
``metrics.json`` (relit PSNR of the student against the ground-truth relit scene, of the
radiance-only baseline (the teacher cannot relight: its image under the old light) and, with
``--baseline true``, of the same student trained with the progress frozen at 1; mean progress;
mesh Chamfer distance and normal consistency against the scene's reference primitives),
``mesh.ply`` (marching cubes of the teacher's density, albedo-coloured), ``turntable.gif``
(the student's physical render around the object), ``relight.gif`` (the student under a
rotating light), ``loss.png`` and ``report.html``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.threed.prd import PRDConfig

STUDENT_FILE = "student.safetensors"


@dataclass
class PRDSceneConfig:
    views: int = 12  # training views (random orbit)
    test_views: int = 4  # held-out views (turntable at another elevation)
    size: int = 24  # image size in pixels
    samples: int = 48  # samples per ray
    emission: float = 0.25  # glow on the box: a light path the physical model lacks


@dataclass
class PRDRecipeConfig:
    scene: PRDSceneConfig = field(default_factory=PRDSceneConfig)  # toy scene and views
    prd: PRDConfig = field(default_factory=PRDConfig)  # PRD optimisation
    resolution: int = 24  # material grid resolution per axis
    progress_init: float = 0.01  # initial progress (the paper: small)
    baseline: bool = False  # also train with the progress frozen at 1 (no radiance fallback)
    mesh_resolution: int = 48  # marching-cubes grid for mesh.ply and the geometry metrics
    turntable: int = 12  # frames of each GIF
    threads: int = 1  # torch CPU threads (0: torch's default)
    seed: int = 0  # camera draws and initialisation


def _scene(cfg: PRDRecipeConfig):
    from fewstep.threed.cameras import orbit_cameras
    from fewstep.threed.prd import ToyPBRScene, cache_views, default_toy_objects

    sc = cfg.scene
    teacher = ToyPBRScene(default_toy_objects(sc.emission))
    truth = ToyPBRScene(default_toy_objects(0.0))  # materials and light, no glow
    g = torch.Generator().manual_seed(cfg.seed + 1)
    train = orbit_cameras(sc.views, 3.0, (-10.0, 60.0), size=sc.size, random=True, generator=g)
    test = orbit_cameras(sc.test_views, 3.0, 30.0, size=sc.size, azimuth_start=20.0)
    return (
        teacher,
        truth,
        cache_views(teacher, train, sc.samples),
        cache_views(teacher, test, sc.samples),
    )


def reference_mesh(scene):
    """The toy scene's objects as open3d primitives (the geometry ground truth)."""
    import numpy as np
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh()
    for o in scene.objects:
        if o.kind == "sphere":
            m = o3d.geometry.TriangleMesh.create_sphere(radius=o.size, resolution=40)
            m.translate(np.asarray(o.center, dtype=float))
        else:
            m = o3d.geometry.TriangleMesh.create_box(2 * o.size, 2 * o.size, 2 * o.size)
            m.translate(np.asarray(o.center, dtype=float) - o.size)
        mesh += m
    mesh.compute_vertex_normals()
    return mesh


class PRDRecipe:
    name = "threed-prd"
    summary = "progressive radiance distillation: PBR materials + light from a radiance field"
    config_cls = PRDRecipeConfig

    def objective_defaults(self, objective: str) -> dict:
        return {}

    def _student(self, cfg: PRDRecipeConfig):
        from fewstep.threed.prd import PBRField

        torch.manual_seed(cfg.seed)
        return PBRField(cfg.resolution, progress_init=cfg.progress_init)

    def distill(self, cfg: PRDRecipeConfig, obj_cfg, out_dir: Path) -> dict:
        from safetensors.torch import save

        from fewstep.core.io import atomic_write_bytes, atomic_write_json
        from fewstep.core.report import save_line_plot
        from fewstep.threed.prd import (
            PROGRESS_MODES,
            distill_prd,
            mean_progress,
            psnr,
            relit_psnr,
            render_pbr,
            render_prd,
        )

        if cfg.prd.progress not in PROGRESS_MODES:
            raise ValueError(
                f"prd.progress must be one of {PROGRESS_MODES}, got {cfg.prd.progress!r}"
            )
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        teacher, truth, views, test = _scene(cfg)
        student = self._student(cfg)
        log = distill_prd(student, views, cfg.prd, truth, test)
        deg = cfg.prd.relight_degrees
        with torch.no_grad():
            gt_relit, _ = render_pbr(truth, truth.lights.rotated(deg), test)
            out = render_prd(student, test)
            pbr, _ = render_pbr(student, student.lights, test)
        metrics: dict = {
            "method": self.name,
            "progress_mode": cfg.prd.progress,
            "relit_psnr": relit_psnr(student, truth, test, deg),
            "radiance_only_relit_psnr": psnr(test.radiance, gt_relit),
            "hybrid_psnr_vs_teacher": psnr(out["image"], test.radiance),
            "pbr_psnr_vs_teacher": psnr(pbr, test.radiance),
            "mean_progress": mean_progress(out["progress"], test.alpha),
            "train_seconds": log["seconds"][-1] if log["seconds"] else 0.0,
            "steps": len(log["step"]),
            "light_direction": student.lights.directions.detach().tolist(),
            "light_irradiance": student.lights.irradiance.detach().tolist(),
            "eval": log["eval"],
        }
        if cfg.baseline:
            base = self._student(cfg)
            fixed = PRDConfig(**{**cfg.prd.__dict__, "progress": "fixed"})
            blog = distill_prd(base, views, fixed, truth, test)
            metrics["baseline_fixed_progress"] = {
                "relit_psnr": relit_psnr(base, truth, test, deg),
                "eval": blog["eval"],
            }
        metrics.update(self._geometry(cfg, teacher, student, out_dir))
        state = {
            f"student.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()
        }
        atomic_write_bytes(out_dir / STUDENT_FILE, save(state))
        atomic_write_json(out_dir / "metrics.json", metrics)
        self._gifs(cfg, teacher, student, out_dir)
        steps = log["step"]
        series = {
            "loss": list(zip(steps, log["loss"], strict=True)),
            "mean progress": list(zip(steps, log["progress"], strict=True)),
        }
        save_line_plot(out_dir / "loss.png", series, title="PRD training", xlabel="step")
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    @staticmethod
    def _geometry(cfg, teacher, student, out_dir: Path) -> dict:
        from fewstep.threed.geometry_eval import (
            chamfer,
            mesh_from_field,
            normal_consistency,
            save_mesh,
        )

        def albedo(v):
            with torch.no_grad():
                return student.attributes(v)["albedo"]

        mesh = mesh_from_field(teacher, cfg.mesh_resolution, 0.5 * teacher.sigma_max, albedo)
        save_mesh(out_dir / "mesh.ply", mesh)
        ref = reference_mesh(teacher)
        return {
            "mesh_triangles": len(mesh.triangles),
            "chamfer_vs_reference": chamfer(mesh, ref, n=20000),
            "normal_consistency_vs_reference": normal_consistency(mesh, ref, n=20000),
        }

    @staticmethod
    def _gifs(cfg, teacher, student, out_dir: Path) -> None:
        from fewstep.threed.cameras import orbit_cameras
        from fewstep.threed.geometry_eval import turntable_gif
        from fewstep.threed.prd import cache_views, render_pbr

        sc = cfg.scene

        def orbit(az: float):
            cams = orbit_cameras(1, 3.0, 25.0, size=sc.size, azimuth_start=az)
            v = cache_views(teacher, cams, sc.samples)
            return v, cams

        def camera_frame(az: float):
            v, _ = orbit(az)
            return v.image(render_pbr(student, student.lights, v)[0])[0]

        front, _ = orbit(30.0)

        def light_frame(az: float):
            return front.image(render_pbr(student, student.lights.rotated(az), front)[0])[0]

        turntable_gif(camera_frame, cfg.turntable, out_dir / "turntable.gif", upscale=4)
        turntable_gif(light_frame, cfg.turntable, out_dir / "relight.gif", upscale=4)

    def load(self, run_dir: Path):
        from safetensors.torch import load_file

        from fewstep.core.rundir import load_run_config

        run_dir = Path(run_dir)
        cfg, _ = load_run_config(run_dir, PRDRecipeConfig)
        student = self._student(cfg)
        state = load_file(str(run_dir / STUDENT_FILE))
        student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
        return cfg, student.eval()

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """A GIF of ``n`` views of the student's physical render."""
        from fewstep.threed.prd import ToyPBRScene, default_toy_objects

        cfg, student = self.load(run_dir)
        cfg.turntable = n
        folder = Path(out).parent if out else Path(run_dir)
        self._gifs(cfg, ToyPBRScene(default_toy_objects(cfg.scene.emission)), student, folder)
        return folder / "turntable.gif"

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.threed.prd import relit_psnr

        cfg, student = self.load(run_dir)
        _, truth, _, test = _scene(cfg)
        return {"relit_psnr": relit_psnr(student, truth, test, cfg.prd.relight_degrees)}

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        rows = [
            {"model": f"PRD student (progress {m['progress_mode']})", "relit PSNR": m["relit_psnr"],
             "PBR PSNR vs teacher": m["pbr_psnr_vs_teacher"],
             "hybrid PSNR vs teacher": m["hybrid_psnr_vs_teacher"], "train s": m["train_seconds"]},
            {"model": "radiance field only (cannot relight)",
             "relit PSNR": m["radiance_only_relit_psnr"]},
        ]  # fmt: skip
        if "baseline_fixed_progress" in m:
            rows.append({"model": "PBR fit, progress frozen at 1",
                         "relit PSNR": m["baseline_fixed_progress"]["relit_psnr"]})  # fmt: skip
        rep.add_table("Relighting (held-out views, light rotated about z)", rows)
        rep.add_table(
            "Geometry (marching cubes of the teacher's density vs the scene's primitives)",
            [{"Chamfer": m["chamfer_vs_reference"],
              "normal consistency": m["normal_consistency_vs_reference"],
              "triangles": m["mesh_triangles"]}],
        )  # fmt: skip
        rep.add_text("Mean progress on held-out views", f"{m['mean_progress']:.3f}")
        if m["relit_psnr"] <= m["radiance_only_relit_psnr"]:
            rep.add_warning("the PRD student relights no better than the radiance field alone")
        for name, file in (("Turntable (physical render)", "turntable.gif"),
                           ("Relighting (rotating light)", "relight.gif"),
                           ("Training", "loss.png")):  # fmt: skip
            if (run_dir / file).exists():
                rep.add_image(name, run_dir / file)
        return rep.write()


PRD = PRDRecipe()
