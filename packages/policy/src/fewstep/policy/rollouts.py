"""Closed-loop rollouts of many seeds at once: one environment per seed, stepped together,
so a policy plans for all of them in one batched network call (``ChunkPolicy.act`` takes a
batch). Results are ``evaluate.RolloutResult`` like the one-episode ``evaluate.rollout``.

A finished environment keeps its last observation in the batch (the policy's queue stays
in step with the others) and is not stepped again. Timing per action is the batched wall
time divided by the batch: throughput, not single-environment latency (``latency`` measures
that).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np

from fewstep.policy.evaluate import RolloutResult, _success


def rollout_batch(
    env_factory: Callable[[], gym.Env],
    policy,
    seeds: Sequence[int],
    max_steps: int | None = None,
) -> list[RolloutResult]:
    envs = [env_factory() for _ in seeds]
    try:
        first = [env.reset(seed=int(s)) for env, s in zip(envs, seeds)]
        obs = np.stack([o for o, _ in first]).astype(np.float32)
        policy.reset()
        nfe0 = policy.nfe
        n = len(envs)
        done = np.zeros(n, bool)
        success = np.array([_success(info) for _, info in first])
        modes: list[str | None] = [None] * n
        xy = [[o[:2].astype(np.float64)] for o in obs]
        acts: list[list[np.ndarray]] = [[] for _ in range(n)]
        nfe_at_end = [0] * n
        seconds = 0.0
        while not done.all() and (max_steps is None or len(acts[0]) < max_steps):
            t0 = time.perf_counter()
            action = policy.act(obs)
            seconds += time.perf_counter() - t0
            for i in np.flatnonzero(~done):
                o, _, term, trunc, info = envs[i].step(action[i])
                obs[i] = o
                xy[i].append(np.asarray(o, dtype=np.float64)[:2])
                acts[i].append(np.asarray(action[i], dtype=np.float32))
                success[i] |= _success(info)
                if term or trunc:
                    done[i] = True
                    modes[i] = info.get("mode")
                    nfe_at_end[i] = policy.nfe - nfe0
        results = []
        for i, env in enumerate(envs):
            if not done[i]:
                current = getattr(env.unwrapped, "current_mode", None)
                modes[i] = current() if callable(current) else None
                nfe_at_end[i] = policy.nfe - nfe0
            steps = len(acts[i])
            results.append(
                RolloutResult(
                    seed=int(seeds[i]),
                    success=bool(success[i]),
                    mode=modes[i],
                    steps=steps,
                    trajectory=np.stack(xy[i]),
                    actions=np.stack(acts[i]) if acts[i] else np.zeros((0, action.shape[-1])),
                    nfe=int(nfe_at_end[i]),
                    act_seconds=seconds * steps / max(len(acts[0]), 1) / n,
                )
            )
        return results
    finally:
        for env in envs:
            env.close()


def latency(env_factory: Callable[[], gym.Env], policy, seed: int, plans: int = 3) -> dict:
    """Single-environment wall time: ms per planning call and per action, over ``plans``
    planning calls (the first, a warm-up, is not counted)."""
    env = env_factory()
    try:
        obs, _ = env.reset(seed=seed)
        policy.reset()
        per_plan = policy.horizons.action_horizon
        t_total, counted = 0.0, 0
        for step in range((plans + 1) * per_plan):
            t0 = time.perf_counter()
            action = policy.act(obs)
            if step >= per_plan:  # after the warm-up plan
                t_total += time.perf_counter() - t0
                counted += 1
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc:
                obs, _ = env.reset(seed=seed)
        return {"ms_per_action": 1e3 * t_total / max(counted, 1),
                "ms_per_plan": 1e3 * t_total / max(counted, 1) * per_plan}  # fmt: skip
    finally:
        env.close()
