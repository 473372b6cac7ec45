"""Diversity distillation (teacher first, student after): its end points are the student's
few-step sampler and the teacher's Euler sampler, its NFE adds up, and the diversity metric
measures spread across seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import RectifiedFlow, VPDiscrete
from fewstep.core.samplers import EulerSampler, FewStepSampler
from fewstep.image.diversity import DiversitySampler, per_prompt_diversity


class Net(nn.Module):
    """A small conditional net: prediction = tanh(W x + b * time) + cond."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(6, 6)

    def forward(self, x, time, cond):
        return torch.tanh(self.lin(x) + 1e-3 * time[:, None]) + cond


PATHS = {"flow": (RectifiedFlow(), "velocity"), "vp": (VPDiscrete(), "eps")}


@pytest.fixture(params=sorted(PATHS))
def pair(request):
    path, pred = PATHS[request.param]
    return ModuleDenoiser(Net(0), path, pred), ModuleDenoiser(Net(1), path, pred)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 6, generator=g), 0.1 * torch.randn(5, 6, generator=g)


def test_k0_is_the_students_few_step_sampler(pair):
    teacher, student = pair
    noise, cond = _inputs()
    times = (1.0, 0.6, 0.3)
    got = DiversitySampler(teacher, 0, 10, times, generator=torch.Generator().manual_seed(5))
    want = FewStepSampler(times, generator=torch.Generator().manual_seed(5))
    got, want = got.sample(student, noise, cond), want.sample(student, noise, cond)
    assert torch.equal(got.x, want.x)
    assert (got.nfe, got.teacher_nfe, got.student_nfe) == (3, 0, 3)


def test_all_teacher_steps_is_the_teachers_euler_sampler(pair):
    teacher, student = pair
    noise, cond = _inputs()
    got = DiversitySampler(teacher, 8, 8, (1.0,)).sample(student, noise, cond)
    want = EulerSampler(8).sample(teacher, noise, cond)
    assert torch.equal(got.x, want.x)
    assert (got.nfe, got.teacher_nfe, got.student_nfe) == (8, 8, 0)
    assert torch.equal(DiversitySampler(teacher, 99, 8).sample(student, noise, cond).x, want.x)


def test_hybrid_hands_over_at_the_teachers_time_and_counts_both(pair):
    """k teacher steps reach t_k; the student predicts x0 there, then continues on its own
    times below t_k: NFE = k + 1 + (student times below t_k)."""
    teacher, student = pair
    noise, cond = _inputs()
    path = teacher.path
    got = DiversitySampler(teacher, 2, 8, (1.0, 0.5)).sample(student, noise, cond)
    t_k = path.timesteps(8)[2]  # 0.75 of the range: one student time (0.5) lies below
    assert (got.teacher_nfe, got.student_nfe, got.nfe) == (2, 2, 4)
    # the same by hand, with the generator's fresh noise
    x = path.prior(noise)
    for t, t_next in zip(path.timesteps(8)[:2], path.timesteps(8)[1:3], strict=True):
        x0, eps = teacher.x0_eps(x, t.expand(5), cond)
        x = path.noise(x0, t_next.expand(5), eps)
    one_step = DiversitySampler(teacher, 2, 8, (1.0,)).sample(student, noise, cond)
    with torch.no_grad():
        want = student.predict(x, t_k.expand(5), cond, kind="x0")
    torch.testing.assert_close(one_step.x, want)
    assert one_step.nfe == 3  # k + the one student step
    with pytest.raises(ValueError, match="k must be >= 0"):
        DiversitySampler(teacher, -1)


def test_cfg_teacher_steps_count_twice():
    from fewstep.core.models import GuidedDenoiser

    path, pred = PATHS["flow"]
    base = ModuleDenoiser(Net(0), path, pred)
    teacher = GuidedDenoiser(base, 2.0, lambda c: torch.zeros_like(c))
    noise, cond = _inputs()
    got = DiversitySampler(teacher, 3, 8, (1.0,)).sample(
        ModuleDenoiser(Net(1), path, pred), noise, cond
    )
    assert (got.teacher_nfe, got.student_nfe) == (6, 1)


def test_diversity_metric_on_constructed_sets():
    # prompt 1: two seeds 3 apart; prompt 2: identical seeds -> mean (3 + 0) / 2
    a = torch.zeros(2, 2, 4)
    a[0, 1, 0] = 3.0
    assert per_prompt_diversity(a) == pytest.approx(1.5)
    # an equilateral triangle of side 2 in each prompt; scaling scales the metric
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3**0.5]])
    assert per_prompt_diversity(tri[None]) == pytest.approx(2.0)
    assert per_prompt_diversity(5 * tri[None].repeat(3, 1, 1)) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="seeds >= 2"):
        per_prompt_diversity(torch.zeros(3, 1, 4))
