"""``fewstep distill video-blade``: a few-step video student with adaptive block-sparse
attention, distilled jointly with trajectory distribution matching (Video-BLADE, Gu et al.
2025, arXiv 2508.10774; see ``fewstep.video.blade``).

Stages: the cached class-conditional teacher (``teacher.load_teacher``); a copy of it with
ASA in every attention layer (``blade.sparse_student``); sparsity-aware TDM
(``blade.SparseTDM``: core's TDM with the student's sparse attention on in every student
forward; real score = the teacher under CFG, fake score dense) through core's ``Trainer``.

Evaluation, side by side on one machine with the same labels and noise: the sparse student
(K TDM steps), the same weights with dense attention (what the sparsity costs in quality and
saves in time), and the 50-step dense teacher under CFG. Reported: attention density per
layer (kept fraction of attention tiles, measured over the student's sampling), attention
FLOPs saved, end-to-end FLOPs and wall-time ratios against the teacher, NFE, seconds per
video, and FD / digit accuracy / warp error (``evaluate.evaluate_videos``).

Wall time: attention goes through core's dispatch, which runs the Triton block-sparse kernel
on CUDA (compute falls with density) and dense-compute SDPA with the block mask on CPU, so
on CPU the sparse student's per-call time is not lower than the dense one's and its speed-up
comes from NFE; the FLOPs columns say what the sparsity saves where the kernel skips tiles.

The run folder gets ``student.safetensors`` (+ ``student.json``), ``metrics.json``,
``side_by_side.gif`` (rows: teacher, dense-attention student, sparse student),
``density.png`` and ``report.html``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.core.training import TrainConfig
from fewstep.video.blade import ASAConfig
from fewstep.video.evaluate import ClassifierConfig
from fewstep.video.recipes.common import merge_metrics, resolve_device, tile_videos
from fewstep.video.teacher import VideoTeacherConfig


def _train() -> TrainConfig:
    # Adam beta1 = 0 as DMD2 / TDM; the fake score at 5x the student's rate (BLADE's
    # learning_rate_fake 5e-4 vs learning_rate 1e-4). 1,000 steps: at 300 the student trailed
    # the teacher (FD 69.4 vs 63.1, digit accuracy 0.42 vs 0.67); at 1,000 FD 62.9, accuracy
    # 0.55 (H200 sweep, session 12, benchmarks/results/gpu_video_sweep)
    return TrainConfig(steps=1000, batch_size=8, lr=1e-4, role_lr={"fake_score": 5e-4},
                       betas=(0.0, 0.999), ema_decay=0.99, log_every=20)  # fmt: skip


@dataclass
class BladeEvalConfig:
    samples: int = 64  # videos per sampler (same labels and noise for each)
    teacher_steps: int = 50  # the dense teacher's Euler steps (under CFG)
    seed: int = 0  # sampling noise and labels
    fps: float = 8.0  # frame rate of the written GIF
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # FD / accuracy net


@dataclass
class BLADEConfig:
    teacher: VideoTeacherConfig = field(default_factory=VideoTeacherConfig)  # cached teacher
    objective: str = "tdm"  # core objective the sparse student trains with (BLADE: TDM)
    asa: ASAConfig = field(default_factory=ASAConfig)  # the student's adaptive sparse attention
    guidance: float = 2.0  # CFG scale of the real score in training and of the teacher in eval
    train: TrainConfig = field(default_factory=_train)  # sparsity-aware TDM training loop
    eval: BladeEvalConfig = field(default_factory=BladeEvalConfig)  # evaluation
    threads: int = 1  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


def _guided(cfg: BLADEConfig, teacher):
    from fewstep.core.models import GuidedDenoiser
    from fewstep.video.teacher import null_labels

    return teacher if cfg.guidance == 1.0 else GuidedDenoiser(teacher, cfg.guidance, null_labels)


def per_layer(kept: list[float], depth: int) -> list[float]:
    """Mean kept fraction per layer from the mask calls of whole forwards (call i is layer
    i mod depth)."""
    if not kept or len(kept) % depth:
        raise ValueError(f"{len(kept)} mask calls are not whole forwards of {depth} layers")
    return [sum(kept[i::depth]) / len(kept[i::depth]) for i in range(depth)]


class BLADERecipe:
    name = "video-blade"
    summary = "Video-BLADE: adaptive block-sparse attention student trained jointly with TDM"
    config_cls = BLADEConfig
    supported_objectives = ("tdm",)

    def unsupported_reason(self, objective: str) -> str:
        return "BLADE's sparsity-aware distillation is built on TDM (blade.SparseTDM)"

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {"student_steps": 4}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    def _objective(self, cfg: BLADEConfig, obj_cfg, teacher):
        from fewstep.video.blade import SparseTDM

        return SparseTDM(_guided(cfg, teacher), cfg.asa, obj_cfg)

    def distill(self, cfg: BLADEConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.training import TensorData, Trainer
        from fewstep.video.blade import check_asa, sparse_student, sparsify
        from fewstep.video.teacher import load_clips, load_teacher

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        dit_cfg = cfg.teacher.dit()
        if dit_cfg.attention != "full":
            raise ValueError("BLADE needs a full-attention teacher (teacher.attention=full)")
        check_asa(cfg.asa, dit_cfg.grid())  # fail before any training
        out_dir, device = Path(out_dir), resolve_device(cfg.device)
        teacher, tinfo = load_teacher(cfg.teacher, progress=cfg.train.progress)
        clips, labels = load_clips(cfg.teacher.data)
        objective = self._objective(cfg, obj_cfg, teacher)
        student, _ = sparse_student(teacher, cfg.asa)

        t0 = time.perf_counter()
        trainer = Trainer(objective, student, TensorData(clips, labels), cfg.train,
                          out_dir / "train", device=device)  # fmt: skip
        hist = trainer.fit()
        train_seconds = time.perf_counter() - t0
        student = trainer.ema if trainer.ema is not None else trainer.roles["student"]
        student = student.eval().requires_grad_(False)
        sparsify(student, cfg.asa)  # a fresh mask at the final sparsity (the EMA's is a copy)
        self._save(out_dir, student, cfg, objective)

        metrics = self._evaluate(cfg, objective, teacher, student, clips, labels, out_dir)
        dm = [r["dm_loss"] for r in hist if "dm_loss" in r]
        dens = [r["attn_density"] for r in hist if "dm_loss" in r and "attn_density" in r]
        metrics.update(
            teacher_train_seconds=tinfo.get("train_seconds"), train_seconds=train_seconds,
            dm_loss_first=dm[0] if dm else None, dm_loss_last=dm[-1] if dm else None,
            # the density the student's attention ran at in its training updates
            train_attn_density_mean=sum(dens) / len(dens) if dens else None,
            train_attn_density_last=dens[-1] if dens else None,
        )  # fmt: skip
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, student, cfg: BLADEConfig, objective) -> None:
        from fewstep.core.rundir import save_student

        meta = {"student_times": objective.fractions(), "asa": dataclasses.asdict(cfg.asa)}
        save_student(out_dir, {"": student}, meta)

    def load(self, run_dir: Path):
        """(config, objective, teacher, sparse student), frozen."""
        from fewstep.core.config import from_dict
        from fewstep.core.objectives import get_objective
        from fewstep.core.rundir import load_run_config, load_student
        from fewstep.video.blade import sparse_student
        from fewstep.video.teacher import load_teacher

        cfg, resolved = load_run_config(run_dir, self.config_cls)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        obj_cfg = from_dict(get_objective(cfg.objective).config_cls, resolved["objective_config"])
        teacher, _ = load_teacher(cfg.teacher, progress=False)
        student, _ = sparse_student(teacher, cfg.asa)
        student.load_state_dict(load_student(run_dir)[0])
        objective = self._objective(cfg, obj_cfg, teacher)
        return cfg, objective, teacher, student.eval().requires_grad_(False)

    # --- evaluation ------------------------------------------------------------------------
    def _evaluate(self, cfg, objective, teacher, student, clips, clip_labels, out_dir) -> dict:
        from fewstep.core.report import save_line_plot
        from fewstep.core.samplers import EulerSampler
        from fewstep.video.blade import dit_flops, student_mask
        from fewstep.video.evaluate import evaluate_videos, load_classifier
        from fewstep.video.io import write_video

        e, dit_cfg = cfg.eval, cfg.teacher.dit()
        ccfg = dataclasses.replace(e.classifier, frames=dit_cfg.frames, size=dit_cfg.size)
        clf, cinfo = load_classifier(ccfg)
        device = next(student.parameters()).device
        gen = torch.Generator().manual_seed(e.seed)
        labels = torch.randint(0, 10, (e.samples,), generator=gen).to(device)
        noise = torch.randn(e.samples, *clips.shape[1:], generator=gen).to(device)
        dense = copy.deepcopy(student)
        dense.net.use_sparse_attention(0)
        mask = student_mask(student)
        sampler = objective.student_sampler()
        guided = _guided(cfg, teacher)

        def timed(fn):
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0

        with torch.no_grad():
            stats = mask.reset()
            s_sample, s_wall = timed(lambda: sampler.sample(student, noise, labels))
            d_sample, d_wall = timed(lambda: sampler.sample(dense, noise, labels))
            t_sample, t_wall = timed(
                lambda: EulerSampler(e.teacher_steps).sample(guided, noise, labels)
            )
        densities = per_layer(stats.kept, dit_cfg.depth)
        sparse_f, dense_f = dit_flops(dit_cfg, densities), dit_flops(dit_cfg)
        s_nfe, t_nfe = s_sample.nfe, t_sample.nfe

        ref_n = min(len(clips), max(e.samples, 256))
        ref, ref_labels = clips[:ref_n], clip_labels[:ref_n]
        metrics: dict[str, Any] = {
            "method": self.name, "frames": dit_cfg.frames, "size": dit_cfg.size,
            "tokens": math.prod(dit_cfg.grid()),
            "block_size": cfg.asa.block_size, "tile": list(cfg.asa.tile),
            "guidance": cfg.guidance, "student_steps": len(objective.fractions()),
            "student_nfe": s_nfe, "teacher_nfe": t_nfe,
            "attn_density_per_layer": densities,
            "attn_density": sum(densities) / len(densities),
            "attn_flops_saved": 1.0 - sparse_f["attention"] / dense_f["attention"],
            "student_flops_per_call": sparse_f["total"], "dense_flops_per_call": dense_f["total"],
            "flops_ratio_vs_teacher": t_nfe * dense_f["total"] / (s_nfe * sparse_f["total"]),
            "student_seconds": s_wall, "dense_student_seconds": d_wall, "teacher_seconds": t_wall,
            "student_seconds_per_video": s_wall / e.samples,
            "teacher_seconds_per_video": t_wall / e.samples,
            "speedup_vs_teacher": t_wall / max(s_wall, 1e-9),
            "speedup_vs_dense_student": d_wall / max(s_wall, 1e-9),
            "classifier": {**dataclasses.asdict(ccfg), **cinfo},
            "reference_clips": ref_n,
        }  # fmt: skip
        for name, v in (("student", s_sample.x), ("dense_student", d_sample.x),
                        ("teacher", t_sample.x)):  # fmt: skip
            q = evaluate_videos(v.cpu(), labels.cpu(), ref, clf, ref_labels)
            metrics.update({f"{name}_{k}": val for k, val in q.items()})
        rows = [tile_videos(v[:8]) for v in (t_sample.x, d_sample.x, s_sample.x)]
        write_video(out_dir / "side_by_side.gif", torch.cat(rows, 2), e.fps)
        save_line_plot(
            out_dir / "density.png", {"kept fraction": list(enumerate(densities))},
            title="attention density per layer", xlabel="layer", ylabel="kept tiles",
        )  # fmt: skip
        return metrics

    # --- CLI commands ----------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """``n`` videos from the sparse student (``steps`` uniform steps; default trained)."""
        from fewstep.core.samplers import EulerSampler
        from fewstep.video.io import write_video

        cfg, objective, teacher, student = self.load(run_dir)
        sampler = objective.student_sampler()
        if steps is not None:
            path = teacher.path
            sampler = EulerSampler(times=[float(path.fraction_to_t(1 - i / steps))
                                          for i in range(steps)])  # fmt: skip
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        labels = torch.randint(0, 10, (n,), generator=gen)
        noise = torch.randn(n, cfg.teacher.data.frames, 3, cfg.teacher.data.size,
                            cfg.teacher.data.size, generator=gen)  # fmt: skip
        with torch.no_grad():
            video = sampler.sample(student, noise, labels).x
        out = Path(out) if out else Path(run_dir) / f"samples_{n}.gif"
        return write_video(out, tile_videos(video), cfg.eval.fps)

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.video.teacher import load_clips

        cfg, objective, teacher, student = self.load(run_dir)
        clips, labels = load_clips(cfg.teacher.data)
        m = self._evaluate(cfg, objective, teacher, student, clips, labels, Path(run_dir))
        return merge_metrics(run_dir, m)

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        rows = []
        for who, label, nfe, secs in (
            ("student", f"sparse student (K={m['student_steps']}, ASA)", m["student_nfe"],
             m["student_seconds"]),
            ("dense_student", "same weights, dense attention", m["student_nfe"],
             m["dense_student_seconds"]),
            ("teacher", f"dense teacher (Euler, CFG {m['guidance']})", m["teacher_nfe"],
             m["teacher_seconds"]),
        ):  # fmt: skip
            rows.append({
                "sampler": label, "nfe": nfe, "seconds": secs,
                "video_fd": m[f"{who}_video_fd"], "frame_fd": m[f"{who}_frame_fd"],
                "digit_accuracy": m[f"{who}_digit_accuracy"],
                "warp_error": m[f"{who}_warp_error"],
            })  # fmt: skip
        rep.add_table("Sparse student vs dense teacher (same machine, same labels and noise)", rows)
        rep.add_text(
            "Sparsity and speed",
            f"Attention density {m['attn_density']:.3f} (kept tiles, mean over layers; per "
            f"layer {', '.join(f'{d:.3f}' for d in m['attn_density_per_layer'])}); attention "
            f"FLOPs saved {100 * m['attn_flops_saved']:.1f} %; end-to-end FLOPs "
            f"{m['flops_ratio_vs_teacher']:.1f}x fewer than the teacher; wall time "
            f"{m['speedup_vs_teacher']:.1f}x lower than the teacher and "
            f"{m['speedup_vs_dense_student']:.2f}x that of the dense-attention student "
            "(on CPU attention runs dense-compute SDPA with the mask, so sparsity saves "
            "FLOPs only where the Triton kernel runs).",
        )
        if (run_dir / "density.png").exists():
            rep.add_image("Attention density per layer", run_dir / "density.png")
        if (run_dir / "side_by_side.gif").exists():
            rep.add_image("Rows: teacher, dense-attention student, sparse student",
                          run_dir / "side_by_side.gif")  # fmt: skip
        return rep.write()


BLADE = BLADERecipe()
