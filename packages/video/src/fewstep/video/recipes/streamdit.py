"""``fewstep distill video-streamdit``: a streaming few-step video student from the
moving-digits teacher (StreamDiT, Kodaira et al. 2025).

Stages: the cached bidirectional teacher (``teacher.load_teacher``); a ``BufferDiT`` with its
weights trained by buffered flow matching on mixed partitions (``streamdit.
BufferedFlowMatching``, the StreamDiT model: a multi-step streaming teacher); a student
initialised from it and distilled chunk-wise (``streamdit.ChunkwiseDistillation``: the
StreamDiT teacher's s micro-steps per segment under CFG -> one student step), both through
core's ``Trainer``. Evaluation streams videos with the student (one call per chunk) and the
StreamDiT teacher (s calls per chunk), samples the base teacher (Euler, full clip), and
scores all three against the training clips with ``evaluate.evaluate_videos`` (video and
per-frame FD, digit accuracy, warp error), side by side on the same machine.

The run folder gets ``student.safetensors`` (+ ``student.json``), ``metrics.json``,
``side_by_side.gif`` (rows: base teacher, StreamDiT teacher, student; same labels) and
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

from fewstep.core.training import TrainConfig
from fewstep.video.evaluate import ClassifierConfig
from fewstep.video.recipes.common import merge_metrics, resolve_device, tile_videos
from fewstep.video.teacher import VideoTeacherConfig

STUDENT_FILE = "student.safetensors"


def _train(**kw) -> TrainConfig:
    base = dict(steps=400, batch_size=16, lr=2e-4, ema_decay=0.99, log_every=20)
    return TrainConfig(**{**base, **kw})


@dataclass
class BufferStageConfig:
    chunk_options: tuple[int, ...] = (2, 4, 8)  # chunk sizes (frames) of the mixed partitions
    warmup_prob: float = 0.2  # share of samples at buffer-filling levels
    train: TrainConfig = field(default_factory=_train)  # buffered flow-matching loop


@dataclass
class DistillStageConfig:
    teacher_micro_steps: int = 8  # s: StreamDiT teacher Euler steps per segment (student: 1)
    warmup_prob: float = 0.25  # share of samples on buffer-filling segments
    train: TrainConfig = field(default_factory=lambda: _train(lr=1e-4))  # distillation loop


@dataclass
class StreamEvalConfig:
    samples: int = 64  # videos per sampler (same labels and noise seed for each)
    teacher_steps: int = 50  # the base teacher's Euler steps
    seed: int = 0  # sampling noise and labels
    fps: float = 8.0  # frame rate of the written GIF
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # FD / accuracy net


@dataclass
class StreamDiTRecipeConfig:
    teacher: VideoTeacherConfig = field(default_factory=VideoTeacherConfig)  # cached teacher
    chunk_frames: int = 2  # c of the streamed partition: buffer / c chunks = student NFE/frame
    window: int = -1  # temporal attention window in latent frames (-1 = the whole buffer)
    guidance: float = 2.0  # CFG scale of the StreamDiT teacher in distillation and eval
    buffer: BufferStageConfig = field(default_factory=BufferStageConfig)  # StreamDiT training
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)  # distillation
    eval: StreamEvalConfig = field(default_factory=StreamEvalConfig)  # evaluation
    threads: int = 1  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


def _window(cfg: StreamDiTRecipeConfig) -> int | None:
    if cfg.window < -1:
        raise ValueError(f"window must be -1 (whole buffer) or >= 0, got {cfg.window}")
    return None if cfg.window == -1 else cfg.window


def _guided(cfg: StreamDiTRecipeConfig, model):
    from fewstep.core.models import GuidedDenoiser
    from fewstep.video.teacher import null_labels

    return model if cfg.guidance == 1.0 else GuidedDenoiser(model, cfg.guidance, null_labels)


class StreamDiTRecipe:
    name = "video-streamdit"
    summary = "StreamDiT: moving-buffer streaming video student, one call per chunk"
    config_cls = StreamDiTRecipeConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    def distill(self, cfg: StreamDiTRecipeConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.training import TensorData, Trainer
        from fewstep.video.streamdit import (
            BufferedFlowMatching,
            BufferFMConfig,
            ChunkDistillConfig,
            ChunkwiseDistillation,
            buffer_model,
            check_partition,
        )
        from fewstep.video.teacher import NUM_CLASSES, load_clips, load_teacher

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        window = _window(cfg)
        pt = cfg.teacher.patch[0]
        for c in (cfg.chunk_frames, *cfg.buffer.chunk_options):  # fail before any training
            check_partition(cfg.teacher.data.frames, c, pt)
        out_dir, device = Path(out_dir), resolve_device(cfg.device)
        teacher, tinfo = load_teacher(cfg.teacher, progress=cfg.buffer.train.progress)
        clips, labels = load_clips(cfg.teacher.data)
        data = TensorData(clips, labels)

        t0 = time.perf_counter()
        fm = BufferedFlowMatching(teacher, BufferFMConfig(
            chunk_options=tuple(cfg.buffer.chunk_options), warmup_prob=cfg.buffer.warmup_prob,
            cond_dropout=cfg.teacher.cond_dropout, null_label=NUM_CLASSES,
        ))  # fmt: skip
        stage1 = Trainer(fm, buffer_model(teacher, window), data, cfg.buffer.train,
                         out_dir / "buffer", device=device)  # fmt: skip
        hist1 = stage1.fit()
        buffer_seconds = time.perf_counter() - t0
        stream_teacher = stage1.ema if stage1.ema is not None else stage1.roles["student"]
        stream_teacher = stream_teacher.eval().requires_grad_(False)
        self._save(out_dir, stream_teacher, cfg, "stream_teacher.safetensors")

        t0 = time.perf_counter()
        dcfg = ChunkDistillConfig(
            chunk_frames=cfg.chunk_frames, teacher_micro_steps=cfg.distill.teacher_micro_steps,
            warmup_prob=cfg.distill.warmup_prob,
        )  # fmt: skip
        student = buffer_model(stream_teacher, window)
        stage2 = Trainer(ChunkwiseDistillation(_guided(cfg, stream_teacher), dcfg), student,
                         data, cfg.distill.train, out_dir / "distill", device=device)  # fmt: skip
        hist2 = stage2.fit()
        distill_seconds = time.perf_counter() - t0
        student = stage2.ema if stage2.ema is not None else stage2.roles["student"]
        self._save(out_dir, student, cfg, STUDENT_FILE)

        metrics = self._evaluate(cfg, teacher, stream_teacher, student.eval(), clips, labels,
                                 out_dir)  # fmt: skip
        fm_loss = [r["buffer_fm_loss"] for r in hist1 if "buffer_fm_loss" in r]
        d_loss = [r["distill_loss"] for r in hist2 if "distill_loss" in r]
        metrics.update(
            teacher_train_seconds=tinfo.get("train_seconds"), buffer_seconds=buffer_seconds,
            distill_seconds=distill_seconds,
            buffer_loss_first=fm_loss[0] if fm_loss else None,
            buffer_loss_last=fm_loss[-1] if fm_loss else None,
            distill_loss_first=d_loss[0] if d_loss else None,
            distill_loss_last=d_loss[-1] if d_loss else None,
        )  # fmt: skip
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, model, cfg, name: str) -> None:
        from safetensors.torch import save

        from fewstep.core.io import atomic_write_bytes, atomic_write_json

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(out_dir / name, save(state))
        meta = {"chunk_frames": cfg.chunk_frames, "window": cfg.window,
                "buffer_frames": cfg.teacher.data.frames}  # fmt: skip
        atomic_write_json(out_dir / "student.json", meta)

    def load(self, run_dir: Path):
        """(config, base teacher, StreamDiT teacher, student), frozen."""
        from safetensors.torch import load_file

        from fewstep.core.rundir import load_run_config
        from fewstep.video.streamdit import buffer_model
        from fewstep.video.teacher import load_teacher

        run_dir = Path(run_dir)
        cfg, _ = load_run_config(run_dir, self.config_cls)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        teacher, _ = load_teacher(cfg.teacher, progress=False)
        models = []
        for name in ("stream_teacher.safetensors", STUDENT_FILE):
            m = buffer_model(teacher, _window(cfg))
            m.load_state_dict(load_file(str(run_dir / name)))
            models.append(m.eval().requires_grad_(False))
        return cfg, teacher, models[0], models[1]

    # --- evaluation ------------------------------------------------------------------------
    @staticmethod
    def _stream(model, cfg, labels, steps, gen):
        from fewstep.video.streamdit import BufferStats, stream_buffer

        stats = BufferStats()
        n_chunks = cfg.teacher.data.frames // cfg.chunk_frames
        t0 = time.perf_counter()
        chunks = list(stream_buffer(model, cfg.chunk_frames, n_chunks, steps, labels,
                                    generator=gen, stats=stats))  # fmt: skip
        return torch.cat(chunks, 1), time.perf_counter() - t0, stats

    def _evaluate(self, cfg, teacher, stream_teacher, student, clips, clip_labels, out_dir):
        from fewstep.core.samplers import EulerSampler
        from fewstep.video.evaluate import evaluate_videos, load_classifier
        from fewstep.video.io import write_video

        e, frames = cfg.eval, cfg.teacher.data.frames
        ccfg = dataclasses.replace(e.classifier, frames=frames, size=cfg.teacher.data.size)
        clf, cinfo = load_classifier(ccfg)
        device = next(student.parameters()).device
        gen = torch.Generator().manual_seed(e.seed)
        labels = torch.randint(0, 10, (e.samples,), generator=gen).to(device)
        guided_teacher, guided_stream = _guided(cfg, teacher), _guided(cfg, stream_teacher)
        s = cfg.distill.teacher_micro_steps
        n_buf = frames // cfg.chunk_frames

        with torch.no_grad():
            v_student, s_wall, s_stats = self._stream(student, cfg, labels, 1, gen)
            _, _, s_one = self._stream(student, cfg, labels[:1], 1, gen)
            v_stream, st_wall, st_stats = self._stream(guided_stream, cfg, labels, s, gen)
            _, _, st_one = self._stream(guided_stream, cfg, labels[:1], s, gen)
            noise = torch.randn(e.samples, *clips.shape[1:], generator=gen).to(device)
            t0 = time.perf_counter()
            sample = EulerSampler(e.teacher_steps).sample(guided_teacher, noise, labels)
            t_wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            EulerSampler(e.teacher_steps).sample(guided_teacher, noise[:1], labels[:1])
            t_one = time.perf_counter() - t0
        v_teacher = sample.x

        ref_n = min(len(clips), max(e.samples, 256))
        ref, ref_labels = clips[:ref_n], clip_labels[:ref_n]
        quality = {}
        for name, v in (("student", v_student), ("stream_teacher", v_stream),
                        ("teacher", v_teacher)):  # fmt: skip
            q = evaluate_videos(v.cpu(), labels.cpu(), ref, clf, ref_labels)
            quality[name] = q
        n_frames = e.samples * frames
        metrics: dict[str, Any] = {
            "method": self.name, "frames": frames, "chunk_frames": cfg.chunk_frames,
            "chunks_in_buffer": n_buf, "teacher_micro_steps": s, "guidance": cfg.guidance,
            # network passes each frame goes through, buffer fill excluded (CFG counts 2)
            "student_nfe_per_frame": n_buf * s_stats.chunk_nfe[0],
            "student_nfe_per_chunk": s_stats.chunk_nfe[0],
            "student_calls_per_chunk": s_stats.calls_per_chunk,
            "student_warmup_nfe": s_stats.warmup_nfe,
            "stream_teacher_nfe_per_frame": n_buf * st_stats.chunk_nfe[0],
            "stream_teacher_nfe_per_chunk": st_stats.chunk_nfe[0],
            "teacher_nfe_per_frame": sample.nfe,
            "student_seconds": s_wall, "stream_teacher_seconds": st_wall,
            "teacher_seconds": t_wall,
            "student_frames_per_second": n_frames / s_wall,
            "stream_teacher_frames_per_second": n_frames / st_wall,
            "teacher_frames_per_second": n_frames / t_wall,
            "student_first_chunk_latency": s_one.chunk_seconds[0],
            "stream_teacher_first_chunk_latency": st_one.chunk_seconds[0],
            "teacher_first_frame_latency": t_one,  # the teacher emits every frame at the end
            "wall_speedup_vs_teacher": t_wall / max(s_wall, 1e-9),
            "wall_speedup_vs_stream_teacher": st_wall / max(s_wall, 1e-9),
            "latency_speedup_vs_teacher": t_one / max(s_one.chunk_seconds[0], 1e-9),
            "classifier": {**dataclasses.asdict(ccfg), **cinfo},
            "reference_clips": ref_n,
        }  # fmt: skip
        for name, q in quality.items():
            for k, v in q.items():
                metrics[f"{name}_{k}"] = v
        rows = [tile_videos(v[:8]) for v in (v_teacher, v_stream, v_student)]
        write_video(out_dir / "side_by_side.gif", torch.cat(rows, 2), e.fps)
        return metrics

    # --- CLI commands ----------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """Stream ``n`` videos with the student (``steps`` calls per chunk; default 1)."""
        from fewstep.video.io import write_video

        cfg, _, _, student = self.load(run_dir)
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        labels = torch.randint(0, 10, (n,), generator=gen)
        with torch.no_grad():
            video, _, _ = self._stream(student, cfg, labels, steps or 1, gen)
        out = Path(out) if out else Path(run_dir) / f"samples_{n}.gif"
        return write_video(out, tile_videos(video), cfg.eval.fps)

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.video.teacher import load_clips

        cfg, teacher, stream_teacher, student = self.load(run_dir)
        clips, labels = load_clips(cfg.teacher.data)
        m = self._evaluate(cfg, teacher, stream_teacher, student, clips, labels, Path(run_dir))
        return merge_metrics(run_dir, m)

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        names = {
            "student": f"student (1 call per chunk, {m['chunks_in_buffer']} chunks in buffer)",
            "stream_teacher": f"StreamDiT teacher ({m['teacher_micro_steps']} calls per chunk)",
            "teacher": "base teacher (Euler, whole clip)",
        }
        rows = []
        for key, label in names.items():
            rows.append({
                "sampler": label, "nfe_per_frame": m[f"{key}_nfe_per_frame"],
                "frames_per_second": m[f"{key}_frames_per_second"],
                "video_fd": m[f"{key}_video_fd"], "frame_fd": m[f"{key}_frame_fd"],
                "digit_accuracy": m[f"{key}_digit_accuracy"],
                "warp_error": m[f"{key}_warp_error"],
            })  # fmt: skip
        rep.add_table("Streaming student vs teachers (same machine, same run)", rows)
        rep.add_text(
            "Reading the table",
            f"First chunk after {m['student_first_chunk_latency']:.4f} s (student) vs "
            f"{m['teacher_first_frame_latency']:.4f} s for the base teacher's first frame. "
            f"Real clips: warp error {m['student_reference_warp_error']:.4f}, digit accuracy "
            f"{m.get('student_reference_digit_accuracy', float('nan')):.3f} (two-digit clips "
            "cap it below 1). NFE per frame counts the calls each frame goes through after "
            "the buffer has filled (CFG counts 2). FD uses fewstep's own video classifier.",
        )
        if (run_dir / "side_by_side.gif").exists():
            rep.add_image("Rows: base teacher, StreamDiT teacher, student (same labels)",
                          run_dir / "side_by_side.gif")  # fmt: skip
        return rep.write()


STREAMDIT = StreamDiTRecipe()
