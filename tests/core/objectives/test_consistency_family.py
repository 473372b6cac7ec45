"""The consistency family: Hyper-SD, SLAM, sCM, rCM and TBCM, and the TrigFlow view.

* ``trigflow``: the SNR-matched map between TrigFlow and any path (exact inverse, exact time
  derivative under forward-mode AD), and the TrigFlow view of a teacher, whose one-step
  sample is the teacher's own one-step jump.
* Fixed-input checks against the papers' equations written out by hand: sCM's tangent g and
  its loss gradient (a closed-form TrigFlow map of a rectified-flow net, df/dt by a central
  difference of f along the teacher's flow), exact vs finite-difference JVPs and exact vs
  ``torch.autograd.functional.jvp``; SLAM's sub-path noise level against the reference
  code's formula; Hyper-SD's segment targets; rCM's loss = sCM + lambda DMD; TBCM's pairs
  = the teacher's TrigFlow DDIM rollout along a stratified route.
* Learning on the 2-D suite (``suite2d.distil``): 1-step students on the rectified-flow
  teacher for every objective, 2-step sCM (exact JVP) and 2-segment Hyper-SD students, and
  Hyper-SD and SLAM on the discrete-VP eps teacher; sabotage runs (a flipped tangent, a
  flipped DMD gradient, reversed trajectory pairs, no teacher step, a mirrored sub-path end)
  that must fail. Hyper-SD resumes exactly across its stage switches.

sCM-family students take dF/dt by finite differences with a 1e-2 step in the learning runs:
ToyMLP's sinusoidal time features reach 100 cycles per unit time, so the exact tangent of a
copy of the toy teacher carries wiggles that a 1e-2 step averages out (with the exact tangent
and a 1e-3 learning rate the tangent norm grows without bound within 500 steps). One learning
run (the 2-step sCM student) uses the exact JVP.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.budgets2d import BUDGETS, CD_TRAIN, SCM_CFG, SCM_TRAIN
from fewstep.core.models import DiffusersUNetDenoiser, ModuleDenoiser, trainable_copy
from fewstep.core.objectives import dmd2 as dmd2_mod
from fewstep.core.objectives import get_objective
from fewstep.core.objectives import hyper_sd as hyper_sd_mod
from fewstep.core.objectives import scm as scm_mod
from fewstep.core.objectives import slam as slam_mod
from fewstep.core.objectives import tbcm as tbcm_mod
from fewstep.core.objectives.dmd2 import dmd_loss
from fewstep.core.objectives.hyper_sd import HyperSD, HyperSDConfig
from fewstep.core.objectives.rcm import RCM, RCMConfig
from fewstep.core.objectives.scm import SCM, SCMConfig, scm_tangent
from fewstep.core.objectives.slam import sub_path_point
from fewstep.core.objectives.tbcm import TBCM, TBCMConfig
from fewstep.core.objectives.trigflow import (
    TrigFlowDenoiser,
    angle_window,
    path_angle,
    path_time,
    to_path,
)
from fewstep.core.paths import RectifiedFlow, make_path
from fewstep.core.samplers import EulerSampler, FewStepSampler
from fewstep.core.suite2d import Budget, distil
from fewstep.core.toy import ToyData
from fewstep.core.training import NonFiniteLossError, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

SD_BETAS = {"schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

# ---------------------------------------------------------------------------- budgets
# Each a few seconds on one core; checked over training seeds 0-2 (SW ratio / modes):
# sCM 0.21-0.26 / 7-8, sCM 2-step 0.33-0.35 / 7-8, rCM 0.20-0.23 / 7-8, TBCM 0.18-0.23 / 8,
# Hyper-SD 0.17 (rf) and 0.34-0.36 (vp) / 7-8, 2 segments 0.21 / 8, SLAM 0.09 (rf) and
# 0.24-0.28 (vp) / 8. Sabotaged runs: 0.62-1.0 with 0 modes (Hyper-SD 0.38, 0 modes).
SCM_B = BUDGETS["scm"]
# 2-step: sCM's intermediate angle 1.1 (sec. 6) is fraction 0.7 of [0, pi/2]
SCM_2STEP = Budget(*BUDGETS["scm"].configs(2))
RCM_B = BUDGETS["rcm"]
TBCM_B = BUDGETS["tbcm"]
HYPER_SD_B = BUDGETS["hyper_sd"]
HYPER_SD_2SEG = Budget(*BUDGETS["hyper_sd"].configs(2))
SLAM_B = BUDGETS["slam"]


def run(teacher, name, budget: Budget, tmp_path, **kw):
    return distil(teacher, name, budget.objective, budget.train, tmp_path, **kw)


def batch_of(x, seed=0, step=0, cond=None, shape=(2,)):
    n = x.shape[0] if x is not None else 16
    rng = StepRNG(seed, step, 0, n, 0, n)
    return Batch(x=x, cond=cond, rng=rng, extras={"sample_shape": shape})


# ------------------------------------------------------------------------- TrigFlow map


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("rectified_flow", {}), ("vp_discrete", SD_BETAS), ("edm", {}), ("vp", {})],
)
def test_trigflow_map_matches_snr_and_time_derivative(name, kwargs):
    path, sd = make_path(name, **kwargs), 0.7
    lo, hi = angle_window(path, sd)
    angle = torch.linspace(lo, hi, 9)
    x0, eps = torch.randn(9, 2), torch.randn(9, 2)
    x_trig = torch.cos(angle)[:, None] * x0 + sd * torch.sin(angle)[:, None] * eps
    x_p, s = to_path(path, x_trig, angle, sd)
    # the same (x0, eps) at the path time with the same SNR
    torch.testing.assert_close(x_p, path.noise(x0, s, eps), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(path_angle(path, s, sd), angle, atol=1e-5, rtol=0)
    # forward-mode derivative of the inverse = 1 / (dangle/ds) by a central difference
    inner = angle[2:-2].double()
    _, ds = torch.func.jvp(lambda a: path_time(path, a, sd), (inner,), (torch.ones_like(inner),))
    h = 1e-4
    fd = (
        path_angle(path, path_time(path, inner, sd) + h, sd)
        - path_angle(path, path_time(path, inner, sd) - h, sd)
    ) / (2 * h)
    torch.testing.assert_close(ds, 1.0 / fd, rtol=2e-3, atol=0)


@pytest.mark.parametrize("teacher_name", ["rf_teacher", "vp_teacher"])
def test_trigflow_view_one_step_is_the_teachers_jump(request, teacher_name):
    teacher = request.getfixturevalue(teacher_name)
    view = TrigFlowDenoiser(teacher, sigma_data=1.0)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ours = FewStepSampler((1.0,)).sample(view, noise).x
    theirs = FewStepSampler((1.0,)).sample(teacher, noise).x
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # and its x0-prediction is sCM's f = cos t x - sin t sd F
    t = torch.full((64,), 0.9)
    f = view.predict(noise, t, kind="x0")
    ref = torch.cos(t)[:, None] * noise - torch.sin(t)[:, None] * 1.0 * view.F(noise, t)
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ sCM against the paper


class TinyVelocity(nn.Module):
    """A small rectified-flow velocity net v(x, s) with smooth time dependence."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(3, 16, generator=g, dtype=torch.float64) * 0.5)
        self.w2 = nn.Parameter(torch.randn(16, 2, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x, s, cond=None):
        h = torch.cat([x, s[:, None] / 1000.0], dim=1) @ self.w1  # RF network time = 1000 s
        return torch.tanh(h) @ self.w2


def reference_F(net, x, t, sd):
    """F(x, t) of a rectified-flow velocity net written out by hand: s with
    s / (1 - s) = sd tan t, x_p = x (1 - s) / cos t, x0 = x_p - s v, eps = x_p + (1 - s) v,
    F = (-sin t x0 + sd cos t eps) / sd."""
    tan = torch.tan(t)
    s = sd * tan / (1 + sd * tan)
    c = ((1 - s) / torch.cos(t))[:, None]
    x_p = c * x
    v = net(x_p, 1000.0 * s)
    x0 = x_p - s[:, None] * v
    eps = x_p + (1 - s)[:, None] * v
    return (-torch.sin(t)[:, None] * x0 + sd * torch.cos(t)[:, None] * eps) / sd


def scm_setup(sd=0.8, jvp_mode="exact", **cfg):
    net = TinyVelocity()
    student = ModuleDenoiser(net, RectifiedFlow(), "velocity")
    teacher = ModuleDenoiser(TinyVelocity(), RectifiedFlow(), "velocity").requires_grad_(False)
    obj = SCM(teacher, SCMConfig(sigma_data=sd, jvp_mode=jvp_mode, tangent_warmup=100, **cfg))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.linspace(0.2, 1.4, 6, dtype=torch.float64)
    dxdt = torch.randn(6, 2, generator=g, dtype=torch.float64)  # any teacher velocity
    return obj, net, student, x, t, dxdt


def test_scm_loss_and_gradient_match_the_paper():
    """r = 1: g = cos(t) df/dt along the teacher's flow dx/dt (sCM eq. 8 with w = 1/(sd tan
    t)), normalised by ||g|| + 0.1; loss ||F - F- - g||^2 / D, gradient -2 g dF/dtheta / D."""
    sd = 0.8
    obj, net, student, x, t, dxdt = scm_setup(sd)
    loss, logs = obj.scm_loss({"student": student}, x, t, dxdt, None, step=500)

    def f(x_, t_):  # sCM eq. 6, with the hand-written F
        return torch.cos(t_)[:, None] * x_ - torch.sin(t_)[:, None] * sd * reference_F(
            net, x_, t_, sd
        )

    h = 1e-5
    with torch.no_grad():
        dfdt = (f(x + h * dxdt, t + h) - f(x - h * dxdt, t - h)) / (2 * h)
    g = torch.cos(t)[:, None] * dfdt
    g_ref = g / (g.norm(dim=1, keepdim=True) + 0.1)
    assert logs["tangent_norm"] == pytest.approx(g.norm(dim=1).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(g_ref.pow(2).mean().item(), rel=1e-6)

    grads = torch.autograd.grad(loss, list(net.parameters()))
    F = reference_F(net, x, t, sd)
    surrogate = -2.0 * (g_ref * F).sum() / F.numel()  # -2/D g . F, averaged over the batch
    ref_grads = torch.autograd.grad(surrogate, list(net.parameters()))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_scm_tangent_warmup_matches_the_paper():
    """r < 1: g = -cos^2 t (sd F- - dx/dt) - r cos t sin t (x + sd dF-/dt) (sCM sec. 4.2),
    dF-/dt from torch.autograd.functional.jvp on the hand-written F."""
    sd, r = 0.8, 0.3
    obj, net, student, x, t, dxdt = scm_setup(sd, tangent_norm_c=0.0)
    _, logs = obj.scm_loss({"student": student}, x, t, dxdt, None, step=30)
    assert logs["r"] == pytest.approx(r)
    F_minus, dF = obj.tangent(obj.view(student), x, t, dxdt, None)
    with torch.no_grad():
        F = reference_F(net, x, t, sd)
    _, dFdt = torch.autograd.functional.jvp(
        lambda x_, t_: reference_F(net, x_, t_, sd), (x, t), (dxdt, torch.ones_like(t))
    )
    cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
    g_ref = -cos * cos * (sd * F - dxdt) - r * cos * sin * (x + sd * dFdt)
    g, _ = scm_tangent(F_minus, dxdt, x, dF, t, r, sd, 0.0)
    # (paths compute their coefficients in float32)
    torch.testing.assert_close(F_minus, F, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_scm_exact_and_finite_difference_tangents_agree(rf_teacher):
    obj, net, student, x, t, dxdt = scm_setup()
    view = obj.view(student)
    F1, d1 = obj.tangent(view, x, t, dxdt, None)
    obj.config.jvp_mode, obj.config.fd_eps = "finite_difference", 1e-3
    F2, d2 = obj.tangent(view, x, t, dxdt, None)
    torch.testing.assert_close(F1, F2)
    torch.testing.assert_close(d1, d2, rtol=1e-3, atol=1e-4)  # float32 path coefficients
    # the exact JVP through a toy denoiser equals torch.autograd.functional.jvp
    teacher = trainable_copy(rf_teacher)
    obj = SCM(rf_teacher, SCMConfig(sigma_data=1.0))
    view = obj.view(teacher)
    xs, ts = torch.randn(32, 2), torch.rand(32) * 1.4 + 0.1
    v = torch.randn(32, 2)
    _, dF = obj.tangent(view, xs, ts, v, None)
    cs = torch.cos(ts) * torch.sin(ts)
    _, ref = torch.autograd.functional.jvp(
        lambda a, b: view.F(a, b), (xs, ts), (cs[:, None] * v, cs)
    )
    torch.testing.assert_close(dF, ref, rtol=1e-4, atol=1e-5)
    obj.config.jvp_mode, obj.config.fd_eps = "finite_difference", 1e-3
    _, dF_fd = obj.tangent(view, xs, ts, v, None)
    assert (dF_fd - dF).norm() / dF.norm() < 0.05  # float32 and ToyMLP's fast time features


def test_scm_exact_jvp_through_a_diffusers_unet(tiny_unet):
    """A class-conditional UNet2DModel with attention (the digits teacher's family): the fused
    CPU attention kernel has no forward-mode rule, so exact JVPs run on the math backend."""
    unet = tiny_unet(4)
    student = DiffusersUNetDenoiser(unet, RectifiedFlow(), "velocity")
    obj = SCM(student, SCMConfig(sigma_data=0.5))
    x, dxdt = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t, cond = torch.tensor([0.3, 0.8, 1.3]), torch.tensor([0, 2, 3])
    F1, d1 = obj.tangent(obj.view(student), x, t, dxdt, cond)
    obj.config.jvp_mode, obj.config.fd_eps = "finite_difference", 1e-3
    F2, d2 = obj.tangent(obj.view(student), x, t, dxdt, cond)
    torch.testing.assert_close(F1, F2)
    assert (d1 - d2).norm() / d1.norm() < 5e-2  # float32; diffusers time features (1000 s)


def test_scm_adaptive_weighting_role():
    obj, net, student, x, t, dxdt = scm_setup(adaptive_weighting=True)
    assert obj.roles == ("student", "weighting") and SCM.roles == ("student",)
    roles = obj.build_roles(student, batch_of(x))
    loss, logs = obj.scm_loss(roles, x, t, dxdt, None, step=500)
    plain, _ = SCM(obj.teacher, SCMConfig(sigma_data=0.8, tangent_warmup=100)).scm_loss(
        roles, x, t, dxdt, None, step=500
    )
    # w_phi starts at 0: e^{-0} L + 0 = L; its gradient is 1 - L per sample
    assert loss.item() == pytest.approx(plain.item()) and logs["logvar"] == 0.0
    assert roles["weighting"].lin.bias.requires_grad


# --------------------------------------------------- Hyper-SD, SLAM, rCM, TBCM by hand


def test_hyper_sd_segment_targets_by_hand(rf_teacher):
    cfg = HyperSDConfig(
        num_intervals=8, segments=(4, 2), stage_steps=10, student_steps=2, metric="l2"
    )
    obj = HyperSD(rf_teacher, cfg)
    assert [obj.segments_at(s) for s in (0, 9, 10, 500)] == [4, 4, 2, 2]
    roles = obj.build_roles(trainable_copy(rf_teacher), None)
    x0 = torch.randn(64, 2)
    losses, logs = obj.losses(roles, batch_of(x0, seed=1, step=3), ["student"], step=3)
    loss = losses["student"]
    # replay the draws: step i -> i-1 of 8, boundary floor((i-1)/2)*2 (S = 4 segments)
    rng = StepRNG(1, 3, 0, 64, 0, 64)
    i = rng.randint(1, 9).float()
    t_hi, t_lo, t_b = i / 8, (i - 1) / 8, torch.floor((i - 1) / 2) * 2 / 8
    x_hi = (1 - t_hi)[:, None] * x0 + t_hi[:, None] * rng.randn(2)
    v = rf_teacher(x_hi, t_hi)
    x_lo = x_hi + (t_lo - t_hi)[:, None] * v  # Euler = DDIM on rectified flow

    def jump(model, x, t):  # x0 = x - t v, eps = x + (1 - t) v, re-noised at t_b
        u = model(x, t)
        return (1 - t_b)[:, None] * (x - t[:, None] * u) + t_b[:, None] * (x + (1 - t)[:, None] * u)

    with torch.no_grad():
        ref = (jump(roles["student"], x_hi, t_hi) - jump(roles["target"], x_lo, t_lo)).pow(2).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    assert logs["segments"] == 4.0
    # boundary condition: at t_lo = t_b the target is x_lo itself
    on_b = (i - 1) % 2 == 0
    j = jump(roles["target"], x_lo, t_lo)
    torch.testing.assert_close(j[on_b], x_lo[on_b], atol=1e-5, rtol=0)
    # S-segment sampling: DDIM jumps between the boundaries
    sampler = obj.segment_sampler(2)
    assert isinstance(sampler, EulerSampler) and sampler.times == [1.0, 0.5]


def test_hyper_sd_resume_across_stage_switches_is_exact(rf_teacher, tmp_path):
    cfg = HyperSDConfig(num_intervals=8, segments=(4, 2, 1), stage_steps=4, metric="l2")

    def trainer(out, steps, resume):
        tc = TrainConfig(steps=steps, batch_size=16, lr=1e-3, progress=False, resume=resume)
        obj = HyperSD(rf_teacher, cfg)
        return Trainer(obj, trainable_copy(rf_teacher), ToyData("mixture"), tc, out)

    straight = trainer(tmp_path / "a", 10, False)
    straight.fit()
    trainer(tmp_path / "b", 6, False).fit()  # stops (and checkpoints) inside stage 2
    resumed = trainer(tmp_path / "b", 10, True)
    assert resumed.step == 6
    resumed.fit()
    for role in ("student", "target"):
        a, b = straight.roles[role].state_dict(), resumed.roles[role].state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_slam_sub_path_noise_level_matches_reference_code():
    """The reference's predicted_origin_splam: sigma_gamma = sqrt((sigma_lo a_hi / a_lo)^2 +
    gamma^2 (1 - (a_hi / a_lo)^2)) on a VP path; the point keeps signal alpha(t_hi) x0."""
    path = make_path("vp_discrete", **SD_BETAS)
    t_hi = torch.tensor([999.0, 700.0, 300.0, 60.0])
    t_lo = t_hi - torch.tensor([100.0, 50.0, 100.0, 60.0])
    gamma = torch.tensor([0.9, 0.5, 0.2, 0.6])
    x0, e_hi, e_lo = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2)
    x_hi, x_lo = path.noise(x0, t_hi, e_hi), path.noise(x0, t_lo, e_lo)
    x, t = sub_path_point(path, x_hi, t_hi, x_lo, t_lo, gamma)
    a_hi, a_lo = path.alpha(t_hi), path.alpha(t_lo)
    s_lo = path.sigma(t_lo)
    sigma_ref = torch.sqrt((s_lo * a_hi / a_lo) ** 2 + gamma**2 * (1 - (a_hi / a_lo) ** 2))
    # same SNR at the returned time, and x rescaled from the reference's interpolation
    torch.testing.assert_close(path.alpha(t) / path.sigma(t), a_hi / sigma_ref, rtol=1e-4, atol=0)
    inter = gamma[:, None] * x_hi + (1 - gamma[:, None]) * x_lo * (a_hi / a_lo)[:, None]
    torch.testing.assert_close(x, inter * (path.alpha(t) / a_hi)[:, None], rtol=1e-4, atol=1e-5)
    assert bool((t > t_lo).all() and (t < t_hi).all())
    # the ends of the sub-path
    x1, t1 = sub_path_point(path, x_hi, t_hi, x_lo, t_lo, torch.ones(4))
    torch.testing.assert_close(x1, x_hi, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t1, t_hi, rtol=1e-4, atol=1e-3)
    x0_, t0_ = sub_path_point(path, x_hi, t_hi, x_lo, t_lo, torch.full((4,), 1e-7))
    torch.testing.assert_close(x0_, x_lo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t0_, t_lo, rtol=1e-4, atol=1e-2)


def test_rcm_loss_is_scm_plus_lambda_dmd(rf_teacher):
    cfg = dict(sigma_data=1.0, tangent_warmup=10, dmd_weight=0.7, fake_updates_per_student=3)
    obj = RCM(rf_teacher, RCMConfig(**cfg))
    assert [obj.schedule(s) for s in (0, 9, 10, 11, 13)] == [
        ["student"],
        ["student"],
        ["student", "fake_score"],
        ["fake_score"],
        ["student", "fake_score"],
    ]
    x0 = torch.randn(32, 2)
    roles = obj.build_roles(trainable_copy(rf_teacher), batch_of(x0))
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in roles["fake_score"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = list(roles["student"].parameters())
    losses, logs = obj.losses(roles, batch_of(x0, step=12), ["student"], step=12)
    g_rcm = torch.autograd.grad(losses["student"], student)
    scm_only = SCM(
        rf_teacher,
        SCMConfig(**{k: v for k, v in cfg.items() if k in ("sigma_data", "tangent_warmup")}),
    )
    l_scm, _ = scm_only.losses(roles, batch_of(x0, step=12), ["student"], step=12)
    g_scm = torch.autograd.grad(l_scm["student"], student)
    # replay the draws after sCM's (angle, noise): the 1-step student's sample from noise,
    # then DMD's time and noise; DMD's gradient wrt the sample is w (x0_fake - x0_real)
    rng = StepRNG(0, 12, 0, 32, 0, 32)
    rng.rand(), rng.randn(2)
    view = obj.view(roles["student"])
    z = rng.randn(2)
    x = view.predict(1.0 * z, torch.full((32,), math.pi / 2), kind="x0")
    t_d = 0.02 + 0.96 * rng.rand()
    x_d = (1 - t_d)[:, None] * x.detach() + t_d[:, None] * rng.randn(2)
    with torch.no_grad():
        x0_real = rf_teacher.predict(x_d, t_d, kind="x0")
        x0_fake = roles["fake_score"].predict(x_d, t_d, kind="x0")
        w = 1.0 / (x.detach() - x0_real).abs().mean(dim=1, keepdim=True)
    surrogate = (w * (x0_fake - x0_real) * x).sum() / x.numel()
    g_dmd = torch.autograd.grad(surrogate, student)
    for a, b, c in zip(g_rcm, g_scm, g_dmd, strict=True):
        torch.testing.assert_close(a, b + 0.7 * c, rtol=1e-4, atol=1e-7)
    assert logs["dm_loss"] == pytest.approx(dmd_loss(x, x0_real, x0_fake)[0].item(), rel=1e-4)


def test_tbcm_pairs_are_the_teachers_trajectory(rf_teacher):
    obj = TBCM(rf_teacher, TBCMConfig(sigma_data=1.0, route_steps=5))
    assert obj.needs_data is False
    batch = batch_of(None, seed=2)  # data-free: no x at all
    x_t, t, dxdt, cond = obj.training_points(None, batch)
    assert x_t.shape == (16 * 4, 2) and cond is None
    # the route: pi/2 first, then one angle inside each reference interval
    ref = path_angle(rf_teacher.path, torch.linspace(1.0, 0.0, 5), 1.0)
    route = obj.route(batch_of(None, seed=2))
    assert torch.allclose(route[:, 0], torch.full((16,), math.pi / 2))
    assert bool(((route[:, 1:] <= ref[:-1] + 1e-6) & (route[:, 1:] >= ref[1:] - 1e-6)).all())
    # replay: noise at pi/2, TBCM's update x <- cos(dt) x - sin(dt) dx/dt with the teacher's
    # TrigFlow velocity; every point after the first is a pair
    rng = StepRNG(2, 0, 0, 16, 0, 16)
    rng.rand(4)
    x = rng.randn(2)
    view = TrigFlowDenoiser(rf_teacher, 1.0)
    for i in range(5):
        v = view(x, route[:, i])
        if i > 0:
            sl = slice((i - 1) * 16, i * 16)
            torch.testing.assert_close(x_t[sl], x, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dxdt[sl], v, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(t[sl], route[:, i])
        if i < 4:
            dt = (route[:, i] - route[:, i + 1])[:, None]
            x = torch.cos(dt) * x - torch.sin(dt) * v
    # a conditional batch repeats its labels for every pair
    assert tbcm_mod.repeat_cond(torch.arange(3), 2).tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("scm", {"jvp_mode": "reverse"}),
        ("scm", {"sigma_data": 0.0}),
        ("rcm", {"fake_updates_per_student": 0}),
        ("tbcm", {"route_steps": 1}),
        ("hyper_sd", {"num_intervals": 10, "segments": (4, 2, 1)}),
        ("hyper_sd", {"segments": (2, 4)}),
        ("hyper_sd", {"segments": (4, 2), "num_intervals": 8, "student_steps": 1}),
        ("slam", {"endpoint_prob": 1.5}),
    ],
)
def test_bad_configs_are_rejected(rf_teacher, name, bad):
    cls = get_objective(name)
    with pytest.raises(ValueError):
        cls(rf_teacher, cls.config_cls(**bad))


def test_data_objectives_name_missing_data(rf_teacher):
    for name in ("scm", "hyper_sd", "slam"):
        cls = get_objective(name)
        obj = cls(
            rf_teacher, cls.config_cls(**({"num_intervals": 8} if name == "hyper_sd" else {}))
        )
        roles = obj.build_roles(trainable_copy(rf_teacher), batch_of(torch.zeros(4, 2)))
        with pytest.raises(ValueError, match="data"):
            obj.losses(roles, batch_of(None), ["student"], 0)


# ---------------------------------------------------------------------- they learn


def test_scm_one_step(rf_teacher, tmp_path):
    out = run(rf_teacher, "scm", SCM_B, tmp_path)
    assert out.learned(), out


def test_scm_two_step_exact_jvp(rf_teacher, tmp_path):
    out = run(rf_teacher, "scm", SCM_2STEP, tmp_path)
    assert out.learned(), out


def test_rcm_one_step(rf_teacher, tmp_path):
    out = run(rf_teacher, "rcm", RCM_B, tmp_path)
    assert out.learned(), out
    assert any("dm_loss" in h for h in out.history)


def test_tbcm_one_step_data_free(rf_teacher, tmp_path):
    out = run(rf_teacher, "tbcm", TBCM_B, tmp_path)
    assert out.learned(), out


@pytest.mark.parametrize("teacher_name", ["rf_teacher", "vp_teacher"], ids=["rf", "vp"])
def test_hyper_sd_one_step(request, tmp_path, teacher_name):
    out = run(request.getfixturevalue(teacher_name), "hyper_sd", HYPER_SD_B, tmp_path)
    assert out.learned(), out


def test_hyper_sd_two_segments_two_steps(rf_teacher, tmp_path):
    out = run(rf_teacher, "hyper_sd", HYPER_SD_2SEG, tmp_path)
    assert out.learned(), out


@pytest.mark.parametrize("teacher_name", ["rf_teacher", "vp_teacher"], ids=["rf", "vp"])
def test_slam_one_step(request, tmp_path, teacher_name):
    out = run(request.getfixturevalue(teacher_name), "slam", SLAM_B, tmp_path)
    assert out.learned(), out


# ----------------------------------------------------------------- sabotage must fail


def test_sabotage_scm_tangent_sign_flipped(rf_teacher, tmp_path, monkeypatch):
    honest = scm_mod.SCM.tangent

    def flipped(self, view, x_t, t, dxdt, cond):
        F_minus, dF = honest(self, view, x_t, t, dxdt, cond)
        return F_minus, -dF

    monkeypatch.setattr(scm_mod.SCM, "tangent", flipped)
    try:
        out = run(rf_teacher, "scm", Budget(SCM_CFG, {**SCM_TRAIN, "steps": 100}), tmp_path)
    except NonFiniteLossError:
        return
    assert not out.learned(), out


def test_sabotage_rcm_dmd_gradient_flipped(rf_teacher, tmp_path, monkeypatch):
    honest = dmd2_mod.dmd_loss  # the DM term every DMD-family objective shares (dm_term)

    def ascent(x, x0_real, x0_fake):
        loss, gnorm = honest(x, x0_real, x0_fake)
        return -loss, gnorm

    monkeypatch.setattr(dmd2_mod, "dmd_loss", ascent)
    budget = Budget({**RCM_B.objective, "dmd_weight": 5.0}, RCM_B.train)
    try:
        out = run(rf_teacher, "rcm", budget, tmp_path)
    except NonFiniteLossError:
        return
    assert not out.learned(), out


def test_sabotage_tbcm_reversed_trajectory(rf_teacher, tmp_path, monkeypatch):
    honest = tbcm_mod.TBCM.teacher_velocity

    def reversed_flow(self, x, t, cond):
        return -honest(self, x, t, cond)  # pairs from the time-reversed teacher ODE

    monkeypatch.setattr(tbcm_mod.TBCM, "teacher_velocity", reversed_flow)
    try:
        out = run(
            rf_teacher, "tbcm", Budget(TBCM_B.objective, {**TBCM_B.train, "steps": 100}), tmp_path
        )
    except NonFiniteLossError:
        return
    assert not out.learned(), out


def test_sabotage_hyper_sd_no_teacher_step(rf_teacher, tmp_path, monkeypatch):
    # x_{t_{i-1}} := x_{t_i}: only the boundary identities anchor the student (it drifts to
    # the identity map, whose one-step samples are the noise)
    monkeypatch.setattr(hyper_sd_mod.HyperSD, "teacher_step", lambda self, x, t, tn, c: x)
    out = run(rf_teacher, "hyper_sd", HYPER_SD_B, tmp_path)
    assert not out.learned(), out


def test_sabotage_slam_sub_path_endpoint_reflected(rf_teacher, tmp_path, monkeypatch):
    honest = slam_mod.sub_path_point

    def reflected(path, x_hi, t_hi, x_lo, t_lo, gamma):
        return honest(path, x_hi, t_hi, -x_lo, t_lo, gamma)  # the SL-ODE's lower end mirrored

    monkeypatch.setattr(slam_mod, "sub_path_point", reflected)
    out = run(rf_teacher, "slam", Budget(SLAM_B.objective, {**CD_TRAIN, "steps": 150}), tmp_path)
    assert not out.learned(), out
