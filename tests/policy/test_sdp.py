"""Streaming Diffusion Policy: the chunk-wise level schedule, the per-position training
noise, and the streaming buffer at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.core.batch import StepRNG
from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import make_path
from fewstep.policy.data import Normalizer, WindowConfig
from fewstep.policy.nets import ConditionalUnet1D, UnetConfig
from fewstep.policy.sdp import (
    SDPConfig,
    StreamingPolicy,
    chunk_index,
    num_chunks,
    sdp_loss,
    staircase,
    training_levels,
)

H = WindowConfig(obs_horizon=2, pred_horizon=16, action_horizon=3)  # 5 chunks of 3
PATH = make_path("vp_discrete", schedule="squaredcos_cap_v2", num_train_timesteps=100)


class Spy(torch.nn.Module):
    """A stand-in network that records its inputs and predicts zero noise."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, obs):
        self.calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)


def test_chunks_and_staircase():
    assert num_chunks(H) == 5
    # past position 0 joins chunk 0; chunks of 3 from position 1; position 16 - 0 ... fits
    assert chunk_index(H).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    levels = staircase(H, 100, torch.tensor([0, 5]))
    assert levels[0].tolist() == [19] * 4 + [39] * 3 + [59] * 3 + [79] * 3 + [99] * 3
    assert torch.equal(levels[1], levels[0] - 5)
    odd = WindowConfig(obs_horizon=2, pred_horizon=16, action_horizon=4)  # 3 chunks + tail
    assert chunk_index(odd).tolist()[-4:] == [2, 2, 2, 2]


def test_training_regimes():
    cfg = SDPConfig(constant_weight=0.0, chunk_wise_weight=1.0)
    for step in range(20):
        lv = training_levels(H, 100, cfg, StepRNG(0, step, 0, 8, 0, 8))
        offset = staircase(H, 100, torch.zeros(8)) - lv
        assert (offset == offset[:, :1]).all() and offset.min() >= 0 and offset.max() < 20
    const = training_levels(H, 100, SDPConfig(1.0, 0.0, 0.0, 0.0), StepRNG(0, 1, 0, 8, 0, 8))
    assert (const == const[:, :1]).all() and not (const[:, 0] == const[0, 0]).all()
    draws = [training_levels(H, 100, SDPConfig(), StepRNG(1, s, 0, 4, 0, 4))[0] for s in range(40)]
    assert {len(set(d.tolist())) > 1 for d in draws} == {True, False}  # both regimes drawn
    with pytest.raises(ValueError, match="sum to 1"):
        SDPConfig(constant_weight=0.5, chunk_wise_weight=0.8)
    with pytest.raises(ValueError, match="buffer_init"):
        SDPConfig(buffer_init="ones")


def test_training_noise_is_per_position():
    """Each position is noised at its own level and the network sees every level: a
    single level for the sequence (the ordinary diffusion loss) fails this."""
    spy = Spy()
    den = ModuleDenoiser(spy, PATH, "eps")
    x0, eps = torch.randn(2, 16, 2), torch.randn(2, 16, 2)
    levels = staircase(H, 100, torch.tensor([0, 7]))
    loss = sdp_loss(den, x0, torch.zeros(2, 8), levels, eps)
    x_t, t_seen = spy.calls[0]
    assert torch.equal(t_seen, levels.float())
    a, s = PATH.alpha(levels.float())[..., None], PATH.sigma(levels.float())[..., None]
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    assert not torch.allclose(x_t[:, :4], (a[:, -1:] * x0 + s[:, -1:] * eps)[:, :4])
    torch.testing.assert_close(loss, eps.pow(2).mean())  # the spy predicts zero noise
    v_loss = sdp_loss(ModuleDenoiser(spy, PATH, "v"), x0, torch.zeros(2, 8), levels, eps)
    torch.testing.assert_close(v_loss, (a * eps - s * x0).pow(2).mean())


def test_per_position_levels_reach_the_network_time_embedding():
    net = ConditionalUnet1D(2, 16, 8, UnetConfig(down_dims=(16, 32), time_embed_dim=16))
    x, obs = torch.randn(2, 16, 2), torch.randn(2, 8)
    same = net(x, torch.tensor([30.0, 60.0]), obs)
    assert torch.allclose(same, net(x, torch.tensor([[30.0] * 16, [60.0] * 16]), obs))
    stair = staircase(H, 100, torch.zeros(2)).float()
    assert not torch.allclose(same, net(x, stair, obs))
    with pytest.raises(ValueError, match="16 steps"):
        net(torch.randn(2, 12, 2), torch.tensor([1.0, 1.0]), obs)


def _policy(init="zero", net=None, jump=1):
    net = net or Spy()
    den = ModuleDenoiser(net, PATH, "eps")
    norm = Normalizer({"obs": (np.zeros(4), np.ones(4)), "action": (np.zeros(2), np.ones(2))})
    cfg = SDPConfig(buffer_init=init, levels_per_step=jump)
    return StreamingPolicy(den, norm, H, 2, cfg, seed=0), net


@pytest.mark.parametrize("init", ["zero", "constant", "denoise"])
def test_streaming_buffer_costs_n_over_c_per_plan(init):
    policy, spy = _policy(init)
    obs = np.random.default_rng(0).random((3, 4)).astype(np.float32)  # a batch of 3 envs
    for step in range(4 * H.action_horizon):
        assert policy.act(obs).shape == (3, 2)
        if step % H.action_horizon == 0:  # a plan just ran: the buffer shifted
            expected = staircase(H, 100, torch.zeros(3))
            assert torch.equal(policy.levels, expected), "after a shift the buffer is the staircase"
    assert policy.plans == 4
    # N / C = 100 / 5 evaluations per plan; "denoise" spends N on its first plan instead
    assert policy.nfe == (100 + 3 * 20 if init == "denoise" else 4 * 20)
    first = 100 if init == "denoise" else 0
    # every steady-state call sees the staircase, ending with the executed chunk clean
    levels = torch.stack([t[0] for _, t in spy.calls[first:]])
    assert (levels[:, 0] > levels[:, -1]).sum() == 0 and (levels[:, -1] > levels[:, 0]).all()


def test_jumps_of_several_levels_keep_the_staircase():
    policy, _ = _policy(jump=4)
    obs = np.zeros((2, 4), np.float32)
    for _ in range(3 * H.action_horizon):
        policy.act(obs)
    assert policy.nfe == 3 * 5  # 20 levels per call in jumps of 4
    assert torch.equal(policy.levels, staircase(H, 100, torch.zeros(2)))
    with pytest.raises(ValueError, match="must divide the 20 levels"):
        _policy(jump=3)


def test_streaming_requires_an_eps_x0_or_v_network():
    den = ModuleDenoiser(Spy(), make_path("rectified_flow"), "velocity")
    norm = Normalizer({"obs": (np.zeros(4), np.ones(4)), "action": (np.zeros(2), np.ones(2))})
    with pytest.raises(ValueError, match="one of"):
        StreamingPolicy(den, norm, H, 2, SDPConfig())


def test_step_rules_match_core_samplers_at_a_uniform_level():
    """At one level for every position, the DDIM rule is core's Euler (DDIM) step and the
    DDPM rule has the posterior's mean; the DDIM rule must ignore its noise argument."""
    from fewstep.core.samplers import ddpm_posterior
    from fewstep.policy.sdp import ddim_update, ddpm_update

    g = torch.Generator().manual_seed(0)
    x, x0, noise = (torch.randn(2, 16, 2, generator=g) for _ in range(3))
    t, s = torch.tensor(60.0), torch.tensor(50.0)
    a_t, s_t, a_s, s_s = PATH.alpha(t), PATH.sigma(t), PATH.alpha(s), PATH.sigma(s)
    eps = (x - a_t * x0) / s_t
    torch.testing.assert_close(
        ddim_update(a_t, s_t, a_s, s_s, x, x0, noise), PATH.noise(x0, s, eps)
    )
    torch.testing.assert_close(
        ddim_update(a_t, s_t, a_s, s_s, x, x0, noise),
        ddim_update(a_t, s_t, a_s, s_s, x, x0, -noise),
    )
    mean, std = ddpm_posterior(a_t, s_t, a_s, s_s, x, x0)
    torch.testing.assert_close(ddpm_update(a_t, s_t, a_s, s_s, x, x0, noise), mean + std * noise)
    assert float(std) > 0
    with pytest.raises(ValueError, match="update must be one of"):
        SDPConfig(update="euler")
