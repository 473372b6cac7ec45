"""``fewstep distill video-accvideo``: an m-step video student distilled on a synthetic
dataset of the teacher's own denoising trajectories (AccVideo, Zhang et al. 2025, arXiv
2503.19462; see ``fewstep.video.accvideo``).

Stages: the cached class-conditional teacher (``teacher.load_teacher``); SynVid, its N-step
Euler trajectories under CFG from fresh noise, cached by teacher weights + sampler + count +
seed (``accvideo.load_synvid``; only the m + 1 key points are loaded); the student, a copy
of the teacher, trained with the trajectory-based few-step guidance (eq. 6) and, unless
``accvideo.adv_weight`` is 0, the adversarial term on SynVid's key-time marginals with the
frozen teacher as feature extractor and timestep-aware heads (eqs. 7-8), through core's
``Trainer``.

Evaluation, side by side with the same labels and noise: the teacher with its full solver
(N Euler steps, CFG), the teacher on the m key times (what plain step-skipping gives), and
the student (EMA weights) on the m key times and on fewer uniform key times
(``eval.extra_steps``). Reported: NFE, seconds per video and wall-time ratio against the
teacher, video FD / frame FD / digit accuracy / warp error (``evaluate.evaluate_videos``, FD
to held-in real clips), and the mean squared distance of each sampler's videos to the
teacher's from the same noise (how closely the noise-to-video mapping was learnt).

The run folder gets ``student.safetensors`` (+ ``student.json``), ``metrics.json``, a GIF
per sampler, ``side_by_side.gif`` (rows: teacher, teacher at m steps, student at m steps)
and ``report.html``.
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
from fewstep.video.accvideo import AccVideoLossConfig
from fewstep.video.evaluate import ClassifierConfig
from fewstep.video.recipes.common import merge_metrics, resolve_device, tile_videos
from fewstep.video.teacher import VideoTeacherConfig


def _train() -> TrainConfig:
    # Adam beta1 = 0.5 for the GAN pair; the paper: AdamW, one rate (5e-6 on HunyuanVideo)
    return TrainConfig(steps=500, batch_size=16, lr=1e-4, betas=(0.5, 0.999), ema_decay=0.99,
                       log_every=20)  # fmt: skip


@dataclass
class SynVidConfig:
    videos: int = 512  # synthetic trajectories (the paper: 110K)
    steps: int = 50  # the teacher's Euler steps N; each trajectory stores N + 1 points
    guidance: float = 2.0  # CFG scale the teacher generates with (1 = none)
    seed: int = 0  # noise and label draws
    batch: int = 64  # trajectories generated at once (does not change the result)


@dataclass
class AccVideoEvalConfig:
    samples: int = 256  # videos per sampler (same labels and noise for each)
    extra_steps: tuple[int, ...] = (3,)  # also sample the student at these uniform key counts
    seed: int = 0  # sampling noise and labels
    fps: float = 8.0  # frame rate of the written GIFs
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # FD / accuracy net


@dataclass
class AccVideoConfig:
    teacher: VideoTeacherConfig = field(default_factory=VideoTeacherConfig)  # cached teacher
    synvid: SynVidConfig = field(default_factory=SynVidConfig)  # the synthetic trajectories
    keys: int = 5  # student steps m (the paper: 5 of 50)
    key_indices: tuple[int, ...] = ()  # explicit key steps 0 < ... < N; () = every N / m
    accvideo: AccVideoLossConfig = field(default_factory=AccVideoLossConfig)  # losses
    train: TrainConfig = field(default_factory=_train)  # distillation loop
    eval: AccVideoEvalConfig = field(default_factory=AccVideoEvalConfig)  # evaluation
    threads: int = 1  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


def _guided(cfg: AccVideoConfig, teacher):
    from fewstep.core.models import GuidedDenoiser
    from fewstep.video.teacher import null_labels

    g = cfg.synvid.guidance
    return teacher if g == 1.0 else GuidedDenoiser(teacher, g, null_labels)


def _keys(cfg: AccVideoConfig) -> list[int]:
    from fewstep.video.accvideo import key_indices

    return key_indices(cfg.synvid.steps, cfg.keys, cfg.key_indices)


class AccVideoRecipe:
    name = "video-accvideo"
    summary = "AccVideo: m-step student from teacher trajectories (guidance + key-time GAN)"
    config_cls = AccVideoConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    @staticmethod
    def check(cfg: AccVideoConfig) -> None:
        """Fail on a bad config before any teacher or data is built."""
        _keys(cfg)
        cfg.accvideo.check()
        if cfg.synvid.videos < 1:
            raise ValueError(f"synvid.videos must be >= 1, got {cfg.synvid.videos}")
        bad = [k for k in cfg.eval.extra_steps if not 1 <= k <= cfg.synvid.steps]
        if bad:
            raise ValueError(f"eval.extra_steps must be in [1, {cfg.synvid.steps}], got {bad}")

    def distill(self, cfg: AccVideoConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.models import trainable_copy
        from fewstep.core.training import TensorData, Trainer
        from fewstep.video.accvideo import AccVideo, load_synvid
        from fewstep.video.teacher import load_teacher

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.check(cfg)
        out_dir, device = Path(out_dir), resolve_device(cfg.device)
        teacher, tinfo = load_teacher(cfg.teacher, progress=cfg.train.progress)
        keys = _keys(cfg)
        s = cfg.synvid
        teacher.to(device)
        traj, times, labels, sinfo = load_synvid(
            teacher, s.videos, s.steps, s.guidance, s.seed, s.batch, indices=keys,
            progress=cfg.train.progress,
        )  # fmt: skip
        key_times = [float(times[k]) for k in keys]
        objective = AccVideo(teacher, key_times, cfg.accvideo)
        t0 = time.perf_counter()
        trainer = Trainer(objective, trainable_copy(teacher), TensorData(traj, labels),
                          cfg.train, out_dir / "train", device=device)  # fmt: skip
        hist = trainer.fit()
        train_seconds = time.perf_counter() - t0
        student = trainer.ema if trainer.ema is not None else trainer.roles["student"]
        student = student.eval().requires_grad_(False)
        self._save(out_dir, student, keys, key_times)

        metrics = self._evaluate(cfg, teacher, student, out_dir)

        def series(key):
            return [r[key] for r in hist if key in r]

        guide, disc = series("guide_loss"), series("disc_loss")
        metrics.update(
            teacher_train_seconds=tinfo.get("train_seconds"), train_seconds=train_seconds,
            synvid_videos=s.videos, synvid_cached=sinfo["cached"],
            synvid_seconds=sinfo["synth_seconds"],
            guide_loss_first=guide[0] if guide else None,
            guide_loss_last=guide[-1] if guide else None,
            disc_loss_last=disc[-1] if disc else None,
            disc_real_acc_last=series("disc_real_acc")[-1] if disc else None,
            disc_fake_acc_last=series("disc_fake_acc")[-1] if disc else None,
            train_log=[{k: r[k] for k in ("step", "guide_loss", "disc_loss") if k in r}
                       for r in hist if "guide_loss" in r],
        )  # fmt: skip
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, student, keys: list[int], key_times: list[float]) -> None:
        from fewstep.core.rundir import save_student

        save_student(out_dir, {"": student}, {"key_indices": keys, "key_times": key_times})

    def load(self, run_dir: Path):
        """(config, frozen teacher, frozen student)."""
        from fewstep.core.rundir import load_run_config, load_student
        from fewstep.video.teacher import build_teacher, load_teacher

        cfg, _ = load_run_config(run_dir, self.config_cls)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        teacher, _ = load_teacher(cfg.teacher, progress=False)
        student = build_teacher(cfg.teacher)
        student.load_state_dict(load_student(run_dir)[0])
        return cfg, teacher, student.eval().requires_grad_(False)

    # --- evaluation ------------------------------------------------------------------------
    @staticmethod
    def key_times(cfg: AccVideoConfig, path, m: int | None = None) -> list[float]:
        """Native key times of the m-step sampler (default m = ``cfg.keys`` with the run's
        key indices; another m: every N / m teacher steps)."""
        from fewstep.video.accvideo import key_indices, teacher_grid

        times = teacher_grid(path, cfg.synvid.steps)
        keys = _keys(cfg) if m is None else key_indices(cfg.synvid.steps, m)
        return [float(times[k]) for k in keys]

    def _evaluate(self, cfg: AccVideoConfig, teacher, student, out_dir: Path) -> dict:
        from fewstep.core.samplers import EulerSampler
        from fewstep.video.accvideo import key_sampler
        from fewstep.video.evaluate import evaluate_videos, load_classifier
        from fewstep.video.io import write_video
        from fewstep.video.teacher import load_clips

        e, data = cfg.eval, cfg.teacher.data
        ccfg = dataclasses.replace(e.classifier, frames=data.frames, size=data.size)
        clf, cinfo = load_classifier(ccfg)
        clips, clip_labels = load_clips(data)
        ref_n = min(len(clips), max(e.samples, 256))
        ref, ref_labels = clips[:ref_n], clip_labels[:ref_n]
        device = next(student.parameters()).device
        teacher = teacher.to(device)
        guided = _guided(cfg, teacher)
        gen = torch.Generator().manual_seed(e.seed)
        labels = torch.randint(0, 10, (e.samples,), generator=gen).to(device)
        noise = torch.randn(e.samples, *clips.shape[1:], generator=gen).to(device)
        m, path = cfg.keys, teacher.path
        runs = [
            ("teacher", guided, EulerSampler(cfg.synvid.steps)),
            (f"teacher_{m}", guided, key_sampler(self.key_times(cfg, path))),
            (f"student_{m}", student, key_sampler(self.key_times(cfg, path))),
        ]
        for k in e.extra_steps:
            if k != m:
                runs.append((f"student_{k}", student, key_sampler(self.key_times(cfg, path, k))))
        videos: dict[str, Tensor] = {}
        rows: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            for name, model, sampler in runs:
                t0 = time.perf_counter()
                out = sampler.sample(model, noise, labels)
                secs = time.perf_counter() - t0
                videos[name] = out.x.cpu()
                rows[name] = {"nfe": out.nfe, "seconds": secs, "s_per_video": secs / e.samples}
        t_secs = rows["teacher"]["seconds"]
        for name, v in videos.items():
            q = evaluate_videos(v, labels.cpu(), ref, clf, ref_labels)
            speedup = t_secs / max(rows[name]["seconds"], 1e-9)
            mse = (v - videos["teacher"]).pow(2).mean().item()
            rows[name].update(q, speedup_vs_teacher=speedup, mse_to_teacher=mse)
        metrics: dict[str, Any] = {
            "method": self.name, "frames": data.frames, "size": data.size,
            "keys": m, "key_indices": _keys(cfg), "key_times": self.key_times(cfg, path),
            "teacher_steps": cfg.synvid.steps, "guidance": cfg.synvid.guidance,
            "adv_weight": cfg.accvideo.adv_weight, "guide_form": cfg.accvideo.guide_form,
            "fake_from": cfg.accvideo.fake_from, "samples": e.samples,
            "reference_clips": ref_n, "samplers": rows,
            "classifier": {**dataclasses.asdict(ccfg), **cinfo},
        }  # fmt: skip
        for name, r in rows.items():
            for key, v in r.items():
                metrics[f"{name}_{key}"] = v
        for name, v in videos.items():
            write_video(out_dir / f"samples_{name}.gif", tile_videos(v[:8]), e.fps)
        side = [tile_videos(videos[n][:8]) for n in ("teacher", f"teacher_{m}", f"student_{m}")]
        write_video(out_dir / "side_by_side.gif", torch.cat(side, 2), e.fps)
        return metrics

    # --- CLI commands ----------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """``n`` videos from the student at ``steps`` key steps (default: the trained m)."""
        from fewstep.video.accvideo import key_sampler
        from fewstep.video.io import write_video

        cfg, teacher, student = self.load(run_dir)
        times = self.key_times(cfg, teacher.path, None if steps in (None, cfg.keys) else steps)
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        labels = torch.randint(0, 10, (n,), generator=gen)
        d = cfg.teacher.data
        noise = torch.randn(n, d.frames, 3, d.size, d.size, generator=gen)
        with torch.no_grad():
            video = key_sampler(times).sample(student, noise, labels).x
        out = Path(out) if out else Path(run_dir) / f"samples_{n}.gif"
        return write_video(out, tile_videos(video), cfg.eval.fps)

    def evaluate(self, run_dir: Path) -> dict:
        cfg, teacher, student = self.load(run_dir)
        m = self._evaluate(cfg, teacher, student, Path(run_dir))
        return merge_metrics(run_dir, m)

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        table = []
        for name, r in m["samplers"].items():
            table.append({"sampler": name, "nfe": r["nfe"], "s_per_video": r["s_per_video"],
                          "speedup_vs_teacher": r["speedup_vs_teacher"],
                          "video_fd": r["video_fd"], "frame_fd": r["frame_fd"],
                          "digit_accuracy": r["digit_accuracy"], "warp_error": r["warp_error"],
                          "mse_to_teacher": r["mse_to_teacher"]})  # fmt: skip
        rep.add_table("Teacher vs AccVideo student (same machine, labels and noise)", table)
        rep.add_text(
            "Reading the table",
            f"teacher: {m['teacher_steps']} Euler steps under CFG {m['guidance']} (2 network "
            f"calls per step); teacher_{m['keys']}: the same teacher on the {m['keys']} key "
            f"times {[round(t, 3) for t in m['key_times']]}; student_k: the distilled student "
            "(one call per step, the CFG of its synthetic trajectories baked in) on k key "
            f"times. Adversarial weight {m['adv_weight']} (0 = guidance only), guidance loss "
            f"in {m['guide_form']} form, fakes from {m['fake_from']}. FD to "
            f"{m['reference_clips']} real training clips on fewstep's video classifier; "
            "mse_to_teacher: distance to the teacher's video from the same noise.",
        )
        if (run_dir / "side_by_side.gif").exists():
            rep.add_image(f"Rows: teacher, teacher at {m['keys']} steps, student at "
                          f"{m['keys']} steps", run_dir / "side_by_side.gif")  # fmt: skip
        for gif in sorted(run_dir.glob("samples_*.gif")):
            rep.add_image(f"Videos: {gif.stem.removeprefix('samples_')}", gif)
        return rep.write()


ACCVIDEO = AccVideoRecipe()
