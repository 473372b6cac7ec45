"""``fewstep distill threed-mdt-dist``: MDT-dist (``fewstep.threed.mdt``) of a small 3-D flow
teacher over voxel latents of procedural shapes (boxes, spheres, tori).

The teacher (a 3-D conv U-Net velocity net) is trained by ``core.pretrain`` and cached by
config hash; the student starts as a copy and is distilled by the core ``Trainer`` with the
``MDTDist`` objective. The run folder gets ``student.safetensors`` (EMA student),
``metrics.json`` (per sampler: nearest-training-shape IoU, 1-NN class histogram and its TV
distance, MMD^2 against held-out shapes, squared distance to the teacher's 25-step sample from
the same noise, seconds per sample and speed-up; Chamfer distance and normal consistency of
sample meshes to their nearest training shape's mesh), ``teacher_sample.ply`` /
``student_sample.ply`` (marching cubes of one sample), ``turntable.gif`` (teacher 25-step |
student 1-step | student 2-step samples side by side), ``loss.png`` and ``report.html``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.core.training import TrainConfig
from fewstep.threed.mdt import MDTConfig

STUDENT_FILE = "student.safetensors"


@dataclass
class ShapeDataConfig:
    resolution: int = 8  # latent grid per axis (even)
    n_train: int = 512  # training shapes (classes cycle box, sphere, torus)
    n_held_out: int = 128  # held-out shapes for MMD
    trunc: float = 0.25  # SDF truncation: latent = clamp(sdf / trunc, -1, 1)


def _train_default() -> TrainConfig:
    return TrainConfig(steps=200, batch_size=32, lr=1e-3, ema_decay=0.99, progress=False)


@dataclass
class MDTRecipeConfig:
    data: ShapeDataConfig = field(default_factory=ShapeDataConfig)  # procedural shapes
    channels: int = 8  # U-Net width (teacher and student)
    teacher_steps: int = 600  # teacher training steps (cached)
    teacher_batch: int = 32  # teacher batch size
    teacher_lr: float = 3e-3  # teacher learning rate
    teacher_nfe: int = 25  # teacher Euler steps at sampling (TRELLIS: 25)
    student_nfe: tuple[int, ...] = (1, 2)  # student Euler steps evaluated
    mdt: MDTConfig = field(default_factory=MDTConfig)  # MDT-dist loss settings
    train: TrainConfig = field(default_factory=_train_default)  # distillation loop
    eval_samples: int = 128  # samples per sampler in the evaluation
    meshes: int = 3  # samples meshed for the Chamfer / normal-consistency metrics
    turntable: int = 12  # GIF frames
    threads: int = 1  # torch CPU threads (0: torch's default)
    seed: int = 0  # data, teacher and evaluation noise


def _net(cfg: MDTRecipeConfig):
    from fewstep.core.models import ModuleDenoiser
    from fewstep.core.paths import RectifiedFlow
    from fewstep.threed.mdt import VoxelVelocityNet

    return ModuleDenoiser(VoxelVelocityNet(cfg.channels), RectifiedFlow(), "velocity")


def _data(cfg: MDTRecipeConfig):
    from fewstep.threed.mdt import procedural_shapes

    d = cfg.data
    x, y = procedural_shapes(d.n_train, d.resolution, d.trunc, seed=cfg.seed)
    held, _ = procedural_shapes(d.n_held_out, d.resolution, d.trunc, seed=cfg.seed + 10_000)
    return x, y, held


def load_teacher(cfg: MDTRecipeConfig, x):
    import dataclasses
    import time

    from fewstep.core.cache import cached_module
    from fewstep.core.pretrain import train_denoiser
    from fewstep.core.training import TensorData

    spec = {
        "data": dataclasses.asdict(cfg.data),
        "channels": cfg.channels,
        "steps": cfg.teacher_steps,
        "batch": cfg.teacher_batch,
        "lr": cfg.teacher_lr,
        "seed": cfg.seed,
    }
    torch.manual_seed(cfg.seed)
    model = _net(cfg)

    def train(m):
        t0 = time.perf_counter()
        ema, losses = train_denoiser(
            m, TensorData(x), cfg.teacher_steps, cfg.teacher_batch, cfg.teacher_lr,
            seed=cfg.seed, progress=False,
        )  # fmt: skip
        m.load_state_dict(ema.state_dict())  # the cache keeps the EMA weights
        return {"train_seconds": time.perf_counter() - t0, "final_loss": losses[-1]}

    model, info, cached = cached_module("threed/mdt-teacher", spec, model, train)
    return model.eval().requires_grad_(False), info, cached


def latent_field(latent, density: float = 30.0):
    """A VoxelField of a latent (1, R, R, R) (negative inside) for rendering: density
    ``density * sigmoid(-4 latent)``, colour from the latent's gradient (normal shading)."""
    from fewstep.threed.fields import VoxelField

    v = latent[0].float()
    g = torch.stack(torch.gradient(v), -1)
    rgb = (0.5 + 0.45 * torch.nn.functional.normalize(g, dim=-1)).clamp(0.05, 0.95)
    return VoxelField.from_grids(density * torch.sigmoid(-4 * v), rgb)


class MDTRecipe:
    name = "threed-mdt-dist"
    summary = "MDT-dist: few-step 3-D flow (velocity matching + velocity distillation)"
    config_cls = MDTRecipeConfig

    def objective_defaults(self, objective: str) -> dict:
        return {}

    def distill(self, cfg: MDTRecipeConfig, obj_cfg, out_dir: Path) -> dict:
        from safetensors.torch import save

        from fewstep.core.io import atomic_write_bytes, atomic_write_json
        from fewstep.core.models import trainable_copy
        from fewstep.core.report import save_line_plot
        from fewstep.core.training import TensorData, Trainer
        from fewstep.threed.mdt import MDTDist

        if not cfg.student_nfe or min(cfg.student_nfe) < 1:
            raise ValueError(f"student_nfe must list step counts >= 1, got {cfg.student_nfe}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        x, y, held = _data(cfg)
        teacher, tinfo, cached = load_teacher(cfg, x)
        student = trainable_copy(teacher)
        trainer = Trainer(MDTDist(teacher, cfg.mdt), student, TensorData(x), cfg.train,
                          out_dir / "train", device="cpu")  # fmt: skip
        history = trainer.fit()
        final = trainer.sampling_denoiser().eval()
        metrics = {
            "method": self.name,
            "teacher_cached": cached,
            "teacher_train_seconds": tinfo.get("train_seconds"),
            "distill_seconds": history[-1]["elapsed"] if history else 0.0,
            **self._evaluate(cfg, teacher, final, x, y, held, out_dir),
        }
        state = {
            f"student.{k}": v.detach().cpu().contiguous() for k, v in final.state_dict().items()
        }
        atomic_write_bytes(out_dir / STUDENT_FILE, save(state))
        atomic_write_json(out_dir / "metrics.json", metrics)
        series = {k: [(h["step"], h[k]) for h in history if k in h]
                  for k in ("loss_vm", "loss_vd")}  # fmt: skip
        save_line_plot(out_dir / "loss.png", {k: v for k, v in series.items() if v},
                       title="MDT-dist losses", xlabel="step")  # fmt: skip
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _evaluate(self, cfg, teacher, student, x, y, held, out_dir: Path) -> dict:
        from fewstep.threed.geometry_eval import (
            chamfer,
            mesh_from_volume,
            normal_consistency,
            save_mesh,
        )
        from fewstep.threed.mdt import generate, nearest_iou, sample_quality, seconds_per_sample

        R = cfg.data.resolution
        g = torch.Generator().manual_seed(cfg.seed + 7)
        z = torch.randn(cfg.eval_samples, 1, R, R, R, generator=g)
        ref = generate(teacher, z, cfg.teacher_nfe)
        runs = {f"teacher_{cfg.teacher_nfe}": (teacher, cfg.teacher_nfe)}
        runs["untrained_student_1"] = (teacher, 1)  # the student's initialisation
        for k in cfg.student_nfe:
            runs[f"student_{k}"] = (student, k)
        table, samples = {}, {}
        t_sec = seconds_per_sample(teacher, z[:32], cfg.teacher_nfe)
        for name, (model, nfe) in runs.items():
            s = ref if name.startswith("teacher") else generate(model, z, nfe)
            samples[name] = s
            sec = t_sec if name.startswith("teacher") else seconds_per_sample(model, z[:32], nfe)
            table[name] = {
                "nfe": nfe,
                **sample_quality(s, x, y, held),
                "mse_to_teacher": float((s - ref).pow(2).mean()),
                "seconds_per_sample": sec,
                "speedup": t_sec / sec,
            }
        geo = {}
        aabb = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
        for name in (f"teacher_{cfg.teacher_nfe}", f"student_{min(cfg.student_nfe)}"):
            s = samples[name][: cfg.meshes]
            _, idx = nearest_iou(s, x)
            ch, nc = [], []
            for i in range(len(s)):
                try:
                    m = mesh_from_volume(s[i, 0], aabb, 0.0, inside="below")
                except ValueError:  # an empty or full sample: no surface
                    continue
                r = mesh_from_volume(x[idx[i], 0], aabb, 0.0, inside="below")
                ch.append(chamfer(m, r, n=5000))
                nc.append(normal_consistency(m, r, n=5000))
                if i == 0:
                    save_mesh(out_dir / f"{name.split('_')[0]}_sample.ply", m)
            geo[name] = {
                "chamfer_to_nearest": sum(ch) / len(ch) if ch else None,
                "normal_consistency_to_nearest": sum(nc) / len(nc) if nc else None,
                "meshed": len(ch),
            }
        self._gif(cfg, [samples[f"teacher_{cfg.teacher_nfe}"][0]]
                  + [samples[f"student_{k}"][0] for k in cfg.student_nfe], out_dir)  # fmt: skip
        return {"samplers": table, "geometry": geo}

    @staticmethod
    def _gif(cfg, latents, out_dir: Path) -> None:
        from fewstep.threed.cameras import orbit_cameras
        from fewstep.threed.geometry_eval import turntable_gif
        from fewstep.threed.volume import VolumeRenderConfig, render_field

        fields = [latent_field(v) for v in latents]

        def frame(az: float):
            cams = orbit_cameras(1, 3.2, 25.0, size=32, azimuth_start=az)
            rc = VolumeRenderConfig(n_samples=48)
            return torch.cat([render_field(f, cams, rc)["image"][0] for f in fields], 1)

        turntable_gif(frame, cfg.turntable, out_dir / "turntable.gif", upscale=3)

    def load(self, run_dir: Path):
        from safetensors.torch import load_file

        from fewstep.core.rundir import load_run_config

        run_dir = Path(run_dir)
        cfg, _ = load_run_config(run_dir, MDTRecipeConfig)
        student = _net(cfg)
        state = load_file(str(run_dir / STUDENT_FILE))
        student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
        return cfg, student.eval()

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """``n`` student samples (``steps`` Euler steps, default the fewest) as a GIF row."""
        from fewstep.threed.mdt import generate

        cfg, student = self.load(run_dir)
        R = cfg.data.resolution
        z = torch.randn(n, 1, R, R, R, generator=torch.Generator().manual_seed(cfg.seed))
        s = generate(student, z, steps or min(cfg.student_nfe))
        folder = Path(out).parent if out else Path(run_dir)
        self._gif(cfg, list(s), folder)
        return folder / "turntable.gif"

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.threed.mdt import generate, sample_quality

        cfg, student = self.load(run_dir)
        x, y, held = _data(cfg)
        R = cfg.data.resolution
        g = torch.Generator().manual_seed(cfg.seed + 7)
        z = torch.randn(cfg.eval_samples, 1, R, R, R, generator=g)
        k = min(cfg.student_nfe)
        return {f"student_{k}": sample_quality(generate(student, z, k), x, y, held)}

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        rows = []
        for name, r in m["samplers"].items():
            rows.append({"sampler": name, "NFE": r["nfe"], "nearest IoU": r["nearest_iou"],
                         "class TV": r["class_tv"], "MMD^2": r["mmd"],
                         "MSE to teacher": r["mse_to_teacher"],
                         "s / sample": r["seconds_per_sample"],
                         "speed-up": r["speedup"]})  # fmt: skip
        rep.add_table("Samples (same noise for every sampler)", rows)
        rep.add_table("Sample meshes vs nearest training shape",
                      [{"sampler": k, **v} for k, v in m["geometry"].items()])  # fmt: skip
        for name, file in (("Teacher 25 steps | student 1 step | student 2 steps",
                            "turntable.gif"), ("Losses", "loss.png")):  # fmt: skip
            if (run_dir / file).exists():
                rep.add_image(name, run_dir / file)
        return rep.write()


MDT_DIST = MDTRecipe()
