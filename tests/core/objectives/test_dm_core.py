"""Distribution matching, core family: DMD, VSD, SiD (few-step, LSG / Zero- / Anti-CFG),
f-distill and Uni-Instruct.

Three kinds of test: (1) each objective distils a toy teacher on CPU in a few seconds and
must beat the untrained student by the suite's criterion (``Outcome.learned``); (2) its math
matches a plain reference written here from the paper's equations: exact references on
Gaussians for Uni-Instruct (the expanded f-divergence's gradient, and its reduction to the
DMD / Diff-Instruct / f-distill gradient), hand-computed values elsewhere; (3) sabotage:
a flipped sign or a dropped term must make the same check fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.budgets2d import BUDGETS
from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives import dmd2 as dmd2_mod
from fewstep.core.objectives import sid as sid_mod
from fewstep.core.objectives import vsd as vsd_mod
from fewstep.core.objectives.classifier_free import guided_predict
from fewstep.core.objectives.dmd import DMD, DMDConfig, regression_loss
from fewstep.core.objectives.dmd2 import dmd_loss
from fewstep.core.objectives.f_distill import (
    DIVERGENCES,
    FDistill,
    FDistillConfig,
    FDivergence,
    density_ratio,
    f_weights,
    get_divergence,
)
from fewstep.core.objectives.sid import SiD, SiDConfig, sid_generator_loss
from fewstep.core.objectives.uni_instruct import (
    UniInstruct,
    UniInstructConfig,
    uni_instruct_terms,
)
from fewstep.core.objectives.vsd import VSD, VSDConfig, lora_critic, vsd_loss, vsd_weight
from fewstep.core.paths import RectifiedFlow, VPDiscrete
from fewstep.core.suite2d import distil, reference
from fewstep.core.toy import ToyData, mixture_centers
from fewstep.core.training import NonFiniteLossError, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

# Budgets (objective config, train config), each a few seconds on one core; checked over
# training seeds 0-2. SiD and Uni-Instruct back-propagate through both score networks and
# take a smaller student learning rate than the DMD family.
FAST_FAKE = {"fake_score": 3e-3}
DMD_RF = BUDGETS["dmd"].configs(1)
# the eps student's x0 = (x - sigma eps) / alpha amplifies its output (see test_objectives_2d)
DMD_VP = BUDGETS["dmd"].configs(1, eps=True)
VSD_RF = BUDGETS["vsd"].configs(1)
SID_RF = BUDGETS["sid"].configs(1)
SID_RF_2STEP = BUDGETS["sid"].configs(2)
F_DISTILL_RF = BUDGETS["f_distill"].configs(1)
UNI_INSTRUCT_RF = BUDGETS["uni_instruct"].configs(1)
# class-conditional SiD from a conditional teacher (label 8 = null); alpha = 1 and a larger
# null-condition rate keep the guided fake score stable over a short budget
SID_COND = dict(steps=150, batch_size=128, lr=2e-4, role_lr=FAST_FAKE, ema_decay=0.95)
SID_COND_CFG = {"alpha": 1.0, "null_label": 8, "fake_cond_dropout": 0.3}


# ------------------------------------------------------------------------ they learn


@pytest.mark.parametrize(
    ("name", "budget"),
    [
        ("dmd", DMD_RF),
        ("vsd", VSD_RF),
        ("sid", SID_RF),
        ("f_distill", F_DISTILL_RF),
        ("uni_instruct", UNI_INSTRUCT_RF),
    ],
)
def test_one_step_rf(rf_teacher, tmp_path, name, budget):
    out = distil(rf_teacher, name, *budget, tmp_path)
    assert out.learned(), out


def test_dmd_one_step_vp_eps_teacher(vp_teacher, tmp_path):
    out = distil(vp_teacher, "dmd", *DMD_VP, tmp_path)
    assert out.learned(), out


def test_sid_two_step_uniform_mixture(rf_teacher, tmp_path):
    out = distil(rf_teacher, "sid", *SID_RF_2STEP, tmp_path)
    assert out.learned(), out


def _class_projection(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean coordinate of each sample along its own class's mode direction (the ring's
    radius is 2). Classifier-free guidance raises it: a noised sample's class evidence
    log p(c | x_t) grows with x_t . centre_c, so guided samples move away from the other
    classes' common centroid (the teacher's 50-step samples: 2.00 unguided, 2.10 at w = 2,
    2.26 at w = 4)."""
    centres = mixture_centers()[labels]
    return float((x * centres / centres.norm(dim=1, keepdim=True)).sum(1).mean())


def test_sid_zero_and_anti_cfg_guide_the_student(cond_rf_teacher, tmp_path):
    """Zero-CFG (fake score without the label) and Anti-CFG (fake score guided with a
    negative scale) push the student along its label as CFG does, without any CFG in the
    teacher; plain SiD from the same conditional teacher stays where the teacher is."""
    _, ref, labels = reference(cond_rf_teacher)
    proj = {}
    for guidance in ("none", "zero_cfg", "anti_cfg"):
        cfg = {**SID_COND_CFG, "guidance": guidance, "anti_scale": -0.5}
        out = distil(cond_rf_teacher, "sid", cfg, SID_COND, tmp_path / guidance)
        nearest = torch.cdist(out.samples, mixture_centers()).argmin(1)
        assert (nearest == labels).float().mean() > 0.95, (guidance, out)  # labels kept
        proj[guidance] = _class_projection(out.samples, labels)
    assert abs(proj["none"] - _class_projection(ref, labels)) < 0.1, proj
    assert proj["zero_cfg"] > proj["none"] + 0.2, proj  # measured: +0.48 to +0.52
    assert proj["anti_cfg"] > proj["none"] + 0.15, proj  # measured: +0.26 to +0.35


# ----------------------------------------------------------------- sabotage must fail


def _fails(run) -> None:
    try:
        out = run()
    except NonFiniteLossError:
        return  # diverged: it certainly did not learn
    assert not out.learned(), out
    assert out.after > 0.8 * out.before, out


def test_sabotage_sid_loss_sign(rf_teacher, tmp_path, monkeypatch):
    honest = sid_mod.sid_generator_loss
    monkeypatch.setattr(sid_mod, "sid_generator_loss", lambda *a: -honest(*a))
    budget = {**SID_RF[1], "steps": 100}
    _fails(lambda: distil(rf_teacher, "sid", SID_RF[0], budget, tmp_path))


def test_sabotage_dmd_gradient_sign_despite_regression(rf_teacher, tmp_path, monkeypatch):
    """With the distribution-matching gradient reversed the regression term (lambda_reg =
    0.25) does not rescue the student: the DM gradient carries the method."""
    honest = dmd2_mod.dmd_loss  # the DM term every DMD-family objective shares (dm_term)

    def ascent(x, x0_real, x0_fake):
        loss, gnorm = honest(x, x0_real, x0_fake)
        return -loss, gnorm

    monkeypatch.setattr(dmd2_mod, "dmd_loss", ascent)
    _fails(lambda: distil(rf_teacher, "dmd", *DMD_RF, tmp_path))


def test_sabotage_vsd_teacher_and_critic_swapped(rf_teacher, tmp_path, monkeypatch):
    honest = vsd_mod.vsd_loss
    monkeypatch.setattr(vsd_mod, "vsd_loss", lambda x, er, ef, w: honest(x, ef, er, w))
    budget = {**VSD_RF[1], "steps": 100}
    _fails(lambda: distil(rf_teacher, "vsd", VSD_RF[0], budget, tmp_path))


# ------------------------------------------------------------- fixed-input references


def _batch(n: int, seed: int = 0, cond=None, shape=(2,)) -> Batch:
    rng = StepRNG(seed, 0, 0, global_size=n, offset=0, local_size=n)
    return Batch(x=None, cond=cond, rng=rng, extras={"sample_shape": shape})


def test_sid_generator_loss_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    y_real, y_fake = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    alpha = 1.2
    loss = sid_generator_loss(x, y_real, y_fake, alpha)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss, ref_grad = 0.0, torch.zeros(3, 4)
    for i in range(3):  # SiD: (yr - yf) . ((yr - x) - alpha (yr - yf)) / mean|x - yr|
        w = float((x[i] - y_real[i]).detach().abs().mean())
        d = y_real[i] - y_fake[i]
        ref_loss += float((d * ((y_real[i] - x[i]) - alpha * d)).detach().sum()) / w
        ref_grad[i] = -d / w  # x enters only through (yr - x); predictions held fixed
    assert loss.item() == pytest.approx(ref_loss / 12, rel=1e-5)
    assert torch.allclose(grad, ref_grad / 12, atol=1e-6)


class _Affine(nn.Module):
    """net(x, time, label) = A x + b[label] (label 2 = null), for hand-checked CFG."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[0.5, 0.1], [-0.2, 0.3]]))
        self.b = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.2]]))

    def forward(self, x, time, cond=None):
        return x @ self.A.T + self.b[cond.long()]


def test_guided_predict_is_classifier_free_guidance():
    d = ModuleDenoiser(_Affine(), RectifiedFlow(), "x0")
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    c = torch.tensor([0, 1, 0, 1])
    null = lambda c: torch.full_like(c, 2)  # noqa: E731
    cond, uncond = d.predict(x, t, c), d.predict(x, t, null(c))
    scale = torch.tensor([-0.5, 0.0, 1.0, 3.0])
    ref = uncond + scale[:, None] * (cond - uncond)
    assert torch.allclose(guided_predict(d, x, t, c, scale, null), ref, atol=1e-6)
    assert torch.allclose(guided_predict(d, x, t, c, 0.0, null), uncond)
    assert torch.allclose(guided_predict(d, x, t, c, 1.0, None), cond)
    # in eps space it is the same combination (guidance is linear in every parameterization)
    eps = guided_predict(d, x, t, c, 2.0, null, kind="eps")
    e_c, e_u = d.predict(x, t, c, kind="eps"), d.predict(x, t, null(c), kind="eps")
    assert torch.allclose(eps, e_u + 2.0 * (e_c - e_u), atol=1e-5)


def test_vsd_gradient_and_weighting_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, generator=g, requires_grad=True)
    e_real, e_fake = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    w = torch.rand(3, 1, generator=g)
    (grad,) = torch.autograd.grad(vsd_loss(x, e_real, e_fake, w), x)
    assert torch.allclose(grad, w * (e_real - e_fake) / 6)  # ProlificDreamer eq. 9
    path = VPDiscrete()
    t = torch.tensor([10.0, 500.0, 999.0])
    a, s = path.coeffs(t, torch.zeros(3, 1))
    one_minus_abar = (1 - path.abar[t.long()]).float()[:, None]  # ProlificDreamer's w(t)
    assert torch.allclose(vsd_weight(a, s, "sigma2"), one_minus_abar, atol=1e-5)
    assert torch.equal(vsd_weight(a, s, "uniform"), torch.ones_like(s))


def test_vsd_lora_critic_trains_only_its_adapters(rf_teacher):
    critic = lora_critic(rf_teacher, rank=4, alpha=4.0, targets=())
    x, t = torch.randn(8, 2), torch.rand(8)
    assert torch.allclose(critic(x, t), rf_teacher(x, t))  # LoRA B = 0 at the start
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    n_linear = sum(isinstance(m, nn.Linear) for m in rf_teacher.modules())
    assert len(trainable) == 2 * n_linear  # A and B on every Linear layer
    only_out = lora_critic(rf_teacher, rank=4, alpha=4.0, targets=("out",))
    assert [n for n, p in only_out.named_parameters() if p.requires_grad] == [
        "net.out.lora_A.default.weight",
        "net.out.lora_B.default.weight",
    ]
    with pytest.raises(ValueError, match="no Linear/Conv layer matches"):
        lora_critic(rf_teacher, rank=4, alpha=4.0, targets=("nonexistent",))
    assert all(not p.requires_grad for p in rf_teacher.parameters())  # teacher untouched


def test_vsd_pg_sb_guides_teacher_and_critic_with_one_random_scale(cond_rf_teacher):
    obj = VSD(cond_rf_teacher, VSDConfig(pg_scale_range=(2.0, 6.0), null_label=8))
    labels = torch.tensor([0, 3, 5, 7])
    critic = lora_critic(cond_rf_teacher, 4, 4.0, ())
    x_t, t = torch.randn(4, 2), torch.full((4,), 0.6)
    real, fake = obj.eps_pair(critic, x_t, t, _batch(4, cond=labels))
    kappa = 2.0 + 4.0 * _batch(4).rng.rand()  # the same draw from the same step generator
    null = torch.full_like(labels, 8)
    for model, got in ((cond_rf_teacher, real), (critic, fake)):
        e_c, e_u = model.predict(x_t, t, labels, "eps"), model.predict(x_t, t, null, "eps")
        assert torch.allclose(got, e_u + kappa[:, None] * (e_c - e_u), atol=1e-5)


def test_dmd_pairs_are_teacher_euler_solves_and_checkpointed(rf_teacher, tmp_path):
    cfg = DMDConfig(num_pairs=16, pair_steps=8, pair_seed=3)
    pairs = DMD(rf_teacher, cfg).make_pairs(_batch(4))
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pairs.noise, noise)
    x, ts = noise.clone(), torch.linspace(1.0, 0.0, 9)  # rectified flow: x_1 = noise
    with torch.no_grad():
        for t0, t1 in zip(ts[:-1], ts[1:], strict=True):  # Euler on dx/dt = v(x, t)
            x = x + (t1 - t0) * rf_teacher(x, t0.expand(16))
    assert torch.allclose(pairs.target, x, atol=1e-5)

    trainer = Trainer(
        DMD(rf_teacher, cfg),
        trainable_copy(rf_teacher),
        ToyData(),
        TrainConfig(steps=2, batch_size=8, progress=False),
        tmp_path,
    )
    trainer.fit()
    saved = load_file(trainer.last_checkpoint / "weights.safetensors")
    assert torch.equal(saved["pairs.target"], trainer.roles["pairs"].target)
    assert torch.equal(saved["pairs.noise"], noise)


def test_dmd_pairs_of_a_conditional_teacher_carry_labels(cond_rf_teacher):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    pairs = DMD(cond_rf_teacher, DMDConfig(num_pairs=64, pair_steps=20)).make_pairs(
        _batch(8, cond=labels)
    )
    assert pairs.cond.shape == (64,) and set(pairs.cond.tolist()) <= set(range(8))
    nearest = torch.cdist(pairs.target, mixture_centers()).argmin(1)
    assert (nearest == pairs.cond).float().mean() > 0.95  # each target lands on its label


def test_dmd_regression_loss_reference():
    pred, target = torch.tensor([[0.0, 1.0], [2.0, -1.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert float(regression_loss(pred, target, "l2", 0.0)) == pytest.approx((1 + 4 + 1) / 4)
    c = 0.5
    ref = sum(math.sqrt(v * v + c * c) - c for v in (1.0, 0.0, 2.0, 1.0)) / 4
    assert float(regression_loss(pred, target, "huber", c)) == pytest.approx(ref, rel=1e-6)


def test_f_divergence_table_is_r2_f_second_derivative():
    """h(r) = r^2 f''(r) for the f of f-distill's table, and h' and h'' (used by
    Uni-Instruct), all by automatic differentiation of f itself."""
    fs = {
        "reverse_kl": lambda r: -torch.log(r),
        "forward_kl": lambda r: r * torch.log(r),
        "js": lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2),
        "jeffreys": lambda r: (r - 1) * torch.log(r),
    }
    assert set(fs) == set(DIVERGENCES)
    for name, f in fs.items():
        div = get_divergence(name)
        for r0 in (0.3, 1.0, 2.5):
            r = torch.tensor(r0, dtype=torch.float64, requires_grad=True)
            (df,) = torch.autograd.grad(f(r), r, create_graph=True)
            (d2f,) = torch.autograd.grad(df, r, create_graph=True)
            h = r * r * d2f
            (dh,) = torch.autograd.grad(h, r, create_graph=True)
            (d2h,) = torch.autograd.grad(dh, r)
            rt = torch.tensor([r0], dtype=torch.float64)
            assert float(div.h(rt)) == pytest.approx(h.item(), rel=1e-9), name
            assert float(div.dh(rt)) == pytest.approx(dh.item(), abs=1e-9), name
            assert float(div.d2h(rt)) == pytest.approx(float(d2h), abs=1e-9), name


def test_f_distill_weighting_reference():
    logits = torch.tensor([-12.0, -1.0, 0.0, 2.0])
    r = density_ratio(logits)
    assert torch.allclose(r, torch.tensor([-10.0, -1.0, 0.0, 2.0]).exp())  # clamped logit
    for name, h in (("reverse_kl", torch.ones(4)), ("forward_kl", r), ("js", r / (1 + r))):
        assert torch.allclose(f_weights(r, name), h / h.mean(), rtol=1e-5), name
    # the weighted DMD gradient: h * w * (x0_fake - x0_real) / numel, w = 1 / mean|x - x0_real|
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, generator=g, requires_grad=True)
    x0_real, x0_fake = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    h = f_weights(r, "js")[:, None]
    loss, _ = dmd_loss(x, x0_real, x0_real + h * (x0_fake - x0_real))
    (grad,) = torch.autograd.grad(loss, x)
    w = 1 / (x.detach() - x0_real).abs().mean(1, keepdim=True)
    assert torch.allclose(grad, h * w * (x0_fake - x0_real) / 8, atol=1e-6)


# Uni-Instruct on Gaussians. Teacher p0 = N(MP, VP), student x0 = theta + sqrt(VQ) z on the
# rectified-flow path x_t = (1 - t) x0 + t eps: every marginal is Gaussian, so the scores,
# x0-predictions and the density ratio are exact and E over (z, eps) is Gauss-Hermite
# quadrature.
MP, VP, VQ, THETA = 0.3, 1.0, 0.6, -0.2


def _gauss_hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(nodes), torch.tensor(weights / weights.sum())


def _logpdf(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * torch.as_tensor(var))


def _x0_pred(x_t, a, s, mean, var):  # E[x0 | x_t] for x0 ~ N(mean, var)
    return mean + a * var / (a * a * var + s * s) * (x_t - a * mean)


def _expanded_divergence(theta, t, div):
    """E_{q_t}[H(r_t) (s_p - s_q)^2] in closed-form Gaussians (Uni-Instruct's integrand)."""
    a, s = 1 - t, t
    vq, vp = a * a * VQ + s * s, a * a * VP + s * s
    n, w = _gauss_hermite(80)
    x = a * theta + vq**0.5 * n
    r = torch.exp(_logpdf(x, a * MP, vp) - _logpdf(x, a * theta, vq))
    delta = -(x - a * MP) / vp + (x - a * theta) / vq
    return (w * div.h(r) * delta**2).sum()


def _student_grid(theta, t):
    """Quadrature over (z, eps): weights, x0 (with gradient), x_t and the exact networks."""
    a, s = torch.tensor(1.0 - t), torch.tensor(float(t))
    n, w = _gauss_hermite(40)
    z, e = torch.meshgrid(n, n, indexing="ij")
    weights = (w[:, None] * w[None, :]).reshape(-1)
    x0 = (theta + VQ**0.5 * z).reshape(-1, 1)
    x_t = a * x0 + s * e.reshape(-1, 1)
    frozen = theta.detach()  # the fake score is a network: its weights are not theta
    y_real, y_fake = _x0_pred(x_t, a, s, MP, VP), _x0_pred(x_t, a, s, frozen, VQ)
    vq, vp = a * a * VQ + s * s, a * a * VP + s * s
    r = torch.exp(_logpdf(x_t, a * MP, vp) - _logpdf(x_t, a * frozen, vq)).flatten()
    return weights, a, s, x0, x_t, y_real, y_fake, r.detach()


def _ui_grad(t, div) -> float:
    """d/dtheta of E[L] of the tractable loss, in score units (x a^2 / s^4)."""
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    w, a, s, x0, _, y_real, y_fake, r = _student_grid(theta, t)
    loss = (w * uni_instruct_terms(x0, y_real, y_fake, r, a, s, div)).sum() * a * a / s**4
    return float(torch.autograd.grad(loss, theta)[0])


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_uni_instruct_gradient_equals_expanded_f_divergence_gradient(name):
    """Uni-Instruct Thm. 3.2: the tractable loss has the gradient of the (intractable)
    expanded divergence E_{q_t}[H(r)||s_p - s_q||^2], exactly, at every noise level."""
    div = get_divergence(name)
    for t in (0.2, 0.5, 0.8):
        theta = torch.tensor(THETA, requires_grad=True)
        (exact,) = torch.autograd.grad(_expanded_divergence(theta, t, div), theta)
        assert _ui_grad(t, div) == pytest.approx(float(exact), rel=1e-6, abs=1e-9), (name, t)


@pytest.mark.usefixtures("float64")
def test_sabotage_uni_instruct_without_its_di_term():
    """Forward KL with h' dropped loses the Grad(DI) part and the gradient is wrong."""
    fkl = get_divergence("forward_kl")
    broken = FDivergence("fkl_no_di", fkl.h, lambda r: torch.zeros_like(r), fkl.d2h)
    theta = torch.tensor(THETA, requires_grad=True)
    (exact,) = torch.autograd.grad(_expanded_divergence(theta, 0.5, fkl), theta)
    assert abs(_ui_grad(0.5, broken) - float(exact)) > 0.1 * abs(float(exact))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js"])
def test_uni_instruct_integrated_over_time_is_dmd_di_and_f_distill(name):
    """The expansion D_f(p_t || q_t) = int_t^1 g^2 / 2 E[H ||delta||^2] ds (rectified flow:
    g^2 = 2 s / (1 - s), and D_f = 0 at s = 1) makes the time integral of the Uni-Instruct
    gradient equal the gradient of D_f at t: E[h(r) (s_q - s_p) dx_t/dtheta], i.e. the
    Diff-Instruct / DMD gradient for reverse KL (h = 1) and f-distill's for the others."""
    div, t = get_divergence(name), 0.3
    u, wu = np.polynomial.legendre.leggauss(48)
    integral = 0.0
    for ui, wi in zip((u + 1) / 2, wu / 2, strict=True):
        s = 1 - (1 - t) * ui**2  # s in [t, 1), denser near 1 where g^2 blows up
        integral += wi * 2 * (1 - t) * ui * (s / (1 - s)) * _ui_grad(s, div)
    theta = torch.tensor(THETA, requires_grad=True)
    w, a, s, _, x_t, y_real, y_fake, r = _student_grid(theta, t)
    with torch.no_grad():  # f-distill: h(r) (s_q - s_p), with s = (a y - x_t) / s^2
        g = div.h(r)[:, None] * a * (y_fake - y_real) / s**2
    (di,) = torch.autograd.grad((w[:, None] * g * x_t).sum(), theta)
    assert integral == pytest.approx(float(di), rel=1e-6)


def test_uni_instruct_reverse_kl_is_twice_sid_at_half_alpha():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=g, requires_grad=True)
    m1, m2 = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    x_t = 0.6 * x + 0.8 * torch.randn(5, 3, generator=g)
    y_real, y_fake = torch.tanh(x_t @ m1), torch.tanh(x_t @ m2)  # "networks" through x_t
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    ui = uni_instruct_terms(x, y_real, y_fake, None, a, s, get_divergence("reverse_kl"))
    d = y_real - y_fake
    ref = 2 * (d * ((y_real - x) - 0.5 * d)).sum(1)  # SiD's per-sample loss, alpha = 1/2
    assert torch.allclose(ui, ref, atol=1e-6)
    g_ui = torch.autograd.grad(ui.sum(), x, retain_graph=True)[0]
    assert torch.allclose(g_ui, torch.autograd.grad(ref.sum(), x)[0], atol=1e-6)


# ------------------------------------------------------------------- configuration


def test_bad_configs_name_what_is_expected(rf_teacher, cond_rf_teacher):
    with pytest.raises(ValueError, match="expected one of"):
        SiD(rf_teacher, SiDConfig(guidance="more"))
    with pytest.raises(ValueError, match="null_label"):
        SiD(rf_teacher, SiDConfig(guidance="zero_cfg"))
    with pytest.raises(ValueError, match="negative anti_scale"):
        SiD(cond_rf_teacher, SiDConfig(guidance="anti_cfg", anti_scale=0.5, null_label=8))
    with pytest.raises(ValueError, match="gan_weight > 0"):
        FDistill(rf_teacher, FDistillConfig(gan_weight=0.0))
    with pytest.raises(ValueError, match="expected one of"):
        FDistill(rf_teacher, FDistillConfig(divergence="hellinger"))
    with pytest.raises(ValueError, match="gan_weight > 0"):
        UniInstruct(rf_teacher, UniInstructConfig(divergence="js", gan_weight=0.0))
    UniInstruct(rf_teacher, UniInstructConfig(divergence="reverse_kl", gan_weight=0.0))
    with pytest.raises(ValueError, match="'l2' or 'huber'"):
        DMD(rf_teacher, DMDConfig(reg_metric="lpips"))
    with pytest.raises(ValueError, match="'sigma2' or 'uniform'"):
        VSD(rf_teacher, VSDConfig(weighting="snr"))
    with pytest.raises(ValueError, match="null_label"):
        VSD(rf_teacher, VSDConfig(pg_scale_range=(2.0, 5.0)))


def test_gan_head_classifies_feature_layout_not_only_channel_means():
    """Real and fake bottlenecks with the same channel means but mirrored layouts: DMD2's
    strided-conv head separates them; a head on channel means alone cannot."""
    torch.manual_seed(0)
    pattern = torch.randn(1, 8, 4, 4)

    def feats(n):
        real = pattern + 0.3 * torch.randn(n, 8, 4, 4)
        fake = pattern.flip(-1) + 0.3 * torch.randn(n, 8, 4, 4)
        return torch.cat([real, fake]), torch.cat([torch.ones(n), torch.zeros(n)])

    def accuracy(head):
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(150):
            f, y = feats(32)
            loss = nn.functional.binary_cross_entropy_with_logits(head(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        f, y = feats(256)
        with torch.no_grad():
            return ((head(f) > 0).float() == y).float().mean().item()

    assert len(dmd2_mod.GANHead(8, 32, spatial=(4, 4)).convs) == 3  # 4x4 -> 2x2, one block
    assert accuracy(dmd2_mod.GANHead(8, 32, spatial=(4, 4))) > 0.95
    assert accuracy(dmd2_mod.GANHead(8, 32)) < 0.7


def test_gan_critic_loss_one_pass_equals_separate_real_and_fake_passes():
    """The critic scores noised real and student samples in one concatenated pass; per-sample
    features make that the same loss as DMD2 eq. 4 written with two passes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))
    embed = nn.Embedding(4, 3)

    def feature_fn(net, x, time, cond):
        return net[:2](torch.cat([x, time[:, None] / 1000], 1) + embed(cond))[:, :8]

    score = ModuleDenoiser(net, RectifiedFlow(), "velocity", feature_fn=feature_fn)
    critic = nn.ModuleDict({"score": score, "head": dmd2_mod.GANHead(8, 16)})
    path = RectifiedFlow()
    x_real, x_fake = torch.randn(6, 2), torch.randn(6, 2)
    cond = torch.randint(0, 4, (6,))

    def batch():
        return Batch(x=x_real, cond=cond, rng=StepRNG(3, 0, 0, 6, 0, 6), extras={})

    t = torch.rand(6)
    loss, acc = dmd2_mod.gan_critic_loss(critic, path, x_fake, t, batch())
    b = batch()  # the same noise draws, in the same order
    xf_t, _ = dmd2_mod.noised(path, x_fake, t, b)
    xr_t, _ = dmd2_mod.noised(path, x_real, t, b)
    lf = critic["head"](score.features(xf_t, t, cond))
    lr = critic["head"](score.features(xr_t, t, cond))
    want = nn.functional.softplus(lf).mean() + nn.functional.softplus(-lr).mean()
    torch.testing.assert_close(loss, want)
    assert acc == (lr > 0).float().mean().item()
    # the real half must carry the minus sign: swapping the halves changes the loss
    swapped = nn.functional.softplus(lr).mean() + nn.functional.softplus(-lf).mean()
    assert abs(float(loss.detach() - swapped.detach())) > 1e-4


def test_dmd2_lora_fake_score_starts_as_the_teacher_and_trains_adapters_only(rf_teacher):
    obj = dmd2_mod.DMD2(rf_teacher, dmd2_mod.DMD2Config(fake_lora_rank=4))
    rng = StepRNG(0, 0, 0, 8, 0, 8)
    batch = Batch(x=None, cond=None, rng=rng, extras={"sample_shape": (2,)})
    roles = obj.build_roles(trainable_copy(rf_teacher), batch)
    score = roles["fake_score"]["score"]
    trainable = {n for n, p in score.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in score.named_parameters() if n not in trainable}
    x, t = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.full((8,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(score(x, t), rf_teacher(x, t))  # B = 0: the teacher
    opt = torch.optim.Adam([p for p in score.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        b = Batch(x=None, cond=None, rng=StepRNG(0, step, 0, 8, 0, 8), extras=batch.extras)
        losses, _ = obj.losses(roles, b, ["fake_score"], step)
        opt.zero_grad()
        losses["fake_score"].backward()
        opt.step()
    with torch.no_grad():
        assert float((score(x, t) - rf_teacher(x, t)).abs().max()) > 1e-4  # the adapters moved
    for n, p in score.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the teacher's weights did not
