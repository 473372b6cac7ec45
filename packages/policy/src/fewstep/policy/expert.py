"""A scripted, multimodal expert for ReachAround, and demonstrations recorded from it.

Per episode the expert picks a side (left with probability ``p_left``) and a clearance,
lays a path start -> below the obstacle's corner on that side -> above it -> target, and
follows it by pure pursuit: each step it commands the path point ``lookahead`` ahead of its
projection on the path, plus a little Gaussian noise. The lookahead rounds the corners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewstep.policy.data import Episode
from fewstep.policy.envs.reach_around import ReachAroundConfig, ReachAroundEnv


@dataclass(frozen=True)
class ExpertConfig:
    """How the scripted expert drives ReachAround."""

    p_left: float = 0.5  # probability of passing the obstacle on its left
    clearance: tuple[float, float] = (0.06, 0.12)  # via points' range of distance from the box
    lookahead: float = 0.05  # path distance ahead of the agent's projection that it commands
    action_noise: float = 0.003  # std of the Gaussian noise on every commanded position
    spacing: float = 0.005  # resolution of the path the expert follows

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_left <= 1.0:
            raise ValueError(f"p_left in [0, 1] expected, got {self.p_left}")
        if not 0.0 < self.clearance[0] <= self.clearance[1]:
            raise ValueError(f"0 < clearance[0] <= clearance[1] expected, got {self.clearance}")
        if self.lookahead <= 0 or self.spacing <= 0 or self.action_noise < 0:
            raise ValueError("lookahead > 0, spacing > 0 and action_noise >= 0 expected")


def _resample(points: np.ndarray, spacing: float) -> np.ndarray:
    """Polyline (K, 2) -> points (M, 2) every ``spacing`` along it, both ends included."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    grid = np.linspace(0.0, s[-1], max(2, int(np.ceil(s[-1] / spacing)) + 1))
    return np.stack([np.interp(grid, s, points[:, 0]), np.interp(grid, s, points[:, 1])], 1)


class ExpertPolicy:
    """The scripted expert behind the policy protocol: ``reset()``, ``act(obs) -> action``.

    Reads only the observation (agent xy, target xy) and the task geometry. ``side`` holds
    the side drawn at the last ``reset()``.
    """

    def __init__(
        self,
        env_config: ReachAroundConfig | None = None,
        config: ExpertConfig | None = None,
        seed: int | None = 0,
    ):
        self.env_config = env_config if env_config is not None else ReachAroundConfig()
        self.config = config if config is not None else ExpertConfig()
        self.rng = np.random.default_rng(seed)
        self.side: str | None = None
        self._clearance = (0.0, 0.0)
        self._path: np.ndarray | None = None
        self._index = 0

    def reset(self) -> None:
        """Draw this episode's side and clearances; the path is laid at the first ``act``."""
        c = self.config
        self.side = "left" if self.rng.random() < c.p_left else "right"
        self._clearance = tuple(self.rng.uniform(*c.clearance, size=2))
        self._path = None
        self._index = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs (4,) [agent x, agent y, target x, target y] -> action (2,) float32."""
        if self.side is None:
            raise RuntimeError("call reset() before act()")
        obs = np.asarray(obs, dtype=np.float64).reshape(-1)
        agent, target = obs[:2], obs[2:4]
        if self._path is None:
            self._path = self._lay_path(agent, target)
        c = self.config
        window = self._path[self._index : self._index + int(4 * c.lookahead / c.spacing) + 2]
        self._index += int(np.argmin(np.linalg.norm(window - agent, axis=1)))
        ahead = min(self._index + int(round(c.lookahead / c.spacing)), len(self._path) - 1)
        action = self._path[ahead] + c.action_noise * self.rng.standard_normal(2)
        return np.clip(action, 0.0, 1.0).astype(np.float32)

    def _lay_path(self, agent: np.ndarray, target: np.ndarray) -> np.ndarray:
        e = self.env_config
        dx, dy = self._clearance
        x = e.obstacle_min[0] - dx if self.side == "left" else e.obstacle_max[0] + dx
        x = min(max(x, 0.0), 1.0)
        below = (x, e.obstacle_min[1] - dy)
        above = (x, e.obstacle_max[1] + dy)
        return _resample(np.array([agent, below, above, target]), self.config.spacing)


def collect_demos(
    n_episodes: int,
    seed: int = 0,
    env_config: ReachAroundConfig | None = None,
    expert_config: ExpertConfig | None = None,
) -> list[Episode]:
    """Record ``n_episodes`` expert demonstrations on ReachAround.

    Episode i resets the env with seed ``seed + i``; the expert's own draws (side, clearance,
    noise) come from a generator seeded with ``seed``. Each episode runs until success or
    ``env_config.max_episode_steps``; obs[t] is the observation action[t] answered.
    Failed episodes are kept (``success=False``) so callers see them.
    """
    env = ReachAroundEnv(env_config)
    expert = ExpertPolicy(env.config, expert_config, seed=seed)
    episodes = []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        expert.reset()
        observations, actions = [], []
        done, info = False, {}
        while not done:
            action = expert.act(obs)
            observations.append(obs)
            actions.append(action)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        episodes.append(
            Episode(
                np.stack(observations),
                np.stack(actions),
                mode=info["mode"],
                success=bool(info["success"]),
            )
        )
    return episodes
