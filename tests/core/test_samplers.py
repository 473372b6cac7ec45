"""Behavioural tests for fewstep.core.samplers (CPU, fast).

The workhorse is an exact denoiser for Gaussian data x0 ~ N(mu, s^2 I): its posterior mean
is E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu), so the probability-flow ODE
maps a prior draw z to mu + s z and every solver's error is visible in the sample stats.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.core.models import Denoiser, GuidedDenoiser, ModuleDenoiser
from fewstep.core.paths import make_path
from fewstep.core.samplers import (
    SAMPLERS,
    DDPMSampler,
    DiffusersSampler,
    EulerSampler,
    FewStepSampler,
    HeunSampler,
    Sample,
    make_sampler,
)

MU, STD = 1.0, 0.5


class GaussianDenoiser(Denoiser):
    """Exact x0-prediction for data N(mu, std^2 I) on any path; counts its calls."""

    def __init__(self, path, mu: float = MU, std: float = STD):
        super().__init__(path, "x0")
        self.mu, self.std = mu, std
        self.calls = 0

    def forward(self, x_t, t, cond=None):
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float32).expand(x_t.shape[0])
        a, s = self.path.coeffs(t, x_t)
        v = self.std**2
        return self.mu + a * v / (a * a * v + s * s) * (x_t - a * self.mu)


class CountingNet(nn.Module):
    """A conditional net that counts the samples it has seen: out = 0.9 x + cond."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x, time, cond=None):
        self.seen += x.shape[0]
        c = 0 if cond is None else cond.reshape(-1, *([1] * (x.ndim - 1)))
        return 0.9 * x + c


def _noise(n=2048, shape=(2,), seed=0):
    """Standard normal noise standardised to mean 0 and std 1 exactly, so sample stats
    measure only the solver (the flow map is affine in the noise)."""
    z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return (z - z.mean()) / z.std()


def _stats(x):
    return float(x.mean()), float(x.std())


PATH_CASES = [
    ("rectified_flow", {}),
    ("vp_discrete", {}),
    ("edm", {}),
]


@pytest.mark.parametrize("name,kw", PATH_CASES, ids=[c[0] for c in PATH_CASES])
@pytest.mark.parametrize(
    "sampler,tol_std",
    [(EulerSampler(100), 0.02), (HeunSampler(50), 0.008)],
    ids=["euler100", "heun50"],
)
def test_samplers_reach_gaussian_target(name, kw, sampler, tol_std):
    path = make_path(name, **kw)
    den = GaussianDenoiser(path)
    out = sampler.sample(den, _noise())
    assert isinstance(out, Sample)
    assert out.x.shape == (2048, 2)
    mean, std = _stats(out.x)
    # vp_discrete and edm drop the small data term of the prior: mean bias <= ~0.007
    assert mean == pytest.approx(MU, abs=0.012)
    assert std == pytest.approx(STD, abs=tol_std)


def test_euler_converges_with_steps():
    path = make_path("rectified_flow")
    errs = [
        abs(_stats(EulerSampler(n).sample(GaussianDenoiser(path), _noise()).x)[1] - STD)
        for n in (5, 20, 80)
    ]
    assert errs[0] > errs[1] > errs[2]
    # first order: 4x the steps, about a quarter of the error
    assert errs[1] / errs[2] == pytest.approx(4.0, rel=0.3)


@pytest.mark.parametrize("name", ["rectified_flow", "vp_discrete"])
def test_x0_trajectory_runs_from_the_first_prediction_to_the_sample(name):
    path = make_path(name)
    den = GaussianDenoiser(path)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    sampler = EulerSampler(steps=6)
    traj = sampler.x0_trajectory(den, noise)
    assert len(traj) == 6
    t0 = path.timesteps(6)[0]
    torch.testing.assert_close(traj[0], den.predict(path.prior(noise), t0, kind="x0"))
    torch.testing.assert_close(traj[-1], sampler.sample(den, noise).x)  # last jump lands on it
    # the prediction sharpens along the way: from the prior's blur towards the data spread
    assert float(traj[0].std()) < float(traj[-1].std())
    with pytest.raises(NotImplementedError, match="EulerSampler"):
        HeunSampler(steps=3).x0_trajectory(den, noise)


def test_heun_beats_euler_on_rectified_flow():
    path = make_path("rectified_flow")
    z = _noise()

    def err(sampler):
        return abs(_stats(sampler.sample(GaussianDenoiser(path), z).x)[1] - STD)

    for n in (4, 10):
        assert err(HeunSampler(n)) < err(EulerSampler(n)) / 2
    # and at fewer network evaluations: Heun 6 steps (11 NFE) vs Euler 20 steps (20 NFE)
    assert err(HeunSampler(6)) < err(EulerSampler(20))
    # second order: doubling the steps cuts the error about fourfold
    assert err(HeunSampler(10)) / err(HeunSampler(20)) > 3.0


@pytest.mark.parametrize("n", [1, 3, 8])
def test_nfe_counts(n):
    path = make_path("rectified_flow")
    z = _noise(8)
    den = GaussianDenoiser(path)
    assert EulerSampler(n).sample(den, z).nfe == n
    assert den.calls == n
    den = GaussianDenoiser(path)
    assert HeunSampler(n).sample(den, z).nfe == 2 * n - 1
    assert den.calls == 2 * n - 1
    times = [1.0 - i / n for i in range(n)]
    den = GaussianDenoiser(path)
    assert FewStepSampler(times).sample(den, z).nfe == n
    assert den.calls == n


@pytest.mark.parametrize("n", [1, 3])
def test_nfe_doubles_under_guidance(n):
    path = make_path("vp")
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([1.0, 0.0, -1.0, 2.0])
    for sampler, nfe in [
        (EulerSampler(n), n),
        (HeunSampler(n), 2 * n - 1),
        (FewStepSampler.uniform(n), n),
    ]:
        net = CountingNet()
        guided = GuidedDenoiser(ModuleDenoiser(net, path, "eps"), 3.0, torch.zeros_like)
        out = sampler.sample(guided, z, cond)
        assert out.nfe == 2 * nfe
        assert net.seen == 2 * nfe * 4  # cond + uncond rows actually evaluated
        net = CountingNet()
        plain = GuidedDenoiser(ModuleDenoiser(net, path, "eps"), 1.0, torch.zeros_like)
        assert sampler.sample(plain, z, cond).nfe == nfe
        assert net.seen == nfe * 4


@pytest.mark.parametrize("name", ["rectified_flow", "vp_discrete", "edm", "trigflow"])
def test_one_step_few_step_sampler_is_x0_prediction_of_the_prior(name):
    path = make_path(name)
    den = GaussianDenoiser(path, mu=0.4, std=0.8)
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    out = FewStepSampler((1.0,)).sample(den, z)
    t_max = torch.full((6,), float(path.t_max))
    want = den.predict(path.prior(z), t_max, kind="x0")
    torch.testing.assert_close(out.x, want)
    assert out.nfe == 1


def test_few_step_rollout_states_and_renoising():
    path = make_path("vp_discrete")
    den = GaussianDenoiser(path)
    sampler = FewStepSampler((1.0, 0.6, 0.3))
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    fresh_noise = [
        torch.randn(5, 2, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)
    ]

    def fresh_factory():
        it = iter(fresh_noise)
        return lambda like: next(it)

    ts = [path.fraction_to_t(f) for f in sampler.times]
    # by hand: predict x0, re-noise to the next time with fresh noise
    states = [path.prior(z)]
    x = states[0]
    for i in range(3):
        x0 = den.predict(x, ts[i].expand(5), kind="x0")
        x = path.noise(x0, ts[i + 1].expand(5), fresh_noise[i]) if i < 2 else x0
        states.append(x)

    for k in range(1, 3):
        x, t, nfe = sampler.rollout(den, z, upto=k, fresh=fresh_factory())
        assert nfe == k
        assert float(t) == pytest.approx(float(ts[k]))
        torch.testing.assert_close(x, states[k])
    x, t, nfe = sampler.rollout(den, z, upto=3, fresh=fresh_factory())
    assert t is None and nfe == 3
    torch.testing.assert_close(x, states[3])
    x, t, nfe = sampler.rollout(den, z, fresh=fresh_factory())  # upto=None: all steps
    assert t is None and nfe == 3
    torch.testing.assert_close(x, states[3])
    x, t, nfe = sampler.rollout(den, z, upto=0)
    assert nfe == 0 and float(t) == pytest.approx(float(ts[0]))
    torch.testing.assert_close(x, states[0])


def test_few_step_sampler_generator_and_uniform():
    path = make_path("rectified_flow")
    den = GaussianDenoiser(path)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    a = FewStepSampler.uniform(3, generator=torch.Generator().manual_seed(7)).sample(den, z)
    b = FewStepSampler.uniform(3, generator=torch.Generator().manual_seed(7)).sample(den, z)
    c = FewStepSampler.uniform(3, generator=torch.Generator().manual_seed(8)).sample(den, z)
    torch.testing.assert_close(a.x, b.x)
    assert float((a.x - c.x).abs().max()) > 1e-4  # re-noising draws fresh noise
    assert FewStepSampler.uniform(4).times == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError):
        FewStepSampler(())


def test_few_step_on_exact_denoiser_keeps_the_target_distribution():
    """Consistency multistep sampling with an exact x0-predictor of a Gaussian collapses
    to the mean in one step; re-noising and re-denoising keeps the mean and grows the
    spread towards the target (never past it)."""
    path = make_path("rectified_flow")
    den = GaussianDenoiser(path)
    z = _noise()
    one = FewStepSampler((1.0,)).sample(den, z).x
    four = FewStepSampler.uniform(4, generator=torch.Generator().manual_seed(0)).sample(den, z).x
    assert _stats(one)[0] == pytest.approx(MU, abs=1e-5)
    assert _stats(one)[1] == pytest.approx(0.0, abs=1e-5)
    m4, s4 = _stats(four)
    assert m4 == pytest.approx(MU, abs=0.03)
    assert 0.2 < s4 < STD + 0.02


@pytest.mark.parametrize("steps", [4, 10, 20])
@pytest.mark.parametrize(
    "schedule,kw",
    [("linear", {}), ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012})],
    ids=["linear", "sd"],
)
def test_diffusers_ddim_matches_euler(steps, schedule, kw):
    """DDIM with eta=0, trailing spacing and set_alpha_to_one=True steps along the same grid
    as EulerSampler (steps dividing 1000, so DDIM's prev_t = t - 1000 // steps is the next
    grid point) and its last step lands on clean data. The two differ only in the prior:
    diffusers starts from unit noise, fewstep from sigma(t_max) * noise."""
    diffusers = pytest.importorskip("diffusers")
    path = make_path("vp_discrete", schedule=schedule, **kw)
    den = GaussianDenoiser(path)
    sch = diffusers.DDIMScheduler(
        beta_schedule=schedule,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        **kw,
    )
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(4))
    ours = DiffusersSampler(sch, steps=steps).sample(den, z)
    assert ours.nfe == steps
    sch.set_timesteps(steps)
    assert torch.equal(sch.timesteps.float(), path.timesteps(steps))
    s_max = float(path.sigma(torch.tensor(path.t_max)))
    euler = EulerSampler(steps).sample(den, z / s_max)  # same starting point exactly
    torch.testing.assert_close(ours.x, euler.x, rtol=1e-5, atol=1e-5)
    # without aligning the priors they still agree closely (sigma(t_max) ~ 1)
    torch.testing.assert_close(ours.x, EulerSampler(steps).sample(den, z).x, rtol=0, atol=5e-3)


def test_diffusers_ddim_with_v_and_x0_prediction_types():
    """The sampler converts into the scheduler's prediction_type; every type gives the
    same trajectory."""
    diffusers = pytest.importorskip("diffusers")
    path = make_path("vp_discrete")
    den = GaussianDenoiser(path)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    outs = []
    for pt in ("epsilon", "v_prediction", "sample"):
        sch = diffusers.DDIMScheduler(
            prediction_type=pt,
            timestep_spacing="trailing",
            clip_sample=False,
            set_alpha_to_one=True,
        )
        outs.append(DiffusersSampler(sch, steps=10).sample(den, z).x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)


def test_diffusers_flow_match_euler_on_rectified_flow():
    diffusers = pytest.importorskip("diffusers")
    path = make_path("rectified_flow")
    den = GaussianDenoiser(path)
    z = _noise()
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    out = DiffusersSampler(sch, steps=100).sample(den, z)
    assert out.nfe == 100
    mean, std = _stats(out.x)
    assert mean == pytest.approx(MU, abs=1e-3)
    assert std == pytest.approx(STD, abs=0.02)
    # it is Euler in t on the scheduler's sigma grid
    sch.set_timesteps(8)
    grid = sch.sigmas[:-1].tolist()
    assert sch.sigmas[-1] == 0
    ours = EulerSampler(times=grid).sample(den, z)
    theirs = DiffusersSampler(sch, steps=8).sample(den, z)
    torch.testing.assert_close(theirs.x, ours.x, rtol=1e-4, atol=1e-4)


def test_make_sampler():
    assert isinstance(make_sampler("euler", steps=3), EulerSampler)
    assert make_sampler("euler", steps=3).steps == 3
    assert isinstance(make_sampler("heun"), HeunSampler)
    assert isinstance(make_sampler("few-step", times=(1.0, 0.5)), FewStepSampler)
    with pytest.raises(ValueError) as err:
        make_sampler("dpm++")
    for name in SAMPLERS:
        assert name in str(err.value)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_sampler_matches_diffusers_ddpm_scheduler(clip):
    """Ancestral DDPM on diffusion_policy's settings (100-step squaredcos_cap_v2 table, eps
    prediction, clip_sample on or off) equals diffusers' DDPMScheduler step for step when
    both draw their noise from generators with the same seed and start from the same x."""
    diffusers = pytest.importorskip("diffusers")
    path = make_path("vp_discrete", schedule="squaredcos_cap_v2", num_train_timesteps=100)
    den = GaussianDenoiser(path, mu=0.2, std=0.3)  # inside the clip range
    sch = diffusers.DDPMScheduler(
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip is not None,
        prediction_type="epsilon",
        variance_type="fixed_small",
    )
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    s_max = float(path.sigma(torch.tensor(path.t_max)))
    ours = DDPMSampler(100, clip_x0=clip, generator=torch.Generator().manual_seed(1))
    out = ours.sample(den, z / s_max)  # our prior is sigma(t_max) * noise: start at z exactly
    assert out.nfe == 100
    g = torch.Generator().manual_seed(1)
    x = z.clone()
    sch.set_timesteps(100)
    for ts in sch.timesteps:
        eps = den.predict(x, ts.float().expand(len(x)), kind="eps")
        x = sch.step(eps, ts, x, generator=g).prev_sample
    torch.testing.assert_close(out.x, x, rtol=1e-4, atol=1e-4)
    # and it samples the data distribution (the denoiser is exact)
    m, s = _stats(out.x)
    assert abs(m - 0.2) < 0.03 and abs(s - 0.3) < 0.03
