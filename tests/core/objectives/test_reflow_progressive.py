"""Reflow, InstaFlow, SlimFlow and progressive distillation on the 2-D toys.

Each objective must learn a 1-step (progressive also a 2-step) student that beats the
untrained student by a wide margin and covers the ring's modes; reflow also on the discrete-VP
eps teacher. Fixed-input checks compare the losses and targets with references written here
from the papers' equations; sabotage tests break one piece (the coupling of the pairs, the
two-step target, the distillation target) and check that the learning criterion then fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.budgets2d import BUDGETS, small_student
from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives import instaflow as instaflow_mod
from fewstep.core.objectives import progressive as progressive_mod
from fewstep.core.objectives import reflow as reflow_mod
from fewstep.core.objectives.instaflow import InstaFlow
from fewstep.core.objectives.progressive import ProgressiveDistillation, two_step_target
from fewstep.core.objectives.reflow import Reflow, pair_noise, u_shaped_fraction
from fewstep.core.objectives.slimflow import SlimFlow, anneal_beta
from fewstep.core.paths import RectifiedFlow, VPDiscrete
from fewstep.core.samplers import EulerSampler
from fewstep.core.suite2d import MIN_MODES, Budget, distil, reference
from fewstep.core.toy import ToyData, ToyMLP, mixture_centers
from fewstep.core.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

# Budgets (objective config, train config). Pairs: 2048 teacher couplings from 8 Euler steps
# (their endpoints lie 0.07 from the 50-step reference's on average). Checked for seeds 0-2.
REFLOW = BUDGETS["reflow"]
INSTAFLOW = BUDGETS["instaflow"]
SLIMFLOW = BUDGETS["slimflow"]
PROGRESSIVE_1 = BUDGETS["progressive"]
PROGRESSIVE_2 = Budget(*BUDGETS["progressive"].configs(2))


def run(teacher, name, budget, tmp_path, **kw):
    return distil(teacher, name, budget.objective, budget.train, tmp_path, **kw)


def endpoint_gap(x, teacher):
    """Mean distance between samples from the reference noise and the teacher's 50-step ODE
    endpoints from the same noise."""
    _, ref, _ = reference(teacher)
    return (x - ref).norm(dim=1).mean().item()


# ------------------------------------------------------------------------ they learn


def test_reflow_one_step_and_straight(rf_teacher, tmp_path):
    out = run(rf_teacher, "reflow", REFLOW, tmp_path)
    assert out.learned(), out
    # Straightness: the reflowed student's one Euler step lands near the teacher's ODE
    # endpoint from the same noise; the un-reflowed flow's one step (the teacher's) does not.
    noise, _, _ = reference(rf_teacher)
    straight = endpoint_gap(out.samples, rf_teacher)
    curved = endpoint_gap(EulerSampler(1).sample(rf_teacher, noise).x, rf_teacher)
    assert straight < 0.25 * curved, (straight, curved)


def test_reflow_one_step_vp_eps(vp_teacher, tmp_path):
    out = run(vp_teacher, "reflow", REFLOW, tmp_path)
    assert out.learned(), out


def test_instaflow_one_step(rf_teacher, tmp_path):
    out = run(rf_teacher, "instaflow", INSTAFLOW, tmp_path)
    assert out.learned(), out
    assert any("distill_loss" in h for h in out.history), "stage 2 never ran"


def test_slimflow_smaller_student(rf_teacher, tmp_path):
    student = small_student(rf_teacher)
    out = run(rf_teacher, "slimflow", SLIMFLOW, tmp_path, student=student)
    ratio = out.trainer.objective.param_ratio
    assert ratio < 0.35, ratio
    assert out.learned(), out
    # a random small net's "before" is lenient (0.55): ask for teacher-like samples too
    assert out.after < 0.25, out


@pytest.mark.parametrize("budget", [PROGRESSIVE_1, PROGRESSIVE_2], ids=["1step", "2step"])
def test_progressive(rf_teacher, tmp_path, budget):
    out = run(rf_teacher, "progressive", budget, tmp_path)
    assert out.learned(), out


# ------------------------------------------------------------------ fixed-input checks


def test_u_shaped_density_shape():
    a = 4.0
    u = torch.rand(400_000, 2, generator=torch.Generator().manual_seed(0))
    f = u_shaped_fraction(u, a)
    assert f.min() > 0.0 and f.max() < 1.0
    hist = torch.histc(f, bins=20, min=0.0, max=1.0) / (len(f) / 20)  # density estimate
    mid = (torch.arange(20) + 0.5) / 20
    # p(f) = a (e^{af} + e^{a(1-f)}) / (2 (e^a - 1)) (Lee et al. 2024, rfpp t_dist.py)
    pdf = a * (torch.exp(a * mid) + torch.exp(a * (1 - mid))) / (2 * math.expm1(a))
    assert torch.allclose(hist, pdf, rtol=0.08), (hist, pdf)
    assert hist[0] > 3 * hist[10] and hist[-1] > 3 * hist[9]  # U-shaped: ends 3.4x the middle
    assert abs(hist[:10].sum() - hist[10:].sum()) < 0.02 * hist.sum()  # symmetric


class Affine(nn.Module):
    """net(x, time, cond) = x @ W + time * b: a hand-built network."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.tensor(w)), nn.Parameter(torch.tensor(b))

    def forward(self, x, time, cond=None):
        return x @ self.w + time[:, None] * self.b


def fixed_batch(n=5, seed=3):
    return Batch(None, None, StepRNG(seed, 0, 0, n, 0, n), {"sample_shape": (2,)})


def test_reflow_loss_fixed_input():
    path = RectifiedFlow(time_scale=1.0)
    net = Affine([[0.5, -0.2], [0.1, 0.9]], [0.3, -0.4])
    student = ModuleDenoiser(net, path, "velocity")
    z = torch.tensor([[1.0, -0.5], [0.2, 0.3], [-1.0, 2.0]])
    x0 = torch.tensor([[2.0, 0.0], [0.0, -2.0], [1.4, 1.4]])
    f = torch.tensor([0.1, 0.5, 0.95])
    # Liu et al. 2023 eq. 1: x_t = (1 - t) x0 + t z, target z - x0
    x_t = (1 - f[:, None]) * x0 + f[:, None] * z
    v = x_t @ net.w + f[:, None] * net.b
    err = v - (z - x0)
    c = 0.00054 * math.sqrt(2)
    expect = {
        "l2": (err**2).mean(),
        "huber": (torch.sqrt((err**2).sum(1) + c * c) - c).mean(),
    }
    for metric, ref in expect.items():
        obj = Reflow(rf_teacher_stub(path), Reflow.config_cls(metric=metric))
        loss, _ = obj.flow_loss(student, z, x0, None, f)
        assert torch.allclose(loss, ref, atol=1e-6), (metric, loss, ref)
    # feature-Huber (rfpp's LPIPS-Huber with a feature network): (1 - t) Huber(v) + Huber(F)
    obj = Reflow(rf_teacher_stub(path), Reflow.config_cls(metric="feature_huber"))
    obj.feature_fn = lambda x, cond: torch.cat([x, x.pow(2)], dim=1)
    loss, _ = obj.flow_loss(student, z, x0, None, f)
    x0_hat = x_t - f[:, None] * v
    fd = torch.cat([x0_hat, x0_hat**2], 1) - torch.cat([x0, x0**2], 1)
    cf = 0.00054 * 2.0  # sqrt(d) for 4 features
    feat = torch.sqrt((fd**2).sum(1) + cf * cf) - cf
    huber = torch.sqrt((err**2).sum(1) + c * c) - c
    assert torch.allclose(loss, ((1 - f) * huber + feat).mean(), atol=1e-6)
    # gradient flows to the student only
    loss.backward()
    assert net.w.grad is not None and net.w.grad.abs().sum() > 0


def rf_teacher_stub(path):
    return ModuleDenoiser(Affine([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]), path, "velocity")


def test_pair_noise_starts_where_the_sampler_starts():
    path = VPDiscrete(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    z, x0 = torch.randn(4, 2), torch.randn(4, 2)
    eps = pair_noise(path, z, x0)
    assert torch.allclose(path.noise(x0, torch.tensor(path.t_max), eps), path.prior(z), atol=1e-6)
    assert torch.equal(pair_noise(RectifiedFlow(), z, x0), z)


@pytest.mark.parametrize("path_name", ["rf", "vp"])
def test_progressive_target_is_two_ddim_steps(path_name):
    """alg. 2 of Salimans & Ho against DDIM steps written out by hand."""
    if path_name == "rf":
        path = RectifiedFlow(time_scale=1.0)
        teacher = ModuleDenoiser(Affine([[0.7, 0.2], [-0.3, 0.5]], [0.2, 0.1]), path, "velocity")
    else:
        path = VPDiscrete(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        teacher = ModuleDenoiser(Affine([[0.7, 0.2], [-0.3, 0.5]], [2e-4, 1e-4]), path, "eps")
    n = 8
    f = torch.tensor([1.0, 0.75, 0.5, 0.25])  # student grid 2i/n, i = 4, 3, 2, 1
    z_t = torch.tensor([[1.0, -1.0], [0.5, 0.2], [-0.3, 0.8], [0.9, 0.1]])
    with torch.no_grad():
        got = two_step_target(teacher, path, z_t, f, n, None)

    def coeff(frac):
        if frac == 0.0:
            return 1.0, 0.0  # the last step lands on clean data
        t = path.fraction_to_t(frac)
        return float(path.alpha(t)), float(path.sigma(t))

    for b in range(len(f)):
        fs = [f[b].item(), f[b].item() - 1 / n, f[b].item() - 2 / n]
        (a0, s0), (a1, s1), (a2, s2) = (coeff(x) for x in fs)
        z = z_t[b : b + 1]
        for (a, s), (an, sn), fr in [((a0, s0), (a1, s1), fs[0]), ((a1, s1), (a2, s2), fs[1])]:
            t = path.fraction_to_t(fr).reshape(1)
            x_hat = teacher.predict(z, t, kind="x0").detach()
            z = an * x_hat + (sn / s) * (z - a * x_hat)  # DDIM (alg. 2)
        ref = (z - (s2 / s0) * z_t[b]) / (a2 - (s2 / s0) * a0)
        assert torch.allclose(got[b], ref[0], atol=1e-4, rtol=1e-4), (b, got[b], ref)
        # one student DDIM step with x~ from z_t lands on the teacher's two-step point
        eps = (z_t[b] - a0 * got[b]) / s0
        assert torch.allclose(a2 * got[b] + s2 * eps, z[0], atol=1e-4, rtol=1e-4)


def test_progressive_truncated_snr_loss():
    path = RectifiedFlow(time_scale=1.0)
    teacher = ModuleDenoiser(Affine([[0.7, 0.2], [-0.3, 0.5]], [0.2, 0.1]), path, "velocity")
    student = ModuleDenoiser(Affine([[0.6, 0.1], [-0.2, 0.4]], [0.1, 0.3]), path, "velocity")
    obj = ProgressiveDistillation(teacher, ProgressiveDistillation.config_cls(teacher_steps=4))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-1.4, 1.4], [1.0, -1.0]])
    batch = Batch(x, None, StepRNG(0, 0, 0, 4, 0, 4))
    loss, _ = obj.losses({"student": student, "round_teacher": teacher}, batch, ["student"], 0)
    # replay the batch's draws: i ~ U{1..n/2}, then the noise
    rng = StepRNG(0, 0, 0, 4, 0, 4)
    f = 2.0 * rng.randint(1, 3).float() / 4
    z_t = (1 - f[:, None]) * x + f[:, None] * rng.randn(2)
    target = two_step_target(teacher, path, z_t, f, 4, None)
    x_hat = student.predict(z_t, f, kind="x0")
    w = torch.clamp((1 - f) ** 2 / f**2, min=1.0)  # max(SNR, 1)
    ref = (w * ((x_hat - target) ** 2).mean(1)).mean()
    assert torch.allclose(loss["student"], ref, atol=1e-6)


def test_slimflow_annealing_and_flow_guided_term():
    assert anneal_beta(0, 100, "cosine") == 1.0 and anneal_beta(100, 100, "cosine") == 0.0
    assert anneal_beta(50, 100, "linear") == 0.5 and anneal_beta(500, 100, "cosine") == 0.0
    path = RectifiedFlow(time_scale=1.0)
    reflowed = ModuleDenoiser(Affine([[0.7, 0.2], [-0.3, 0.5]], [0.2, 0.1]), path, "velocity")
    student = ModuleDenoiser(Affine([[0.6, 0.1], [-0.2, 0.4]], [0.1, 0.3]), path, "velocity")
    cfg = SlimFlow.config_cls(target_steps=2, guide_weight=0.5)
    obj = SlimFlow(reflowed, cfg)
    roles = {"student": student, "reflowed": reflowed}
    loss, _ = obj.distill_loss(roles, fixed_batch())
    # replay: z, then tau ~ U(0.2, 0.8); the authors' teacher_loss_new in our convention
    # (fraction 1 = noise): x_tau = z - (1 - tau) v_s(z, 1), x0 target = x_tau - tau v_2(x_tau)
    rng = fixed_batch().rng
    z = rng.randn(2)
    tau = 0.2 + 0.6 * rng.rand()
    one = torch.ones(5)
    v_s = student(z, one)
    x0_s = z - v_s
    x_half = z - 0.5 * reflowed(z, one)  # 2 Euler steps of v_2: 1 -> 0.5 -> 0
    ode = x_half - 0.5 * reflowed(x_half, 0.5 * one)
    x_tau = z - (1 - tau[:, None]) * v_s
    guide = x_tau - tau[:, None] * reflowed(x_tau, tau)
    ref = ((x0_s - ode) ** 2).mean() + 0.5 * ((x0_s - guide) ** 2).mean()
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)


def test_instaflow_switches_stage_and_freezes_the_reflowed_flow():
    path = RectifiedFlow(time_scale=1.0)
    teacher = rf_teacher_stub(path)
    obj = InstaFlow(teacher, InstaFlow.config_cls(num_pairs=16, pair_steps=2, reflow_steps=3))
    student = trainable_copy(
        ModuleDenoiser(Affine([[0.6, 0.1], [0.2, 0.4]], [0.1, 0.3]), path, "velocity")
    )
    roles = obj.build_roles(student, fixed_batch())
    assert obj.stage(2) == "reflow" and obj.stage(3) == "distill"
    with torch.no_grad():
        student.net.w.add_(1.0)
    obj.after_update(roles, ["student"], 1)
    assert not torch.equal(roles["reflowed"].net.w, student.net.w)
    obj.after_update(roles, ["student"], 2)  # last reflow step: freeze
    assert torch.equal(roles["reflowed"].net.w, student.net.w)
    assert not roles["reflowed"].net.w.requires_grad


def test_conditional_pairs_carry_labels(cond_rf_teacher):
    obj = Reflow(cond_rf_teacher, Reflow.config_cls(num_pairs=512, pair_steps=8, solver="euler"))
    labels = torch.arange(64) % 8
    example = Batch(None, labels, StepRNG(0, 0, 0, 64, 0, 64), {"sample_shape": (2,)})
    pairs = obj.build_roles(trainable_copy(cond_rf_teacher), example)["pairs"]
    assert pairs.cond.shape == (512,) and set(pairs.cond.tolist()) == set(range(8))
    nearest = torch.cdist(pairs.x0, mixture_centers()).argmin(1)
    assert (nearest == pairs.cond).float().mean() > 0.9  # each pair lands on its label's mode
    z, x0, cond = pairs.draw(torch.tensor([3, 7]))
    assert torch.equal(cond, pairs.cond[[3, 7]]) and torch.equal(x0, pairs.x0[[3, 7]])


def test_feature_huber_uses_the_teacher_features(rf_teacher):
    obj = Reflow(rf_teacher, Reflow.config_cls(metric="feature_huber", num_pairs=8, pair_steps=2))
    student = trainable_copy(rf_teacher)
    roles = obj.build_roles(student, fixed_batch())
    z, x0, _ = roles["pairs"].draw(torch.arange(8))
    loss, logs = obj.flow_loss(student, z, x0, None, torch.full((8,), 0.5))
    loss.backward()
    assert logs["feature_huber"] > 0 and torch.isfinite(loss)
    plain = ModuleDenoiser(ToyMLP(), rf_teacher.path, "velocity")  # exposes no features
    with pytest.raises(ValueError, match="feature_fn"):
        Reflow(plain, Reflow.config_cls(metric="feature_huber")).build_roles(plain, fixed_batch())


def test_online_pairs_are_teacher_solutions_of_the_batch_noise(rf_teacher):
    obj = Reflow(rf_teacher, Reflow.config_cls(online=True, pair_steps=4, solver="euler"))
    assert "pairs" not in obj.build_roles(trainable_copy(rf_teacher), fixed_batch())
    z, x0, _ = obj.draw_pairs({}, fixed_batch(), 0)
    assert torch.equal(z, fixed_batch().rng.randn(2))
    assert torch.allclose(x0, EulerSampler(4).sample(rf_teacher, z).x)


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("progressive", {"teacher_steps": 8, "round_steps": 3}),
        ("instaflow", {"num_pairs": 64, "pair_steps": 2, "reflow_steps": 4, "target_steps": 2}),
    ],
)
def test_resume_across_a_stage_boundary(rf_teacher, tmp_path, name, cfg):
    """The frozen round teacher / reflowed flow are checkpointed: stopping after a switch
    and resuming gives the uninterrupted run's weights."""
    from fewstep.core.objectives import get_objective

    cls = get_objective(name)

    def trainer(out, steps):
        tc = TrainConfig(steps=steps, batch_size=16, lr=1e-3, progress=False, log_every=1)
        return Trainer(
            cls(rf_teacher, cls.config_cls(**cfg)), trainable_copy(rf_teacher), ToyData(), tc, out
        )

    full = trainer(tmp_path / "full", 8)
    full.fit()
    trainer(tmp_path / "cut", 5).fit()  # stops after the first switch (step 3 or 4)
    resumed = trainer(tmp_path / "cut", 8)
    assert resumed.step == 5
    resumed.fit()
    for role, module in full.roles.items():
        for (k, v), (_, w) in zip(
            module.state_dict().items(), resumed.roles[role].state_dict().items(), strict=True
        ):
            assert torch.equal(v, w), (role, k)


def test_bad_configs_are_named():
    path = RectifiedFlow()
    t = rf_teacher_stub(path)
    with pytest.raises(ValueError, match="power of two"):
        ProgressiveDistillation(t, ProgressiveDistillation.config_cls(teacher_steps=6))
    with pytest.raises(ValueError, match="metric"):
        Reflow(t, Reflow.config_cls(metric="lpips"))
    with pytest.raises(ValueError, match="one-step"):
        InstaFlow(t, InstaFlow.config_cls(student_steps=2))
    with pytest.raises(ValueError, match="real data"):
        obj = ProgressiveDistillation(t)
        obj.losses({"student": t}, fixed_batch(), ["student"], 0)


# ----------------------------------------------------------------- sabotage must fail


def test_sabotage_reflow_independent_coupling(rf_teacher, tmp_path, monkeypatch):
    honest = Reflow.draw_pairs

    def shuffled(self, roles, batch, step):
        z, x0, cond = honest(self, roles, batch, step)
        return z.roll(1, dims=0), x0, cond  # noise paired with another pair's sample

    monkeypatch.setattr(Reflow, "draw_pairs", shuffled)
    out = run(rf_teacher, "reflow", REFLOW, tmp_path)
    # flow matching on an independent coupling: curved, so one step lands near the mean
    assert not out.learned(), out
    assert endpoint_gap(out.samples, rf_teacher) > 1.0


def test_sabotage_instaflow_target_from_other_noise(rf_teacher, tmp_path, monkeypatch):
    honest_grid = instaflow_mod.euler_grid

    class Shuffled:
        def __init__(self, sampler):
            self.sampler = sampler

        def sample(self, model, z, cond=None):
            return self.sampler.sample(model, z.roll(1, dims=0), cond)

    monkeypatch.setattr(instaflow_mod, "euler_grid", lambda *a: Shuffled(honest_grid(*a)))
    monkeypatch.setattr(reflow_mod, "pair_noise", lambda path, z, x0: z.roll(1, dims=0))
    out = run(rf_teacher, "instaflow", INSTAFLOW, tmp_path)
    assert not out.learned(), out


def test_sabotage_progressive_one_teacher_step(rf_teacher, tmp_path, monkeypatch):
    honest = progressive_mod.two_step_target

    def one_step(teacher, path, z_t, f, n, cond):
        return honest(teacher, path, z_t, f, 2 * n, cond)  # one teacher step, not two

    monkeypatch.setattr(progressive_mod, "two_step_target", one_step)
    out = run(rf_teacher, "progressive", PROGRESSIVE_1, tmp_path)
    # the student only ever learns the round teacher's own step size: the steps never halve
    assert not out.learned(), out
    assert out.covered < MIN_MODES, out
