"""Multi-Student Distillation (MSD).

Song, Lorraine, Nie, Kreis and Lucas, "Multi-student Diffusion Distillation for Better
One-step Generators" (ICML 2025, arXiv 2410.23274).

A conditional teacher is distilled into K students; student k owns the conditions of its
partition (class labels routed by ``partition[label]``, default ``label % K``; MSD sec. 3) and
is trained with DMD2 (distribution matching, TTUR, optional GAN head, backward simulation;
see ``dmd2``) on the samples of its own partition only. Each student has its own fake score
by default, as in MSD, where the students train independently (and in parallel) as K
separate DMD2 runs on K slices of the condition set; ``shared_fake_score=True`` uses one
conditional fake score for all students instead (equal in the limit, since the fake score
is conditional, and K times cheaper). The student role is a ``RoutedDenoiser`` over the K
students routed by label, so sampling picks the student by condition and costs one student
evaluation per sample. Routing is sample-wise, so the DM gradient of a sample reaches only
its label's student and its label's fake score, which is exactly K independent DMD2 runs
with batches split by partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, trainable_copy
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config
from fewstep.core.objectives.phased_dmd import RoutedDenoiser


@dataclass
class MultiStudentConfig(DMD2Config):
    num_students: int = 2  # K students (each owns part of the conditions)
    partition: tuple[int, ...] = ()  # student index per class label; empty: label % K
    shared_fake_score: bool = False  # one conditional fake score for all students


class MultiStudent(DMD2):
    name = "multi_student"
    config_cls = MultiStudentConfig
    roles = ("student", "fake_score")
    summary = "K students, each DMD2-distilled on its partition of the labels (Song 2024)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.num_students < 1:
            raise ValueError(f"num_students must be >= 1, got {cfg.num_students}")
        bad = [p for p in cfg.partition if not 0 <= int(p) < cfg.num_students]
        if bad:
            raise ValueError(
                f"partition maps labels to students 0..{cfg.num_students - 1}; got {bad}"
            )
        if cfg.partition and len(set(cfg.partition)) < cfg.num_students:
            missing = sorted(set(range(cfg.num_students)) - set(cfg.partition))
            raise ValueError(f"partition gives no labels to student(s) {missing}")

    def route(self, experts: list[Denoiser]) -> RoutedDenoiser:
        return RoutedDenoiser(experts, "label", partition=self.config.partition)

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        k = self.config.num_students
        roles = super().build_roles(student, example)
        students = [student] + [trainable_copy(student) for _ in range(k - 1)]
        roles["student"] = self.route(students)
        if not self.config.shared_fake_score:
            score = roles["fake_score"]["score"]
            roles["fake_score"]["score"] = self.route(
                [score] + [trainable_copy(score) for _ in range(k - 1)]
            )
        return roles

    def losses(self, roles, batch, update, step):
        if not isinstance(batch.cond, Tensor):
            raise ValueError(
                "multi_student routes samples by class label: batches need integer labels "
                f"in batch.cond (a (B,) tensor); got {type(batch.cond).__name__}"
            )
        return super().losses(roles, batch, update, step)
