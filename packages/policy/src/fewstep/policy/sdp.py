"""Streaming Diffusion Policy (Høeg, Du and Egeland 2024, "Streaming Diffusion Policy: Fast
Policy Synthesis with Variable Noise Diffusion Models"; built on TEDi, Zhang et al. 2024).

The action buffer of ``pred_horizon`` positions carries a noise level per position that rises
chunk by chunk: after each call the first chunk is clean and executed, the buffer shifts by
``action_horizon``, a chunk of pure noise enters at the end, and the next call denoises every
position by ``N / C`` levels (C chunks), which makes the next chunk clean. So a call costs
``N / C`` network evaluations instead of N.

Levels are diffusers-style integer timesteps of a discrete VP path with N entries (the
teacher's 100-step table). Training draws one noise regime per batch, as the authors' code:
the chunk-wise staircase with a random offset (weight 0.8 in their configs), one level for the
whole sequence (0.2), and optionally linearly increasing or independent random levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.batch import StepRNG
from fewstep.core.models import Denoiser
from fewstep.core.samplers import ddpm_posterior
from fewstep.policy.data import Normalizer, WindowConfig
from fewstep.policy.policy import ChunkPolicy

REGIMES = ("constant", "increasing", "random", "chunk_wise")


def ddpm_update(a_t, s_t, a_s, s_s, x: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Ancestral: a draw from the DDPM posterior q(x_s | x_t, x0_hat)."""
    mean, std = ddpm_posterior(a_t, s_t, a_s, s_s, x, x0)
    return mean + std * noise


def ddim_update(a_t, s_t, a_s, s_s, x: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """DDIM with eta = 0 (Song et al. 2021, eq. 12): x_s = a_s x0_hat + s_s eps_hat, with
    eps_hat recomputed from the clipped x0_hat as diffusers' DDIMScheduler does."""
    eps = (x - a_t * x0) / s_t.clamp(min=1e-12)
    return a_s * x0 + s_s * eps


UPDATES = {"ddpm": ddpm_update, "ddim": ddim_update}
BUFFER_INITS = ("zero", "constant", "denoise")


@dataclass
class SDPConfig:
    constant_weight: float = 0.2  # share of batches with one level for the whole sequence
    increasing_weight: float = 0.0  # share with levels rising linearly from 0 to N - 1
    random_weight: float = 0.0  # share with independent random levels per position
    chunk_wise_weight: float = 0.8  # share with the streaming staircase (random offset)
    buffer_init: str = "zero"  # first call: zero, constant (current position) or denoise
    clip_x0: float = 1.0  # clamp of the x0 prediction at each step (diffusion_policy's clip)
    levels_per_step: int = 1  # levels each evaluation descends (1: the paper's DDPM; 2+: jumps)
    # per-step rule: ddim (deterministic; 0.92 vs ddpm's 0.80 success on ReachAround, same
    # network, BENCHMARKS.md) or ddpm (ancestral, the paper's); SDP's code ships both
    update: str = "ddim"

    def __post_init__(self):
        w = (
            self.constant_weight,
            self.increasing_weight,
            self.random_weight,
            self.chunk_wise_weight,
        )
        if min(w) < 0 or not math.isclose(sum(w), 1.0, rel_tol=1e-3):
            raise ValueError(f"SDP regime weights must be >= 0 and sum to 1, got {w}")
        if self.levels_per_step < 1:
            raise ValueError(f"levels_per_step must be >= 1, got {self.levels_per_step}")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {tuple(UPDATES)}, got {self.update!r}")
        if self.buffer_init not in BUFFER_INITS:
            raise ValueError(f"buffer_init must be one of {BUFFER_INITS}, got {self.buffer_init!r}")

    @property
    def weights(self) -> tuple[float, ...]:
        return (
            self.constant_weight,
            self.increasing_weight,
            self.random_weight,
            self.chunk_wise_weight,
        )


def num_chunks(h: WindowConfig) -> int:
    """Complete chunks of ``action_horizon`` after the ``obs_horizon - 1`` past positions
    (at least one: ``WindowConfig`` requires obs_horizon - 1 + action_horizon <= pred)."""
    return (h.pred_horizon - (h.obs_horizon - 1)) // h.action_horizon


def chunk_index(h: WindowConfig) -> Tensor:
    """(pred_horizon,) chunk of each buffer position: the past positions belong to chunk 0,
    and positions after the last complete chunk to the last chunk."""
    c = num_chunks(h)
    i = torch.arange(h.pred_horizon)
    idx = torch.div(i - (h.obs_horizon - 1), h.action_horizon, rounding_mode="floor")
    return idx.clamp(0, c - 1)


def staircase(h: WindowConfig, n_levels: int, offset: Tensor) -> Tensor:
    """(B, pred_horizon) levels ``floor(N (c + 1) / C) - 1 - offset`` of chunk c; offset 0
    is the buffer right after a shift (chunk 0 one call from clean)."""
    c = num_chunks(h)
    top = torch.div(n_levels * (chunk_index(h) + 1), c, rounding_mode="floor") - 1
    return top[None, :] - offset.long().view(-1, 1)


def training_levels(h: WindowConfig, n_levels: int, cfg: SDPConfig, rng: StepRNG) -> Tensor:
    """(B, pred_horizon) integer levels of one training batch; the regime is drawn once per
    batch from the configured weights (SDP's ``get_diff_steps_training``)."""
    b, tp = rng.local_size, h.pred_horizon
    regime = REGIMES[int(torch.multinomial(torch.tensor(cfg.weights), 1, generator=rng.generator))]
    if regime == "constant":
        return rng.randint(0, n_levels, 1).expand(b, tp)
    if regime == "increasing":
        return torch.linspace(0, n_levels - 1, tp).long().expand(b, tp).to(rng.device)
    if regime == "random":
        return rng.randint(0, n_levels, tp)
    per_call = n_levels // num_chunks(h)
    return staircase(h, n_levels, rng.randint(0, per_call)).to(rng.device)


def _coeffs(path, levels: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) per position, (B, T, 1); level -1 is clean data (1, 0)."""
    t = levels.clamp(min=0).float()
    a = torch.where(levels >= 0, path.alpha(t), torch.ones_like(t))
    s = torch.where(levels >= 0, path.sigma(t), torch.zeros_like(t))
    return a[..., None].to(like), s[..., None].to(like)


PREDICTIONS = ("eps", "x0", "v")  # parameterizations SDP handles per position


def _check_prediction(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"SDP runs networks predicting one of {PREDICTIONS}, not {kind!r}")


def sdp_loss(
    denoiser: Denoiser, actions: Tensor, obs: Tensor, levels: Tensor, eps: Tensor
) -> Tensor:
    """The denoising loss with a level per position: ``|| net(x_t, k, obs) - target ||^2``
    with x_t = alpha(k_i) x0_i + sigma(k_i) eps_i at every position i; the target is the
    network's parameterization (eps, x0 or v) at each position's own level."""
    _check_prediction(denoiser.prediction)
    path, t = denoiser.path, levels.float()  # core's conversions take a (B, T) time
    x_t = path.noise(actions, t, eps)
    pred = denoiser(x_t, t, obs)
    return (pred - path.from_x0_eps(actions, eps, denoiser.prediction, t)).pow(2).mean()


class StreamingPolicy(ChunkPolicy):
    """SDP inference: a persistent noisy buffer, denoised ``N / C`` levels per call."""

    def __init__(
        self,
        denoiser: Denoiser,
        normalizer: Normalizer,
        horizons: WindowConfig,
        act_dim: int,
        cfg: SDPConfig,
        seed: int = 0,
        device: str = "cpu",
    ):
        _check_prediction(denoiser.prediction)
        self.denoiser, self.act_dim, self.cfg = denoiser.eval(), act_dim, cfg
        self.n_levels = int(denoiser.path.t_max) + 1
        per_call = self.n_levels // num_chunks(horizons)
        if per_call % cfg.levels_per_step:
            raise ValueError(
                f"levels_per_step {cfg.levels_per_step} must divide the {per_call} levels a call "
                f"descends ({self.n_levels} levels / {num_chunks(horizons)} chunks)"
            )
        self.generator = torch.Generator().manual_seed(seed)
        super().__init__(normalizer, horizons, device)

    def reset(self) -> None:
        super().reset()
        self.buffer: Tensor | None = None  # (B, pred_horizon, act_dim), normalised
        self.levels: Tensor | None = None  # (B, pred_horizon) integer levels, -1 = clean

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator).to(self.device)

    def _noised(self, x0: Tensor, levels: Tensor) -> Tensor:
        a, s = _coeffs(self.denoiser.path, levels, x0)
        return a * x0 + s * self._randn(*x0.shape)

    def _step(self, obs: Tensor) -> None:
        """One step of every position from its level k to k - j (j = levels_per_step) with
        the DDPM posterior of that jump (ancestral skipping) or DDIM (SDP's code ships both)."""
        x, k = self.buffer, self.levels
        t = k.clamp(min=0).float()  # clean (-1) positions are computed, then left as they are
        pred = self.denoiser(x, t, obs)
        x0 = self.denoiser.path.to_x0_eps(pred, self.denoiser.prediction, x, t)[0]
        x0 = x0.clamp(-self.cfg.clip_x0, self.cfg.clip_x0)
        a_t, s_t = _coeffs(self.denoiser.path, k, x)
        k_next = (k - self.cfg.levels_per_step).clamp(min=-1)
        a_s, s_s = _coeffs(self.denoiser.path, k_next, x)
        new = UPDATES[self.cfg.update](a_t, s_t, a_s, s_s, x, x0, self._randn(*x.shape))
        self.buffer = torch.where(k[..., None] >= 0, new, x)
        self.levels = k_next
        self.nfe += 1

    def _init_buffer(self, obs_raw: Tensor, obs: Tensor) -> None:
        h, b = self.horizons, len(obs)
        shape = (b, h.pred_horizon, self.act_dim)
        levels = staircase(h, self.n_levels, torch.zeros(b)).to(self.device)
        if self.cfg.buffer_init == "denoise":
            # a full N-step plan, re-noised to where a finished call leaves the buffer: the
            # first chunk clean, chunk c at the staircase level of chunk c - 1
            self.buffer = self._randn(*shape)
            self.levels = torch.full((b, h.pred_horizon), self.n_levels - 1, device=self.device)
            while int(self.levels.max()) >= 0:
                self._step(obs)
            per_call = self.n_levels // num_chunks(h)
            levels = staircase(h, self.n_levels, torch.full((b,), per_call)).clamp(min=-1)
            self.buffer, self.levels = self._noised(self.buffer, levels.to(self.device)), levels
            return
        if self.cfg.buffer_init == "constant":  # hold the current position: the observation
            # must start with the agent's position in action units (ReachAround, Push-T)
            pos = self.normalizer.encode("action", obs_raw[:, : self.act_dim])
            x0 = pos[:, None, :].expand(shape).to(self.device)
        else:
            x0 = torch.zeros(shape, device=self.device)
        self.buffer, self.levels = self._noised(x0, levels), levels

    def act(self, observation):
        obs = torch.as_tensor(observation, dtype=torch.float32)
        self._raw = obs.reshape(1, -1) if obs.ndim == 1 else obs  # for buffer_init "constant"
        return super().act(observation)

    def plan(self, obs: Tensor) -> Tensor:
        h = self.horizons
        obs = obs.flatten(1)
        if self.buffer is None:
            self._init_buffer(self._raw, obs)
        last = h.obs_horizon - 1 + h.action_horizon - 1  # the last position executed now
        while int(self.levels[:, last].max()) >= 0:
            self._step(obs)
        plan = self.buffer.clone()
        self._shift()
        return plan

    def _shift(self) -> None:
        """Drop the executed chunk (and a partial tail), append pure noise at the top level,
        and re-noise the past positions to the level of the chunk they now belong to."""
        h = self.horizons
        tail = (h.pred_horizon - (h.obs_horizon - 1)) % h.action_horizon
        keep = slice(h.action_horizon, h.pred_horizon - tail)
        x, k = self.buffer[:, keep], self.levels[:, keep]
        b, new = len(x), h.action_horizon + tail
        x = torch.cat([x, self._randn(b, new, self.act_dim)], 1)
        k = torch.cat([k, torch.full((b, new), self.n_levels - 1, device=k.device)], 1)
        past = h.obs_horizon - 1
        if past:
            k[:, :past] = k[:, past : past + 1]
            x[:, :past] = self._noised(x[:, :past], k[:, :past])
        self.buffer, self.levels = x, k
