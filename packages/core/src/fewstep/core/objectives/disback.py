"""DisBack: distribution backtracking distillation.

Zhang, Yang, Li, Meng, Zhao, Yang, Yang, Yang, Sun, "Distribution Backtracking Builds A
Faster Convergence Trajectory for Diffusion Distillation" (arXiv:2408.15991, 2024; code
SYZhang0805/DisBack).

Score distillation starts with a large mismatch: the teacher's score is far from the initial
student's distribution. DisBack gives the student a path of intermediate targets instead.

Stage 1, degradation recording (sec. 3.2, alg. 1 lines 1-6): a copy s_phi of the teacher
is fine-tuned with the teacher's denoising loss on samples of the *initial* student (frozen
during this stage), so it degrades from the teacher's score towards the initial student's.
N intermediate states are recorded along the way: s'_0 = teacher, s'_1, ..., s'_N, and the
end of the run s'_{N+1} ~ the initial student's score.

Stage 2, distribution backtracking (sec. 3.3, alg. 1 lines 7-15): the fake score starts
at the end of the degradation path (it already models the initial student; the reference
code loads the degraded network into the fake score) and the student is distilled with
DMD's score-difference gradient (DMD eq. 7, normalised as in eq. 8; ``dmd2.dmd_loss``)
where the "real" score walks the path backwards, s'_N first, then s'_{N-1}, ..., s'_1,
each for a number of steps (``backtrack_steps``), and the teacher s'_0 for the rest of the
run. The fake score keeps training on the current student's samples (DMD2's two time-scale
rule, ``fake_updates_per_student``).

Both stages run in one trainer run, switched by the step: steps [0, record_steps) are stage
1 and the rest stage 2. The path is the frozen role ``path`` (N frozen copies of the
network, filled in ``after_update`` at the recording steps), so it is checkpointed with the
run and a resumed run continues on the same path. If the teacher is a classifier-free
guidance wrapper the path targets are guided the same way (the degradation itself trains
the unguided network, as the fake score in DMD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, GuidedDenoiser, frozen_copy, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    denoising_loss,
    student_x0,
    unguided,
)
from fewstep.core.objectives.dmd2 import dm_term


@dataclass
class DisBackConfig(ObjectiveConfig):
    record_steps: int = 400  # stage 1 length: degradation steps on initial-student samples
    num_checkpoints: int = 4  # N intermediate scores recorded on the degradation path
    backtrack_steps: tuple[int, ...] = (100,)  # steps per target s'_N..s'_1 (one value: all)
    fake_updates_per_student: int = 5  # stage 2 TTUR: fake-score updates per student update
    t_range: tuple[float, float] = (0.02, 0.98)  # DM-loss times as fractions of the path
    backward_simulation: bool = True  # multi-step: train on the student's own rollouts


class DisBack(Objective):
    name = "disback"
    config_cls = DisBackConfig
    roles = ("student", "fake_score")
    frozen_roles = ("path",)
    summary = "record a teacher-to-student degradation path, then distil back along it (Zhang 2024)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        n = cfg.num_checkpoints
        if n < 0:
            raise ValueError(f"num_checkpoints must be >= 0, got {n}")
        if cfg.record_steps < n + 1:
            raise ValueError(
                f"record_steps must be at least num_checkpoints + 1 = {n + 1} so that every "
                f"checkpoint is recorded at its own step, got {cfg.record_steps}"
            )
        if len(cfg.backtrack_steps) not in (1, max(n, 1)) or min(cfg.backtrack_steps) < 1:
            raise ValueError(
                "backtrack_steps must be one positive step count (used for every checkpoint) "
                f"or {n} of them (one per checkpoint, s'_N first), got {cfg.backtrack_steps}"
            )
        if cfg.fake_updates_per_student < 1:
            raise ValueError(
                f"fake_updates_per_student must be >= 1, got {cfg.fake_updates_per_student}"
            )
        lo, hi = cfg.t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {cfg.t_range}")

    # --- the path and its schedule (pure functions of the step) ----------------------------
    def record_step(self, k: int) -> int:
        """The step after which checkpoint s'_k (k = 1..N) is recorded: k / (N + 1) of the
        way through stage 1 (the end of stage 1 is the fake score's starting point)."""
        cfg = self.config
        return round(k * cfg.record_steps / (cfg.num_checkpoints + 1)) - 1

    def target_index(self, step: int) -> int:
        """Index k of the stage-2 target s'_k at ``step``: N, N-1, ..., 1, then 0 = teacher.
        Stage-1 steps have no target (-1)."""
        cfg = self.config
        s = step - cfg.record_steps
        if s < 0:
            return -1
        n = cfg.num_checkpoints
        steps = cfg.backtrack_steps * n if len(cfg.backtrack_steps) == 1 else cfg.backtrack_steps
        for j, length in enumerate(steps[:n]):
            if s < length:
                return n - j
            s -= length
        return 0

    def real_score(self, roles, k: int) -> Denoiser:
        """The stage-2 target s'_k (k = 0: the teacher), guided like the teacher."""
        if k == 0:
            return self.teacher
        net = roles["path"][k - 1]
        if isinstance(self.teacher, GuidedDenoiser):
            t = self.teacher
            return GuidedDenoiser(net, t.scale, t.null_cond, t.negative)
        return net

    # --- objective ---------------------------------------------------------------------------
    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        base = unguided(self.teacher)
        path = nn.ModuleList(frozen_copy(base) for _ in range(self.config.num_checkpoints))
        return {"student": student, "fake_score": trainable_copy(base), "path": path}

    def schedule(self, step: int) -> list[str]:
        cfg = self.config
        if step < cfg.record_steps:
            return ["fake_score"]  # stage 1: the student stays at its initialisation
        if (step - cfg.record_steps) % cfg.fake_updates_per_student == 0:
            return ["student", "fake_score"]
        return ["fake_score"]

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student, fake = roles["student"], roles["fake_score"]
        losses, logs = {}, {}
        with torch.set_grad_enabled("student" in update):
            x, _ = student_x0(student, self.student_sampler(), batch, cfg.backward_simulation)

        if "student" in update:
            k = self.target_index(step)
            if k < 0:
                raise RuntimeError(f"disback updates the student in stage 1 (step {step})")
            loss, dm_logs = dm_term(self.real_score(roles, k), fake, x, batch, cfg.t_range)
            logs.update(dm_logs)
            logs["target"] = float(k)
            losses["student"] = loss

        if "fake_score" in update:
            loss = denoising_loss(fake, x.detach(), batch.cond, batch)
            key = "degradation_loss" if step < cfg.record_steps else "fake_score_loss"
            logs[key] = loss.item()
            losses["fake_score"] = loss
        return losses, logs

    def after_update(self, roles, updated, step):
        """Record s'_k: copy the degrading score into the path at its recording step."""
        for k in range(1, self.config.num_checkpoints + 1):
            if step == self.record_step(k):
                roles["path"][k - 1].load_state_dict(roles["fake_score"].state_dict())
