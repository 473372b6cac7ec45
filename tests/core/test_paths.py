"""Behavioural tests for fewstep.core.paths (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.core.paths import (
    EDM,
    PATHS,
    PREDICTIONS,
    RectifiedFlow,
    TrigFlow,
    VPContinuous,
    VPDiscrete,
    diffusers_alphas_cumprod,
    make_path,
)

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}

# (id, registry name, kwargs, interior times in native units)
CASES = [
    ("rf", "rectified_flow", {}, [0.05, 0.3, 0.5, 0.8, 0.95]),
    ("vp-linear", "vp", {"schedule": "linear"}, [0.01, 0.2, 0.5, 0.7, 0.9]),
    ("vp-cosine", "vp", {"schedule": "cosine"}, [0.01, 0.2, 0.5, 0.7, 0.9]),
    ("vpd-linear", "vp_discrete", {"schedule": "linear"}, [3.0, 100.0, 400.25, 700.5, 950.0]),
    (
        "vpd-scaled",
        "vp_discrete",
        {"schedule": "scaled_linear", **SD_BETAS},
        [3.0, 100.0, 400.25, 700.5, 950.0],
    ),
    (
        "vpd-cos",
        "vp_discrete",
        {"schedule": "squaredcos_cap_v2"},
        [3.0, 100.0, 400.25, 700.5, 950.0],
    ),
    ("edm", "edm", {}, [0.01, 0.3, 1.0, 5.0, 40.0]),
    ("trigflow", "trigflow", {}, [0.05, 0.4, 0.8, 1.2, 1.5]),
]
IDS = [c[0] for c in CASES]


def _case(case):
    _, name, kw, times = case
    return make_path(name, **kw), torch.tensor(times, dtype=torch.float32)


def _data(n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 2, generator=g, dtype=dtype)
    eps = torch.randn(n, 3, 2, generator=g, dtype=dtype)
    return x0, eps


def test_registry_covers_every_path():
    assert set(PATHS) == {"rectified_flow", "vp", "vp_discrete", "edm", "trigflow"}
    assert {c[1] for c in CASES} == set(PATHS)
    assert isinstance(make_path("rectified_flow"), RectifiedFlow)
    assert make_path("vp", schedule="cosine").schedule == "cosine"
    assert isinstance(make_path("vp_discrete"), VPDiscrete)
    assert isinstance(make_path("edm", sigma_max=10.0), EDM)
    assert make_path("trigflow", sigma_data=0.7).sigma_data == 0.7


def test_make_path_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_path("ddpm_but_misspelt")
    msg = str(err.value)
    assert "ddpm_but_misspelt" in msg
    for name in PATHS:
        assert name in msg


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_noise_is_alpha_x0_plus_sigma_eps(case):
    path, t = _case(case)
    x0, eps = _data(len(t))
    xt = path.noise(x0, t, eps)
    a = path.alpha(t).double().reshape(-1, 1, 1)
    s = path.sigma(t).double().reshape(-1, 1, 1)
    torch.testing.assert_close(xt, a * x0 + s * eps)
    # scalar t broadcasts to the whole batch
    xt1 = path.noise(x0, t[2], eps)
    torch.testing.assert_close(
        xt1, path.alpha(t[2]).double() * x0 + path.sigma(t[2]).double() * eps
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_round_trip_through_every_prediction(case, kind):
    path, t = _case(case)
    x0, eps = _data(len(t), seed=1)
    xt = path.noise(x0, t, eps)
    pred = path.from_x0_eps(x0, eps, kind, t)
    x0_r, eps_r = path.to_x0_eps(pred, kind, xt, t)
    torch.testing.assert_close(x0_r, x0, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(eps_r, eps, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prediction_definitions(case):
    """Pin each parameterization to its formula (a round trip alone cannot catch a sign
    error made the same way in both directions)."""
    path, t = _case(case)
    x0, eps = _data(len(t), seed=2)
    a = path.alpha(t).double().reshape(-1, 1, 1)
    s = path.sigma(t).double().reshape(-1, 1, 1)
    torch.testing.assert_close(path.from_x0_eps(x0, eps, "eps", t), eps)
    torch.testing.assert_close(path.from_x0_eps(x0, eps, "x0", t), x0)
    torch.testing.assert_close(path.from_x0_eps(x0, eps, "v", t), a * eps - s * x0)
    torch.testing.assert_close(path.from_x0_eps(x0, eps, "score", t), -eps / s)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_score_of_gaussian_data_is_grad_log_density(case):
    """For x0 ~ N(mu, c^2), x_t ~ N(a mu, a^2 c^2 + s^2) and Tweedie's x0 = E[x0 | x_t]
    converted to 'score' must equal -(x_t - a mu) / (a^2 c^2 + s^2)."""
    path, t = _case(case)
    mu, c = 0.7, 0.4
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(len(t), 4, generator=g, dtype=torch.float64) * 2.0
    a = path.alpha(t).double().reshape(-1, 1)
    s = path.sigma(t).double().reshape(-1, 1)
    var = a * a * c * c + s * s
    x0_hat = mu + a * c * c / var * (xt - a * mu)
    score = path.convert(x0_hat, "x0", "score", xt, t)
    torch.testing.assert_close(score, -(xt - a * mu) / var, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_convert_agrees_with_going_through_x0_eps(case):
    path, t = _case(case)
    x0, eps = _data(len(t), seed=4)
    xt = path.noise(x0, t, eps)
    for src in PREDICTIONS:
        pred = path.from_x0_eps(x0, eps, src, t)
        for dst in PREDICTIONS:
            got = path.convert(pred, src, dst, xt, t)
            want = path.from_x0_eps(x0, eps, dst, t)
            torch.testing.assert_close(
                got, want, rtol=1e-8, atol=1e-8, msg=lambda m, s=src, d=dst: f"{s}->{d}: {m}"
            )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_velocity_is_time_derivative_of_the_path(case):
    path, t = _case(case)
    x0, eps = _data(len(t), seed=5)
    if case[1] == "vp_discrete":
        # abar is piecewise linear in t: stay inside one table segment, off the integers
        t = t.floor() + 0.5
        h = torch.full_like(t, 0.25)
    else:
        h = 2.0**-12 * t.clamp(min=1.0)
    tp, tm = (t + h).float(), (t - h).float()
    dt = (tp.double() - tm.double()).reshape(-1, 1, 1)  # the step actually taken in float32
    fd = (path.noise(x0, tp, eps) - path.noise(x0, tm, eps)) / dt
    vel = path.from_x0_eps(x0, eps, "velocity", t)
    scale = float(vel.abs().max())
    torch.testing.assert_close(vel, fd, rtol=2e-3, atol=2e-3 * scale)
    # and the derivative methods themselves
    a_fd = (path.alpha(tp.double()) - path.alpha(tm.double())) / dt.flatten()
    s_fd = (path.sigma(tp.double()) - path.sigma(tm.double())) / dt.flatten()
    torch.testing.assert_close(path.d_alpha(t.double()), a_fd, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(path.d_sigma(t.double()), s_fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "schedule,kw",
    [("linear", {}), ("scaled_linear", SD_BETAS), ("squaredcos_cap_v2", {})],
    ids=["linear", "sd-scaled-linear", "squaredcos"],
)
def test_vp_discrete_matches_diffusers_alphas_cumprod_exactly(schedule, kw):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=schedule, **kw
    ).alphas_cumprod
    assert torch.equal(diffusers_alphas_cumprod(schedule, 1000, **kw), ref)
    path = make_path("vp_discrete", schedule=schedule, **kw)
    ints = torch.arange(1000, dtype=torch.float64)
    abar, _ = path._abar(ints)
    assert torch.equal(abar.float(), ref)
    torch.testing.assert_close(path.alpha(ints) ** 2, ref.double(), rtol=1e-12, atol=0)
    torch.testing.assert_close(path.sigma(ints) ** 2, 1 - ref.double(), rtol=1e-12, atol=1e-15)
    # between integers abar interpolates linearly
    mid, _ = path._abar(torch.tensor([10.25], dtype=torch.float64))
    torch.testing.assert_close(mid, 0.75 * ref[10:11].double() + 0.25 * ref[11:12].double())


def test_vp_discrete_zero_snr_matches_diffusers_rescaled_table():
    diffusers = pytest.importorskip("diffusers")
    kw = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", **SD_BETAS)
    ref = diffusers.EulerDiscreteScheduler(**kw, rescale_betas_zero_snr=True).alphas_cumprod
    path = make_path("vp_discrete", schedule="scaled_linear", zero_snr=True, **SD_BETAS)
    torch.testing.assert_close(path.abar.float(), ref, rtol=1e-5, atol=1e-9)
    assert float(path.abar[-1]) == 2.0**-24  # finite 1 / alpha at the last step
    plain = make_path("vp_discrete", schedule="scaled_linear", **SD_BETAS)
    assert float(plain.abar[-1]) > 1e-3 and float(plain.abar[0]) == float(path.abar[0])


def test_vp_discrete_default_is_not_sd_schedule():
    lin = VPDiscrete()
    sd = VPDiscrete(schedule="scaled_linear", **SD_BETAS)
    # SD's table keeps much more signal at the end than the DDPM default
    assert float(sd.abar[-1]) > 10 * float(lin.abar[-1])


def test_diffusers_alphas_cumprod_unknown_schedule():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        diffusers_alphas_cumprod("quadratic")


def test_trigflow_alpha_sigma_circle():
    path = TrigFlow(sigma_data=0.5)
    t = torch.linspace(0, math.pi / 2, 17, dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    torch.testing.assert_close(a**2 + (s / 0.5) ** 2, torch.ones_like(t))
    assert float(path.sigma(torch.tensor(path.t_max))) == pytest.approx(0.5)
    assert float(path.alpha(torch.tensor(path.t_max))) == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(path.prior(torch.ones(3)), torch.full((3,), 0.5))


def test_vp_continuous_preserves_variance_and_linear_formula():
    for schedule in ("linear", "cosine"):
        path = VPContinuous(schedule=schedule)
        t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
        torch.testing.assert_close(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t))
        assert float(path.alpha(torch.tensor(0.0))) == pytest.approx(1.0)
        assert bool((path.alpha(t[1:]) < path.alpha(t[:-1])).all())
    path = VPContinuous(schedule="linear", beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.3], dtype=torch.float64)
    want = math.exp(-0.5 * (0.1 * 0.3 + 0.5 * 19.9 * 0.09))
    assert float(path.alpha(t)) == pytest.approx(want, rel=1e-12)
    cos = VPContinuous(schedule="cosine")
    s = 0.008
    f = math.cos((0.3 + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)
    assert float(cos.alpha(t)) == pytest.approx(f, rel=1e-12)


def test_rectified_flow_and_edm_coefficients():
    rf = RectifiedFlow()
    t = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(rf.alpha(t), 1 - t)
    torch.testing.assert_close(rf.sigma(t), t)
    torch.testing.assert_close(rf.network_time(t), 1000 * t)
    edm = EDM()
    s = torch.tensor([0.002, 0.5, 1.0, 80.0])
    torch.testing.assert_close(edm.alpha(s), torch.ones(4))
    torch.testing.assert_close(edm.sigma(s), s)


def test_edm_network_time_is_log_sigma_over_four():
    edm = EDM()
    s = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    want = torch.tensor([math.log(v) / 4 for v in s.tolist()], dtype=torch.float64)
    torch.testing.assert_close(edm.network_time(s), want)
    assert float(edm.network_time(torch.tensor(1.0))) == 0.0


def test_input_scale_is_inverse_std():
    edm = EDM()
    s = torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(edm.input_scale(s, 0.5), 1 / torch.sqrt(0.25 + s * s))
    vp = VPContinuous()
    t = torch.tensor([0.2, 0.7])
    torch.testing.assert_close(vp.input_scale(t, 1.0), torch.ones(2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sample_t_within_range(case):
    path, _ = _case(case)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(6))
    t = path.sample_t(4096, u)
    assert t.shape == (4096,)
    assert bool(torch.isfinite(t).all())
    assert float(t.min()) >= path.t_min
    assert float(t.max()) <= path.t_max
    assert float(t.std()) > 0  # not a constant
    if case[1] == "vp_discrete":
        assert torch.equal(t, t.round())  # integer timestep indices, as DDPM trains


def test_rf_logit_normal_concentrates_around_half():
    u = torch.rand(8192, generator=torch.Generator().manual_seed(7))
    ln = RectifiedFlow(t_sampling="logit_normal").sample_t(8192, u)
    uni = RectifiedFlow().sample_t(8192, u)
    mid = lambda x: float(((x > 0.25) & (x < 0.75)).float().mean())  # noqa: E731
    # P(|N(0,1)| < logit(0.75) = 1.0986) = 0.728; uniform gives 0.5
    assert mid(ln) == pytest.approx(0.728, abs=0.03)
    assert mid(uni) == pytest.approx(0.5, abs=0.03)
    assert float(ln.median()) == pytest.approx(0.5, abs=0.03)
    shifted = RectifiedFlow(t_sampling="logit_normal", logit_mean=1.0).sample_t(8192, u)
    assert float(shifted.median()) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.03)


def test_edm_and_trigflow_training_densities():
    u = torch.rand(8192, generator=torch.Generator().manual_seed(8))
    edm = EDM(p_mean=-1.2, p_std=1.2)
    log_s = edm.sample_t(8192, u).log()
    assert float(log_s.median()) == pytest.approx(-1.2, abs=0.05)
    assert float(log_s.std()) == pytest.approx(1.2, abs=0.06)  # clamping barely matters
    tf = TrigFlow(sigma_data=0.5, p_mean=-1.0, p_std=1.4)
    log_tan = (0.5 * tf.sample_t(8192, u).tan()).log()
    assert float(log_tan.median()) == pytest.approx(-1.0, abs=0.05)
    assert float(log_tan.std()) == pytest.approx(1.4, abs=0.06)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("n", [1, 2, 4, 10, 25])
def test_timesteps_decreasing_from_t_max(case, n):
    path, _ = _case(case)
    ts = path.timesteps(n)
    assert ts.shape == (n,)
    assert float(ts[0]) == pytest.approx(path.t_max, rel=1e-6)
    assert bool((ts[1:] < ts[:-1]).all())
    assert float(ts[-1]) >= path.t_min


def test_timesteps_values():
    torch.testing.assert_close(RectifiedFlow().timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    edm = EDM(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    ts = edm.timesteps(5).double()
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    want = torch.tensor([(hi + i / 4 * (lo - hi)) ** 7 for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(ts, want, rtol=1e-6, atol=0)
    assert float(ts[-1]) == pytest.approx(0.002, rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 16, 20, 48, 50, 61, 100, 250, 1000])
def test_vp_discrete_timesteps_match_diffusers_trailing(n):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(timestep_spacing="trailing")
    sch.set_timesteps(n)
    ts = VPDiscrete().timesteps(n)
    # diffusers can end on index -1 (n=61); a valid grid clamps that to 0
    assert torch.equal(ts, sch.timesteps.float().clamp(min=0))
    assert torch.equal(ts, ts.round())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fraction_to_t_and_prior(case):
    path, _ = _case(case)
    assert float(path.fraction_to_t(0.0)) == pytest.approx(path.t_min, abs=1e-6)
    assert float(path.fraction_to_t(1.0)) == pytest.approx(path.t_max, rel=1e-6)
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(9))
    s_max = float(path.sigma(torch.tensor(path.t_max)))
    torch.testing.assert_close(path.prior(eps), s_max * eps)


def test_unknown_prediction_kind_raises():
    path = RectifiedFlow()
    x = torch.zeros(2, 3)
    t = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="velocity"):
        path.to_x0_eps(x, "epsilon", x, t)
    with pytest.raises(ValueError, match="score"):
        path.from_x0_eps(x, x, "flow", t)
    with pytest.raises(ValueError):
        path.convert(x, "eps", "sample", x, t)
    with pytest.raises(ValueError):
        path.convert(x, "sample", "eps", x, t)


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "velocity"])
def test_per_position_times_convert_like_each_position_alone(kind):
    """A (B, T) time gives each position of a (B, T, D) sequence its own level (Streaming
    Diffusion Policy): every conversion equals the one made position by position."""
    path = make_path("vp_discrete", schedule="squaredcos_cap_v2", num_train_timesteps=100)
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    t = torch.randint(0, 100, (3, 5), generator=g).float()
    x0, eps = path.to_x0_eps(pred, kind, x, t)
    back = path.from_x0_eps(x0, eps, kind, t)
    noised = path.noise(x0, t, eps)
    for j in range(5):
        x0_j, eps_j = path.to_x0_eps(pred[:, j], kind, x[:, j], t[:, j])
        torch.testing.assert_close(x0[:, j], x0_j)
        torch.testing.assert_close(eps[:, j], eps_j)
        torch.testing.assert_close(back[:, j], path.from_x0_eps(x0_j, eps_j, kind, t[:, j]))
        torch.testing.assert_close(noised[:, j], path.noise(x0_j, t[:, j], eps_j))
    torch.testing.assert_close(back, pred, rtol=1e-4, atol=1e-4)  # a round trip
