"""Policies with the interface the robotics ecosystem expects (lerobot's ``select_action``):
``reset()`` at an episode start, then ``act(observation) -> action`` once per control step.

Internally a policy keeps the last ``obs_horizon`` observations and a queue of planned
actions: when the queue is empty it plans ``pred_horizon`` actions from the observation
window and queues ``action_horizon`` of them, starting at the current step (index
``obs_horizon - 1`` of the plan: diffusion_policy's obs-action alignment). ``nfe`` counts
every network evaluation since construction.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

from fewstep.core.models import Denoiser
from fewstep.core.samplers import Sampler
from fewstep.policy.data import Normalizer, WindowConfig


class ChunkPolicy:
    """Observation history and action queue around ``plan`` (subclasses). ``act`` takes one
    observation (obs_dim,) or a batch (B, obs_dim) of synchronised environments (every
    episode started at the same ``reset``), and returns actions of the same layout."""

    def __init__(self, normalizer: Normalizer, horizons: WindowConfig, device: str = "cpu"):
        self.normalizer, self.horizons, self.device = normalizer, horizons, torch.device(device)
        self.nfe = 0  # network evaluations so far (one batched call counts once)
        self.plans = 0  # calls to plan so far
        self.reset()

    def reset(self) -> None:
        self._obs: deque[np.ndarray] = deque(maxlen=self.horizons.obs_horizon)
        self._queue: deque[np.ndarray] = deque()

    def plan(self, obs: Tensor) -> Tensor:
        """(B, obs_horizon, obs_dim) normalised observations -> (B, pred_horizon, act_dim)
        normalised actions."""
        raise NotImplementedError

    def act(self, observation: np.ndarray) -> np.ndarray:
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim == 1
        obs = obs.reshape(1, -1) if single else obs
        if not self._obs:  # episode start: the window repeats the first observation
            self._obs.extend([obs] * self.horizons.obs_horizon)
        else:
            self._obs.append(obs)
        if not self._queue:
            window = self.normalizer.encode("obs", np.stack(self._obs, 1))  # (B, To, obs_dim)
            with torch.no_grad():
                plan = self.plan(torch.as_tensor(window, device=self.device).float())
            self.plans += 1
            actions = self.normalizer.decode("action", plan.float().cpu().numpy())
            start = self.horizons.obs_horizon - 1
            self._queue.extend(actions[:, start + i] for i in range(self.horizons.action_horizon))
        action = self._queue.popleft()
        return action[0] if single else action


class DenoiserPolicy(ChunkPolicy):
    """A diffusion policy: plans by sampling the denoiser with any core sampler (the
    teacher's 100-step DDPM, a student's one- or few-step sampler)."""

    def __init__(
        self,
        denoiser: Denoiser,
        sampler: Sampler,
        normalizer: Normalizer,
        horizons: WindowConfig,
        act_dim: int,
        seed: int = 0,
        device: str = "cpu",
    ):
        self.denoiser, self.sampler, self.act_dim = denoiser.eval(), sampler, act_dim
        self.generator = torch.Generator().manual_seed(seed)
        super().__init__(normalizer, horizons, device)

    def plan(self, obs: Tensor) -> Tensor:
        shape = (len(obs), self.horizons.pred_horizon, self.act_dim)
        noise = torch.randn(shape, generator=self.generator)
        out = self.sampler.sample(self.denoiser, noise.to(obs.device), obs.flatten(1))
        self.nfe += out.nfe
        return out.x
