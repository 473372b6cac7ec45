"""Compression next to step distillation: quantized distillation, Dense2MoE and KD-MI.

A compressed student keeps the teacher's sampler (here 10 Euler steps; the teacher's own
10-step samples sit at SW ~0.04 from its 50-step reference) unless it is combined with a
step-distillation objective. "Learns" means the distilled student's samples land far below
the compressed-but-undistilled one's (the 2-bit rounded network, the MoE before
distillation, a randomly initialised small network) and cover the ring's modes, and its
prediction error against the teacher falls below a fifth of the undistilled one's (a student
matched to the teacher at the wrong time passes the first check, not this one). Sabotage
tests break one piece (the straight-through estimator's sign, the MI term's sign) and check
that the criterion then fails; an MoE with random experts and no distillation is the
baseline Dense2MoE must beat.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.budgets2d import BUDGETS, small_student
from fewstep.core.metrics import sliced_wasserstein
from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives import dense2moe as moe_mod
from fewstep.core.objectives import get_objective
from fewstep.core.objectives import kd_mi as kd_mod
from fewstep.core.objectives import quantized as q_mod
from fewstep.core.paths import make_path
from fewstep.core.samplers import EulerSampler
from fewstep.core.suite2d import Budget, distil, reference, sample_with
from fewstep.core.toy import ToyData
from fewstep.core.training import NonFiniteLossError, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

# Budgets, each a few seconds on one core; checked over training seeds 0-2.
QUANT_RF = BUDGETS["quantized"]
QUANT_VP = QUANT_RF  # the same budget distils the eps-predicting VP teacher
QUANT_CD = Budget(  # quantised AND one-step: 3-bit student trained by consistency distillation
    objective={
        "bits": 3,
        "signal": "consistency",
        "signal_config": {"num_intervals": 10, "metric": "l2"},
    },
    train=dict(steps=200, batch_size=128, lr=2e-3, ema_decay=0.95),
)
MOE_RF = BUDGETS["dense2moe"]
KDMI_RF = BUDGETS["kd_mi"]
KDMI_MI_ONLY = Budget(  # the MI term alone (no prediction KD): does it raise the bound?
    objective={"sampler_steps": 10, "match_weight": 0.0, "mi_weight": 1.0},
    train=dict(steps=80, batch_size=128, lr=3e-3, ema_decay=0.0, log_every=10),
)


def example_batch(n: int = 128, seed: int = 0) -> Batch:
    rng = StepRNG(seed, 0, 0, global_size=n, offset=0, local_size=n)
    x, cond = ToyData("mixture")(rng)
    return Batch(x=x, cond=cond, rng=rng, extras={"sample_shape": (2,)})


def compressed(teacher, name: str, cfg: dict, student=None):
    """The compressed student before any training (as the trainer builds it for seed 0)."""
    cls = get_objective(name)
    obj = cls(teacher, cls.config_cls(**cfg))
    torch.manual_seed(0)
    student = student if student is not None else trainable_copy(teacher)
    return obj.build_roles(student, example_batch())["student"].eval()


def teacher_gap(student, teacher, n: int = 2048) -> float:
    """Relative prediction error E||s - T||^2 / E||T||^2 in the teacher's parameterization at
    fixed noised data (x_t, t), t uniform over the path: how close the compressed student
    stays to the teacher as a function, not only in its samples."""
    g = torch.Generator().manual_seed(7)
    x0 = ToyData("mixture").sample(n, g)
    t = teacher.path.fraction_to_t(torch.rand(n, generator=g))
    x_t = teacher.path.noise(x0, t, torch.randn(n, 2, generator=g))
    with torch.no_grad():
        want = teacher(x_t, t)
        return ((student(x_t, t) - want) ** 2).mean().item() / (want**2).mean().item()


def check_close_to_teacher(out, teacher, before):
    """The distilled student's prediction error fell below a fifth of the undistilled one's
    (a student matching the teacher at the wrong (x_t, t) lands above it, even where its
    samples still look fine)."""
    after = teacher_gap(out.trainer.sampling_denoiser(), teacher)
    ahead = teacher_gap(before, teacher)
    assert after < 0.2 * ahead, (after, ahead)


# ======================================================================= quantized


def test_quantize_matches_reference_and_gradients():
    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    points = torch.tensor([0.0, 0.2, 0.7, 1.0], requires_grad=True)
    q = q_mod.quantize(w, points, bits=2)
    up = torch.randn(3, 5)
    (q * up).sum().backward()
    ref_q = torch.empty(3, 5)
    w_, p_ = w.detach(), points.detach()
    ref_gp = torch.zeros(4)
    for c in range(3):
        lo, hi = float(w_[c].min()), float(w_[c].max())
        for j in range(5):
            v = (float(w_[c, j]) - lo) / (hi - lo)
            i = min(range(4), key=lambda k: abs(v - float(p_[k])))
            ref_q[c, j] = lo + (hi - lo) * float(p_[i])
            ref_gp[i] += (hi - lo) * float(up[c, j])  # dL/dp_i, differentiable quantization
    torch.testing.assert_close(q.detach(), ref_q)
    torch.testing.assert_close(w.grad, up)  # straight-through
    torch.testing.assert_close(points.grad, ref_gp)
    # uniform grid: round to (2^k - 1) levels; every channel keeps <= 2^k values
    qu = q_mod.quantize(w.detach(), None, bits=2, straight_through=False)
    for c in range(3):
        lo, hi = w[c].min(), w[c].max()
        levels = torch.round((w[c].detach() - lo) / (hi - lo) * 3) / 3
        torch.testing.assert_close(qu[c], lo + (hi - lo) * levels)
        assert torch.unique(qu[c]).numel() <= 4


def test_quantized_student_takes_2k_values_and_reports_size(rf_teacher):
    obj = q_mod.QuantizedDistillation(rf_teacher, q_mod.QuantizedConfig(bits=3))
    roles = obj.build_roles(trainable_copy(rf_teacher), example_batch())
    rep = obj.report(roles)
    assert rep["bits"] == 3 and rep["quantized_layers"] == 5
    assert rep["max_values_per_channel"] <= 2**3
    assert 5 < rep["compression"] < 32 / 3  # k-bit weights + float biases and scales
    # the trainer deep-copies students (EMA) and checkpoints state_dicts
    twin = obj.build_roles(trainable_copy(rf_teacher), example_batch())["student"]
    twin.load_state_dict(roles["student"].state_dict())
    x, t = torch.randn(4, 2), torch.full((4,), 500.0)
    torch.testing.assert_close(twin(x, t), roles["student"](x, t))
    with pytest.raises(ValueError, match="bits"):
        q_mod.QuantizedDistillation(rf_teacher, q_mod.QuantizedConfig(bits=0))
    with pytest.raises(ValueError, match="registered objective"):
        q_mod.QuantizedDistillation(rf_teacher, q_mod.QuantizedConfig(signal="nope"))


@pytest.mark.parametrize(
    ("teacher_name", "budget"),
    [("rf_teacher", QUANT_RF), ("vp_teacher", QUANT_VP)],
    ids=["rf", "vp"],
)
def test_quantized_distillation_learns(request, tmp_path, teacher_name, budget):
    teacher = request.getfixturevalue(teacher_name)
    out = distil(teacher, "quantized", budget.objective, budget.train, tmp_path)
    # before = the 2-bit rounded teacher (no distillation), sampled with 10 Euler steps
    assert out.learned(), out
    check_close_to_teacher(out, teacher, compressed(teacher, "quantized", budget.objective))
    student = out.trainer.sampling_denoiser()
    assert q_mod.distinct_values_per_channel(student) <= 4


def test_quantized_with_consistency_one_step(rf_teacher, tmp_path):
    out = distil(rf_teacher, "quantized", QUANT_CD.objective, QUANT_CD.train, tmp_path)
    assert out.trainer.objective.roles == ("student",)
    assert out.trainer.objective.student_sampler().times == [1.0]  # one step
    assert out.learned(), out
    assert q_mod.distinct_values_per_channel(out.trainer.sampling_denoiser()) <= 8


def test_quantized_composes_with_dmd2_roles(rf_teacher):
    cfg = q_mod.QuantizedConfig(
        bits=4, signal="dmd2", signal_config={"fake_updates_per_student": 2}
    )
    obj = q_mod.QuantizedDistillation(rf_teacher, cfg)
    assert obj.roles == ("student", "fake_score")
    assert obj.schedule(0) == ["student", "fake_score"] and obj.schedule(1) == ["fake_score"]
    roles = obj.build_roles(trainable_copy(rf_teacher), example_batch())
    losses, logs = obj.losses(roles, example_batch(), ["student", "fake_score"], 0)
    assert set(losses) == {"student", "fake_score"} and "dm_loss" in logs
    assert q_mod.quantized_layers(roles["student"]) and not q_mod.quantized_layers(
        roles["fake_score"]
    )


def test_sabotage_quantized_straight_through_sign(rf_teacher, tmp_path, monkeypatch):
    honest = q_mod.quantize

    def reversed_ste(w, points, bits, straight_through=True):
        return honest(w, points, bits, False) + (w.detach() - w)  # gradient -dL/dQ to w

    monkeypatch.setattr(q_mod, "quantize", reversed_ste)
    budget = {**QUANT_RF.train, "steps": 80}
    try:
        out = distil(rf_teacher, "quantized", QUANT_RF.objective, budget, tmp_path)
    except NonFiniteLossError:
        return
    assert not out.learned(), out
    assert out.after > out.before, out


def test_differentiable_quantization_moves_only_points(rf_teacher, tmp_path):
    cfg = {"bits": 2, "points": "learned", "train_weights": False, "sampler_steps": 10}
    obj = q_mod.QuantizedDistillation(rf_teacher, q_mod.QuantizedConfig(**cfg))
    train = TrainConfig(steps=20, batch_size=64, lr=1e-2, progress=False, resume=False)
    trainer = Trainer(obj, trainable_copy(rf_teacher), ToyData("mixture"), train, tmp_path)
    student = trainer.roles["student"]
    assert {n.rsplit(".", 1)[-1] for n, p in student.named_parameters() if p.requires_grad} == {
        "points"
    }
    layer = student.net.blocks[0]
    w0 = layer.parametrizations.weight.original.detach().clone()
    p0 = layer.parametrizations.weight[0].points.detach().clone()
    history = trainer.fit()
    torch.testing.assert_close(layer.parametrizations.weight.original, w0)
    assert not torch.equal(layer.parametrizations.weight[0].points, p0)
    assert history[-1]["match_loss"] < history[0]["match_loss"], history
    assert q_mod.distinct_values_per_channel(student) <= 4


RESUMABLE = {
    "quantized": {"bits": 3, "points": "learned"},
    "dense2moe": {"targets": ("net.blocks.*",)},
    "kd_mi": {},
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_is_exact(rf_teacher, tmp_path, name):
    cls = get_objective(name)

    def run(steps, out, resume):
        obj = cls(rf_teacher, cls.config_cls(**RESUMABLE[name]))
        cfg = TrainConfig(
            steps=steps, batch_size=32, lr=1e-3, progress=False, resume=resume, log_every=1
        )
        trainer = Trainer(obj, trainable_copy(rf_teacher), ToyData("mixture"), cfg, out)
        trainer.fit()
        return trainer

    straight = run(4, tmp_path / "a", False)
    run(2, tmp_path / "b", False)
    resumed = run(4, tmp_path / "b", True)
    for role, module in straight.roles.items():
        for (k, v), (k2, v2) in zip(
            module.state_dict().items(), resumed.roles[role].state_dict().items(), strict=True
        ):
            assert k == k2
            torch.testing.assert_close(v, v2, msg=f"{role}.{k}")


# ======================================================================= dense2moe


def test_switch_balance_loss_reference():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    topi = torch.tensor([[0], [1], [0], [2]])
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    p = probs.mean(0)
    expected = 3 * float((f * p).sum())  # Fedus et al. 2022, eq. 4
    assert moe_mod.switch_balance_loss(probs, topi).item() == pytest.approx(expected)
    uniform = torch.full((6, 3), 1 / 3)
    assert moe_mod.switch_balance_loss(uniform, torch.tensor([[0], [1], [2]] * 2)).item() == (
        pytest.approx(1.0)
    )


def _zero_router(layer):
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()


@pytest.mark.parametrize("kind", ["linear", "mlp", "gated"])
def test_moe_with_every_expert_active_equals_dense(kind):
    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(12, 5)
    elif kind == "mlp":
        dense = nn.Sequential(nn.Linear(5, 12), nn.GELU(), nn.Linear(12, 5))
    else:

        class Gated(nn.Module):  # GEGLU-style: one Linear gives value and gate halves
            def __init__(self):
                super().__init__()
                self.proj, self.out = nn.Linear(5, 24), nn.Linear(12, 5)

            def forward(self, x):
                v, g = self.proj(x).chunk(2, -1)
                return self.out(v * torch.nn.functional.gelu(g))

        dense = Gated()
    cfg = moe_mod.Dense2MoEConfig(targets=("x",), num_experts=3, top_k=3)
    layer = moe_mod.make_moe(dense, cfg, torch.rand(12), "cpu")
    _zero_router(layer)  # p = 1/E, so every gate is E p = 1
    x = torch.randn(7, 4, 12 if kind == "linear" else 5)
    torch.testing.assert_close(layer(x), dense(x))
    total, active = layer.parameter_counts()
    assert active == total  # top-k = E: everything runs
    cfg = moe_mod.Dense2MoEConfig(targets=("x",), num_experts=3, top_k=1, init="copy")
    layer = moe_mod.make_moe(dense, cfg, None, "cpu")
    _zero_router(layer)  # copies: the one selected copy gets weight (E / k) / E = 1
    torch.testing.assert_close(layer(x), dense(x))
    total, active = layer.parameter_counts()
    assert active < total / 2


def test_taylor_importance_reference(rf_teacher):
    student = trainable_copy(rf_teacher)
    batch = example_batch(32, seed=3)
    got = moe_mod.taylor_importance(student, ["net.blocks.0"], batch, repeats=1)["net.blocks.0"]
    # plain reference: same draws, the hidden activation h (input of blocks.0) as a leaf
    batch = example_batch(32, seed=3)
    path, net = rf_teacher.path, student.net
    t = path.sample_t(32, batch.rng.rand())
    eps = batch.rng.randn_like(batch.x)
    x_t = path.noise(batch.x, t, eps)
    emb = net.embed(path.network_time(t), None, 32)
    h = net.act(net.inp(x_t) + emb).detach().requires_grad_(True)
    out = net.out(net.act(net.blocks[1](net.act(net.blocks[0](h) + emb)) + emb))
    loss = ((out - path.from_x0_eps(batch.x, eps, "velocity", t)) ** 2).mean()
    (g,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(
        got, (h * g).abs().mean(0).detach()
    )  # Molchanov et al.'s Taylor criterion
    shared, experts = moe_mod.split_neurons(got, 4, 32)
    assert set(shared.tolist()) == set(got.argsort(descending=True)[:32].tolist())
    assert sorted(torch.cat([shared, *experts]).tolist()) == list(range(128))


def test_dense2moe_learns_and_beats_random_experts(rf_teacher, tmp_path):
    noise, ref, _ = reference(rf_teacher)
    cfg = MOE_RF.objective
    random_experts = compressed(rf_teacher, "dense2moe", {**cfg, "init": "random"})
    random_sw = sliced_wasserstein(sample_with(random_experts, EulerSampler(10), noise), ref)
    out = distil(rf_teacher, "dense2moe", cfg, MOE_RF.train, tmp_path)
    # before = the Taylor-initialised MoE, not distilled yet
    assert out.learned(), out
    check_close_to_teacher(out, rf_teacher, compressed(rf_teacher, "dense2moe", cfg))
    assert out.before < 0.6 * random_sw, (out, random_sw)  # the Taylor split keeps a lot
    assert out.after < 0.25 * random_sw, (out, random_sw)
    rep = out.trainer.objective.report(out.trainer.roles)
    assert rep["activated_params"] < 0.6 * rep["total_params"], rep
    assert any("balance_loss" in h for h in out.history)


def test_dense2moe_errors(rf_teacher):
    with pytest.raises(ValueError, match="needs targets"):
        moe_mod.Dense2MoE(rf_teacher)
    obj = moe_mod.Dense2MoE(rf_teacher, moe_mod.Dense2MoEConfig(targets=("net.nothing",)))
    with pytest.raises(ValueError, match="match no module"):
        obj.build_roles(trainable_copy(rf_teacher), example_batch())
    with pytest.raises(ValueError, match="top_k"):
        moe_mod.Dense2MoE(rf_teacher, moe_mod.Dense2MoEConfig(targets=("a",), top_k=5))


# =========================================================================== kd_mi


def _poole_reference(scores, log_q, alpha):
    """I_alpha written out with loops (Poole et al. 2019, leave-one-out baseline)."""
    k = scores.shape[0]
    s = scores.tolist()

    def a(i, j):  # baseline for y_i when x_j is left out of the multi-sample mean
        m = sum(math.exp(s[i][c]) for c in range(k) if c != j) / (k - 1)
        return alpha * m + (1 - alpha) * math.exp(float(log_q[i]))

    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    joint = sum(s[i][i] - math.log(a(i, j)) for i, j in pairs) / len(pairs)
    marg = sum(math.exp(s[i][j]) / a(i, i) for i, j in pairs) / len(pairs)
    return 1 + joint - marg


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mi_alpha_bound_reference(alpha):
    torch.manual_seed(0)
    scores = 3 * torch.randn(5, 5)
    log_q = torch.randn(5)
    got = kd_mod.mi_alpha_bound(scores, log_q, alpha).item()
    assert got == pytest.approx(_poole_reference(scores, log_q, alpha), rel=1e-5, abs=1e-5)
    # the leave-one-out mean stays finite when one score dominates
    big = torch.tensor([[60.0, 0.0, -1.0], [0.0, 60.0, 1.0], [2.0, 0.0, 60.0]])
    loo = kd_mod.log_loo_mean_exp(big)
    assert loo[0, 0].item() == pytest.approx(math.log((1 + math.exp(-1)) / 2), rel=1e-6)
    assert torch.isfinite(kd_mod.mi_alpha_bound(big, torch.zeros(3), alpha))


def test_kd_mi_small_student_learns(rf_teacher, tmp_path):
    student = small_student(rf_teacher)  # 64 wide vs the teacher's 128, random init
    out = distil(rf_teacher, "kd_mi", KDMI_RF.objective, KDMI_RF.train, tmp_path, student=student)
    assert out.learned(), out
    assert out.after < 0.25, out
    check_close_to_teacher(out, rf_teacher, small_student(rf_teacher))
    critic = out.trainer.roles["critic"]
    assert critic.g[0].in_features == 64 and critic.h[0].in_features == 128
    assert out.history[-1]["mi_bound"] > 3.0, out.history[-1]


class StudentMinimisesMI(kd_mod.KDMI):
    """Sabotage: the student descends the MI bound the critic ascends."""

    def aux_losses(self, roles, batch, update):
        losses, logs = super().aux_losses(roles, batch, update)
        losses["student"] = -losses["student"]
        return losses, logs


def mi_only_run(teacher, cls, out_dir, seed: int = 0) -> float:
    """Train a small student on the MI term alone (no KD); the bound at the end."""
    budget = KDMI_MI_ONLY
    obj = cls(teacher, cls.config_cls(**budget.objective))
    cfg = TrainConfig(**{**budget.train, "seed": seed, "progress": False, "resume": False})
    trainer = Trainer(obj, small_student(teacher), ToyData("mixture"), cfg, out_dir)
    history = trainer.fit()
    return history[-1]["mi_bound"]


def test_kd_mi_term_raises_the_bound_and_sabotage_lowers_it(rf_teacher, tmp_path):
    honest = mi_only_run(rf_teacher, kd_mod.KDMI, tmp_path / "honest")
    sabotaged = mi_only_run(rf_teacher, StudentMinimisesMI, tmp_path / "sabotaged")
    # log K = log 128 = 4.85 caps InfoNCE; the critic alone reaches ~3.7 on the features of a
    # fresh student, which already determine much of the teacher's (both see x_t and t). The
    # student ascending the bound keeps it there; descending it destroys the shared information.
    assert honest > 3.0, honest
    assert sabotaged < honest - 2.0, (honest, sabotaged)


def test_kd_mi_needs_features(rf_teacher):
    class Bare(nn.Module):
        def forward(self, x, t, cond=None):
            return x

    student = ModuleDenoiser(Bare(), make_path("rectified_flow"), "velocity")
    obj = kd_mod.KDMI(rf_teacher)
    with pytest.raises(ValueError, match="features from the student"):
        obj.build_roles(student, example_batch())
