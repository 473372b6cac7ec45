"""CTMSR (one-step SR by consistency training + distribution trajectory matching): the
trajectory, the boundary condition, loss parity with plain re-computations, the sign of the
DTM term, and the ``image-sr-ctmsr`` recipe end to end at toy scale."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.image.sr import ctmsr as C
from fewstep.image.sr import trajectory as T
from fewstep.image.sr.trajectory import TrajectoryConfig


class TinyNet(nn.Module):
    """net(x_t, t, y) -> raw output; a stand-in for the UNet (no diffusers needed)."""

    def __init__(self, ch: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(2 * ch + 1, ch, 3, padding=1)
        self.calls = 0

    def forward(self, x_t, t, y):
        self.calls += 1
        tt = t.reshape(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[-2:]).to(x_t)
        return self.conv(torch.cat([x_t, y, tt], 1))


def _batch(hr, y, seed=0, step=0):
    rng = StepRNG(seed, step, 0, global_size=len(hr), offset=0, local_size=len(hr))
    return Batch(x=hr, cond=y, rng=rng)


def _rng(seed=0, step=0, n=4):
    return StepRNG(seed, step, 0, global_size=n, offset=0, local_size=n)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    y = (hr + 0.3 * torch.randn(hr.shape, generator=g)).clamp(-1, 1)
    return hr, y


# ------------------------------------------------------------------------------ trajectory


@pytest.mark.parametrize("rho", [(1.0, 1.0), (0.5, 2.0)])
def test_trajectory_endpoints_are_exact(pair, rho):
    hr, y = pair
    cfg = TrajectoryConfig(sigma_max=0.7, res_rho=rho[0], noise_rho=rho[1])
    eps = torch.randn_like(hr)
    assert torch.equal(T.forward(hr, y, 0.0, eps, cfg), hr)  # t = 0 is HR
    x1 = T.forward(hr, y, torch.ones(4), eps, cfg)
    assert torch.equal(x1, y + 0.7 * eps)  # t = 1 is LR_up + noise of std kappa
    assert torch.equal(x1, T.prior(y, eps, cfg))


def test_grid_is_ctmsrs_karras_schedule():
    """alpha / sigma on t_i = i / N equal karras_schedule(N + 1, 0, hi, rho) of the code:
    (lo^(1/rho) + s (hi^(1/rho) - lo^(1/rho)))^rho with s = linspace(0, 1)."""
    cfg = TrajectoryConfig(sigma_max=2.0, res_rho=3.0, noise_rho=0.5)
    t = T.grid(4)
    s = torch.linspace(0, 1, 5)
    torch.testing.assert_close(T.alpha(t, cfg), (s * 1.0 ** (1 / 3.0)) ** 3.0)
    torch.testing.assert_close(T.sigma(t, cfg), (s * 2.0 ** (1 / 0.5)) ** 0.5)


def test_pf_ode_drift_is_the_trajectorys_velocity(pair):
    hr, y = pair
    cfg = TrajectoryConfig(sigma_max=0.8, res_rho=2.0, noise_rho=1.5)
    eps = torch.randn_like(hr)
    t, h = 0.4, 1e-3
    x_t = T.forward(hr, y, t, eps, cfg)
    drift = T.pf_ode_drift(x_t, y, hr, t, cfg)  # the exact x0 of this one trajectory
    fd = (T.forward(hr, y, t + h, eps, cfg) - T.forward(hr, y, t - h, eps, cfg)) / (2 * h)
    torch.testing.assert_close(drift, fd, atol=1e-3, rtol=1e-3)
    # integrating the ODE from LR + noise with the exact x0 lands on HR
    lin = TrajectoryConfig(sigma_max=0.8)
    x = T.prior(y, eps, lin)
    ts = torch.linspace(1, 0, 11)
    for a, b in zip(ts[:-1], ts[1:], strict=True):
        x = x + (b - a) * T.pf_ode_drift(x, y, hr, a, lin)
    torch.testing.assert_close(x, hr, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- consistency function


def test_boundary_condition_holds_exactly(pair):
    hr, y = pair
    f = C.SRConsistencyFunction(TinyNet(), TrajectoryConfig())
    x = torch.randn_like(hr)
    assert torch.equal(f(x, 0.0, y), x)
    c_skip, c_out = C.boundary_coefficients(torch.tensor(0.0), 10.0, 0.5)
    assert c_skip == 1 and c_out == 0
    assert not torch.allclose(f(x, 0.5, y), x)  # away from t = 0 the net matters


def test_boundary_coefficients_match_core_consistency_function():
    """The same c_skip / c_out as core's ConsistencyFunction on an EDM path (sigma = t, whose
    t_min = sigma_min offsets sigma)."""
    from fewstep.core.models import ModuleDenoiser
    from fewstep.core.objectives.consistency import ConsistencyFunction
    from fewstep.core.paths import EDM

    path = EDM()
    core = ConsistencyFunction(ModuleDenoiser(nn.Identity(), path, "x0"), 10.0, 0.5)
    t = torch.tensor([0.002, 0.01, 0.3, 1.0, 5.0])
    like = torch.zeros(5, 1, 1, 1)
    cs, co = core.coefficients(t, like)
    ms, mo = C.boundary_coefficients(t - path.sigma_min, 10.0, 0.5)
    torch.testing.assert_close(cs.flatten(), ms)
    torch.testing.assert_close(co.flatten(), mo)


# --------------------------------------------------------------------- consistency training


def test_interval_schedule_follows_ctmsrs_linear_decrease():
    # improved_timesteps_schedule_decrease_linear(step, 100, 4, 3): 4 for steps < 50, then 3
    got = [C.num_intervals(s, 100, 4, 3) for s in (0, 49, 50, 99)]
    assert got == [4, 4, 3, 3]
    assert [C.num_intervals(s, 90, 2, 4) for s in (0, 29, 30, 60, 89)] == [2, 2, 3, 4, 4]
    assert C.num_intervals(10, 0, 4, 3) == 4


def test_ct_loss_parity_with_plain_recomputation(pair):
    hr, y = pair
    torch.manual_seed(0)
    cfg = C.CTMSRConfig(
        dtm_weight=0.0, intervals_start=3, intervals_end=3, huber_c=0.01,
        trajectory=TrajectoryConfig(sigma_max=0.9),
    )  # fmt: skip
    obj = C.CTMSR(cfg)
    batch = _batch(hr, y, seed=3, step=5)
    roles = obj.build_roles(TinyNet(), batch)
    with torch.no_grad():  # a target that differs from the student, so the pairing matters
        for p in roles["target"].parameters():
            p.add_(0.05)
    losses, logs = obj.losses(roles, batch, ["student"], 5)

    rng = _rng(3, 5)  # the same draws, in the same order
    i = rng.randint(0, 3).float()
    eps = rng.randn_like(hr)
    t_lo, t_hi = i / 3, (i + 1) / 3

    def f(net, t, x):
        s = 0.9 * t
        c_skip = 0.25 / ((10 * s) ** 2 + 0.25)
        c_out = 10 * s / torch.sqrt((10 * s) ** 2 + 0.25)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * net(x, t, y)

    def x_at(t):
        t = t.view(-1, 1, 1, 1)
        return hr + t * (y - hr) + 0.9 * t * eps

    pred = f(roles["student"], t_hi, x_at(t_hi))
    target = f(roles["target"], t_lo, x_at(t_lo)).detach()
    ref = (torch.sqrt((pred - target) ** 2 + 0.01**2) - 0.01).mean()
    torch.testing.assert_close(losses["student"], ref, rtol=1e-5, atol=1e-6)
    assert logs["ct_loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    losses["student"].backward()
    assert all(p.grad is not None for p in roles["student"].parameters())
    assert all(p.grad is None for r in ("target", "dtm_model") for p in roles[r].parameters())


def test_target_copies_student_each_step_and_dtm_snapshot_refreshes(pair):
    hr, y = pair
    obj = C.CTMSR(C.CTMSRConfig(dtm_start=3, dtm_refresh=2))
    roles = obj.build_roles(TinyNet(), _batch(hr, y))

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    for step in range(6):
        with torch.no_grad():
            for p in roles["student"].parameters():
                p.add_(0.1)  # an "optimizer step"
        obj.after_update(roles, ["student"], step)
        assert same(roles["target"], roles["student"])  # target_ema = 0: a copy (CTMSR)
        # D is the student after 3 updates (DTM starts), then every 2 updates
        assert same(roles["dtm_model"], roles["student"]) == (step + 1 in (3, 5))


# -------------------------------------------------------------------------------------- DTM


def test_dtm_gradient_moves_sr_towards_hr_in_a_solvable_case():
    """No noise (kappa = 0): x_t = (1 - alpha) x0 + alpha y, and D(x_t) = (x_t - alpha y) /
    (1 - alpha) recovers each trajectory's start exactly, so g = x^ - x0 and DTM's gradient
    is w (x^ - x0) / numel: descent moves the SR output towards HR (a flipped sign fails)."""
    cfg = TrajectoryConfig(sigma_max=0.0)
    g = torch.Generator().manual_seed(0)
    hr = torch.randn(3, 1, 4, 4, generator=g)
    y = torch.randn(3, 1, 4, 4, generator=g)
    sr = torch.randn(3, 1, 4, 4, generator=g).requires_grad_(True)
    t, eps = 0.3, torch.zeros_like(hr)
    a = float(T.alpha(t, cfg))

    def d(x):
        return (x - a * y) / (1 - a)

    grad = C.dtm_gradient(
        d(T.forward(sr.detach(), y, t, eps, cfg)), d(T.forward(hr, y, t, eps, cfg))
    )
    torch.testing.assert_close(grad, sr.detach() - hr)
    w = C.dtm_weights(sr, hr, "improved")
    torch.testing.assert_close(w.flatten(), 1 / (sr.detach() - hr).abs().flatten(1).mean(1))
    C.dtm_loss(sr, grad, w).backward()
    torch.testing.assert_close(sr.grad, w * (sr.detach() - hr) / sr.numel())
    before = (sr.detach() - hr).norm()
    after = (sr.detach() - 10.0 * sr.grad - hr).norm()
    assert after < before


def test_dtm_pulls_the_sr_distribution_to_the_hr_distribution():
    """2-D case: HR ~ N(m_real, s^2 I); D is the exact posterior mean E[x0 | x_t] under
    that distribution (what a consistency model of HR trajectories is, here linear). SR
    particles from N(m_fake, s^2 I) follow DTM's gradient; their mean reaches m_real."""
    cfg = TrajectoryConfig(sigma_max=1.0)
    s2, m_real, m_fake, t = 0.25, torch.tensor([1.0, -2.0]), torch.tensor([-2.0, 1.5]), 0.4
    a, sig = float(T.alpha(t, cfg)), float(T.sigma(t, cfg))
    g = torch.Generator().manual_seed(0)
    n = 256

    def draw(m):
        return (m + math.sqrt(s2) * torch.randn(n, 2, generator=g)).view(n, 2, 1, 1)

    def d(x, y):  # E[x0 | x_t, y] for x0 ~ N(m_real, s2), x_t = (1-a) x0 + a y + sig eps
        mr = m_real.view(1, 2, 1, 1)
        k = (1 - a) * s2 / ((1 - a) ** 2 * s2 + sig**2)
        return mr + k * (x - (1 - a) * mr - a * y)

    sr = draw(m_fake).requires_grad_(True)
    opt = torch.optim.SGD([sr], lr=float(sr.numel()) * 0.5)
    start = (sr.detach().mean((0, 2, 3)) - m_real).norm()
    for _ in range(40):
        hr, y = draw(m_real), torch.zeros(n, 2, 1, 1)
        eps = torch.randn(n, 2, 1, 1, generator=g)
        grad = C.dtm_gradient(
            d(T.forward(sr.detach(), y, t, eps, cfg), y), d(T.forward(hr, y, t, eps, cfg), y)
        )
        opt.zero_grad()
        C.dtm_loss(sr, grad, C.dtm_weights(sr, hr, "simple")).backward()
        opt.step()
    end = (sr.detach().mean((0, 2, 3)) - m_real).norm()
    assert end < 0.1 * start


def test_removing_dtm_changes_the_loss(pair):
    hr, y = pair
    batch = _batch(hr, y, seed=1, step=7)
    out = {}
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        obj = C.CTMSR(C.CTMSRConfig(dtm_weight=w, dtm_start=5))
        roles = obj.build_roles(TinyNet(), batch)
        with torch.no_grad():  # D: an earlier snapshot, different from the student
            for p in roles["dtm_model"].parameters():
                p.add_(0.1)
        out[w] = obj.losses(roles, _batch(hr, y, seed=1, step=7), ["student"], 7)
    (l0, logs0), (l1, logs1) = out[0.0], out[1.0]
    assert "dtm_loss" not in logs0 and float(l0["student"].detach()) == pytest.approx(
        logs0["ct_loss"]
    )
    assert logs1["dtm_loss"] > 0 and logs1["ct_loss"] == pytest.approx(logs0["ct_loss"])
    assert float(l1["student"].detach()) == pytest.approx(
        logs1["ct_loss"] + logs1["dtm_loss"], rel=1e-6
    )
    assert float(l1["student"].detach()) != pytest.approx(float(l0["student"].detach()))
    # before dtm_start the weight does not matter
    obj = C.CTMSR(C.CTMSRConfig(dtm_weight=1.0, dtm_start=5))
    roles = obj.build_roles(TinyNet(), batch)
    _, logs = obj.losses(roles, _batch(hr, y), ["student"], 4)
    assert "dtm_loss" not in logs


def test_sample_sr_uses_one_network_call_per_step(pair):
    hr, y = pair
    net = TinyNet()
    f = C.SRConsistencyFunction(net, TrajectoryConfig())
    out = C.sample_sr(f, y, (1.0,), torch.Generator().manual_seed(0))
    assert out.shape == y.shape and net.calls == 1
    C.sample_sr(f, y, (1.0, 0.5), torch.Generator().manual_seed(0))
    assert net.calls == 3
    with pytest.raises(ValueError, match="student_times must begin at 1.0"):
        C.sample_sr(f, y, (0.5,), torch.Generator())


def test_bad_objective_inputs_error_clearly(pair):
    hr, y = pair
    with pytest.raises(ValueError, match="metric must be one of"):
        C.CTMSR(C.CTMSRConfig(metric="l1"))
    with pytest.raises(ValueError, match="dtm_t_range"):
        C.CTMSR(C.CTMSRConfig(dtm_t_range=(0.5, 0.2)))
    obj = C.CTMSR(C.CTMSRConfig())
    with pytest.raises(ValueError, match="cond = bicubic-upsampled LR"):
        obj.build_roles(TinyNet(), _batch(hr, y[:, :, :4]))
    obj = C.CTMSR(C.CTMSRConfig(dtm_start=0, dtm_t_range=(0.9, 0.95), intervals_start=3))
    roles = obj.build_roles(TinyNet(), _batch(hr, y))
    with pytest.raises(ValueError, match="no point of the 3-interval grid"):
        obj.losses(roles, _batch(hr, y), ["student"], 0)


def test_sr_net_shapes_residual_and_config_errors(tmp_path):
    from fewstep.image.sr.net import SRNet, SRNetConfig

    y = torch.rand(2, 3, 16, 16) * 2 - 1
    x = torch.randn_like(y)
    for enc in ("unshuffle", "concat"):
        cfg = SRNetConfig(channels=(8, 16), norm_groups=4, encoder=enc)
        net = SRNet.build(cfg, 3, 16, 4)
        assert net(x, torch.rand(2), y).shape == y.shape
        with torch.no_grad():  # a UNet that outputs 0: the residual net returns y itself
            net.unet.conv_out.weight.zero_()
            net.unet.conv_out.bias.zero_()
        assert torch.equal(net(x, torch.rand(2), y), y)
    back = SRNet.load(net.save(tmp_path / "net"))
    assert back.encoder == "concat" and back.scale == 4 and back.residual
    assert torch.equal(back(x, torch.full((2,), 0.5), y), y)
    with pytest.raises(ValueError, match="norm_groups 3 must divide"):
        SRNet.build(SRNetConfig(channels=(8, 16), norm_groups=3), 1, 16, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        SRNet.build(SRNetConfig(channels=(8, 8, 8), norm_groups=4), 1, 8, 4)


# ------------------------------------------------------------------------------ the recipe

_TINY = (
    "--net.channels 8,16 --net.norm_groups 4 --train.steps 4 --ctmsr.dtm_start 2 "
    "--train.batch_size 8 --train.checkpoint_every 0 --eval_images 16 --probe_images 8 "
    "--grid_images 4 --threads 1 --device cpu --train.progress false"
)
TINY = _TINY.split()  # noqa: SIM905 - readable lines of options
_PHOTOS = "--data.dataset photos --data.train_crops 32 --data.eval_crops 16 --data.hr_size 16"


def _distill(tmp_path_factory, name: str, more: list[str]):
    from fewstep.core import cli

    run = tmp_path_factory.mktemp("sr") / name
    assert cli.main(["distill", "image-sr-ctmsr", "--out", str(run), *TINY, *more]) == 0
    return run


def _check_run(run, name: str, size: int, scale: int) -> None:
    from fewstep.image.sr.net import SRNet

    for f in ("config.json", "metrics.json", "report.html", "grid.png", "log.jsonl"):
        assert (run / f).exists(), f
    m = json.loads((run / "metrics.json").read_text())
    assert m["dataset"] == name and m["scale"] == scale and m["hr_size"] == size
    assert m["heldout_images"] == 16
    for k in ("bicubic", "ctmsr_1step", "ctmsr_2step"):
        assert math.isfinite(m[k]["psnr"]) and -1 <= m[k]["ssim"] <= 1
        assert m[k]["swd_to_hr"] >= 0
    assert m["ctmsr_1step"]["nfe"] == 1 and m["ctmsr_2step"]["nfe"] == 2
    assert ("skipped" in m["classifier_metrics"]) == (name == "digits")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("dtm_loss" in r for r in log)  # DTM ran after dtm_start
    assert not any("dtm_loss" in r for r in log if r["step"] <= 2)
    net = SRNet.load(run / "student")  # a diffusers folder + how to feed it
    assert (run / "student" / "diffusion_pytorch_model.safetensors").exists()
    assert net.scale == scale


def test_recipe_smoke_digits(tmp_path_factory):
    _check_run(_distill(tmp_path_factory, "digits", []), "digits", 16, 2)


def test_recipe_smoke_photos_and_sample_command(tmp_path_factory, tmp_path):
    from fewstep.core import cli

    run = _distill(tmp_path_factory, "photos", _PHOTOS.split())  # noqa: SIM905
    _check_run(run, "photos", 16, 4)
    out = tmp_path / "s.png"
    assert cli.main(["sample", str(run), "--n", "3", "--out", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 0


def test_bad_scale_is_a_clear_cli_error(tmp_path, capsys):
    from fewstep.core import cli

    args = ["distill", "image-sr-ctmsr", "--out", str(tmp_path / "bad"), "--data.dataset"]
    args += ["photos", "--data.scale", "3", *TINY]
    assert cli.main(args) == 2
    assert "scale 3 does not divide the HR size 32" in capsys.readouterr().err
