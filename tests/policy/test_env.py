"""ReachAround: geometry, collisions, success, mode detection; the Push-T adapter."""

import gymnasium as gym
import numpy as np
import pytest

from fewstep.policy.envs import (
    REACH_AROUND_ID,
    ReachAroundConfig,
    ReachAroundEnv,
    move_with_collision,
    trajectory_mode,
)
from fewstep.policy.pusht import PushTLowDim, make_pusht_env, pusht_state_obs

CFG = ReachAroundConfig()
BOX_MIN, BOX_MAX = CFG.obstacle_min, CFG.obstacle_max


def inside_box(xy):
    xy = np.atleast_2d(xy)
    return (
        (xy[:, 0] > BOX_MIN[0])
        & (xy[:, 0] < BOX_MAX[0])
        & (xy[:, 1] > BOX_MIN[1])
        & (xy[:, 1] < BOX_MAX[1])
    )


def test_reset_layout_and_seeding():
    env = ReachAroundEnv()
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs.shape == (4,)
    assert env.observation_space.contains(obs)
    assert CFG.start_low[1] <= obs[1] <= CFG.start_high[1]
    assert CFG.target_low[1] <= obs[3] <= CFG.target_high[1]
    np.testing.assert_allclose(info["agent_pos"], obs[:2], atol=1e-6)
    again, _ = env.reset(seed=3)
    other, _ = env.reset(seed=4)
    np.testing.assert_array_equal(obs, again)
    assert not np.array_equal(obs, other)


def test_move_with_collision_by_hand():
    # straight up through the box, a step longer than the box is tall: stops on the bottom face
    assert move_with_collision((0.5, 0.3), (0.0, 0.5), BOX_MIN, BOX_MAX) == pytest.approx(
        (0.5, 0.4)
    )
    # diagonal: hits the bottom face halfway (t = 0.5) at x = 0.55, slides the remaining 0.05
    assert move_with_collision((0.5, 0.35), (0.1, 0.1), BOX_MIN, BOX_MAX) == pytest.approx(
        (0.6, 0.4)
    )
    # from the left, into the left face: stops at x = 0.25, slides up by the rest of dy
    assert move_with_collision((0.2, 0.5), (0.1, 0.02), BOX_MIN, BOX_MAX) == pytest.approx(
        (0.25, 0.52)
    )
    # along a face and beside the box: free
    assert move_with_collision((0.5, 0.4), (0.1, 0.0), BOX_MIN, BOX_MAX) == pytest.approx(
        (0.6, 0.4)
    )
    assert move_with_collision((0.1, 0.5), (0.1, 0.0), BOX_MIN, BOX_MAX) == pytest.approx(
        (0.2, 0.5)
    )
    # moving away from a face it touches: free
    assert move_with_collision((0.5, 0.4), (0.0, -0.1), BOX_MIN, BOX_MAX) == pytest.approx(
        (0.5, 0.3)
    )


def test_obstacle_blocks_a_straight_path():
    env = ReachAroundEnv(ReachAroundConfig(max_episode_steps=60))
    env.reset(seed=0, options={"agent": (0.5, 0.1), "target": (0.5, 0.9)})
    path, info, done = [], {}, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(np.array([0.5, 0.9], np.float32))
        path.append(obs[:2])
        done = terminated or truncated
    path = np.array(path)
    assert truncated and not terminated and reward == 0.0
    assert not inside_box(path).any()
    assert path[:, 1].max() <= BOX_MIN[1] + 1e-6  # pressed against the bottom face
    assert path[-1, 1] == pytest.approx(BOX_MIN[1], abs=1e-6)
    assert info["mode"] is None and not info["success"]


def test_random_actions_never_enter_the_box():
    env = ReachAroundEnv()
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for _ in range(3000):
        obs, _, terminated, truncated, _ = env.step(rng.uniform(0, 1, 2))
        assert not inside_box(obs[:2]).any()
        assert 0.0 <= obs[0] <= 1.0 and 0.0 <= obs[1] <= 1.0
        if terminated or truncated:
            env.reset()


def test_speed_is_bounded():
    env = ReachAroundEnv()
    obs, _ = env.reset(seed=1)
    nxt, *_ = env.step(np.array([1.0, 0.0]))
    assert np.linalg.norm(nxt[:2] - obs[:2]) == pytest.approx(CFG.max_speed, rel=1e-5)


@pytest.mark.parametrize("offset, expected", [(-0.002, True), (0.002, False)])
def test_success_only_within_the_threshold(offset, expected):
    env = ReachAroundEnv()
    target = (0.5, 0.85)
    agent = (0.5, target[1] - CFG.success_radius - offset)
    env.reset(seed=0, options={"agent": agent, "target": target})
    _, reward, terminated, _, info = env.step(np.array(agent))  # stay put
    assert info["success"] is expected and terminated is expected
    assert reward == float(expected)
    assert ("mode" in info) is expected


def test_modes_of_hand_made_trajectories():
    left = np.array([[0.5, 0.1], [0.15, 0.35], [0.15, 0.5], [0.15, 0.65], [0.5, 0.9]])
    right = left * [-1, 1] + [1, 0]
    assert trajectory_mode(left, CFG) == "left"
    assert trajectory_mode(right, CFG) == "right"
    assert trajectory_mode(left[:3], CFG) is None  # still beside the box
    assert trajectory_mode(np.array([[0.5, 0.1], [0.5, 0.4]]), CFG) is None
    assert trajectory_mode(np.array([[0.5, 0.9], [0.4, 0.95]]), CFG) is None  # began above
    # up the left side, back down, then up the right side: the first passage counts
    detour = np.concatenate([left[:4], left[2::-1], right[1:]])
    assert trajectory_mode(detour, CFG) == "left"
    # up the left side to the centre line, back down, then up the right side
    back = np.concatenate([left[:3], left[1::-1], right[1:]])
    assert trajectory_mode(back, CFG) == "right"
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        trajectory_mode(np.zeros((3, 3)), CFG)


@pytest.mark.parametrize("side", ["left", "right"])
def test_env_reports_the_mode_it_was_driven_through(side):
    x = 0.12 if side == "left" else 0.88
    env = ReachAroundEnv()
    env.reset(seed=0, options={"agent": (0.5, 0.1), "target": (0.5, 0.9)})
    info, done = {}, False
    for waypoint in [(x, 0.3), (x, 0.7), (0.5, 0.9)]:
        for _ in range(40):
            _, _, terminated, truncated, info = env.step(np.array(waypoint))
            done = terminated or truncated
            if done:
                break
    assert done and info["success"] and info["mode"] == side


def test_registered_env_and_render():
    env = gym.make(REACH_AROUND_ID, render_mode="rgb_array")
    assert env.spec.max_episode_steps == CFG.max_episode_steps
    obs, _ = env.reset(seed=0)
    env.step(obs[:2] + [0.0, 0.05])
    frame = env.render()
    assert frame.shape == (CFG.render_size, CFG.render_size, 3) and frame.dtype == np.uint8
    grey = (frame == 110).all(axis=-1)  # the obstacle's colour
    assert 0.05 < grey.mean() < 0.2
    assert env.unwrapped.config == CFG


def test_bad_inputs_are_named():
    env = ReachAroundEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0.5]))
    with pytest.raises(ValueError, match="inside the obstacle"):
        env.reset(options={"agent": (0.5, 0.5)})
    with pytest.raises(ValueError, match="render_mode"):
        ReachAroundEnv(render_mode="human")
    with pytest.raises(ValueError, match="below the obstacle"):
        ReachAroundConfig(start_high=(0.7, 0.45))


# -- Push-T adapter (gym-pusht itself is not installed here) ----------------------------------
class FakePushT(gym.Env):
    """Stands in for gym-pusht's PushTEnv(obs_type="state"): float64 state, is_success."""

    obs_type = "state"
    observation_space = gym.spaces.Box(0, 512, (5,), np.float64)
    action_space = gym.spaces.Box(0, 512, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = np.array([10.0, 20.0, 200.0, 300.0, -0.5])
        return self.state.copy(), {"is_success": False, "pos_agent": self.state[:2].copy()}

    def step(self, action):
        self.state[:2] = action
        done = bool(action[0] > 400)
        info = {"is_success": done, "pos_agent": self.state[:2].copy(), "coverage": 0.5}
        return self.state.copy(), float(done), done, False, info


def test_pusht_adapter_on_a_stand_in():
    env = PushTLowDim(FakePushT())
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (5,)
    assert obs[4] == pytest.approx(2 * np.pi - 0.5, abs=1e-5)  # wrapped angle
    assert info["success"] is False and info["agent_pos"].tolist() == [10.0, 20.0]
    obs, _, terminated, _, info = env.step(np.array([450.0, 100.0]))
    assert terminated and info["success"] is True and info["coverage"] == 0.5
    np.testing.assert_allclose(obs[:2], [450.0, 100.0])
    assert env.observation_space.contains(obs)


def test_pusht_state_obs_checks_its_shape():
    out = pusht_state_obs(np.array([[1, 2, 3, 4, 7.0]]))
    assert out.dtype == np.float32 and out[0, 4] == pytest.approx(7.0 - 2 * np.pi, abs=1e-5)
    with pytest.raises(ValueError, match="block_angle"):
        pusht_state_obs(np.zeros(4))


def test_pusht_names_the_extra_when_missing():
    try:
        import gym_pusht  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"fewstep-policy\[pusht\]"):
            make_pusht_env()
    else:
        pytest.skip("gym-pusht is installed; the missing-extra message cannot be shown")
