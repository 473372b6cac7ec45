"""Guidance and preference objectives on the 2-D toys: guidance_distill, agd, pso, flash_dmd,
distillation_dpo.

Guidance: the one-pass student (guidance scale as an input) must reproduce the CFG teacher's
w-guided 50-step samples at two scales, far better than the unguided student does.
Preference: with the toy reward r(x) = y (prefer the upper half-plane) the student's mass must
move up by a clear margin while it stays on the ring (samples near a mode, modes covered).
Each objective also has a fixed-input check of its loss against the paper's equation written
out here, and sabotage tests (wrong guidance target, reversed preference signs) must fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.budgets2d import BUDGETS
from fewstep.core.metrics import mode_coverage
from fewstep.core.models import GuidedDenoiser, ModuleDenoiser, trainable_copy
from fewstep.core.objectives import agd as agd_mod
from fewstep.core.objectives import distillation_dpo as ddpo_mod
from fewstep.core.objectives import guidance_distill as gd_mod
from fewstep.core.objectives import pso as pso_mod
from fewstep.core.objectives.agd import AGD, AdaptedDenoiser, AGDConfig
from fewstep.core.objectives.distillation_dpo import DistillationDPO, distillation_dpo_loss
from fewstep.core.objectives.dmd2 import DMD2
from fewstep.core.objectives.flash_dmd import FlashDMD, FlashDMDConfig
from fewstep.core.objectives.guidance_distill import GuidanceDistillation, GuidanceDistillConfig
from fewstep.core.objectives.guidance_embed import FixedGuidance, GuidanceEmbedded, pack_guidance
from fewstep.core.objectives.preference import dpo_logistic, rank_pairs
from fewstep.core.objectives.pso import PSO, PSOConfig, pso_margin
from fewstep.core.paths import make_path
from fewstep.core.samplers import FewStepSampler
from fewstep.core.suite2d import (
    COVER_RADIUS,
    GUIDED_SCALES,
    MIN_MODES,
    distil,
    distil_guided,
    reference,
    sample_with,
)
from fewstep.core.toy import mixture_centers
from fewstep.core.training import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("single_thread")


def upper_half(x0, cond=None):
    """The toy reward: r(x) = y, higher in the upper half-plane."""
    return x0[:, 1]


def null_label(c):
    return torch.full_like(c, 8)


# Budgets: (objective config, train config). Checked over training seeds 0-2.
GD = BUDGETS["guidance_distill"].configs(50)
AGD_B = BUDGETS["agd"].configs(10)
FLASH_RF = BUDGETS["flash_dmd"].configs(1)
FLASH_2STEP = BUDGETS["flash_dmd"].configs(2)
DDPO_RF = BUDGETS["distillation_dpo"].configs(1)
DDPO_VP = BUDGETS["distillation_dpo"].configs(1, eps=True)
# PSO tunes a 2-step DMD2 student (distilled once per module; test_objectives_2d's budget)
DMD2_2STEP = BUDGETS["dmd2"].configs(2)
PSO_B = BUDGETS["pso"].configs(2)

W_EVAL = GUIDED_SCALES  # guidance scales the guided students are checked at


# ----------------------------------------------------------------------------- helpers


def tilt(x: torch.Tensor) -> dict:
    """Mean reward (y) and how much of the sample stays on the ring."""
    cov = mode_coverage(x, mixture_centers(), COVER_RADIUS)
    return {
        "reward": float(x[:, 1].mean()),
        "on_ring": cov["fraction_in_radius"],
        "covered": cov["covered"],
    }


def assert_tilted(out, baseline: dict, margin: float, on_ring: float):
    got = tilt(out.samples)
    assert got["reward"] > baseline["reward"] + margin, (got, baseline, out)
    assert got["on_ring"] > on_ring and got["covered"] >= MIN_MODES, (got, out)


def guided_run(base, objective_cls, budget, out_dir) -> dict:
    """SW to the CFG teacher at each scale in W_EVAL, before (the unguided student) and after
    (the EMA student at that scale)."""
    o = distil_guided(base, "", *budget, out_dir, objective_cls=objective_cls, scales=W_EVAL)
    return {
        "before": {w: s["sw"] for w, s in o.before.items()},
        "after": {w: s["sw"] for w, s in o.after.items()},
        "trainer": o.trainer,
    }


@pytest.fixture(scope="module")
def two_step_student(rf_teacher, tmp_path_factory):
    """A 2-step DMD2 student of the ring teacher (the starting point PSO tunes)."""
    threads = torch.get_num_threads()  # module fixtures run before the single_thread fixture
    torch.set_num_threads(1)
    try:
        out = distil(rf_teacher, "dmd2", *DMD2_2STEP, tmp_path_factory.mktemp("dmd2"))
    finally:
        torch.set_num_threads(threads)
    assert out.learned(), out
    return out.trainer.ema


# ----------------------------------------------------------- guidance: they learn


@pytest.mark.parametrize("cls", [GuidanceDistillation, AGD], ids=["guidance_distill", "agd"])
def test_guided_student_matches_cfg_teacher(cond_rf_teacher, tmp_path, cls):
    budget = GD if cls is GuidanceDistillation else AGD_B
    res = guided_run(cond_rf_teacher, cls, budget, tmp_path)
    for w in W_EVAL:
        assert res["after"][w] < 0.5 * res["before"][w], res
    if cls is AGD:  # only adapters were trained; the base is bit-identical to the teacher's
        student = res["trainer"].roles["student"]
        assert 0 < student.added_fraction() < 0.1
        for p, q in zip(student.base.parameters(), cond_rf_teacher.parameters(), strict=True):
            assert torch.equal(p, q)


def test_sabotage_guidance_target_ignores_scale(cond_rf_teacher, tmp_path, monkeypatch):
    honest = gd_mod.guided_prediction

    def conditional_only(base, null_cond, x_t, t, cond, w):
        return honest(base, null_cond, x_t, t, cond, torch.ones_like(w))  # target at w = 1

    monkeypatch.setattr(gd_mod, "guided_prediction", conditional_only)
    # the student starts equal to that target: loss and gradient are exactly zero, so a short
    # budget shows as much as the full one
    res = guided_run(
        cond_rf_teacher, GuidanceDistillation, (GD[0], {**GD[1], "steps": 60}), tmp_path
    )
    assert res["after"][5.0] > 0.8 * res["before"][5.0], res


# ------------------------------------------------------ guidance: fixed-input checks


class TinyNet(nn.Module):
    """net(x, time, cond) with a ``time_mlp`` whose output is added to the hidden layer."""

    def __init__(self):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(1, 4), nn.SiLU())
        self.inp, self.out = nn.Linear(2, 4), nn.Linear(4, 2)

    def forward(self, x, time, cond=None):
        h = self.inp(x) + self.time_mlp(time[:, None] / 1000)
        if cond is not None:
            h = h + cond.float()[:, None]
        return self.out(torch.tanh(h))


def tiny(seed=0, prediction="velocity"):
    torch.manual_seed(seed)
    return ModuleDenoiser(TinyNet(), make_path("rectified_flow"), prediction)


def make_batch(n=6, seed=3, with_x=True, cond=True):
    rng = StepRNG(seed, 0, 0, global_size=n, offset=0, local_size=n)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) if with_x else None
    c = torch.arange(n) % 3 if cond else None
    return Batch(x=x, cond=c, rng=rng, extras={"sample_shape": (2,)})


def test_guidance_embedding_starts_equal_and_adds_to_the_time_embedding():
    base = tiny()
    g = GuidanceEmbedded(base, default_scale=2.0)
    assert g.embed_module == "net.time_mlp"
    x, t, c = torch.randn(5, 2), torch.rand(5), torch.arange(5) % 3
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(g(x, t, pack_guidance(c, w)), base(x, t, c))
    nn.init.normal_(g.guidance_embedding.mlp[-1].weight)
    emb = g.guidance_embedding(w)
    net = base.net
    h = net.inp(x) + net.time_mlp(base.path.network_time(t)[:, None] / 1000) + emb + c[:, None]
    torch.testing.assert_close(g(x, t, pack_guidance(c, w)), net.out(torch.tanh(h)))
    # a plain condition uses the default scale; FixedGuidance packs its own
    torch.testing.assert_close(g(x, t, c), g(x, t, pack_guidance(c, 2.0)))
    torch.testing.assert_close(FixedGuidance(g, 4.0)(x, t, c), g(x, t, pack_guidance(c, 4.0)))


def test_guidance_distill_loss_matches_meng_eq5():
    base = tiny(0)
    teacher = GuidedDenoiser(base, 3.0, lambda c: torch.zeros_like(c))
    obj = GuidanceDistillation(teacher, GuidanceDistillConfig(scale_range=(1.0, 5.0)))
    roles = obj.build_roles(trainable_copy(tiny(1)), make_batch())
    nn.init.normal_(roles["student"].guidance_embedding.mlp[-1].weight)
    loss = obj.losses(roles, make_batch(), ["student"], 0)[0]["student"]
    # the same draws, in the objective's order: t, eps, w
    b = make_batch()
    t = base.path.sample_t(6, b.rng.rand())
    eps = b.rng.randn(2)
    w = 1.0 + 4.0 * b.rng.rand()
    x_t = (1 - t[:, None]) * b.x + t[:, None] * eps  # rectified flow
    cond_out, null_out = base(x_t, t, b.cond), base(x_t, t, torch.zeros_like(b.cond))
    target = null_out + w[:, None] * (cond_out - null_out)
    pred = roles["student"](x_t, t, {"cond": b.cond, "guidance": w})
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


def test_agd_trains_only_adapters_on_guided_trajectories(cond_rf_teacher):
    w = 2.5
    teacher = GuidedDenoiser(cond_rf_teacher, w, null_label)
    obj = AGD(teacher, AGDConfig(scale_range=(w, w), student_steps=6))
    batch = Batch(
        x=None,
        cond=torch.arange(8) % 8,
        rng=StepRNG(5, 0, 0, 8, 0, 8),
        extras={"sample_shape": (2,)},
    )
    roles = obj.build_roles(trainable_copy(cond_rf_teacher), batch)
    student = roles["student"]
    assert isinstance(student, AdaptedDenoiser)
    assert all(
        n.startswith(("encoder", "adapters"))
        for n, p in student.named_parameters()
        if p.requires_grad
    )
    assert student.targets == ["net.time_mlp.0", "net.blocks.0", "net.blocks.1"]
    x_t, t, ws, target = obj.trajectory_points(batch)
    # replay: the guided Euler (DDIM) trajectory from the same noise, states at every grid time
    replay = Batch(x=None, cond=batch.cond, rng=StepRNG(5, 0, 0, 8, 0, 8), extras=batch.extras)
    noise = replay.rng.randn(2)
    replay.rng.rand()  # the scale draw
    idx = replay.rng.randint(0, 6)
    grid = obj.student_sampler().grid(obj.path)
    x = obj.path.prior(noise)
    for i in range(6):
        here = idx == i
        torch.testing.assert_close(x_t[here], x[here])
        assert torch.all(t[here] == grid[i])
        with torch.no_grad():
            pred = teacher(x, torch.full((8,), float(grid[i])), batch.cond)
            torch.testing.assert_close(target[here], pred[here])
            x0, eps = obj.path.to_x0_eps(pred, "velocity", x, torch.full((8,), float(grid[i])))
            nxt = grid[i + 1]
            x = x0 if nxt is None else obj.path.noise(x0, torch.full((8,), float(nxt)), eps)
    torch.testing.assert_close(ws, torch.full((8,), w))
    # the adapted student starts exactly as the conditional base
    torch.testing.assert_close(
        student(x_t, t, pack_guidance(batch.cond, ws)), cond_rf_teacher(x_t, t, batch.cond)
    )


def test_guidance_objectives_reject_a_plain_teacher_and_bad_config(cond_rf_teacher):
    with pytest.raises(TypeError, match="GuidedDenoiser"):
        GuidanceDistillation(cond_rf_teacher)
    guided = GuidedDenoiser(cond_rf_teacher, 3.0, null_label)
    with pytest.raises(ValueError, match="scale_range"):
        AGD(guided, AGDConfig(scale_range=(5.0, 1.0)))
    with pytest.raises(ValueError, match="time-embedding"):
        GuidanceEmbedded(ModuleDenoiser(nn.Linear(2, 2), make_path("rectified_flow"), "x0"))


def test_guidance_embedding_on_diffusers_unets(tiny_unet):
    from fewstep.core.models import DiffusersUNetDenoiser

    unet = tiny_unet(11, attention=False)
    base = DiffusersUNetDenoiser(unet, make_path("rectified_flow"), "velocity")
    x, t, c = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    w = torch.tensor([1.0, 3.0, 5.0])
    for student in (
        GuidanceEmbedded(base),
        AdaptedDenoiser(base, agd_mod.adapter_targets(base, (), 16)),
    ):
        torch.testing.assert_close(student(x, t, pack_guidance(c, w)), base(x, t, c))
    g = GuidanceEmbedded(base)
    assert g.embed_module == "unet.time_embedding"
    nn.init.normal_(g.guidance_embedding.mlp[-1].weight)
    assert not torch.allclose(g(x, t, pack_guidance(c, w)), base(x, t, c))


# ---------------------------------------------------------- preference: they learn


def test_flash_dmd_one_step_learns_and_follows_the_reward(rf_teacher, tmp_path):
    out = distil(rf_teacher, "flash_dmd", *FLASH_RF, tmp_path, reward=upper_half)
    assert out.after < 0.6 * out.before, out
    _, ref, _ = reference(rf_teacher)
    assert_tilted(out, tilt(ref), margin=0.25, on_ring=0.4)


def test_flash_dmd_two_step_timestep_aware_gan(rf_teacher, tmp_path):
    out = distil(rf_teacher, "flash_dmd", *FLASH_2STEP, tmp_path, reward=upper_half)
    assert out.learned(), out
    logs = {k for rec in out.history for k in rec}
    assert {"gan_student", "dm_loss"} <= logs  # both halves of the step split were used


@pytest.mark.parametrize(
    ("teacher_name", "budget"), [("rf_teacher", DDPO_RF), ("vp_teacher", DDPO_VP)], ids=["rf", "vp"]
)
def test_distillation_dpo_learns_and_prefers(request, tmp_path, teacher_name, budget):
    teacher = request.getfixturevalue(teacher_name)
    out = distil(teacher, "distillation_dpo", *budget, tmp_path, reward=upper_half)
    assert out.learned(ratio=0.6, min_modes=MIN_MODES), out
    _, ref, _ = reference(teacher)
    assert_tilted(out, tilt(ref), margin=0.2, on_ring=0.3)


def test_pso_tunes_a_few_step_student_towards_the_reward(rf_teacher, two_step_student, tmp_path):
    noise, _, _ = reference(rf_teacher)
    base = tilt(sample_with(two_step_student, FewStepSampler.uniform(2), noise))
    out = distil(
        rf_teacher,
        "pso",
        *PSO_B,
        tmp_path,
        student=trainable_copy(two_step_student),
        reward=upper_half,
    )
    assert_tilted(out, base, margin=0.3, on_ring=0.9 * base["on_ring"])


# ----------------------------------------------------------- preference: sabotage


def test_sabotage_pso_reversed_preference(rf_teacher, two_step_student, tmp_path, monkeypatch):
    honest = pso_mod.rank_pairs

    def reversed_pairs(x_a, x_b, r_a, r_b):
        x_w, x_l, a_won = honest(x_a, x_b, r_a, r_b)
        return x_l, x_w, ~a_won

    monkeypatch.setattr(pso_mod, "rank_pairs", reversed_pairs)
    noise, _, _ = reference(rf_teacher)
    base = tilt(sample_with(two_step_student, FewStepSampler.uniform(2), noise))
    student = trainable_copy(two_step_student)
    out = distil(rf_teacher, "pso", *PSO_B, tmp_path, student=student, reward=upper_half)
    assert tilt(out.samples)["reward"] < base["reward"] + 0.1, out


@pytest.mark.slow  # a second sabotage of the same loss
def test_sabotage_distillation_dpo_public_code_signs(rf_teacher, tmp_path, monkeypatch):
    """The reference code's signs (winners pulled to the teacher, losers pushed away) lower the
    reward instead of raising it."""
    honest = ddpo_mod.dpo_logistic

    def reversed_weight(margin, beta, *args, **kwargs):
        loss, weight = honest(margin, beta, *args, **kwargs)
        return loss, -weight

    monkeypatch.setattr(ddpo_mod, "dpo_logistic", reversed_weight)
    try:
        out = distil(rf_teacher, "distillation_dpo", *DDPO_RF, tmp_path, reward=upper_half)
    except NonFiniteLossError:
        return
    _, ref, _ = reference(rf_teacher)
    assert tilt(out.samples)["reward"] < tilt(ref)["reward"] + 0.1, out


# --------------------------------------------------- preference: fixed-input checks


def test_rank_pairs_and_dpo_logistic():
    xa, xb = torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([[0.0, 3.0], [0.0, -1.0]])
    w, lo, a_won = rank_pairs(xa, xb, xa[:, 1], xb[:, 1])
    torch.testing.assert_close(w, torch.tensor([[0.0, 3.0], [0.0, 2.0]]))
    torch.testing.assert_close(lo, torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    assert a_won.tolist() == [False, True]
    m = torch.tensor([-1.0, 0.0, 2.0])
    loss, weight = dpo_logistic(m, 2.0)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(2.0 * m)))
    torch.testing.assert_close(weight, 2.0 * torch.sigmoid(-2.0 * m))


def test_distillation_dpo_loss_gradient():
    g = torch.Generator().manual_seed(0)
    x_w, x_l = (
        torch.randn(3, 4, 2, generator=g),
        torch.randn(3, 4, 2, generator=g),
    )  # (B, N, 3)-like
    rw, fw, rl, fl = (torch.randn(3, 4, 2, generator=g) for _ in range(4))
    margin, beta, lam = torch.tensor([0.5, -1.0, 0.0]), 2.0, 1.0
    x_w.requires_grad_(True)
    x_l.requires_grad_(True)
    loss, _ = distillation_dpo_loss(x_w, x_l, rw, fw, rl, fl, margin, beta, lam)
    loss.backward()
    # reference: dL/dx_k = a_k w_k (x0_fake - x0_real) / numel, w_k = 1 / mean|x_k - x0_real|,
    # a_w = lambda - c, a_l = lambda + c, c = beta sigma(-beta m)
    c = beta * torch.sigmoid(-beta * margin)[:, None, None]
    for x, real, fake, a in ((x_w, rw, fw, lam - c), (x_l, rl, fl, lam + c)):
        norm = 1 / (x.detach() - real).abs().mean(dim=(1, 2), keepdim=True)
        torch.testing.assert_close(x.grad, a * norm * (fake - real) / x.numel())


def test_pso_margin_matches_diffusion_dpo():
    x_w, x_l = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    pred_w, pred_l = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.0]])
    ref_w, ref_l = torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    # e = mean squared x0 error: e_theta(w) = 0.125, e_ref(w) = 0.5, e_theta(l) = 0.5, e_ref(l) = 0
    m = pso_margin(x_w, x_l, pred_w, pred_l, ref_w, ref_l)
    torch.testing.assert_close(m, torch.tensor([(0.5 - 0.125) - (0.0 - 0.5)]))
    # gradient of -log sigma(beta m) pulls the student's prediction to the winner
    pred_w = pred_w.clone().requires_grad_(True)
    loss, _ = dpo_logistic(pso_margin(x_w, x_l, pred_w, pred_l, ref_w, ref_l), 1.0)
    loss.sum().backward()
    assert pred_w.grad[0, 0] < 0  # descent increases pred_w[0] towards x_w[0] = 1


def test_flash_dmd_loss_is_dmd2_minus_weighted_reward(rf_teacher):
    seen = []

    def reward(x0, cond):
        seen.append(x0.detach())
        return x0[:, 1] - x0[:, 0] ** 2

    cfg = FlashDMDConfig(reward_weight=0.7, gan_weight=0.0)
    flash, dmd = FlashDMD(rf_teacher, cfg, reward=reward), DMD2(rf_teacher)
    student = trainable_copy(rf_teacher)
    roles = dmd.build_roles(student, make_batch(cond=False))
    batch = make_batch(cond=False)
    got = flash.losses(roles, batch, ["student"], 0)[0]["student"]
    want = dmd.losses(roles, make_batch(cond=False), ["student"], 0)[0]["student"]
    torch.testing.assert_close(got, want - 0.7 * reward(seen[0], None).mean())
    with pytest.raises(ValueError, match="reward"):
        FlashDMD(rf_teacher, cfg)
    with pytest.raises(ValueError, match="split_frac"):
        FlashDMD(rf_teacher, FlashDMDConfig(split_frac=1.5), reward=reward)


def test_preference_objectives_check_their_inputs(rf_teacher):
    with pytest.raises(ValueError, match="reward"):
        DistillationDPO(rf_teacher)
    with pytest.raises(ValueError, match="beta"):
        DistillationDPO(rf_teacher, ddpo_mod.DistillationDPOConfig(beta=0.0), reward=upper_half)
    with pytest.raises(ValueError, match="pairs"):
        PSO(rf_teacher, PSOConfig(pairs="both"), reward=upper_half)
    assert PSO(rf_teacher, PSOConfig(pairs="offline")).needs_data

    def bad(x0, cond):
        return x0  # (B, 2), not (B,)

    obj = DistillationDPO(rf_teacher, reward=bad)
    roles = obj.build_roles(trainable_copy(rf_teacher), make_batch(cond=False))
    with pytest.raises(ValueError, match=r"shape \(12,\)"):
        obj.losses(roles, make_batch(cond=False), ["fake_score"], 1)


def test_student_pairs_can_share_a_scaled_noise():
    """Distillation-DPO's code pairs noise with 1.1 * noise; by default the pair's noises are
    independent. An identity x0-student returns its (prior-scaled) start noise."""
    from fewstep.core.objectives.preference import student_pairs
    from fewstep.core.paths import make_path
    from fewstep.core.samplers import FewStepSampler

    student = ModuleDenoiser(nn.Identity(), make_path("rectified_flow"), "x0")
    student.forward = lambda x, t, cond=None: x  # x0-prediction = the input

    def pair(scale):
        batch = Batch(torch.zeros(4, 3), None, StepRNG(0, 0, 0, 4, 0, 4, "cpu"))
        x, _, _ = student_pairs(student, FewStepSampler(), batch, shared_noise_scale=scale)
        return x.chunk(2)

    a, b = pair(1.1)
    torch.testing.assert_close(b, 1.1 * a)
    a, b = pair(0.0)
    assert not torch.allclose(b, 1.1 * a) and not torch.allclose(a, b)


def test_distillation_dpo_can_rank_finished_samples():
    """``rank="finished"`` ranks and trains on the samples the student's sampler returns
    (Distillation-DPO's code, gradient through the last step: ``p_sample_with_final_step_grad``);
    the default ranks the x0-predictions at a random step. A toy x0-student whose prediction
    depends on the step time tells them apart."""
    from fewstep.core.objectives.preference import finished_samples

    net = nn.Linear(2, 2)
    student = ModuleDenoiser(net, make_path("rectified_flow"), "x0")
    student.forward = lambda x, t, cond=None: net(x) + 3 * t[:, None]  # x0-pred depends on t
    times = (1.0, 0.5, 0.2)
    seen = []

    def reward(x0, cond):
        seen.append(x0.detach().clone())
        return x0[:, 1]

    def batch():
        return Batch(torch.zeros(4, 2), None, StepRNG(0, 3, 0, 4, 0, 4, "cpu"))

    want, _ = finished_samples(student, FewStepSampler(times), batch(), copies=2)
    for rank in ("finished", "prediction"):
        cfg = ddpo_mod.DistillationDPOConfig(
            student_steps=len(times), student_times=times, rank=rank
        )
        x_w, x_l, _, _ = DistillationDPO(student, cfg, reward=reward).pairs(student, batch())
        if rank == "prediction":
            assert not torch.allclose(seen[-1], want)  # a random step's predictions
            continue
        torch.testing.assert_close(seen[-1], want)  # same draws: the very same samples
        assert torch.allclose(torch.cat([x_w, x_l]).detach().sort(0).values, want.sort(0).values)
        net.zero_grad()
        (x_w.sum() + x_l.sum()).backward()
        assert net.weight.grad.abs().sum() > 0  # gradient through the last step
    with pytest.raises(ValueError, match="rank must be"):
        DistillationDPO(student, ddpo_mod.DistillationDPOConfig(rank="best"), reward=reward)


# ------------------------- Distillation-DPO options: best-of-n pairs, gap filter, unscaled beta


def _toy_x0_student():
    """An x0-student whose prediction depends on its input and time (so it has gradient)."""
    net = nn.Linear(2, 2)
    student = ModuleDenoiser(net, make_path("rectified_flow"), "x0")
    student.forward = lambda x, t, cond=None: net(x) + 3 * t[:, None]
    return student, net


def test_distillation_dpo_best_vs_worst_of_n_candidates():
    """``candidates`` n > 2: the pair is the best and the worst of n completions per condition
    (the same draws ``student_candidates`` makes), predicted again with gradient; n = 2 keeps
    ``student_pairs``' draws exactly."""
    from fewstep.core.objectives.preference import best_worst, student_candidates, student_pairs

    student, net = _toy_x0_student()
    times = (1.0, 0.5)

    def batch():
        return Batch(torch.zeros(3, 2), None, StepRNG(0, 5, 0, 3, 0, 3, "cpu"))

    def reward(x0, cond):
        return x0[:, 1]

    cfg = ddpo_mod.DistillationDPOConfig(student_steps=2, student_times=times, candidates=4)
    obj = DistillationDPO(student, cfg, reward=reward)
    x_w, x_l, gap, r = obj.pairs(student, batch())
    x_t, t, cond = student_candidates(student, FewStepSampler(times), batch(), 4)
    with torch.no_grad():
        cands = student.predict(x_t, t, cond, kind="x0").reshape(4, 3, 2)
    best = cands[cands[..., 1].argmax(0), torch.arange(3)]
    worst = cands[cands[..., 1].argmin(0), torch.arange(3)]
    torch.testing.assert_close(x_w.detach(), best)
    torch.testing.assert_close(x_l.detach(), worst)
    torch.testing.assert_close(gap, best[:, 1] - worst[:, 1])
    assert (gap > 0).all() and r.shape == (12,)
    # wider than a random pair: the first two candidates' gap is never larger
    assert (gap >= (cands[0, :, 1] - cands[1, :, 1]).abs()).all()
    net.zero_grad()
    (x_w.sum() - x_l.sum()).backward()
    assert net.weight.grad.abs().sum() > 0  # the chosen pair carries gradient
    w, lo = best_worst(torch.tensor([0.0, 5.0, 2.0, 1.0, -1.0, 3.0]), 3)  # rows j * 2 + i
    assert w.tolist() == [2, 1] and lo.tolist() == [4, 3]
    # n = 2: the very draws of student_pairs (defaults unchanged)
    x2, _, _ = student_pairs(student, FewStepSampler(times), batch())
    x_t2, t2, c2 = student_candidates(student, FewStepSampler(times), batch(), 2)
    torch.testing.assert_close(x2, student.predict(x_t2, t2, c2, kind="x0"))
    with pytest.raises(ValueError, match="candidates"):
        DistillationDPO(student, ddpo_mod.DistillationDPOConfig(candidates=1), reward=reward)
    with pytest.raises(ValueError, match="shared_noise_scale"):
        DistillationDPO(
            student,
            ddpo_mod.DistillationDPOConfig(candidates=3, shared_noise_scale=1.1),
            reward=reward,
        )


def test_distillation_dpo_gap_filter_and_unscaled_beta_in_the_loss():
    """``pair_weight`` 0 leaves a pair only the DM term (lambda on both halves);
    ``scale_by_beta=False`` uses c = sigma(-beta m), which stays in (0, 1) for any beta."""
    g = torch.Generator().manual_seed(1)
    x_w, x_l = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    rw, fw, rl, fl = (torch.randn(3, 4, 2, generator=g) for _ in range(4))
    margin, beta, lam = torch.tensor([0.01, -0.02, 0.0]), 100.0, 1.0
    keep = torch.tensor([1.0, 0.0, 1.0])
    x_w.requires_grad_(True)
    x_l.requires_grad_(True)
    loss, logs = distillation_dpo_loss(
        x_w, x_l, rw, fw, rl, fl, margin, beta, lam, pair_weight=keep, scale_by_beta=False
    )
    loss.backward()
    c = (torch.sigmoid(-beta * margin) * keep)[:, None, None]
    for x, real, fake, a in ((x_w, rw, fw, lam - c), (x_l, rl, fl, lam + c)):
        norm = 1 / (x.detach() - real).abs().mean(dim=(1, 2), keepdim=True)
        torch.testing.assert_close(x.grad, a * norm * (fake - real) / x.numel())
    # the filtered pair (row 1): plain DMD on both halves, equal weights
    assert c[1].item() == 0.0 and 0.0 < c[0].item() < 0.5 < c[2].item() + 1e-6
    assert logs["margin_agree"] == pytest.approx(1 / 3)
    m = torch.tensor([-0.03, 0.0, 0.03])
    _, unscaled = dpo_logistic(m, 100.0, scale_by_beta=False)
    torch.testing.assert_close(unscaled, torch.sigmoid(-100.0 * m))
    _, scaled = dpo_logistic(m, 100.0)  # the default keeps DPO's beta sigma(-beta m)
    torch.testing.assert_close(scaled, 100.0 * unscaled)


def test_distillation_dpo_min_gap_drops_near_ties(rf_teacher):
    """``min_gap`` above every pair's reward gap: no pair keeps a preference weight, and the
    student loss is the DM term alone; ``min_gap`` 0 keeps every pair."""

    def reward(x0, cond):
        return x0[:, 1]

    def run(min_gap):
        obj = DistillationDPO(
            rf_teacher, ddpo_mod.DistillationDPOConfig(min_gap=min_gap), reward=reward
        )
        roles = obj.build_roles(trainable_copy(rf_teacher), make_batch(cond=False))
        _, logs = obj.losses(roles, make_batch(cond=False), ["student"], 0)
        return obj, logs

    obj, logs = run(1e9)
    assert logs["pref_kept"] == 0.0 and logs["dpo_weight"] == 0.0
    assert len(obj.pair_records) == 6  # (gap, margin) of each ranked pair is recorded
    gap = max(g for g, _ in obj.pair_records)
    _, logs = run(0.5 * gap)
    assert 0.0 < logs["pref_kept"] <= 1.0 and logs["dpo_weight"] > 0.0
    _, logs = run(0.0)
    assert "pref_kept" not in logs and logs["dpo_weight"] == pytest.approx(0.5, abs=0.05)
