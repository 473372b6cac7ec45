"""The objective interface.

An objective is one distillation method. It declares its roles (the modules it trains or
keeps, e.g. ``student`` and ``fake_score``), which of them to update at each step, and
returns per step a loss per updated role plus a dict of logged scalars. It never sees a
device, an optimizer, a process group or a logger: the trainer owns those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.samplers import FewStepSampler, Sampler

Losses = dict[str, Tensor]
Logs = dict[str, float]
# reward(x0, cond) -> (B,) scores, higher is better, differentiable in x0 (preference and
# reward-regularised objectives; recipes supply one, e.g. a classifier's log-probability)
Reward = Callable[[Tensor, Any], Tensor]


@dataclass
class ObjectiveConfig:
    """Options every objective understands."""

    student_steps: int = 1  # number of student steps (NFE) at sampling time
    student_times: tuple[float, ...] = ()  # explicit step times as path fractions (1 = noise)


class Objective(ABC):
    """Subclasses set ``name``, ``config_cls``, ``roles`` and implement ``build_roles`` and
    ``losses``. ``frozen_roles`` are modules kept in checkpoints but never optimised (EMA
    targets)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    roles: ClassVar[tuple[str, ...]] = ("student",)
    frozen_roles: ClassVar[tuple[str, ...]] = ()
    needs_data: ClassVar[bool] = False  # whether batches must carry real samples x
    needs_reward: ClassVar[bool] = False  # whether a reward function must be given
    summary: ClassVar[str] = ""

    def __init__(
        self,
        teacher: Denoiser | None,
        config: ObjectiveConfig | None = None,
        reward: Reward | None = None,
    ):
        self.teacher = teacher
        self.reward = reward
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(
                f"{self.name} expects a {self.config_cls.__name__}, "
                f"got {type(self.config).__name__}"
            )
        if self.needs_reward and reward is None:  # after config: it may depend on it
            raise ValueError(
                f"objective {self.name!r} needs a reward function reward(x0, cond) -> (B,) "
                "scores (higher is better); pass reward=..."
            )

    @property
    def path(self):
        return self.teacher.path

    @abstractmethod
    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        """All roles (trainable and frozen), ``student`` included, initialised here.
        ``example`` is a real batch, for sizing heads from the networks' features."""

    def lr_scales(self, role: str, module: nn.Module) -> dict[str, float]:
        """Learning-rate multipliers for submodules of a role, by qualified name (e.g. a
        freshly initialised head beside a pretrained network); {} = one rate for the role."""
        return {}

    def schedule(self, step: int) -> list[str]:
        """Roles to update at ``step`` (the update schedule between roles)."""
        return list(self.roles)

    @abstractmethod
    def losses(
        self, roles: dict[str, nn.Module], batch: Batch, update: list[str], step: int
    ) -> tuple[Losses, Logs]:
        """One loss per role in ``update``; logs are floats."""

    def after_update(  # noqa: B027 - optional hook
        self, roles: dict[str, nn.Module], updated: list[str], step: int
    ) -> None:
        """Hook after the optimizers stepped (e.g. EMA targets)."""
        return None

    def student_sampler(self) -> Sampler:
        cfg = self.config
        if cfg.student_times:
            return FewStepSampler(cfg.student_times)
        return FewStepSampler.uniform(cfg.student_steps)

    def student_denoiser(self, roles: dict[str, nn.Module]) -> Denoiser:
        """The module to sample the student from (objectives may wrap the raw student)."""
        return roles["student"]
