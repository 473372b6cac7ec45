"""End-to-end distillation on the 2-D toys: the objectives must actually learn.

Each test distils a trainable copy of a toy teacher into a 1- or 2-step student with the
Trainer for a CPU budget of a few seconds, and compares the student's samples with the
teacher's 50-step Euler samples (same noise) by sliced Wasserstein distance. The untrained
student (the teacher sampled in one or two jumps) is the baseline; a distilled student must
land well below it and cover the ring's modes. Sabotage tests break one piece of an objective
(the sign of the DMD gradient, the consistency target, the teacher's ODE step) and check
that the same criterion then fails, so a silently broken objective cannot pass.
"""

from __future__ import annotations

import pytest

from fewstep.core.budgets2d import BUDGETS
from fewstep.core.objectives import consistency as consistency_mod
from fewstep.core.objectives import dmd2 as dmd2_mod
from fewstep.core.objectives.common import noised
from fewstep.core.suite2d import MIN_MODES, distil
from fewstep.core.training import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("single_thread")

# Budgets: (objective config, train config), each a few seconds on one CPU core. The eps
# student gets a smaller learning rate because its x0 = (x - sigma eps) / alpha at t_max
# multiplies its output by sigma / alpha = 15. Checked over training seeds 0-3.
DMD2_RF = BUDGETS["dmd2"].configs(1)
DMD2_VP = BUDGETS["dmd2"].configs(1, eps=True)
DMD2_RF_2STEP = BUDGETS["dmd2"].configs(2)
CD_CFG = {"num_intervals": 10, "metric": "l2"}
CD = dict(steps=400, batch_size=128, lr=1e-3, ema_decay=0.95)


# ------------------------------------------------------------------------ they learn


# The VP cases repeat the VP checkerboard cases of objectives/test_checkerboard.py: slow-marked
VP_REPEAT = pytest.mark.slow


@pytest.mark.parametrize(
    ("teacher_name", "budget"),
    [("rf_teacher", DMD2_RF), pytest.param("vp_teacher", DMD2_VP, marks=VP_REPEAT)],
    ids=["rf", "vp"],
)
def test_dmd2_one_step(request, tmp_path, teacher_name, budget):
    teacher = request.getfixturevalue(teacher_name)
    out = distil(teacher, "dmd2", *budget, tmp_path)
    assert out.learned(), out


@pytest.mark.parametrize(
    "teacher_name", ["rf_teacher", pytest.param("vp_teacher", marks=VP_REPEAT)], ids=["rf", "vp"]
)
def test_consistency_one_step(request, tmp_path, teacher_name):
    teacher = request.getfixturevalue(teacher_name)
    out = distil(teacher, "consistency", CD_CFG, CD, tmp_path)
    assert out.learned(), out


def test_dmd2_two_step_backward_simulation(rf_teacher, tmp_path):
    out = distil(rf_teacher, "dmd2", *DMD2_RF_2STEP, tmp_path)
    assert out.learned(), out


def test_consistency_two_step(rf_teacher, tmp_path):
    out = distil(rf_teacher, "consistency", {**CD_CFG, "student_steps": 2}, CD, tmp_path)
    assert out.learned(), out


# ----------------------------------------------------------------- sabotage must fail


def test_sabotage_dmd_gradient_sign_flipped(rf_teacher, tmp_path, monkeypatch):
    honest = dmd2_mod.dmd_loss

    def ascent(x, x0_real, x0_fake):
        loss, gnorm = honest(x, x0_real, x0_fake)
        return -loss, gnorm  # gradient w * (x0_real - x0_fake): away from the teacher

    monkeypatch.setattr(dmd2_mod, "dmd_loss", ascent)
    try:
        out = distil(rf_teacher, "dmd2", *DMD2_RF, tmp_path)
    except NonFiniteLossError:
        return  # diverged: it certainly did not learn
    assert not out.learned(), out
    assert out.after > 0.8 * out.before, out


class SelfTargetConsistency(consistency_mod.ConsistencyDistillation):
    """Sabotage: the target is the student's own (detached) prediction at the same point."""

    def losses(self, roles, batch, update, step):
        cfg = self.config
        i = batch.rng.randint(1, cfg.num_intervals + 1).float()
        t = self.path.fraction_to_t(i / cfg.num_intervals).to(batch.x.device)
        x_t, _ = noised(self.path, batch.x, t, batch)
        pred = self.wrap(roles["student"])(x_t, t, batch.cond)
        loss = (pred - pred.detach()).pow(2).mean()
        return {"student": loss}, {}


def test_sabotage_consistency_self_target(rf_teacher, tmp_path):
    # the loss and its gradient are exactly zero, so a short budget shows as much as a long one
    budget = {**CD, "steps": 100}
    out = distil(
        rf_teacher, "consistency", CD_CFG, budget, tmp_path, objective_cls=SelfTargetConsistency
    )
    assert not out.learned(), out
    assert out.after > 0.9 * out.before, out


def test_sabotage_consistency_without_teacher_step(rf_teacher, tmp_path, monkeypatch):
    def no_step(self, x, t, t_next, cond):
        return x  # x_{t_lo} := x_{t_hi}: the teacher's ODE never enters the target

    monkeypatch.setattr(consistency_mod.ConsistencyDistillation, "teacher_step", no_step)
    out = distil(rf_teacher, "consistency", CD_CFG, CD, tmp_path)
    # Without the teacher the only anchor is the boundary f(x, t_min) = x, so the student
    # drifts towards the identity (one-step samples = the noise: no mode is hit). On the
    # symmetric ring the drift passes through a transient that looks fine: a radial pull of
    # Gaussian noise onto the nearest mode; the budget must be past it.
    assert not out.learned(), out
    assert out.covered < MIN_MODES, out


def test_dmd2_gan_times_follow_gan_t_range(rf_teacher):
    """The GAN head sees samples at ``gan_t_range`` (path fractions) when set, else at the
    DM loss's ``t_range`` as in the paper; a malformed range is refused by name."""
    from fewstep.core.batch import Batch, StepRNG
    from fewstep.core.objectives.dmd2 import DMD2, DMD2Config

    batch = Batch(x=None, cond=None, rng=StepRNG(0, 0, 0, 512, 0, 512), extras={})
    path = rf_teacher.path
    low = DMD2(rf_teacher, DMD2Config(gan_t_range=(0.0, 0.1))).gan_times(batch, None)
    assert float(low.max()) <= float(path.fraction_to_t(0.1)) + 1e-6
    paper = DMD2(rf_teacher, DMD2Config()).gan_times(batch, None)
    assert float(paper.min()) >= float(path.fraction_to_t(0.02)) - 1e-6
    assert float(paper.max()) > float(path.fraction_to_t(0.5))
    for bad in [(0.5,), (0.9, 0.1)]:
        with pytest.raises(ValueError, match="time range"):
            DMD2(rf_teacher, DMD2Config(gan_t_range=bad)).gan_times(batch, None)
