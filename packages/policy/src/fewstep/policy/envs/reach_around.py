"""ReachAround: a 2-D point agent reaches a target on the far side of a box obstacle.

The agent starts below an axis-aligned box and its target lies above it, so every path to
the target passes either left or right of the box: two homotopy classes, the multimodality
a diffusion policy must keep and a unimodal regressor averages into a collision.

Like Push-T, the action is an absolute position target that a simple controller tracks:
each control step the agent moves toward the commanded point by ``gain * (action - agent)``,
at most ``max_speed`` far. The box is solid: a move that would enter it stops on its face and
slides along it. Success, as in Push-T, is a threshold test (here the agent's distance to
the target), and it ends the episode.

Pure numpy and Python floats: a step costs microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

MODES = ("left", "right")  # the homotopy classes, in the order plots and tables list them


@dataclass(frozen=True)
class ReachAroundConfig:
    """Geometry and dynamics of the task; the workspace is the unit square [0, 1]^2."""

    obstacle_min: tuple[float, float] = (0.25, 0.4)  # lower-left corner (x, y) of the box
    obstacle_max: tuple[float, float] = (0.75, 0.6)  # upper-right corner (x, y) of the box
    start_low: tuple[float, float] = (0.3, 0.05)  # lower corner of the start region (below box)
    start_high: tuple[float, float] = (0.7, 0.2)  # upper corner of the start region
    target_low: tuple[float, float] = (0.3, 0.8)  # lower corner of the target region (above box)
    target_high: tuple[float, float] = (0.7, 0.95)  # upper corner of the target region
    max_speed: float = 0.025  # most distance the agent moves in one control step
    gain: float = 1.0  # controller gain: step = gain * (action - agent), clipped to max_speed
    success_radius: float = 0.04  # success when the agent is closer than this to the target
    max_episode_steps: int = 150  # the episode is truncated after this many control steps
    render_size: int = 96  # side in pixels of the RGB frame render() returns

    def __post_init__(self) -> None:
        lo, hi = np.asarray(self.obstacle_min), np.asarray(self.obstacle_max)
        if not (np.all(lo > 0.0) and np.all(hi < 1.0) and np.all(lo < hi)):
            raise ValueError(
                "obstacle_min < obstacle_max expected, both strictly inside (0, 1)^2; got "
                f"{self.obstacle_min}, {self.obstacle_max}"
            )
        if not (self.start_high[1] < self.obstacle_min[1] < self.obstacle_max[1]):
            raise ValueError("the start region must lie below the obstacle (start_high y < box y)")
        if not (self.target_low[1] > self.obstacle_max[1]):
            raise ValueError("the target region must lie above the obstacle (target_low y > box y)")
        if not (self.max_speed > 0.0 and 0.0 < self.gain <= 1.0):
            raise ValueError(f"max_speed > 0 and 0 < gain <= 1 expected; got {self}")
        if self.success_radius <= 0 or self.max_episode_steps < 1 or self.render_size < 8:
            raise ValueError(
                "success_radius > 0, max_episode_steps >= 1 and render_size >= 8 expected"
            )


def move_with_collision(
    pos: tuple[float, float],
    delta: tuple[float, float],
    box_min: tuple[float, float],
    box_max: tuple[float, float],
) -> tuple[float, float]:
    """Move a point by ``delta``, stopping at the face of a solid box and sliding along it.

    The box's open interior is forbidden; its boundary is allowed. The first contact of the
    segment ``pos -> pos + delta`` with the interior is found with the slab method; from the
    contact point the rest of the move continues along the face (its normal component is
    dropped), which never re-enters the box. ``pos`` must not be inside the box.
    Returns the new (x, y).
    """
    t_enter, t_exit, hit_axis = -math.inf, math.inf, -1
    for axis in (0, 1):
        p, d, lo, hi = pos[axis], delta[axis], box_min[axis], box_max[axis]
        if d == 0.0:
            if p <= lo or p >= hi:
                return (pos[0] + delta[0], pos[1] + delta[1])  # runs parallel, outside the slab
            continue
        t1, t2 = (lo - p) / d, (hi - p) / d
        if t1 > t2:
            t1, t2 = t2, t1
        if t1 > t_enter:
            t_enter, hit_axis = t1, axis
        t_exit = min(t_exit, t2)
    if not (t_enter < t_exit and 0.0 <= t_enter < 1.0 and t_exit > 0.0):
        return (pos[0] + delta[0], pos[1] + delta[1])  # the segment misses the interior
    contact = [pos[0] + t_enter * delta[0], pos[1] + t_enter * delta[1]]
    # put the contact exactly on the face it hit (rounding could leave it a hair inside)
    contact[hit_axis] = box_min[hit_axis] if delta[hit_axis] > 0 else box_max[hit_axis]
    rest = 1.0 - t_enter
    slide = 1 - hit_axis  # the axis along the face
    contact[slide] += rest * delta[slide]
    return (contact[0], contact[1])


def trajectory_mode(xy: np.ndarray, config: ReachAroundConfig) -> str | None:
    """The side on which a path first passed the obstacle: "left", "right" or None.

    xy: (T, 2) agent positions in order. The passage is the first time the path reaches the
    obstacle's top (y >= obstacle_max y); its side is where the last upward crossing of the
    box's centre line (y = centre y) before that lies: x left or right of the box's centre x
    (linearly interpolated between the two positions around the crossing). A path that never
    gets above the box after being below its centre line returns None.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"trajectory of shape (T, 2) expected, got {xy.shape}")
    cx = 0.5 * (config.obstacle_min[0] + config.obstacle_max[0])
    cy = 0.5 * (config.obstacle_min[1] + config.obstacle_max[1])
    y = xy[:, 1]
    above = np.flatnonzero(y >= config.obstacle_max[1])
    if above.size == 0:
        return None
    first_above = int(above[0])
    ups = np.flatnonzero((y[:-1] < cy) & (y[1:] >= cy))
    ups = ups[ups < first_above]
    if ups.size == 0:
        return None
    j = int(ups[-1])
    (x0, y0), (x1, y1) = xy[j], xy[j + 1]
    x_cross = x0 + (cy - y0) / (y1 - y0) * (x1 - x0)
    return "left" if x_cross < cx else "right"


class ReachAroundEnv(gym.Env):
    """Reach a target above a box obstacle, passing it on the left or the right.

    Observation, float32 (4,), all in [0, 1]:
        0: agent x, 1: agent y, 2: target x, 3: target y.
    Action, float32 (2,) in [0, 1]: the absolute (x, y) position the agent is sent toward
    (clipped to the workspace).
    Reward: 1.0 on the step the agent succeeds, else 0.0.
    Termination: success (agent within ``success_radius`` of the target).
    Truncation: after ``max_episode_steps`` control steps.
    Info on every step: ``success`` (bool), ``distance`` (to the target), ``agent_pos``
    ((2,) float64); on the last step of an episode also ``mode`` ("left", "right" or None,
    from :func:`trajectory_mode` on the whole path).
    Reset draws the start and the target uniformly in their regions from ``seed``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, config: ReachAroundConfig | None = None, render_mode: str | None = None):
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None; "
                f"got {render_mode!r}"
            )
        self.config = config if config is not None else ReachAroundConfig()
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0.0, 1.0, shape=(4,), dtype=np.float32)
        self.action_space = spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self._agent = (0.5, 0.1)
        self._target = (0.5, 0.9)
        self._path: list[tuple[float, float]] = []
        self._steps = 0

    # -- gymnasium API ------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new episode. ``options`` may fix ``{"agent": (x, y), "target": (x, y)}``."""
        super().reset(seed=seed)
        c = self.config
        agent = self.np_random.uniform(c.start_low, c.start_high)
        target = self.np_random.uniform(c.target_low, c.target_high)
        options = options or {}
        if "agent" in options:
            agent = np.asarray(options["agent"], dtype=np.float64)
        if "target" in options:
            target = np.asarray(options["target"], dtype=np.float64)
        if self._inside_box(agent):
            raise ValueError(f"agent start {tuple(agent)} lies inside the obstacle")
        self._agent = (float(agent[0]), float(agent[1]))
        self._target = (float(target[0]), float(target[1]))
        self._path = [self._agent]
        self._steps = 0
        return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        c = self.config
        a = np.asarray(action)
        if a.shape != (2,):
            raise ValueError(f"action of shape (2,) expected, got shape {a.shape}")
        ax, ay = float(a[0]), float(a[1])
        if not (math.isfinite(ax) and math.isfinite(ay)):
            raise ValueError(f"finite action expected, got {a!r}")
        ax, ay = min(max(ax, 0.0), 1.0), min(max(ay, 0.0), 1.0)
        dx, dy = c.gain * (ax - self._agent[0]), c.gain * (ay - self._agent[1])
        norm = math.hypot(dx, dy)
        if norm > c.max_speed:
            dx, dy = dx * c.max_speed / norm, dy * c.max_speed / norm
        x, y = move_with_collision(self._agent, (dx, dy), c.obstacle_min, c.obstacle_max)
        self._agent = (min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0))
        self._path.append(self._agent)
        self._steps += 1
        info = self._info()
        terminated = info["success"]
        truncated = self._steps >= c.max_episode_steps and not terminated
        if terminated or truncated:
            info["mode"] = self.current_mode()
        return self._obs(), float(terminated), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """(S, S, 3) uint8 frame, S = ``config.render_size``: box, target, agent, path."""
        if self.render_mode != "rgb_array":
            return None
        from PIL import ImageDraw

        size = self.config.render_size
        image = self.draw_scene(size, target=self._target)
        draw = ImageDraw.Draw(image)
        if len(self._path) > 1:
            draw.line([self.to_pixel(p, size) for p in self._path], fill=(120, 120, 220), width=1)
        r = max(2, round(0.02 * size))
        px, py = self.to_pixel(self._agent, size)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=(40, 80, 220))
        return np.asarray(image, dtype=np.uint8)

    # -- helpers the evaluation uses ----------------------------------------------------
    def current_mode(self) -> str | None:
        """The mode of the path so far (see :func:`trajectory_mode`)."""
        return trajectory_mode(np.asarray(self._path), self.config)

    @property
    def agent_pos(self) -> np.ndarray:
        """(2,) float64 position of the agent."""
        return np.array(self._agent)

    @staticmethod
    def to_pixel(xy: tuple[float, float] | np.ndarray, size: int) -> tuple[float, float]:
        """World (x, y) in [0, 1]^2 -> pixel (column, row) in a size x size image, y up."""
        return (float(xy[0]) * (size - 1), (1.0 - float(xy[1])) * (size - 1))

    def draw_scene(self, size: int, target: tuple[float, float] | None = None):
        """A PIL RGB image of the static scene: obstacle, target region, optional target."""
        from PIL import Image, ImageDraw

        c = self.config
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)

        def rect(lo, hi, **kw):
            (x0, y1), (x1, y0) = self.to_pixel(lo, size), self.to_pixel(hi, size)
            draw.rectangle([x0, y0, x1, y1], **kw)

        rect(c.target_low, c.target_high, outline=(170, 220, 170))
        rect(c.start_low, c.start_high, outline=(220, 220, 220))
        rect(c.obstacle_min, c.obstacle_max, fill=(110, 110, 110))
        if target is not None:
            r = c.success_radius * (size - 1)
            tx, ty = self.to_pixel(target, size)
            draw.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(120, 200, 120))
        return image

    # -- internals ------------------------------------------------------------------------
    def _inside_box(self, p: np.ndarray) -> bool:
        lo, hi = self.config.obstacle_min, self.config.obstacle_max
        return bool(lo[0] < p[0] < hi[0] and lo[1] < p[1] < hi[1])

    def _obs(self) -> np.ndarray:
        return np.array(
            [self._agent[0], self._agent[1], self._target[0], self._target[1]], dtype=np.float32
        )

    def _info(self) -> dict[str, Any]:
        dist = math.hypot(self._agent[0] - self._target[0], self._agent[1] - self._target[1])
        return {
            "success": dist < self.config.success_radius,
            "distance": dist,
            "agent_pos": self.agent_pos,
        }
