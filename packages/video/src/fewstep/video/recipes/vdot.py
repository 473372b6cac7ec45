"""``fewstep distill video-vdot``: a few-step multi-condition video student distilled with
VDOT (Wang et al., "VDOT: Efficient Unified Video Creation via Optimal Transport
Distillation", arXiv 2512.06802): DMD plus an entropic optimal-transport (Sinkhorn) distance
between the real and fake score distributions, core's ``objectives.vdot`` (its docstring has
the equations and says which parts are the paper's and which are our reading).

Conditions: digit class and motion direction (``multicond``: the DiT's label input carries
the pair through a joint index; (B, 2) ``[digit, direction]`` tensors). Stages: the cached
class teacher, fine-tuned into a cached two-condition teacher
(``multicond.load_two_condition_teacher``); the student is a copy of it trained with core's
VDOT objective through core's ``Trainer`` (real score: the two-condition teacher under CFG
on both conditions; fake score: its unguided copy). The paper's discriminator on real videos
is not part of this recipe (core's ``vdot`` leaves it out).

Evaluation (same conditions and noise for both): the K-step student and the 50-step teacher
under CFG: NFE, seconds, video / frame FD, digit accuracy, warp error (``evaluate``), and
direction accuracy (the classifier's direction head agrees with the requested direction;
chance is 1/4), which is what shows the second condition is obeyed. The run folder gets
``student.safetensors`` (+ ``student.json``), ``metrics.json``, ``side_by_side.gif`` (rows:
teacher, student), ``directions.gif`` (student: one digit, the four directions) and
``report.html``.
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
from fewstep.video.multicond import TwoConditionTeacherConfig
from fewstep.video.recipes.common import merge_metrics, resolve_device, tile_videos


def _train() -> TrainConfig:
    # Adam beta1 = 0 as DMD2 (VDOT trains with DMD2's two time-scale updates)
    return TrainConfig(steps=300, batch_size=8, lr=1e-4, betas=(0.0, 0.999), ema_decay=0.99,
                       log_every=20)  # fmt: skip


@dataclass
class VDOTEvalConfig:
    samples: int = 64  # videos per sampler (same conditions and noise for each)
    teacher_steps: int = 50  # the teacher's Euler steps (under CFG)
    seed: int = 0  # sampling noise and conditions
    fps: float = 8.0  # frame rate of the written GIFs
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # FD / accuracy net


@dataclass
class VDOTConfig:
    teacher: TwoConditionTeacherConfig = field(
        default_factory=TwoConditionTeacherConfig
    )  # two-condition teacher (class teacher + direction fine-tuning), cached
    objective: str = "vdot"  # core objective (VDOT: DMD + entropic OT)
    guidance: float = 2.0  # CFG scale (both conditions) of the real score and of the teacher
    train: TrainConfig = field(default_factory=_train)  # distillation loop
    eval: VDOTEvalConfig = field(default_factory=VDOTEvalConfig)  # evaluation
    threads: int = 1  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


def _guided(cfg: VDOTConfig, teacher):
    from fewstep.core.models import GuidedDenoiser
    from fewstep.video.multicond import null_pair

    return teacher if cfg.guidance == 1.0 else GuidedDenoiser(teacher, cfg.guidance, null_pair)


def direction_accuracy(classifier, videos: Tensor, directions: Tensor) -> float:
    """Fraction of videos (N, T, 3, H, W) whose top motion direction (the classifier's
    direction head) is the requested ``directions`` (N,)."""
    if directions.shape != (len(videos),):
        raise ValueError(f"directions must be ({len(videos)},), got {tuple(directions.shape)}")
    dev = next(classifier.parameters()).device
    with torch.no_grad():
        logits = torch.cat([classifier(videos[i : i + 64].to(dev).clamp(-1, 1))[1].cpu()
                            for i in range(0, len(videos), 64)])  # fmt: skip
    return (logits.argmax(1) == directions.cpu()).float().mean().item()


def random_conditions(n: int, gen: torch.Generator) -> Tensor:
    """(n, 2) uniformly drawn [digit, direction] pairs."""
    from fewstep.video.evaluate import DIRECTION_BINS

    digits = torch.randint(0, 10, (n,), generator=gen)
    return torch.stack([digits, torch.randint(0, DIRECTION_BINS, (n,), generator=gen)], 1)


class VDOTRecipe:
    name = "video-vdot"
    summary = "VDOT: DMD + optimal-transport distillation of a two-condition video student"
    config_cls = VDOTConfig
    supported_objectives = ("vdot",)

    def unsupported_reason(self, objective: str) -> str:
        return "the recipe distils with VDOT (DMD alone is --objective.ot_weight 0)"

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {"student_steps": 4}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    def distill(self, cfg: VDOTConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.models import trainable_copy
        from fewstep.core.objectives.vdot import VDOT as VDOTObjective
        from fewstep.core.training import TensorData, Trainer
        from fewstep.video.multicond import load_two_condition_clips, load_two_condition_teacher

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.train.batch_size < 2 and obj_cfg.ot_weight > 0:
            raise ValueError("VDOT's OT term compares samples of a batch: train.batch_size >= 2")
        out_dir, device = Path(out_dir), resolve_device(cfg.device)
        teacher, tinfo = load_two_condition_teacher(cfg.teacher, progress=cfg.train.progress)
        clips, cond = load_two_condition_clips(cfg.teacher)
        objective = VDOTObjective(_guided(cfg, teacher), obj_cfg)

        t0 = time.perf_counter()
        trainer = Trainer(objective, trainable_copy(teacher), TensorData(clips, cond), cfg.train,
                          out_dir / "train", device=device)  # fmt: skip
        hist = trainer.fit()
        train_seconds = time.perf_counter() - t0
        student = trainer.ema if trainer.ema is not None else trainer.roles["student"]
        student = student.eval().requires_grad_(False)
        self._save(out_dir, student, objective)

        metrics = self._evaluate(cfg, objective, teacher, student, clips, cond, out_dir)
        logs = {k: [r[k] for r in hist if k in r] for k in ("dm_loss", "ot_loss", "ot_cost")}
        metrics.update(teacher_finetune_seconds=tinfo.get("train_seconds"),
                       train_seconds=train_seconds)  # fmt: skip
        for k, v in logs.items():
            metrics[f"{k}_first"] = v[0] if v else None
            metrics[f"{k}_last"] = v[-1] if v else None
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, student, objective) -> None:
        from fewstep.core.rundir import save_student

        cfg = objective.config
        meta = {"student_steps": cfg.student_steps, "student_times": list(cfg.student_times),
                "conditions": ["digit", "direction"]}  # fmt: skip
        save_student(out_dir, {"": student}, meta)

    def load(self, run_dir: Path):
        """(config, objective, teacher, student), frozen."""
        from fewstep.core.config import from_dict
        from fewstep.core.models import frozen_copy
        from fewstep.core.objectives.vdot import VDOT as VDOTObjective
        from fewstep.core.objectives.vdot import VDOTConfig as ObjectiveConfig
        from fewstep.core.rundir import load_run_config, load_student
        from fewstep.video.multicond import load_two_condition_teacher

        cfg, resolved = load_run_config(run_dir, self.config_cls)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        obj_cfg = from_dict(ObjectiveConfig, resolved["objective_config"])
        teacher, _ = load_two_condition_teacher(cfg.teacher, progress=False)
        student = frozen_copy(teacher)  # the two-condition architecture
        student.load_state_dict(load_student(run_dir)[0])
        objective = VDOTObjective(_guided(cfg, teacher), obj_cfg)
        return cfg, objective, teacher, student.eval().requires_grad_(False)

    # --- evaluation ------------------------------------------------------------------------
    def _evaluate(self, cfg, objective, teacher, student, clips, clip_cond, out_dir) -> dict:
        from fewstep.core.samplers import EulerSampler
        from fewstep.video.evaluate import DIRECTION_BINS, evaluate_videos, load_classifier
        from fewstep.video.io import write_video

        e, data = cfg.eval, cfg.teacher.base.data
        # the classifier learns the clips' motion too: one trained on the class teacher's
        # bouncing clips read 0.15 of the slow upstream ones' directions (chance 0.25)
        ccfg = dataclasses.replace(e.classifier, frames=data.frames, size=data.size,
                                   speed=cfg.teacher.speed, start=cfg.teacher.start)  # fmt: skip
        clf, cinfo = load_classifier(ccfg)
        device = next(student.parameters()).device
        gen = torch.Generator().manual_seed(e.seed)
        cond = random_conditions(e.samples, gen).to(device)
        noise = torch.randn(e.samples, *clips.shape[1:], generator=gen).to(device)
        sampler = objective.student_sampler()
        sampler.generator = torch.Generator().manual_seed(e.seed + 1)  # re-noising draws
        with torch.no_grad():
            t0 = time.perf_counter()
            s_sample = sampler.sample(student, noise, cond)
            s_wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            t_sample = EulerSampler(e.teacher_steps).sample(_guided(cfg, teacher), noise, cond)
            t_wall = time.perf_counter() - t0
            # one digit, every direction, the same noise: does the motion follow?
            sweep = torch.tensor([[int(cond[0, 0]), d] for d in range(DIRECTION_BINS)])
            sweep_video = sampler.sample(
                student, noise[:1].expand(DIRECTION_BINS, *noise.shape[1:]), sweep.to(device)
            ).x

        ref_n = min(len(clips), max(e.samples, 256))
        ref, ref_cond = clips[:ref_n], clip_cond[:ref_n]
        metrics: dict[str, Any] = {
            "method": self.name, "conditions": ["digit", "direction"],
            "guidance": cfg.guidance, "student_steps": objective.config.student_steps,
            "student_nfe": s_sample.nfe, "teacher_nfe": t_sample.nfe,
            "student_seconds": s_wall, "teacher_seconds": t_wall,
            "student_seconds_per_video": s_wall / e.samples,
            "teacher_seconds_per_video": t_wall / e.samples,
            "speedup_vs_teacher": t_wall / max(s_wall, 1e-9),
            "reference_direction_accuracy": direction_accuracy(clf, ref, ref_cond[:, 1]),
            "classifier": {**dataclasses.asdict(ccfg), **cinfo},
            "reference_clips": ref_n,
        }  # fmt: skip
        for name, v in (("student", s_sample.x), ("teacher", t_sample.x)):
            v = v.cpu()
            q = evaluate_videos(v, cond[:, 0].cpu(), ref, clf, ref_cond[:, 0])
            metrics.update({f"{name}_{k}": val for k, val in q.items()})
            metrics[f"{name}_direction_accuracy"] = direction_accuracy(clf, v, cond[:, 1])
        rows = [tile_videos(v[:8]) for v in (t_sample.x, s_sample.x)]
        write_video(out_dir / "side_by_side.gif", torch.cat(rows, 2), e.fps)
        write_video(out_dir / "directions.gif", tile_videos(sweep_video), e.fps)
        return metrics

    # --- CLI commands ----------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """``n`` videos for random (digit, direction) pairs (``steps``: default trained)."""
        from fewstep.core.samplers import FewStepSampler
        from fewstep.video.io import write_video

        cfg, objective, _, student = self.load(run_dir)
        sampler = FewStepSampler.uniform(steps) if steps else objective.student_sampler()
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        cond = random_conditions(n, gen)
        d = cfg.teacher.base.data
        noise = torch.randn(n, d.frames, 3, d.size, d.size, generator=gen)
        with torch.no_grad():
            video = sampler.sample(student, noise, cond).x
        out = Path(out) if out else Path(run_dir) / f"samples_{n}.gif"
        return write_video(out, tile_videos(video), cfg.eval.fps)

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.video.multicond import load_two_condition_clips

        cfg, objective, teacher, student = self.load(run_dir)
        clips, cond = load_two_condition_clips(cfg.teacher)
        m = self._evaluate(cfg, objective, teacher, student, clips, cond, Path(run_dir))
        return merge_metrics(run_dir, m)

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        rows = []
        for who, label, nfe in (
            ("student", f"VDOT student (K={m['student_steps']})", m["student_nfe"]),
            ("teacher", f"teacher (Euler, CFG {m['guidance']})", m["teacher_nfe"]),
        ):  # fmt: skip
            rows.append({
                "sampler": label, "nfe": nfe, "seconds": m[f"{who}_seconds"],
                "video_fd": m[f"{who}_video_fd"], "frame_fd": m[f"{who}_frame_fd"],
                "digit_accuracy": m[f"{who}_digit_accuracy"],
                "direction_accuracy": m[f"{who}_direction_accuracy"],
                "warp_error": m[f"{who}_warp_error"],
            })  # fmt: skip
        rep.add_table("Two-condition student vs teacher (same conditions and noise)", rows)
        rep.add_text(
            "Conditions",
            "Each video is generated for a (digit, motion direction) pair. Direction accuracy: "
            "the classifier's direction head picks the requested direction (chance 0.25; "
            f"real clips {m['reference_direction_accuracy']:.3f}). Wall time "
            f"{m['speedup_vs_teacher']:.1f}x lower than the teacher's.",
        )
        for name, title in (("side_by_side.gif", "Rows: teacher, student"),
                            ("directions.gif", "Student: one digit, directions right, down, "
                             "left, up (same noise)")):  # fmt: skip
            if (run_dir / name).exists():
                rep.add_image(title, run_dir / name)
        return rep.write()


VDOT = VDOTRecipe()
