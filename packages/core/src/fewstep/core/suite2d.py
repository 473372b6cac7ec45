"""The 2-D objective suite: distil a toy teacher with any objective and score the student.

Shared by core's tests (each objective must *learn*) and ``benchmarks/objectives.py`` (one
table over all objectives). A run trains a trainable copy of the teacher (or a given
student) with the ``Trainer`` and compares the student's samples with the teacher's 50-step
Euler samples from the same noise: sliced Wasserstein distance (SW), MMD, and for the ring
of Gaussians the number of modes covered. The untrained student (the teacher sampled in the
student's few jumps) is the baseline every objective must beat by a wide margin. Guidance
objectives (CFG into a one-pass student with the scale as an input) run through
``distil_guided`` and are scored per scale against the CFG teacher. Per-objective settings
live in ``fewstep.core.budgets2d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.metrics import mmd, mode_coverage, sliced_wasserstein
from fewstep.core.models import Denoiser, GuidedDenoiser, trainable_copy
from fewstep.core.objectives import get_objective
from fewstep.core.objectives.base import Reward
from fewstep.core.objectives.common import unguided
from fewstep.core.samplers import EulerSampler, FewStepSampler, Sampler
from fewstep.core.toy import ToyData, mixture_centers
from fewstep.core.training import TrainConfig, Trainer

N_EVAL = 4000  # samples per set: SW between two teacher sample sets is ~0.08 at this size
COVER_RADIUS = 0.5  # a sample hits a mode within 5 mode-stds of its centre
MIN_MODES = 6  # of 8: what "covers the modes" means in tests
TEACHER_STEPS = 50  # the reference: the teacher's 50-step Euler samples


@dataclass
class Budget:
    """How to distil one objective on the 2-D suite (objective and trainer settings)."""

    objective: dict[str, Any] = field(default_factory=dict)  # objective config fields
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    nfe: tuple[int, ...] = (1, 2, 4)  # student NFEs worth reporting (student_steps per run)
    vary_steps: bool = True  # False: the objective fixes its own sampler (e.g. compression)
    by_nfe: dict[int, dict[str, dict]] = field(default_factory=dict)  # k -> overrides
    eps: dict[str, dict] = field(default_factory=dict)  # overrides for eps-predicting teachers
    conditional: bool = False  # needs a class-conditional teacher (partitions, CFG terms)
    guided: bool = False  # distils CFG into a scale-input student: ``distil_guided``
    reward: str | None = None  # name in REWARDS for reward-driven objectives
    student: str | None = None  # name in budgets2d.STUDENTS; None: a copy of the teacher
    init: str | None = None  # start from the student this objective's budget distils

    def configs(self, nfe: int, eps: bool = False) -> tuple[dict, dict]:
        """(objective config, train config) for a student with ``nfe`` steps; ``eps``: the
        teacher predicts eps (its overrides apply after the per-NFE ones)."""
        obj, train = dict(self.objective), dict(self.train)
        for extra in (self.by_nfe.get(nfe, {}), self.eps if eps else {}):
            obj.update(extra.get("objective", {}))
            for k, v in extra.get("train", {}).items():  # role_lr dicts merge
                both = isinstance(v, dict) and isinstance(train.get(k), dict)
                train[k] = {**train[k], **v} if both else v
        if self.vary_steps:
            obj["student_steps"] = nfe
        return obj, train


def upper_half_reward(x: Tensor, cond=None) -> Tensor:
    """Toy reward: the y coordinate (prefers the ring's upper modes); differentiable."""
    return x[:, 1]


REWARDS = {"upper_half": upper_half_reward}


@dataclass
class Outcome:
    before: float  # SW(untrained student, teacher)
    after: float  # SW(distilled EMA student, teacher)
    covered: int  # ring modes the distilled student covers (0 for the checkerboard)
    history: list  # the trainer's log records
    mmd: float = math.nan  # MMD(distilled EMA student, teacher)
    trainer: Trainer | None = None  # for further checks (roles, sampler, ...)
    samples: Tensor | None = None  # the distilled student's evaluation samples
    samples_before: Tensor | None = None  # the untrained student's, from the same noise

    def learned(self, ratio: float = 0.5, min_modes: int = MIN_MODES) -> bool:
        """SW fell below ``ratio`` x the untrained student's and the ring's modes are hit."""
        return self.after < ratio * self.before and self.covered >= min_modes


_REFERENCE: dict[tuple, tuple[Tensor, Tensor, Tensor | None]] = {}


def eval_cond(teacher: Denoiser, n: int = N_EVAL) -> Tensor | None:
    """Fixed evaluation labels 0..7 (repeated) for class-conditional toy teachers, else None."""
    net = getattr(unguided(teacher), "net", None)
    if getattr(net, "num_classes", 0) > 0:
        return torch.arange(n) % net.num_classes
    return None


def reference(teacher: Denoiser, n: int = N_EVAL) -> tuple[Tensor, Tensor, Tensor | None]:
    """(noise, teacher's 50-step Euler samples from it, labels or None), once per teacher."""
    key = (id(teacher), n)
    if key not in _REFERENCE:
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1234))
        cond = eval_cond(teacher, n)
        with torch.no_grad():
            ref = EulerSampler(TEACHER_STEPS).sample(teacher, noise, cond).x
        _REFERENCE[key] = noise, ref, cond
    return _REFERENCE[key]


def sample_with(denoiser: Denoiser, sampler: Sampler, noise: Tensor, cond=None) -> Tensor:
    """Samples with a fixed re-noising seed for multi-step samplers."""
    if isinstance(sampler, FewStepSampler):
        sampler.generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        return sampler.sample(denoiser, noise, cond).x


def student_samples(trainer: Trainer, noise: Tensor, cond=None, sampler=None) -> Tensor:
    """The (EMA) student's samples with the objective's own sampler (or ``sampler``)."""
    sampler = sampler or trainer.objective.student_sampler()
    return sample_with(trainer.sampling_denoiser(), sampler, noise, cond)


def score(x: Tensor, ref: Tensor, data: str = "mixture", with_mmd: bool = True) -> dict:
    """SW, MMD (NaN unless ``with_mmd``: it costs more than a short distillation run) and
    (ring only) modes covered of samples ``x`` against ``ref``."""
    if not torch.isfinite(x).all():
        return {"sw": math.inf, "mmd": math.inf, "covered": 0}
    covered = 0
    if data == "mixture":
        covered = mode_coverage(x, mixture_centers(), COVER_RADIUS)["covered"]
    m = mmd(x, ref) if with_mmd else math.nan
    return {"sw": sliced_wasserstein(x, ref), "mmd": m, "covered": covered}


def distil(
    teacher: Denoiser,
    name: str,
    objective_cfg: dict | None = None,
    train_cfg: dict | None = None,
    out_dir: str | Path = ".",
    objective_cls=None,
    data: str = "mixture",
    student: Denoiser | None = None,
    reward: Reward | None = None,
    with_mmd: bool = False,
) -> Outcome:
    """Distil ``teacher`` with objective ``name`` (or ``objective_cls``) on toy ``data`` and
    score the EMA student against the teacher's reference samples."""
    cls = objective_cls or get_objective(name)
    kwargs = {"reward": reward} if reward is not None else {}
    objective = cls(teacher, cls.config_cls(**(objective_cfg or {})), **kwargs)
    config = TrainConfig(**{"progress": False, "resume": False, "log_every": 50, **train_cfg})
    conditional = eval_cond(teacher) is not None
    trainer = Trainer(
        objective,
        student if student is not None else trainable_copy(teacher),
        ToyData(data, conditional=conditional),
        config,
        out_dir,
    )
    noise, ref, cond = reference(teacher)
    x_before = student_samples(trainer, noise, cond)
    before = score(x_before, ref, data, with_mmd=False)["sw"]
    history = trainer.fit()
    x = student_samples(trainer, noise, cond)
    s = score(x, ref, data, with_mmd)
    return Outcome(before, s["sw"], s["covered"], history, s["mmd"], trainer, x, x_before)


# ------------------------------------------------------------------ guided students

GUIDED_SCALES = (3.0, 5.0)  # CFG scales guided students are scored at
N_GUIDED = 1000  # evaluation samples per scale
_GUIDED_REF: dict = {}


def guided_reference(base: Denoiser, w: float) -> tuple[Tensor, Tensor, Tensor]:
    """(noise, labels, the CFG teacher's 50-step samples at scale w) over a conditional toy
    teacher ``base`` (its null label is the unconditional input), cached."""
    key = (id(base), w)
    if key not in _GUIDED_REF:
        noise = torch.randn(N_GUIDED, 2, generator=torch.Generator().manual_seed(1234))
        labels = torch.arange(N_GUIDED) % base.net.num_classes
        with torch.no_grad():
            ref = EulerSampler(TEACHER_STEPS).sample(_cfg_teacher(base, w), noise, labels).x
        _GUIDED_REF[key] = noise, labels, ref
    return _GUIDED_REF[key]


def _cfg_teacher(base: Denoiser, w: float) -> GuidedDenoiser:
    null = base.net.null_class
    return GuidedDenoiser(base, w, lambda c: torch.full_like(c, null))


@dataclass
class GuidedOutcome:
    before: dict[float, dict]  # scale -> score of the untrained student (the base at w = 1)
    after: dict[float, dict]  # scale -> score of the distilled student run at that scale
    trainer: Trainer


def distil_guided(
    base: Denoiser,
    name: str,
    objective_cfg: dict,
    train_cfg: dict,
    out_dir: str | Path = ".",
    objective_cls=None,
    scales: tuple[float, ...] = GUIDED_SCALES,
    with_mmd: bool = False,
) -> GuidedOutcome:
    """Distil the CFG teacher over the conditional toy teacher ``base`` into a one-pass
    student with the guidance scale as an input (guidance distillation, AGD), and score it at
    each of ``scales`` against the CFG teacher's 50-step samples at that scale."""
    from fewstep.core.objectives.guidance_embed import FixedGuidance

    cls = objective_cls or get_objective(name)
    objective = cls(_cfg_teacher(base, scales[0]), cls.config_cls(**objective_cfg))
    config = TrainConfig(**{"progress": False, "resume": False, "log_every": 50, **train_cfg})
    data = ToyData("mixture", conditional=True)
    trainer = Trainer(objective, trainable_copy(base), data, config, out_dir)
    sampler = objective.student_sampler()

    def scored(w: float) -> dict:
        noise, labels, ref = guided_reference(base, w)
        student = FixedGuidance(trainer.sampling_denoiser().inner, w)
        with torch.no_grad():
            return score(sampler.sample(student, noise, labels).x, ref, with_mmd=with_mmd)

    before = {w: scored(w) for w in scales}
    trainer.fit()
    return GuidedOutcome(before, {w: scored(w) for w in scales}, trainer)
