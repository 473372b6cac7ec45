"""LiveTalk's multimodal conditions on moving digits: a per-frame 1-D control signal standing
for audio, a teacher that follows it, and a measure of how well a video follows it.

LiveTalk (Chern et al., "LiveTalk: Real-Time Multimodal Interactive Video Diffusion via
Improved On-Policy Distillation", 2025) distils a bidirectional avatar model conditioned on
text, a reference image and audio into a Self Forcing student. Here the class label stands for
the text, a real first chunk for the reference image (``SelfForcingConfig.first_chunk_from_
data``), and the control signal for the audio: the vertical position of the clip's first digit
in each frame, in [-1, 1] (top to bottom), a time series the video has to follow frame by
frame, as lips follow speech.

The control teacher is the bidirectional video teacher with a zero-initialised control input
(``CausalVideoDiT(control=True)`` with one chunk spanning the clip, so attention is full),
fine-tuned on (clip, label, control) by core's ``train_denoiser``; it starts as the class-only
teacher and learns to use the signal. Adherence is measured on pixels, with no network: the
vertical centroid of the digit ink (pixels brighter than any background can be) per frame,
correlated with the control signal per video.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.video.causal import CausalDenoiser, causal_student
from fewstep.video.moving_digits import _BG_MAX
from fewstep.video.teacher import (
    VideoTeacherConfig,
    load_clips,
    load_teacher,
    null_labels,
    train_cached,
)

# ink: a channel above the background ceiling (digits have HSV value 1), with a margin for
# compression and blending at the sprite's soft edges
INK_THRESHOLD = _BG_MAX + 0.15


def control_from_meta(video: dict, size: int) -> list[float]:
    """Per-frame control of one clip from its moving-digits metadata: the first digit's
    top-left y mapped from [0, size - digit_size] to [-1, 1]."""
    d = video["digit_size"]
    span = max(size - d, 1)
    return [2.0 * y / span - 1.0 for _, y in video["digits"][0]["positions"]]


def ink_height(videos: Tensor) -> Tensor:
    """(B, T, 3, H, W) in [-1, 1] -> (B, T): the ink-weighted mean row of each frame, mapped
    from [0, H - 1] to [-1, 1] (0 where a frame has no ink). Ink weight = how far the
    brightest channel rises above ``INK_THRESHOLD``."""
    if videos.ndim != 5:
        raise ValueError(f"expected videos (B, T, 3, H, W), got {tuple(videos.shape)}")
    bright = ((videos.float() + 1) / 2).amax(2)  # (B, T, H, W) in [0, 1]
    w = (bright - INK_THRESHOLD).clamp_min(0).sum(-1)  # (B, T, H) ink per row
    rows = torch.linspace(-1.0, 1.0, w.shape[-1], device=w.device)
    total = w.sum(-1)
    return torch.where(total > 0, (w * rows).sum(-1) / total.clamp_min(1e-8), 0.0)


def control_adherence(videos: Tensor, control: Tensor) -> dict[str, float]:
    """How well videos follow their control (B, T): the mean over videos of the Pearson
    correlation between the control and the measured ink height (videos whose control or
    height is constant count 0), and the mean absolute gap between their frame-to-frame
    changes (same units as the control)."""
    h = ink_height(videos).cpu().double()
    c = control.cpu().double()
    if h.shape != c.shape:
        raise ValueError(f"control {tuple(c.shape)} does not match videos {tuple(h.shape)}")
    hc, cc = h - h.mean(1, keepdim=True), c - c.mean(1, keepdim=True)
    denom = (hc.norm(dim=1) * cc.norm(dim=1)).clamp_min(1e-12)
    corr = torch.where(denom > 1e-9, (hc * cc).sum(1) / denom, 0.0)
    motion_gap = (h.diff(dim=1) - c.diff(dim=1)).abs().mean()
    return {"control_correlation": float(corr.mean()), "control_motion_gap": float(motion_gap)}


def null_labels_keep_control(cond: Any) -> Any:
    """The unconditional input for classifier-free guidance over the label only: the control
    signal stays (LiveTalk keeps the audio in both branches)."""
    if isinstance(cond, dict):
        return {**cond, "labels": null_labels(cond["labels"])}
    return null_labels(cond)


def load_conditions(data) -> tuple[Tensor, Tensor, Tensor]:
    """(clips, labels, control (N, T)) of the teacher's moving-digits data config."""
    clips, labels, meta = load_clips(data, with_meta=True)
    control = torch.tensor([control_from_meta(v, data.size) for v in meta], dtype=torch.float32)
    return clips, labels, control


@dataclass
class ControlTeacherConfig:
    steps: int = 1500  # fine-tuning steps from the class-only teacher
    batch_size: int = 32  # clips per step
    lr: float = 5e-4  # AdamW learning rate (the zero-initialised control layer starts silent)
    cond_dropout: float = 0.1  # label dropout (CFG over the label; the control is kept)
    seed: int = 0  # batch order and dropout draws


def load_control_teacher(
    teacher_cfg: VideoTeacherConfig, cfg: ControlTeacherConfig, progress: bool = True
) -> tuple[CausalDenoiser, dict]:
    """(frozen control teacher, info); fine-tuned from the cached class-only teacher on first
    use and cached by both configs. One chunk spans the clip: full attention, bidirectional."""
    from fewstep.core.training import TensorData

    base, _ = load_teacher(teacher_cfg, progress=progress)
    model = causal_student(base, teacher_cfg.data.frames, control=True)
    spec = {"teacher": dataclasses.asdict(teacher_cfg), "control": dataclasses.asdict(cfg),
            "model": "video-control-teacher-v1"}  # fmt: skip

    def data() -> TensorData:
        clips, labels, control = load_conditions(teacher_cfg.data)
        return TensorData(clips, {"labels": labels, "control": control})

    return train_cached("video-control-teacher", spec, model, data, cfg,
                        null_labels_keep_control, progress)  # fmt: skip


__all__ = [
    "ControlTeacherConfig",
    "control_adherence",
    "control_from_meta",
    "ink_height",
    "load_conditions",
    "load_control_teacher",
    "null_labels_keep_control",
]
