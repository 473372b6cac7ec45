"""``fewstep distill video-livetalk``: LiveTalk's on-policy distillation of a multimodal-
conditioned video teacher into a streaming few-step student (Chern et al., "LiveTalk: Real-Time
Multimodal Interactive Video Diffusion via Improved On-Policy Distillation", 2025).

The Self Forcing recipe (``video-self-forcing``: ODE-pair initialisation, DMD on the
student's KV-cached rollouts, streaming inference) with LiveTalk's three conditions and its
changes to the recipe:

- conditions (``fewstep.video.control``): the class label (the text), a real first chunk
  written into the cache before streaming (the reference image; ``first_chunk_from_data``)
  and a per-frame 1-D control signal (the audio: the first digit's height in each frame);
  the teacher is the class teacher fine-tuned with the control (``load_control_teacher``),
  so the real score in DMD knows what the control asks for;
- "converged ODE initialisation": LiveTalk found Self Forcing unstable with multimodal
  conditions unless the ODE-regression stage is trained to convergence, so it runs 3x the
  Self Forcing recipe's init steps on 2x the pairs;
- an aggressive, short on-policy stage: a higher DMD learning rate for fewer steps, stopping
  before the quality drift it reports for long schedules;
- classifier-free guidance over the label only: the control is given to both branches.

Evaluation adds control adherence (``control_adherence``: the per-video correlation between
the control and the digit's measured height, and the gap between their frame-to-frame
changes) of the student and the teacher, each also with the controls shuffled across videos:
the gap between right and shuffled controls is how much the model follows the signal. The
evaluation conditions (label, control, first chunk) are real clips' (the last
``eval.samples`` clips of the training data: the conditions are real, the videos
generated). Only the student is given the first chunk (the teacher samples the whole clip),
and the student's first chunk is real, so adherence is measured on the frames after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewstep.core.training import TrainConfig
from fewstep.video.control import ControlTeacherConfig
from fewstep.video.recipes.self_forcing import (
    InitConfig,
    SelfForcingRecipe,
    SelfForcingRecipeConfig,
    _train,
)
from fewstep.video.self_forcing import SelfForcingConfig


def _init() -> InitConfig:  # converged ODE initialisation: 2x pairs, 3x steps
    return InitConfig(num_pairs=512, train=_train(steps=900, lr=3e-4))


def _dmd() -> SelfForcingConfig:
    return SelfForcingConfig(student_steps=4, fake_updates_per_student=5,
                             first_chunk_from_data=True)  # fmt: skip


@dataclass
class LiveTalkRecipeConfig(SelfForcingRecipeConfig):
    control_teacher: ControlTeacherConfig = field(
        default_factory=ControlTeacherConfig
    )  # fine-tuning of the class teacher with the control signal
    init: InitConfig = field(default_factory=_init)  # converged ODE-pair initialisation
    dmd: SelfForcingConfig = field(default_factory=_dmd)  # on-policy DMD, real first chunk
    train: TrainConfig = field(
        default_factory=lambda: _train(steps=300, lr=2e-4, betas=(0.0, 0.999), ema_decay=0.99)
    )  # aggressive short on-policy stage (TrainConfig)


class LiveTalkRecipe(SelfForcingRecipe):
    name = "video-livetalk"
    summary = "LiveTalk: multimodal (label, first chunk, 1-D control) streaming student"
    config_cls = LiveTalkRecipeConfig

    @staticmethod
    def real_score(cfg, teacher):
        from fewstep.core.models import GuidedDenoiser
        from fewstep.video.control import null_labels_keep_control

        if cfg.guidance == 1.0:
            return teacher
        return GuidedDenoiser(teacher, cfg.guidance, null_labels_keep_control)

    def load_teacher(self, cfg, progress: bool = True):
        from fewstep.video.control import load_control_teacher

        return load_control_teacher(cfg.teacher, cfg.control_teacher, progress=progress)

    def load_data(self, cfg) -> tuple[Tensor, Any, Tensor]:
        from fewstep.video.control import load_conditions

        clips, labels, control = load_conditions(cfg.teacher.data)
        return clips, {"labels": labels, "control": control}, labels

    def new_student(self, cfg, teacher):
        from fewstep.video.causal import causal_student

        return causal_student(teacher, cfg.chunk_frames, control=True)

    def eval_conditions(self, cfg, clips, cond, gen, device) -> tuple[Any, Tensor, Any]:
        n = cfg.eval.samples
        if n > len(clips):
            raise ValueError(f"eval.samples {n} exceeds the {len(clips)} clips")
        real = {k: v[-n:].to(device) for k, v in cond.items()}
        first = clips[-n:, : cfg.chunk_frames].to(device)
        return real, real["labels"], first

    def long_condition(self, cfg, cond: Any, n: int, n_chunks: int) -> Any:
        """The first n controls extended past the training length by mirroring (continuous
        at every join: a digit bouncing back along its path)."""
        c, frames = cond["control"][:n], n_chunks * cfg.chunk_frames
        reps = [c if i % 2 == 0 else c.flip(1) for i in range(-(-frames // c.shape[1]))]
        return {"labels": cond["labels"][:n], "control": torch.cat(reps, 1)[:, :frames]}

    def extra_metrics(self, cfg, real, student, videos: dict, cond, gen) -> dict:
        from fewstep.video.control import control_adherence

        control = cond["control"]
        perm = torch.randperm(len(control), generator=gen)
        if len(control) > 1:  # a derangement: no video keeps its own control
            perm = torch.roll(torch.arange(len(control)), 1)[perm]
        skip = cfg.chunk_frames  # the student's first chunk is real
        out = {}
        for who, v in videos.items():
            right = control_adherence(v[:, skip:], control[:, skip:])
            wrong = control_adherence(v[:, skip:], control[perm, skip:])
            out.update({f"{who}_{k}": val for k, val in right.items()})
            out.update({f"{who}_shuffled_{k}": val for k, val in wrong.items()})
        return out

    def extra_report(self, rep, m: dict) -> None:
        rows = [{"sampler": who, "control": ctl,
                 "correlation": m[f"{who}_{pre}control_correlation"],
                 "motion_gap": m[f"{who}_{pre}control_motion_gap"]}
                for who in ("student", "teacher")
                for ctl, pre in (("own", ""), ("shuffled", "shuffled_"))]  # fmt: skip
        rep.add_table("Control adherence (frames after the first chunk)", rows)


LIVETALK = LiveTalkRecipe()

__all__ = ["LIVETALK", "LiveTalkRecipe", "LiveTalkRecipeConfig"]
