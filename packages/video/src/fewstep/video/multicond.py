"""A two-condition video model for VDOT's multi-condition student: digit class + motion
direction.

VDOT (Wang et al. 2025, arXiv 2512.06802) distils one student that generates under several
kinds of condition. At moving-digits scale the second condition is the motion direction of the
clip's first digit (``evaluate.direction_bin`` of its velocity: right, down, left, up), which
a video classifier trained on the same motion checks on generated videos. The fine-tuning
clips move slowly from the wall behind the motion, without a bounce
(``TwoConditionTeacherConfig.speed`` / ``start``), so the direction shows in every frame.

``VideoDiT`` takes one label per clip, so the condition pair is fed through its label input
without editing it: ``TwoConditionNet`` encodes (digit, direction) as one joint index and
replaces the DiT's label table by ``PairEmbedding``, which decodes the index and sums a digit
embedding (the class teacher's own table) and a direction embedding (zero-initialised, so the
two-condition model starts as the class teacher, and scaled by ``DIRECTION_GAIN`` so that it
can grow to the digit table's scale). Conditions are (B, 2) long tensors
``[digit, direction]``; (10, 4) is the null pair of classifier-free guidance.

The two-condition teacher is the cached class teacher fine-tuned on (clip, digit, direction)
with the flow-matching loss (core ``pretrain.train_denoiser``), both conditions dropped
together 10 % of the time, and cached by its config.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fewstep.core.models import ModuleDenoiser
from fewstep.video.dit import VideoDiT
from fewstep.video.evaluate import DIRECTION_BINS
from fewstep.video.teacher import NUM_CLASSES, VideoTeacherConfig

NULL_DIRECTION = DIRECTION_BINS  # direction index of the null condition
_SPAN = DIRECTION_BINS + 1  # directions per digit in the joint index (null included)


def null_pair(cond: Tensor) -> Tensor:
    """The CFG null condition shaped like ``cond`` (B, 2): (10, 4) in every row."""
    null = torch.tensor([NUM_CLASSES, NULL_DIRECTION], dtype=cond.dtype, device=cond.device)
    return null.expand_as(cond).clone()


def joint_index(cond: Tensor) -> Tensor:
    """(B, 2) [digit in 0..10, direction in 0..4] -> (B,) digit * 5 + direction; raises on
    a wrong shape or an index out of range."""
    if cond.ndim != 2 or cond.shape[1] != 2:
        raise ValueError(
            f"two-condition input must be (B, 2) [digit, direction], got {tuple(cond.shape)}"
        )
    c = cond.long()
    digit, direction = c[:, 0], c[:, 1]
    if bool((digit < 0).any() | (digit > NUM_CLASSES).any()) or bool(
        (direction < 0).any() | (direction > NULL_DIRECTION).any()
    ):
        raise ValueError(
            f"digits must be in 0..{NUM_CLASSES} ({NUM_CLASSES} = null) and directions in "
            f"0..{NULL_DIRECTION} ({NULL_DIRECTION} = null), got {c.tolist()}"
        )
    return digit * _SPAN + direction


# The direction table starts at zero (the two-condition model starts as the class teacher)
# but is summed with a digit table of unit-scale entries (nn.Embedding's N(0, 1) init). Adam
# moves a table entry by at most about lr per step, so at the fine-tuning lr 3e-4 a plain
# zero table stayed near zero: after 1,000 steps its rows had norm 0.14 against the digit
# rows' 9-10, and the teacher's motion did not depend on the direction at all (session 12).
# The gain multiplies the table's effective step (a learning-rate multiplier for it alone).
DIRECTION_GAIN = 16.0


class PairEmbedding(nn.Module):
    """Stands in for ``VideoDiT.label``: joint index -> digit embedding + ``DIRECTION_GAIN``
    x direction embedding (B,) -> (B, dim)."""

    def __init__(self, digit: nn.Embedding):
        super().__init__()
        self.digit = digit
        self.direction = nn.Embedding(_SPAN, digit.embedding_dim)
        nn.init.zeros_(self.direction.weight)  # start as the class-conditional model

    def forward(self, joint: Tensor) -> Tensor:
        return self.digit(joint // _SPAN) + DIRECTION_GAIN * self.direction(joint % _SPAN)


class TwoConditionNet(nn.Module):
    """``net(x (B, T, C, H, W), time (B,), cond (B, 2) [digit, direction] or None)``; None is
    the null pair. Wraps a class-conditional ``VideoDiT`` (taken over, not copied)."""

    def __init__(self, dit: VideoDiT):
        super().__init__()
        if dit.label is None or dit.cfg.num_classes != NUM_CLASSES:
            raise ValueError(f"the DiT must be class-conditional with {NUM_CLASSES} classes")
        dit.label = PairEmbedding(dit.label)
        self.dit = dit

    def forward(self, x: Tensor, time: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            cond = null_pair(torch.zeros(len(x), 2, dtype=torch.long, device=x.device))
        return self.dit(x, time, joint_index(cond))


def two_condition_model(teacher: ModuleDenoiser) -> ModuleDenoiser:
    """A trainable two-condition model initialised from a class teacher (a copy)."""
    net = TwoConditionNet(copy.deepcopy(teacher.net))
    return ModuleDenoiser(net, teacher.path, teacher.prediction).requires_grad_(True)


# --------------------------------------------------------------------------------- data


def load_two_condition_clips(cfg: TwoConditionTeacherConfig) -> tuple[Tensor, Tensor]:
    """(clips (N, T, 3, H, W) in [-1, 1], conditions (N, 2) [first digit's label, its
    direction bin]): the class teacher's clip recipe with the fine-tuning motion
    (``cfg.motion()``), as MP4 files read back by ``teacher.load_clips`` with their metadata."""
    from fewstep.video.evaluate import direction_bin
    from fewstep.video.teacher import load_clips

    clips, labels, metas = load_clips(cfg.base.data, with_meta=True, recipe=cfg.motion())
    directions = torch.tensor([direction_bin(m["digits"][0]["velocity"]) for m in metas])
    return clips, torch.stack([labels, directions], 1)


# ------------------------------------------------------------------------------ teacher


@dataclass
class TwoConditionTeacherConfig:
    base: VideoTeacherConfig = field(default_factory=VideoTeacherConfig)  # class teacher
    # Motion of the fine-tuning clips. The class teacher's (1-2.5 px per frame, uniform start)
    # bounces a 12-pixel digit in a 16-pixel frame every 2-4 frames, so the start direction
    # shows in a frame or two: teachers fine-tuned 1,000 or 4,000 steps on it sampled every
    # direction at chance (0.22-0.25, H200 sweep, session 12). 0.5-0.57 px from the wall
    # behind the motion crosses the 4-pixel room once, without a bounce
    speed: tuple[float, float] = (0.5, 0.57)  # pixels per frame
    start: str = "upstream"  # moving_digits start positions (upstream: no bounce)
    # 3,000 steps at 1e-3 (on the slow clips): direction accuracy of the teacher's samples
    # 1.00 (real clips 0.91), video FD 42.9; 1,000 at 3e-4 left it at 0.39, FD 119 (session 12)
    steps: int = 3000  # fine-tuning steps with the direction condition
    batch_size: int = 32  # fine-tuning batch
    lr: float = 1e-3  # AdamW learning rate
    cond_dropout: float = 0.1  # both conditions dropped together (CFG)
    seed: int = 0  # fine-tuning seed

    def motion(self):
        """The fine-tuning clips' moving-digits recipe: the class teacher's, with this motion."""
        return dataclasses.replace(self.base.data.recipe(), speed=self.speed, start=self.start)


def load_two_condition_teacher(
    cfg: TwoConditionTeacherConfig, progress: bool = True
) -> tuple[ModuleDenoiser, dict]:
    """(frozen two-condition teacher, info); fine-tuned from the class teacher and cached."""
    from fewstep.core.training import TensorData
    from fewstep.video.teacher import load_teacher, train_cached

    base, _ = load_teacher(cfg.base, progress=progress)
    spec = {**dataclasses.asdict(cfg), "model": "video-dit-2cond-v2"}  # v2: DIRECTION_GAIN
    return train_cached("video-teacher-2cond", spec, two_condition_model(base),
                        lambda: TensorData(*load_two_condition_clips(cfg)), cfg,
                        null_pair, progress)  # fmt: skip


__all__ = [
    "NULL_DIRECTION",
    "PairEmbedding",
    "TwoConditionNet",
    "TwoConditionTeacherConfig",
    "joint_index",
    "load_two_condition_clips",
    "load_two_condition_teacher",
    "null_pair",
    "two_condition_model",
]
