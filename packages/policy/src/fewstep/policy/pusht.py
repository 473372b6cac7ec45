"""Push-T through gym-pusht (the ``pusht`` extra), adapted to the low-dim observation layout.

gym-pusht is imported lazily; without it, :func:`make_pusht_env` raises an ImportError
naming the extra. The adapter exposes gym-pusht's ``obs_type="state"`` observation, which is
also what diffusion_policy's Push-T replay buffer stores as ``data/state``, as float32:

    0: agent x, 1: agent y, 2: block x, 3: block y  (pixels, [0, 512])
    4: block angle  (radians, wrapped to [0, 2*pi))

so a policy trained on ``read_replay_buffer(path, obs_keys=("state",))`` (obs_dim 5,
act_dim 2) runs on the env unchanged. The action is, as in the data, the absolute (x, y)
the agent is driven to, in [0, 512]^2. ``info["success"]`` mirrors gym-pusht's
``is_success`` (block coverage of the goal > 95%), and ``info["agent_pos"]`` its ``pos_agent``.

Untested here: gym-pusht is not installed in this project's environment. The code follows
gym-pusht's documented API (``gym_pusht/PushT-v0``, ``PushTEnv`` in gym_pusht/envs/pusht.py).
Physics pin: gym-pusht up to 0.1.6 registers collisions with pymunk's
``Space.add_collision_handler``, which pymunk 7 removed (gym-pusht issue #23), so those
versions need ``pymunk<7``; gym-pusht's current source uses pymunk 7's ``Space.on_collision``
instead. The extra must pin gym-pusht and pymunk together.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

PUSHT_ID = "gym_pusht/PushT-v0"  # gym-pusht's registered id
PUSHT_OBS_LAYOUT = ("agent_x", "agent_y", "block_x", "block_y", "block_angle")
PUSHT_EXTRA_HINT = "pip install 'fewstep-policy[pusht]'"


def require_gym_pusht():
    """Import gym_pusht (which registers Push-T with gymnasium), or say how to install it."""
    try:
        import gym_pusht
    except ImportError as err:
        raise ImportError(
            f"Push-T needs the optional dependency gym-pusht: {PUSHT_EXTRA_HINT} "
            f"(import failed: {err})"
        ) from err
    return gym_pusht


def pusht_state_obs(state: Any) -> np.ndarray:
    """gym-pusht / diffusion_policy state (..., 5) -> float32 (..., 5), angle in [0, 2*pi)."""
    obs = np.array(state, dtype=np.float32)
    if obs.shape[-1:] != (5,):
        raise ValueError(
            f"Push-T state (..., 5) {PUSHT_OBS_LAYOUT} expected, got shape {obs.shape}"
        )
    obs[..., 4] = np.mod(obs[..., 4], 2 * np.pi)
    return obs


class PushTLowDim(gym.Wrapper):
    """gym-pusht's PushTEnv (``obs_type="state"``) with float32 observations and the info
    keys the evaluation reads (``success``, ``agent_pos``)."""

    plot_y_up = False  # Push-T's coordinates are image coordinates (y grows downward)

    def __init__(self, env: gym.Env):
        super().__init__(env)
        obs_type = getattr(env.unwrapped, "obs_type", "state")
        if obs_type != "state":
            raise ValueError(f"PushTLowDim wraps obs_type='state', got obs_type={obs_type!r}")
        self.observation_space = spaces.Box(
            low=np.zeros(5, np.float32),
            high=np.array([512, 512, 512, 512, 2 * np.pi], np.float32),
            dtype=np.float32,
        )

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return pusht_state_obs(obs), self._info(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(np.asarray(action))
        return pusht_state_obs(obs), reward, terminated, truncated, self._info(info)

    @staticmethod
    def _info(info: dict[str, Any]) -> dict[str, Any]:
        info = dict(info)
        info["success"] = bool(info.get("is_success", False))
        if "pos_agent" in info:
            info["agent_pos"] = np.asarray(info["pos_agent"], dtype=np.float64)
        return info


def make_pusht_env(
    render_mode: str | None = "rgb_array", max_episode_steps: int = 300, **kwargs: Any
) -> gym.Env:
    """Push-T as :class:`PushTLowDim`; ``kwargs`` go to gym-pusht's ``PushTEnv`` (for
    example ``visualization_width``). 300 steps at 10 Hz is gym-pusht's and
    diffusion_policy's episode limit."""
    require_gym_pusht()
    env = gym.make(
        PUSHT_ID,
        obs_type="state",
        render_mode=render_mode,
        max_episode_steps=max_episode_steps,
        **kwargs,
    )
    return PushTLowDim(env)
