"""Distribution matching beyond the plain fake score: DisBack, VDOT and TwinFlow.

Each objective must learn on the 2-D ring (SW below half the untrained student's, >= 6 of 8
modes), its math is checked on fixed inputs against a plain reference written here from the
paper's equations, and one piece per objective is sabotaged to show the learning criterion
catches it. Budgets were checked over training seeds 0-3.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.budgets2d import BUDGETS
from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives import dmd2 as dmd2_mod
from fewstep.core.objectives import twinflow as twinflow_mod
from fewstep.core.objectives import vdot as vdot_mod
from fewstep.core.objectives.disback import DisBack, DisBackConfig
from fewstep.core.objectives.twinflow import (
    TwinFlow,
    TwinFlowConfig,
    negative_time,
    rectify_step,
    twin_metric,
)
from fewstep.core.objectives.vdot import VDOTConfig, ot_projections, sinkhorn_plan, sq_dists
from fewstep.core.paths import make_path
from fewstep.core.suite2d import distil, reference
from fewstep.core.toy import ToyData, ToyMLP
from fewstep.core.training import NonFiniteLossError, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

# Budgets (objective config, train config), each a few seconds on one core.
DISBACK_RF = BUDGETS["disback"].configs(1)
DISBACK_VP = BUDGETS["disback"].configs(1, eps=True)
VDOT_RF = BUDGETS["vdot"].configs(1)
TWINFLOW_RF = BUDGETS["twinflow"].configs(1)


def distil_or_diverge(*args, **kwargs):
    """``distil``, or None when a sabotaged run blows up (it certainly did not learn)."""
    try:
        return distil(*args, **kwargs)
    except NonFiniteLossError:
        return None


# ================================================================================= DisBack


def test_disback_records_the_path_and_learns(rf_teacher, tmp_path):
    out = distil(rf_teacher, "disback", *DISBACK_RF, tmp_path)
    assert out.learned(), out
    # the recorded path: each checkpoint differs from the teacher and from the previous
    # one, and the path moves away from the teacher (towards the initial student)
    roles = out.trainer.roles
    teacher = torch.cat([p.flatten() for p in rf_teacher.parameters()])
    path = [torch.cat([p.flatten() for p in m.parameters()]) for m in roles["path"]]
    dists = [float((p - teacher).norm()) for p in path]
    assert dists[0] > 0 and all(b > 1.2 * a for a, b in itertools.pairwise(dists)), dists
    assert all(float((b - a).norm()) > 0 for a, b in itertools.pairwise(path))
    assert not any(p.requires_grad for p in roles["path"].parameters())


def test_disback_eps_teacher(vp_teacher, tmp_path):
    out = distil(vp_teacher, "disback", *DISBACK_VP, tmp_path)
    assert out.learned(), out


def test_sabotage_disback_backtracks_the_wrong_way(rf_teacher, tmp_path, monkeypatch):
    """Walk the path teacher-first and end on the most degraded checkpoint (the initial
    student's own score): the student is pulled back to where it started."""
    honest = DisBack.target_index

    def forwards(self, step):
        k = honest(self, step)
        return k if k < 0 else self.config.num_checkpoints - k

    monkeypatch.setattr(DisBack, "target_index", forwards)
    out = distil_or_diverge(rf_teacher, "disback", *DISBACK_RF, tmp_path)
    assert out is None or (not out.learned() and out.after > 0.6 * out.before), out


def test_sabotage_disback_gradient_sign(rf_teacher, tmp_path, monkeypatch):
    honest = dmd2_mod.dmd_loss  # the DM term every DMD-family objective shares (dm_term)

    def ascent(x, x0_real, x0_fake):
        loss, gnorm = honest(x, x0_real, x0_fake)
        return -loss, gnorm

    monkeypatch.setattr(dmd2_mod, "dmd_loss", ascent)
    out = distil_or_diverge(rf_teacher, "disback", *DISBACK_RF, tmp_path)
    assert out is None or (not out.learned() and out.after > 0.8 * out.before), out


class ConstX0(nn.Module):
    """net(x, time, cond) -> a learnable constant (an x0-predictor that ignores its input)."""

    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.as_tensor(value, dtype=torch.float32))

    def forward(self, x, time, cond=None):
        return self.value.expand_as(x)


def test_disback_schedule_and_gradient_against_the_paper():
    """Stage 1 updates only the degrading score and records s'_1..s'_N at k/(N+1) of it;
    stage 2 targets s'_N, ..., s'_1, then the teacher, and the student's gradient is DMD's
    w (x0_fake - x0_real) with x0_real from the scheduled target (DMD eqs. 7-8)."""
    path = make_path("rectified_flow")
    teacher = ModuleDenoiser(ConstX0([0.0, 0.0]), path, "x0").requires_grad_(False)
    cfg = DisBackConfig(
        record_steps=12, num_checkpoints=3, backtrack_steps=(2, 3, 4), fake_updates_per_student=1
    )
    obj = DisBack(teacher, cfg)
    assert [obj.record_step(k) for k in (1, 2, 3)] == [2, 5, 8]
    assert [obj.target_index(s) for s in range(10, 25)] == (
        [-1, -1] + [3, 3] + [2, 2, 2] + [1, 1, 1, 1] + [0, 0, 0, 0]
    )
    assert obj.schedule(11) == ["fake_score"] and obj.schedule(12) == ["student", "fake_score"]

    student = trainable_copy(ModuleDenoiser(ConstX0([1.0, -2.0]), path, "x0"))
    rng = StepRNG(0, 0, 0, global_size=4, offset=0, local_size=4)
    example = Batch(x=None, cond=None, rng=rng, extras={"sample_shape": (2,)})
    roles = obj.build_roles(student, example)
    targets = {1: [0.5, 0.5], 2: [1.0, 1.5], 3: [-1.0, 3.0]}
    for k, c in targets.items():
        roles["path"][k - 1].net.value.data = torch.tensor(c)
    roles["fake_score"].net.value.data = torch.tensor([2.0, 1.0])
    x, fake = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 1.0])
    for step, k in [(12, 3), (14, 2), (17, 1), (21, 0)]:
        batch = Batch(
            x=None, cond=None, rng=StepRNG(0, step, 0, 4, 0, 4), extras={"sample_shape": (2,)}
        )
        losses, logs = obj.losses(roles, batch, ["student"], step)
        assert logs["target"] == k
        student.zero_grad()
        losses["student"].backward()
        real = torch.tensor(targets.get(k, [0.0, 0.0]))
        w = 1.0 / (x - real).abs().mean()
        expected = w * (fake - real) / 2  # mean over B samples and D = 2 dims, summed over B
        torch.testing.assert_close(student.net.value.grad, expected)


def test_disback_records_at_the_right_steps_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    teacher = (
        ModuleDenoiser(
            ToyMLP(hidden=16, time_dim=8, depth=2), make_path("rectified_flow"), "velocity"
        )
        .requires_grad_(False)
        .eval()
    )
    cfg = {
        "record_steps": 6,
        "num_checkpoints": 2,
        "backtrack_steps": (2,),
        "fake_updates_per_student": 2,
    }

    def trainer(out, steps):
        obj = DisBack(teacher, DisBackConfig(**cfg))
        config = TrainConfig(
            steps=steps, batch_size=16, lr=1e-2, log_every=1, progress=False, seed=3
        )
        return Trainer(obj, trainable_copy(teacher), ToyData(), config, out)

    full = trainer(tmp_path / "full", 12)
    before = [p.detach().clone() for p in full.roles["student"].parameters()]
    full.cfg.steps = 6  # end of stage 1: recorded, student untouched
    full.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, full.roles["student"].parameters()))
    fake = full.roles["fake_score"].state_dict()
    last = full.roles["path"][1].state_dict()
    assert not all(torch.equal(fake[k], last[k]) for k in fake)  # s'_2 recorded before the end
    full.cfg.steps = 12
    full.fit()

    half = trainer(tmp_path / "split", 4)
    half.fit()
    resumed = trainer(tmp_path / "split", 12)
    assert resumed.step == 4
    resumed.fit()
    for role, module in full.checkpoint_modules().items():
        other = resumed.checkpoint_modules()[role].state_dict()
        for k, v in module.state_dict().items():
            assert torch.equal(v, other[k]), f"{role}.{k} differs after resume"


def test_disback_rejects_bad_configs(rf_teacher):
    with pytest.raises(ValueError, match="record_steps"):
        DisBack(rf_teacher, DisBackConfig(record_steps=3, num_checkpoints=3))
    with pytest.raises(ValueError, match="backtrack_steps"):
        DisBack(rf_teacher, DisBackConfig(num_checkpoints=3, backtrack_steps=(5, 5)))


# ==================================================================================== VDOT


def exact_ot(cost: torch.Tensor) -> float:
    """Exact OT cost between two uniform n-point clouds: the best assignment (Birkhoff)."""
    n = cost.shape[0]
    return min(
        float(sum(cost[i, p[i]] for i in range(n))) / n for p in itertools.permutations(range(n))
    )


@pytest.mark.parametrize("n", [3, 5])
def test_sinkhorn_converges_to_exact_ot(n):
    """At a small eps the entropic plan's cost is the exact OT cost (brute force over the
    n! assignments, the vertices of the Birkhoff polytope) and its marginals are uniform."""
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) + 0.5
    cost = sq_dists(x.double(), y.double())
    scale = float(cost.mean())
    plan = sinkhorn_plan(cost, 1e-3 * scale, iters=1000)
    uniform = torch.full((n,), 1 / n, dtype=plan.dtype)
    torch.testing.assert_close(plan.sum(0), uniform, atol=1e-9, rtol=0)  # exact after g
    torch.testing.assert_close(plan.sum(1), uniform, atol=3e-3 / n, rtol=0)  # small eps: slow
    assert abs(float((plan * cost).sum()) - exact_ot(cost)) < 3e-3 * scale


def reference_sinkhorn_value(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int = 2000):
    """Entropic OT value OT_eps(x, y) = <a, f> + <b, g> from plain (non-log) Sinkhorn matrix
    scaling, u = a / K v, v = b / K^T u, K = exp(-C / eps) (Cuturi 2013), differentiable."""
    n, m = x.shape[0], y.shape[0]
    a, b = torch.full((n,), 1 / n, dtype=x.dtype), torch.full((m,), 1 / m, dtype=x.dtype)
    kernel = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(iters):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return eps * (a * torch.log(u / a)).sum() + eps * (b * torch.log(v / b)).sum()


def test_ot_projections_are_the_sinkhorn_divergence_gradient():
    """d/df_i [OT(F, R) - OT(F, F) / 2] = (2 / n) (T_FF(f_i) - T_FR(f_i)) (envelope theorem),
    checked by autograd through a plain Sinkhorn written from Cuturi's equations."""
    g = torch.Generator().manual_seed(0)
    n = 6
    fake = torch.randn(n, 2, generator=g, dtype=torch.float64)
    real = torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0])
    rel = 0.5
    eps = rel * float(sq_dists(fake, real).mean())
    f = fake.clone().requires_grad_(True)
    div = reference_sinkhorn_value(f, real, eps) - 0.5 * reference_sinkhorn_value(f, f, eps)
    (grad,) = torch.autograd.grad(div, f)
    t_fr, t_ff, _ = ot_projections(fake, real, eps=rel, iters=500)
    torch.testing.assert_close(grad, (2 / n) * (t_ff - t_fr).double(), atol=1e-5, rtol=1e-4)


def test_ot_projections_vanish_when_fake_equals_real():
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(16, 2, generator=g)
    t_fr, t_ff, _ = ot_projections(pts, pts.clone(), eps=0.05, iters=200)
    torch.testing.assert_close(t_fr, t_ff)
    # without debiasing the entropic plan shrinks the target towards local means
    t_fr, t_ff, _ = ot_projections(pts, pts.clone(), eps=0.05, iters=200, debias=False)
    assert float((t_fr - t_ff).abs().max()) > 1e-3


def test_vdot_ot_term_alone_learns(rf_teacher, tmp_path):
    out = distil(rf_teacher, "vdot", *VDOT_RF, tmp_path)
    assert out.learned(), out
    assert "ot_loss" in out.history[-1] and "dm_loss" not in out.history[-1]


def test_sabotage_vdot_ot_gradient_sign(rf_teacher, tmp_path, monkeypatch):
    honest = vdot_mod.ot_projections

    def swapped(fake, real, *args, **kwargs):
        t_fr, t_ff, cost = honest(fake, real, *args, **kwargs)
        return t_ff, t_fr, cost  # the student follows T_FF - T_FR: away from the real scores

    monkeypatch.setattr(vdot_mod, "ot_projections", swapped)
    out = distil_or_diverge(rf_teacher, "vdot", *VDOT_RF, tmp_path)
    assert out is None or (not out.learned() and out.after > 0.8 * out.before), out


def test_vdot_rejects_bad_configs(rf_teacher):
    cls = vdot_mod.VDOT
    with pytest.raises(ValueError, match="not both 0"):
        cls(rf_teacher, VDOTConfig(dm_weight=0.0, ot_weight=0.0))
    with pytest.raises(ValueError, match="ot_eps"):
        cls(rf_teacher, VDOTConfig(ot_eps=0.0))


# ================================================================================ TwinFlow


def test_twinflow_learns_without_using_the_teacher(rf_teacher, tmp_path, monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("twinflow evaluated the frozen teacher during training")

    student = trainable_copy(rf_teacher)  # the teacher only initialises the student
    reference(rf_teacher)  # the evaluation reference (teacher samples) is made beforehand
    monkeypatch.setattr(rf_teacher, "forward", no_teacher)
    out = distil(rf_teacher, "twinflow", *TWINFLOW_RF, tmp_path, student=student)
    monkeypatch.undo()
    assert out.learned(), out


def test_sabotage_twinflow_rectification_sign(rf_teacher, tmp_path, monkeypatch):
    honest = twinflow_mod.rectify_step

    def flipped(x0_pos, x0_neg, sigma, clamp):
        return -honest(x0_pos, x0_neg, sigma, clamp)  # towards the fake branch

    monkeypatch.setattr(twinflow_mod, "rectify_step", flipped)
    out = distil_or_diverge(rf_teacher, "twinflow", *TWINFLOW_RF, tmp_path)
    assert out is None or (not out.learned() and out.after > 0.8 * out.before), out


class TimeProbe(nn.Module):
    """net(x, time) = x * time / 1000: its output shows the network time it was given."""

    def forward(self, x, time, cond=None):
        return x * time[:, None] / 1000.0


def test_negative_time_negates_only_the_network_time():
    path = make_path("rectified_flow")
    d = ModuleDenoiser(TimeProbe(), path, "velocity")
    x, t = torch.randn(4, 2), torch.full((4,), 0.25)
    pos = d.predict(x, t, kind="x0")
    with negative_time(d):
        raw = d(x, t)
        neg = d.predict(x, t, kind="x0")
    torch.testing.assert_close(raw, -0.25 * x)  # the network saw -c_noise(t) = -250
    torch.testing.assert_close(neg, path.convert(-0.25 * x, "velocity", "x0", x, t))
    assert d.path is path and not torch.equal(pos, neg)  # restored afterwards


def test_twinflow_rectification_is_the_reference_velocity_gap():
    """On rectified flow the reference's step is clamp(v^- - v^+) with v = (x_t - x0) / t."""
    g = torch.Generator().manual_seed(0)
    x_t, x0_pos, x0_neg = (torch.randn(8, 2, generator=g) for _ in range(3))
    t = torch.rand(8, 1, generator=g) * 0.7 + 0.1
    v_pos, v_neg = (x_t - x0_pos) / t, (x_t - x0_neg) / t
    torch.testing.assert_close(
        rectify_step(x0_pos, x0_neg, t, clamp=1.0), (v_neg - v_pos).clamp(-1, 1)
    )


def test_twin_metric_barron_matches_the_reference_gradient():
    """Reference Barron-reweighted L2 (alpha = 1): mse_i * sg((mse_i / c^2 + 1)^-1/2) / c."""
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), 1e-3
    a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    mse = ((a1 - b) ** 2).mean(1)
    ref = (mse * ((mse / c**2 + 1.0) ** -0.5).detach() / c).mean()
    (g_ref,) = torch.autograd.grad(ref, a1)
    (g_ours,) = torch.autograd.grad(twin_metric(a2, b, "barron", c), a2)
    torch.testing.assert_close(2 * g_ours, g_ref)


def test_twinflow_rejects_bad_input(rf_teacher):
    with pytest.raises(ValueError, match="student_steps must be 1"):
        TwinFlow(rf_teacher, TwinFlowConfig(student_steps=2))
    edm = ModuleDenoiser(ToyMLP(time_scale=1.0), make_path("edm"), "x0")
    with pytest.raises(ValueError, match="network time"):
        TwinFlow(edm)
    obj = TwinFlow(rf_teacher)
    batch = Batch(x=None, cond=None, rng=StepRNG(0, 0, 0, 4, 0, 4), extras={"sample_shape": (2,)})
    with pytest.raises(ValueError, match="needs real data"):
        obj.losses({"student": trainable_copy(rf_teacher)}, batch, ["student"], 0)
    assert math.isclose(obj.config.rectify_weight, 0.5)
