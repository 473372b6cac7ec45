"""The scripted expert, closed-loop rollouts, summaries and plots."""

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

from fewstep.policy.envs import REACH_AROUND_ID, ReachAroundConfig, ReachAroundEnv
from fewstep.policy.evaluate import (
    MODE_COLOURS,
    mode_fractions,
    plot_trajectories,
    rollout,
    save_rollout_gif,
    summarise,
    total_variation,
)
from fewstep.policy.expert import ExpertConfig, ExpertPolicy, collect_demos


def make_env():
    return gym.make(REACH_AROUND_ID)


def binomial_band(n, p, k=4.0):
    sd = np.sqrt(p * (1 - p) / n)
    return p - k * sd, p + k * sd


def test_expert_demos_succeed_and_split_both_ways():
    demos = collect_demos(150, seed=0)
    assert np.mean([d.success for d in demos]) >= 0.98
    lo, hi = binomial_band(150, 0.5)
    assert lo < np.mean([d.mode == "left" for d in demos]) < hi
    assert {d.mode for d in demos} == {"left", "right"}
    d = demos[0]
    assert d.obs.shape[1] == 4 and d.action.shape[1] == 2 and len(d.obs) == len(d.action)
    assert d.obs.dtype == np.float32 and d.action.dtype == np.float32
    # the first observation is the reset one; the expert heads for the target afterwards
    env = ReachAroundEnv()
    first, _ = env.reset(seed=0)
    np.testing.assert_array_equal(d.obs[0], first)


def test_expert_side_probability_is_configurable():
    demos = collect_demos(60, seed=1, expert_config=ExpertConfig(p_left=0.9))
    lo, _ = binomial_band(60, 0.9)
    assert np.mean([d.mode == "left" for d in demos]) > lo
    assert np.mean([d.success for d in demos]) >= 0.95


def test_expert_takes_the_side_it_drew():
    env, expert = ReachAroundEnv(), ExpertPolicy(seed=5)
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        expert.reset()
        done, info = False, {}
        while not done:
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            done = terminated or truncated
        assert info["mode"] == expert.side


def test_expert_rollouts_summarise_to_full_success_and_even_modes():
    demos = collect_demos(60, seed=7)
    results = rollout(make_env, ExpertPolicy(seed=11), seeds=range(1000, 1100))
    summary = summarise(results, expert_modes=[d.mode for d in demos])
    assert summary["n_rollouts"] == 100
    assert summary["success_rate"] >= 0.98
    lo, hi = binomial_band(100, 0.5)
    assert lo < summary["mode_fractions"]["left"] < hi
    assert summary["mode_tv"] < 0.25
    assert summary["nfe_per_action"] is None  # the expert does not count evaluations
    assert summary["ms_per_action"] > 0
    r = results[0]
    assert r.seed == 1000 and r.trajectory.shape == (r.steps + 1, 2)
    assert r.actions.shape == (r.steps, 2)
    assert summary["mean_steps"] == pytest.approx(np.mean([r.steps for r in results]))


class ChunkedUp:
    """Commands straight up; pretends to run 3 network evaluations per chunk of 4 actions."""

    def __init__(self):
        self.nfe, self.queue = 0, 0

    def reset(self):
        self.queue = 0

    def act(self, obs):
        if self.queue == 0:
            self.nfe += 3
            self.queue = 4
        self.queue -= 1
        return np.array([obs[0], 1.0], np.float32)


def test_blocked_policy_counts_nfe_and_has_no_mode():
    env_cfg = ReachAroundConfig(max_episode_steps=30)
    results = rollout(lambda: ReachAroundEnv(env_cfg), ChunkedUp(), seeds=[0, 1], max_steps=None)
    assert [r.steps for r in results] == [30, 30]
    assert all(r.nfe == 3 * 8 for r in results)  # ceil(30 / 4) = 8 chunks per episode
    summary = summarise(results, expert_modes={"left": 0.5, "right": 0.5})
    assert summary["success_rate"] == 0.0
    assert summary["mode_fractions"] == {"none": 1.0}
    assert summary["mode_tv"] == pytest.approx(1.0)
    assert summary["nfe_per_action"] == pytest.approx(24 / 30)


def test_max_steps_cuts_episodes_and_mode_comes_from_the_path():
    (full,) = rollout(make_env, ExpertPolicy(seed=0), seeds=[3])
    assert full.success and full.mode in ("left", "right")
    # cut 3 steps before success: past the box, so the mode is known, but no success
    (cut,) = rollout(make_env, ExpertPolicy(seed=0), seeds=[3], max_steps=full.steps - 3)
    assert cut.steps == full.steps - 3 and not cut.success and cut.mode == full.mode
    (early,) = rollout(make_env, ExpertPolicy(seed=0), seeds=[3], max_steps=5)
    assert early.steps == 5 and early.mode is None


def test_mode_fractions_and_total_variation_by_hand():
    assert mode_fractions(["left", "left", "right", None]) == {
        "left": 0.5,
        "none": 0.25,
        "right": 0.25,
    }
    assert total_variation({"left": 0.5, "right": 0.5}, {"left": 0.8, "right": 0.2}) == (
        pytest.approx(0.3)
    )
    assert total_variation({"left": 1.0}, {"right": 1.0}) == pytest.approx(1.0)


def test_plot_colours_paths_by_mode(tmp_path):
    results = rollout(make_env, ExpertPolicy(seed=2), seeds=range(12))
    modes = {r.mode for r in results}
    assert modes == {"left", "right"}
    path = tmp_path / "traj.png"
    plot_trajectories(results, make_env(), path, size=200)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    for mode in ("left", "right"):
        assert (pixels == MODE_COLOURS[mode]).all(axis=1).sum() > 100
    # only left rollouts: no orange
    plot_trajectories([r for r in results if r.mode == "left"], make_env(), path, size=200)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    assert (pixels == MODE_COLOURS["right"]).all(axis=1).sum() == 0


def test_rollout_gif_has_a_frame_per_step(tmp_path):
    path = tmp_path / "roll.gif"
    result = save_rollout_gif(
        lambda: gym.make(REACH_AROUND_ID, render_mode="rgb_array"), ExpertPolicy(), 4, path
    )
    with Image.open(path) as gif:
        assert gif.n_frames == result.steps + 1
    with pytest.raises(ValueError, match="rgb_array"):
        save_rollout_gif(make_env, ExpertPolicy(), 4, tmp_path / "x.gif")
