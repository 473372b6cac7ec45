"""Compression next to step distillation: the base that quantized distillation, Dense2MoE
and KD-MI share.

``CompressionObjective`` compresses the student in ``build_roles`` (``compress``) and then
trains it either against the teacher's prediction at random (x_t, t) (``signal="teacher"``,
``teacher_match_loss``, optionally plus the plain denoising loss on real data) or with any
registered step-distillation objective (``"dmd2"``, ``"consistency"``, ...) run unchanged on
the compressed student, so it becomes smaller and few-step at once.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.objectives import get_objective
from fewstep.core.objectives.base import Logs, Losses, Objective, ObjectiveConfig, Reward
from fewstep.core.objectives.common import denoising_loss, noised, sample_times
from fewstep.core.paths import PREDICTIONS
from fewstep.core.samplers import SAMPLERS, Sampler


@dataclass
class CompressionConfig(ObjectiveConfig):
    """Options of every objective that compresses the student (quantisation, MoE, KD)."""

    signal: str = "teacher"  # "teacher" (match its prediction) or a step-distillation objective
    signal_config: dict[str, Any] = field(default_factory=dict)  # that objective's config fields
    match_kind: str = "native"  # prediction space of the matching loss ("native" = teacher's)
    match_weight: float = 1.0  # signal "teacher": weight of the matching loss
    t_range: tuple[float, float] = (0.0, 1.0)  # matching times, as fractions of the path
    data_weight: float = 0.0  # weight of the plain denoising loss on real data (hard labels)
    sampler: Literal["euler", "heun"] = "euler"  # signal "teacher": the teacher's ODE solver
    sampler_steps: int = 50  # signal "teacher": its steps (student_steps/times: signal only)


def teacher_match_loss(
    student: Denoiser,
    teacher: Denoiser,
    batch: Batch,
    t_range: tuple[float, float] = (0.0, 1.0),
    kind: str = "native",
) -> Tensor:
    """Prediction-level distillation at random (x_t, t): mean || s(x_t, t) - T(x_t, t) ||^2,
    x_t = a(t) x + s(t) eps from real data x, t uniform over ``t_range`` (fractions), both
    predictions in ``kind`` ("native" = the teacher's own parameterization)."""
    if batch.x is None:
        raise ValueError("teacher matching needs real samples x in the batch (x_t is noised x)")
    kind = teacher.prediction if kind == "native" else kind
    path = teacher.path
    t = sample_times(path, batch, t_range)
    x_t, _ = noised(path, batch.x, t, batch)
    with torch.no_grad():
        target = teacher.predict(x_t, t, batch.cond, kind=kind)
    return F.mse_loss(student.predict(x_t, t, batch.cond, kind=kind), target)


class CompressionObjective(Objective):
    """Compress the student in ``build_roles`` (``compress``), then train it either against
    the teacher's prediction (``signal="teacher"``) or with a registered step-distillation
    objective run unchanged on the compressed student. Subclasses add their own roles
    (``extra_roles``, built by ``build_extra``) and loss terms (``aux_losses``)."""

    config_cls = CompressionConfig
    extra_roles: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        teacher: Denoiser,
        config: ObjectiveConfig | None = None,
        reward: Reward | None = None,
    ):
        self.inner: Objective | None = None
        super().__init__(teacher, config, reward)
        cfg = self.config
        lo, hi = cfg.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1, got {cfg.t_range}")
        if cfg.sampler not in ("euler", "heun"):
            raise ValueError(f"sampler must be 'euler' or 'heun', got {cfg.sampler!r}")
        if cfg.sampler_steps < 1:
            raise ValueError(f"sampler_steps must be >= 1, got {cfg.sampler_steps}")
        if cfg.match_kind != "native" and cfg.match_kind not in PREDICTIONS:
            raise ValueError(
                f"match_kind must be 'native' or one of {PREDICTIONS}, got {cfg.match_kind!r}"
            )
        if cfg.data_weight < 0 or cfg.match_weight < 0:
            raise ValueError("data_weight and match_weight must be >= 0")
        if cfg.signal != "teacher":
            if cfg.signal == self.name:
                raise ValueError(f"{self.name} cannot use itself as its distillation signal")
            try:
                cls = get_objective(cfg.signal)
            except KeyError as err:
                raise ValueError(
                    f"signal must be 'teacher' or a registered objective: {err.args[0]}"
                ) from None
            fields = {
                "student_steps": cfg.student_steps,
                "student_times": cfg.student_times,
                **cfg.signal_config,
            }
            try:
                inner_cfg = cls.config_cls(**fields)
            except TypeError as err:
                raise ValueError(f"bad signal_config for {cfg.signal!r}: {err}") from None
            self.inner = cls(teacher, inner_cfg, reward=reward)
            clash = set(self.extra_roles) & set(self.inner.roles)
            if clash:
                raise ValueError(f"{self.name} and {cfg.signal} both define roles {sorted(clash)}")
        elif cfg.signal_config:
            raise ValueError("signal_config is only used with a step-distillation signal")

    # --- roles -----------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:  # type: ignore[override]
        inner = () if self.inner is None else tuple(r for r in self.inner.roles if r != "student")
        return ("student", *self.extra_roles, *inner)

    @property
    def frozen_roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.inner is None else tuple(self.inner.frozen_roles)

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        inner = self.inner is not None and self.inner.needs_data
        return self.inner is None or inner or self.config.data_weight > 0

    @property
    def needs_reward(self) -> bool:  # type: ignore[override]
        inner = getattr(self, "inner", None)  # the base constructor asks before inner exists
        return inner is not None and inner.needs_reward

    @abstractmethod
    def compress(self, student: Denoiser, example: Batch) -> Denoiser:
        """The compressed student (modified in place or rebuilt)."""

    def build_extra(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        """Modules of ``extra_roles``."""
        return {}

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        student = self.compress(student, example)
        roles: dict[str, nn.Module] = {"student": student}
        roles.update(self.build_extra(student, example))
        if self.inner is not None:
            roles.update(self.inner.build_roles(student, example))
        return roles

    # --- training --------------------------------------------------------------------------
    def schedule(self, step: int) -> list[str]:
        update = ["student"] if self.inner is None else self.inner.schedule(step)
        if "student" in update:
            update = [*update, *self.extra_roles]
        return update

    def begin_step(self, roles: dict[str, nn.Module]) -> None:  # noqa: B027 - optional hook
        """Called before the step's losses (e.g. to reset statistics collected in forwards)."""

    def aux_losses(
        self, roles: dict[str, nn.Module], batch: Batch, update: list[str]
    ) -> tuple[Losses, Logs]:
        """Extra loss terms per role, added when the student is updated."""
        return {}, {}

    def losses(self, roles, batch, update, step):
        cfg = self.config
        self.begin_step(roles)
        if self.inner is None:
            loss = teacher_match_loss(
                roles["student"], self.teacher, batch, cfg.t_range, cfg.match_kind
            )
            losses, logs = {"student": cfg.match_weight * loss}, {"match_loss": loss.item()}
        else:
            losses, logs = self.inner.losses(roles, batch, update, step)
            losses, logs = dict(losses), dict(logs)
        if "student" in update:
            if cfg.data_weight > 0:
                if batch.x is None:
                    raise ValueError("data_weight > 0 needs real samples x in the batch")
                d = denoising_loss(roles["student"], batch.x, batch.cond, batch)
                logs["data_loss"] = d.item()
                losses["student"] = losses["student"] + cfg.data_weight * d
            aux, aux_logs = self.aux_losses(roles, batch, update)
            logs.update(aux_logs)
            for r, v in aux.items():
                losses[r] = losses[r] + v if r in losses else v
        return losses, logs

    def after_update(self, roles, updated, step):
        if self.inner is not None:
            self.inner.after_update(roles, updated, step)

    # --- sampling --------------------------------------------------------------------------
    def student_sampler(self) -> Sampler:
        if self.inner is not None:
            return self.inner.student_sampler()
        return SAMPLERS[self.config.sampler](self.config.sampler_steps)

    def student_denoiser(self, roles):
        if self.inner is not None:
            return self.inner.student_denoiser(roles)
        return roles["student"]
