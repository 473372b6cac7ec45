"""The digits probe warns when the student collapses (the failure DMD users report most)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fewstep.core.models import Denoiser
from fewstep.core.paths import make_path
from fewstep.core.samplers import FewStepSampler
from fewstep.image.digits_eval import Probe
from fewstep.image.recipes.digits import DigitsConfig
from fewstep.image.teacher import build_teacher


class Constant(Denoiser):
    """A 'student' whose every sample is the same image."""

    def __init__(self):
        super().__init__(make_path("rectified_flow"), "x0")
        self.anchor = torch.nn.Parameter(torch.zeros(1, 1, 8, 8))

    def forward(self, x_t, t, cond=None):
        return self.anchor.expand_as(x_t)


def test_probe_flags_a_collapsed_student_and_not_the_teacher(cache_dir):
    cfg = DigitsConfig(probe_samples=40, classifier_steps=300)
    cfg.teacher.sample_steps = 4
    teacher = build_teacher(cfg.teacher).eval().requires_grad_(False)
    probe = Probe(cfg, teacher)

    def fake_trainer(model):
        sampler = FewStepSampler([1.0])
        return SimpleNamespace(
            sampling_denoiser=lambda use_ema=True: model,
            objective=SimpleNamespace(student_sampler=lambda: sampler),
        )

    collapsed = probe(fake_trainer(Constant()))
    assert any("collapsed" in w for w in collapsed.warnings)
    healthy = probe(fake_trainer(teacher))  # the teacher's own 1-step x0 is not constant
    assert not healthy.warnings
    assert collapsed.images["student"].shape[1:] == (1, 8, 8)
