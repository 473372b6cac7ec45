"""Closed-loop evaluation of a policy: rollouts over fixed seeds, a summary, a plot.

The policy protocol is lerobot's: ``reset()`` at an episode's start, ``act(obs) -> action``
once per control step (the policy keeps its own observation history and action queue). If
the policy has an ``nfe`` attribute (cumulative network evaluations), rollouts record how
many evaluations each episode cost.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

NO_MODE = "none"  # the mode-fraction key for rollouts that never passed the obstacle


class Policy(Protocol):
    """What :func:`rollout` drives."""

    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


@dataclass
class RolloutResult:
    """One closed-loop episode."""

    seed: int  # the env's reset seed
    success: bool  # whether the env reported success at any step
    mode: str | None  # the env's mode at the episode's end (None if none or not reported)
    steps: int  # control steps taken (= actions sent)
    trajectory: np.ndarray  # (steps + 1, 2) agent xy: the first two entries of each obs
    actions: np.ndarray  # (steps, act_dim) the actions sent
    nfe: int | None  # network evaluations the policy spent, None if it does not count them
    act_seconds: float  # wall time spent inside policy.act over the episode

    @property
    def nfe_per_action(self) -> float | None:
        return None if self.nfe is None else self.nfe / max(self.steps, 1)

    @property
    def ms_per_action(self) -> float:
        return 1e3 * self.act_seconds / max(self.steps, 1)


def _success(info: Mapping[str, Any]) -> bool:
    """Our envs say ``success``; gym-pusht says ``is_success``."""
    return bool(info.get("success", info.get("is_success", False)))


def rollout(
    env_factory: Callable[[], gym.Env],
    policy: Policy,
    seeds: Iterable[int],
    max_steps: int | None = None,
) -> list[RolloutResult]:
    """Run one episode per seed and record it.

    env_factory: builds the env once (reset with each seed in turn; closed at the end).
    An episode ends when the env terminates or truncates, or after ``max_steps`` actions.
    Its mode is the final step's ``info["mode"]``, else ``env.unwrapped.current_mode()``
    where the env has one (an episode cut short by ``max_steps``), else None.
    """
    env = env_factory()
    results = []
    try:
        for seed in seeds:
            results.append(_one_episode(env, policy, int(seed), max_steps))
    finally:
        env.close()
    return results


def _one_episode(env: gym.Env, policy: Policy, seed: int, max_steps: int | None):
    obs, info = env.reset(seed=seed)
    policy.reset()
    nfe0 = getattr(policy, "nfe", None)
    xy, actions = [np.asarray(obs, dtype=np.float64)[:2]], []
    success, act_seconds, done = _success(info), 0.0, False
    while not done and (max_steps is None or len(actions) < max_steps):
        t0 = time.perf_counter()
        action = policy.act(obs)
        act_seconds += time.perf_counter() - t0
        obs, _, terminated, truncated, info = env.step(action)
        actions.append(np.asarray(action, dtype=np.float32).reshape(-1))
        xy.append(np.asarray(obs, dtype=np.float64)[:2])
        success = success or _success(info)
        done = terminated or truncated
    if "mode" in info:
        mode = info["mode"]
    else:
        current = getattr(env.unwrapped, "current_mode", None)
        mode = current() if callable(current) else None
    nfe1 = getattr(policy, "nfe", None)
    act_dim = env.action_space.shape[0] if env.action_space.shape else 0
    return RolloutResult(
        seed=seed,
        success=success,
        mode=mode,
        steps=len(actions),
        trajectory=np.stack(xy),
        actions=np.stack(actions) if actions else np.zeros((0, act_dim), np.float32),
        nfe=None if nfe0 is None or nfe1 is None else int(nfe1 - nfe0),
        act_seconds=act_seconds,
    )


def mode_fractions(modes: Iterable[str | None]) -> dict[str, float]:
    """Fraction of each mode; None counts under :data:`NO_MODE`."""
    counts = Counter(NO_MODE if m is None else m for m in modes)
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} if total else {}


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """0.5 * sum |p_k - q_k| over the union of keys (missing keys are 0)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def summarise(
    results: Sequence[RolloutResult],
    expert_modes: Sequence[str | None] | Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Summary of rollouts.

    expert_modes: the expert's modes (one per demonstration, e.g. ``[e.mode for e in
    demos]``) or its mode fractions; when given, ``mode_tv`` is the total-variation distance
    between the rollouts' mode fractions and the expert's (0 = same split, 1 = disjoint).
    Returns n_rollouts, success_rate, mode_fractions, expert_mode_fractions, mode_tv,
    mean_steps, nfe_per_action (None unless every rollout counted NFE), ms_per_action.
    """
    if not results:
        raise ValueError("summarise needs at least one rollout")
    steps = sum(r.steps for r in results)
    fractions = mode_fractions(r.mode for r in results)
    expert = None
    if expert_modes is not None:
        expert = (
            dict(expert_modes)
            if isinstance(expert_modes, Mapping)
            else mode_fractions(expert_modes)
        )
    counted = [r.nfe for r in results]
    return {
        "n_rollouts": len(results),
        "success_rate": float(np.mean([r.success for r in results])),
        "mode_fractions": fractions,
        "expert_mode_fractions": expert,
        "mode_tv": None if expert is None else total_variation(fractions, expert),
        "mean_steps": steps / len(results),
        "nfe_per_action": (
            None if any(n is None for n in counted) else sum(counted) / max(steps, 1)
        ),
        "ms_per_action": 1e3 * sum(r.act_seconds for r in results) / max(steps, 1),
    }


MODE_COLOURS = {"left": (40, 90, 220), "right": (230, 120, 20), None: (150, 150, 150)}


def plot_trajectories(
    results: Sequence[RolloutResult],
    env: gym.Env,
    path: str | os.PathLike,
    size: int = 320,
) -> None:
    """Write a PNG of every rollout's agent path over the scene, coloured by mode.

    Blue: left, orange: right, grey: no mode (other modes get a fixed colour of their own);
    a dot marks each start, a ring each successful end. The scene comes from
    ``env.unwrapped.draw_scene(size)`` where the env has it (white otherwise); paths are
    placed by the observation space's bounds on its first two entries, y up unless the env
    (or a wrapper) sets ``plot_y_up = False`` (image coordinates, as Push-T's).
    """
    from PIL import Image, ImageDraw

    base = env.unwrapped
    image = base.draw_scene(size) if hasattr(base, "draw_scene") else None
    if image is None:
        image = Image.new("RGB", (size, size), (255, 255, 255))
    low = np.asarray(env.observation_space.low, dtype=np.float64)[:2]
    high = np.asarray(env.observation_space.high, dtype=np.float64)[:2]
    y_up = bool(getattr(env, "plot_y_up", getattr(base, "plot_y_up", True)))
    draw = ImageDraw.Draw(image)

    def pixels(xy: np.ndarray) -> list[tuple[float, float]]:
        u = (np.asarray(xy) - low) / (high - low)
        v = 1.0 - u[:, 1] if y_up else u[:, 1]
        return [(float(a) * (size - 1), float(b) * (size - 1)) for a, b in zip(u[:, 0], v)]

    for r in results:
        colour = MODE_COLOURS.get(r.mode) or _other_colour(r.mode)
        pts = pixels(r.trajectory)
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=1)
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        draw.ellipse([x0 - 2, y0 - 2, x0 + 2, y0 + 2], fill=colour)
        if r.success:
            draw.ellipse([x1 - 3, y1 - 3, x1 + 3, y1 + 3], outline=colour)
    counts = Counter(r.mode for r in results)
    legend = "  ".join(f"{m or NO_MODE}: {n}" for m, n in sorted(counts.items(), key=str))
    draw.text((4, 4), legend, fill=(0, 0, 0))
    image.save(os.fspath(path), format="PNG")


def _other_colour(mode: str | None) -> tuple[int, int, int]:
    h = sum(map(ord, str(mode)))
    return (60 + h * 37 % 160, 60 + h * 71 % 160, 60 + h * 113 % 160)


def save_rollout_gif(
    env_factory: Callable[[], gym.Env],
    policy: Policy,
    seed: int,
    path: str | os.PathLike,
    max_steps: int | None = None,
    fps: int = 10,
) -> RolloutResult:
    """Run one episode, rendering every step, and write the frames as an animated GIF.

    ``env_factory`` must build the env with ``render_mode="rgb_array"``. Returns the
    episode's :class:`RolloutResult` (its timing includes no rendering).
    """
    from PIL import Image

    frames: list[np.ndarray] = []

    class _Recorder(gym.Wrapper):
        def reset(self, **kwargs):
            out = self.env.reset(**kwargs)
            frames.append(self.env.render())
            return out

        def step(self, action):
            out = self.env.step(action)
            frames.append(self.env.render())
            return out

    def recording_factory() -> gym.Env:
        env = env_factory()
        if env.render_mode != "rgb_array":
            raise ValueError(f"render_mode 'rgb_array' expected, env has {env.render_mode!r}")
        return _Recorder(env)

    (result,) = rollout(recording_factory, policy, [seed], max_steps=max_steps)
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(
        os.fspath(path), save_all=True, append_images=images[1:], duration=int(1e3 / fps), loop=0
    )
    return result
