"""``fewstep distill video-mcm``: a few-step video student by the Motion Consistency Model
(MCM, Zhai et al. 2024; ``fewstep.video.mcm``).

The video teacher is trained on LOW-quality moving digits (blur, noise, JPEG, strong x264:
``moving_digits`` quality "low"); the frame discriminator sees frames of HIGH-quality clips
drawn with another seed, used as a bag of images (no video of them reaches the student). The
student, initialised from the teacher, is distilled by ``MCMObjective`` through core's
``Trainer`` (motion-representation consistency loss on the teacher's ODE, frame GAN on the
teacher's frozen features (``_mcm_loss``), mixed trajectories) and sampled by consistency
multistep sampling (core's ``FewStepSampler``) at 1, 2 and 4 steps.

Evaluation against held-out high-quality clips (a third seed): video and per-frame Fréchet
distance on fewstep's own video classifier (``evaluate.evaluate_videos``), digit accuracy,
warp error (temporal consistency) and a sharpness ratio (Laplacian energy of the frames over
that of the high-quality frames: the appearance the discriminator should restore). The teacher
(Euler) and the low-quality training clips themselves are scored beside the student.

The run folder gets ``student.safetensors`` (+ ``student.json``), ``metrics.json``, GIFs per
step count, ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.training import TrainConfig
from fewstep.video.evaluate import ClassifierConfig
from fewstep.video.mcm import MCMLossConfig
from fewstep.video.recipes.common import merge_metrics, resolve_device, tile_videos
from fewstep.video.teacher import VideoDataConfig, VideoTeacherConfig


def _low_quality_teacher() -> VideoTeacherConfig:
    return VideoTeacherConfig(data=VideoDataConfig(quality="low"))


def _mcm_loss() -> MCMLossConfig:
    # The frame GAN on frozen features: a trained head on the teacher's first DiT blocks
    # (``disc_backbone`` "teacher", our stand-in for the paper's frozen DINO) at weight 0.01.
    # Against no GAN, two training seeds (session 12, BENCHMARKS.md): 1-step FD 98.8 / 96.3 vs
    # 98.6 / 98.2, 4-step 127.0 / 137.6 vs 137.7 / 140.1, and no over-sharpening at 4 steps
    # (0.92 / 0.87 of the high-quality clips' Laplacian energy vs 2.41 / 1.92). The pixel CNN
    # discriminator made every student worse (0.001-0.01: 1-step FD 138-183, H200 sweep);
    # WGAN at the paper's weight 1 made noise (8-pixel data: 4-step FD 230 vs 42). No
    # gradient penalty: it serves the WGAN's Lipschitz bound, not the non-saturating loss
    return MCMLossConfig(adv_weight=0.01, gan_loss="bce", disc_backbone="teacher",
                         gp_weight=0.0)  # fmt: skip


def _train() -> TrainConfig:
    # the discriminator learns 10x faster than the student, as MCM's 5e-5 vs 5e-6. 2,000
    # steps: at 400 every student was far behind the teacher (1-step FD 205-298 vs 119); at
    # 2,000 the 1-step student passes it (99-110, H200 sweep, session 12)
    return TrainConfig(steps=2000, batch_size=16, lr=5e-5, role_lr={"discriminator": 5e-4},
                       ema_decay=0.99, log_every=20)  # fmt: skip


@dataclass
class MCMEvalConfig:
    steps: tuple[int, ...] = (1, 2, 4)  # student step counts evaluated (consistency multistep)
    samples: int = 64  # videos per sampler (same labels and noise seed for each)
    teacher_steps: int = 50  # the teacher's Euler steps (0: do not sample the teacher)
    reference_videos: int = 256  # held-out high-quality clips the samples are scored against
    reference_seed: int = 2  # their recipe seed (teacher data and discriminator frames differ)
    seed: int = 0  # sampling noise and labels
    fps: float = 8.0  # frame rate of the written GIFs
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # FD / accuracy net


@dataclass
class MCMConfig:
    teacher: VideoTeacherConfig = field(default_factory=_low_quality_teacher)  # on LOW clips
    hq_videos: int = 500  # high-quality clips whose frames (as images) train the discriminator
    hq_seed: int = 1  # their recipe seed (the teacher's clips use teacher.data.seed)
    guidance: float = 1.0  # CFG scale of the teacher's ODE step (1 = none)
    mcm: MCMLossConfig = field(default_factory=_mcm_loss)  # motion, GAN weights, mix ratio
    train: TrainConfig = field(default_factory=_train)  # distillation loop (per-role lr)
    eval: MCMEvalConfig = field(default_factory=MCMEvalConfig)  # evaluation
    threads: int = 1  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


def _hq_data(cfg: MCMConfig, videos: int, seed: int) -> VideoDataConfig:
    """High-quality clips shaped as the teacher's (frames, size)."""
    return dataclasses.replace(cfg.teacher.data, videos=videos, seed=seed, quality="high")


def laplacian_energy(videos: Tensor) -> float:
    """Mean squared response of the 4-neighbour Laplacian over all frames and channels of
    videos (N, T, C, H, W) in [-1, 1] (clamped; replicate padding): the high-frequency energy
    that blur removes (a variance-of-Laplacian sharpness measure, Pech-Pacheco et al. 2000)."""
    x = videos.detach().float().clamp(-1, 1).flatten(0, 2)[:, None]  # (N T C, 1, H, W)
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    lap = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), "replicate"),
                                     k.view(1, 1, 3, 3).to(x))  # fmt: skip
    return lap.pow(2).mean().item()


class MCMRecipe:
    name = "video-mcm"
    summary = "MCM: motion consistency distillation + high-quality frame discriminator"
    config_cls = MCMConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    # --- pieces --------------------------------------------------------------------------
    @staticmethod
    def guided(cfg: MCMConfig, teacher):
        from fewstep.core.models import GuidedDenoiser
        from fewstep.video.teacher import null_labels

        if cfg.guidance == 1.0:
            return teacher
        return GuidedDenoiser(teacher, cfg.guidance, null_labels)

    @staticmethod
    def consistency_function(cfg: MCMConfig, base):
        from fewstep.core.objectives.consistency import ConsistencyFunction

        return ConsistencyFunction(base, cfg.mcm.boundary_scale, cfg.mcm.sigma_data)

    @staticmethod
    def check(cfg: MCMConfig) -> None:
        """Fail on a bad config before any teacher or data is built."""
        from fewstep.core.objectives.common import check_choice
        from fewstep.video.mcm import GAN_LOSSES, get_motion

        get_motion(cfg.mcm.motion)
        check_choice("mcm.gan_loss", cfg.mcm.gan_loss, tuple(GAN_LOSSES))
        if not 0.0 <= cfg.mcm.mix_ratio <= 1.0:
            raise ValueError(f"mcm.mix_ratio must be in [0, 1], got {cfg.mcm.mix_ratio}")
        if cfg.eval.teacher_steps < 0:
            raise ValueError(f"eval.teacher_steps must be >= 0, got {cfg.eval.teacher_steps}")
        if not cfg.eval.steps or min(cfg.eval.steps) < 1:
            raise ValueError(f"eval.steps must be student step counts >= 1, got {cfg.eval.steps}")
        if cfg.hq_videos < 1 and cfg.mcm.adv_weight > 0:
            raise ValueError(f"hq_videos must be >= 1 for the discriminator, got {cfg.hq_videos}")

    def distill(self, cfg: MCMConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.models import trainable_copy
        from fewstep.core.training import TensorData, Trainer
        from fewstep.video.mcm import MCMObjective
        from fewstep.video.teacher import load_clips, load_teacher

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.check(cfg)
        out_dir, device = Path(out_dir), resolve_device(cfg.device)
        teacher, tinfo = load_teacher(cfg.teacher, progress=cfg.train.progress)
        clips, labels = load_clips(cfg.teacher.data)  # low quality: the teacher's data
        real_frames = None
        if cfg.mcm.adv_weight > 0:
            hq, _ = load_clips(_hq_data(cfg, cfg.hq_videos, cfg.hq_seed))
            real_frames = hq.flatten(0, 1)  # (N T, C, H, W): images, order irrelevant
        objective = MCMObjective(self.guided(cfg, teacher), cfg.mcm, real_frames=real_frames)
        t0 = time.perf_counter()
        trainer = Trainer(objective, trainable_copy(teacher), TensorData(clips, labels),
                          cfg.train, out_dir / "train", device=device)  # fmt: skip
        hist = trainer.fit()
        distill_seconds = time.perf_counter() - t0
        base = trainer.ema if trainer.ema is not None else trainer.roles["student"]
        self._save(out_dir, base, cfg)

        metrics = self._evaluate(cfg, teacher, self.consistency_function(cfg, base.eval()),
                                 clips, out_dir)  # fmt: skip
        mloss = [r["motion_loss"] for r in hist if "motion_loss" in r]
        metrics.update(
            teacher_train_seconds=tinfo.get("train_seconds"), distill_seconds=distill_seconds,
            motion_loss_first=mloss[0] if mloss else None,
            motion_loss_last=mloss[-1] if mloss else None,
            disc_loss_last=next((r["disc_loss"] for r in reversed(hist) if "disc_loss" in r),
                                None),
        )  # fmt: skip
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, base, cfg: MCMConfig) -> None:
        from fewstep.core.rundir import save_student

        meta = {"kind": "consistency", "boundary_scale": cfg.mcm.boundary_scale,
                "sigma_data": cfg.mcm.sigma_data, "steps": list(cfg.eval.steps)}  # fmt: skip
        save_student(out_dir, {"": base}, meta)

    def load(self, run_dir: Path):
        """(config, frozen teacher, frozen student consistency function)."""
        from fewstep.core.rundir import load_run_config, load_student
        from fewstep.video.teacher import build_teacher, load_teacher

        cfg, _ = load_run_config(run_dir, self.config_cls)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        teacher, _ = load_teacher(cfg.teacher, progress=False)
        base = build_teacher(cfg.teacher)
        base.load_state_dict(load_student(run_dir)[0])
        student = self.consistency_function(cfg, base.eval().requires_grad_(False))
        return cfg, teacher, student

    # --- evaluation ------------------------------------------------------------------------
    def _evaluate(self, cfg: MCMConfig, teacher, student, clips: Tensor, out_dir: Path) -> dict:
        from fewstep.core.samplers import EulerSampler, FewStepSampler
        from fewstep.video.evaluate import evaluate_videos, load_classifier
        from fewstep.video.io import write_video
        from fewstep.video.teacher import load_clips

        e, data = cfg.eval, cfg.teacher.data
        ccfg = dataclasses.replace(e.classifier, frames=data.frames, size=data.size)
        clf, cinfo = load_classifier(ccfg)
        ref, ref_labels = load_clips(_hq_data(cfg, e.reference_videos, e.reference_seed))
        device = next(student.parameters()).device
        gen = torch.Generator().manual_seed(e.seed)
        labels = torch.randint(0, 10, (e.samples,), generator=gen).to(device)
        noise = torch.randn(e.samples, *clips.shape[1:], generator=gen).to(device)
        hq_sharp = laplacian_energy(ref)

        videos: dict[str, Tensor] = {}
        rows: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            for k in e.steps:
                t0 = time.perf_counter()
                s = FewStepSampler.uniform(k, generator=torch.Generator().manual_seed(e.seed))
                out = s.sample(student, noise, labels)
                videos[f"student_{k}"] = out.x.cpu()
                rows[f"student_{k}"] = {"nfe": out.nfe, "seconds": time.perf_counter() - t0}
            if e.teacher_steps > 0:
                t0 = time.perf_counter()
                sampler = EulerSampler(e.teacher_steps)
                out = sampler.sample(self.guided(cfg, teacher), noise, labels)
                videos["teacher"] = out.x.cpu()
                rows["teacher"] = {"nfe": out.nfe, "seconds": time.perf_counter() - t0}
        n_lq = min(len(clips), e.samples)
        videos["low_quality_data"] = clips[:n_lq]  # what a perfect copy of the teacher scores
        rows["low_quality_data"] = {"nfe": None, "seconds": None}
        for name, v in videos.items():
            # real clips have no generated-for label: placeholder labels, accuracy dropped
            real = name == "low_quality_data"
            lab = torch.zeros(len(v), dtype=torch.long) if real else labels.cpu()
            q = evaluate_videos(v, lab, ref, clf, ref_labels)
            if real:
                q.pop("digit_accuracy")
            rows[name].update(q, sharpness_ratio=laplacian_energy(v) / hq_sharp)
        metrics: dict[str, Any] = {
            "method": self.name, "frames": data.frames, "size": data.size,
            "motion": cfg.mcm.motion, "adv_weight": cfg.mcm.adv_weight,
            "mix_ratio": cfg.mcm.mix_ratio, "gan_loss": cfg.mcm.gan_loss,
            "disc_backbone": cfg.mcm.disc_backbone,
            "guidance": cfg.guidance, "steps": list(e.steps), "samples": e.samples,
            "reference": f"{len(ref)} high-quality clips, seed {e.reference_seed}",
            "hq_laplacian_energy": hq_sharp, "samplers": rows,
            "classifier": {**dataclasses.asdict(ccfg), **cinfo},
        }  # fmt: skip
        for name, r in rows.items():
            for key, v in r.items():
                metrics[f"{name}_{key}"] = v
        fps = e.fps
        for name, v in videos.items():
            write_video(out_dir / f"samples_{name}.gif", tile_videos(v[:8]), fps)
        write_video(out_dir / "samples_high_quality_reference.gif", tile_videos(ref[:8]), fps)
        return metrics

    # --- CLI commands ----------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """``n`` videos from the student at ``steps`` steps (default: the fewest evaluated)
        into a GIF."""
        from fewstep.core.samplers import FewStepSampler
        from fewstep.video.io import write_video

        cfg, _, student = self.load(run_dir)
        k = steps or min(cfg.eval.steps)
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        labels = torch.randint(0, 10, (n,), generator=gen)
        d = cfg.teacher.data
        noise = torch.randn(n, d.frames, 3, d.size, d.size, generator=gen)
        with torch.no_grad():
            video = FewStepSampler.uniform(k, generator=gen).sample(student, noise, labels).x
        out = Path(out) if out else Path(run_dir) / f"samples_{n}.gif"
        return write_video(out, tile_videos(video), cfg.eval.fps)

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.video.teacher import load_clips

        cfg, teacher, student = self.load(run_dir)
        clips, _ = load_clips(cfg.teacher.data)
        m = self._evaluate(cfg, teacher, student, clips, Path(run_dir))
        return merge_metrics(run_dir, m)

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        table = []
        for name, r in m["samplers"].items():
            table.append({"sampler": name, "nfe": r["nfe"], "video_fd_to_hq": r["video_fd"],
                          "frame_fd_to_hq": r["frame_fd"], "warp_error": r["warp_error"],
                          "sharpness_ratio": r["sharpness_ratio"],
                          "digit_accuracy": r.get("digit_accuracy")})  # fmt: skip
        rep.add_table("Students (consistency multistep) vs teacher vs low-quality data", table)
        rep.add_text(
            "Reading the table",
            f"Motion representation {m['motion']!r}, adversarial weight {m['adv_weight']}, "
            f"mixing ratio {m['mix_ratio']}. FD to {m['reference']} on fewstep's own video "
            "classifier (video and per-frame features); sharpness_ratio = Laplacian energy of "
            "the frames / that of the high-quality reference (1 = as sharp; the low-quality "
            "training clips show what blur does). Warp error: the flow-free temporal "
            "consistency proxy of fewstep.video.evaluate (lower = smoother).",
        )
        gifs = sorted(run_dir.glob("samples_*.gif"))
        for gif in gifs:
            rep.add_image(f"Videos: {gif.stem.removeprefix('samples_')}", gif)
        return rep.write()


MCM = MCMRecipe()
