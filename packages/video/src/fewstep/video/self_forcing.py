"""Self Forcing: a streaming (block-causal, KV-cached) few-step video student trained with
DMD on its own autoregressive rollouts.

Huang, Li, He, Zhou, Shechtman, "Self Forcing: Bridging the Train-Test Gap in Autoregressive
Video Diffusion" (2025; code guandeh17/Self-Forcing), built on CausVid (Yin et al., "From
Slow Bidirectional to Fast Autoregressive Video Diffusion Models", CVPR 2025).

1. ODE-pair initialisation (CausVid sec. 3.3): teacher probability-flow trajectories
   (Euler / DDIM, N steps) from noise; the causal student, given each chunk at one of its
   own K step times (drawn independently per chunk, as diffusion forcing), regresses the
   trajectory's endpoint (``ODEInit``; l2 on the x0 prediction).
2. The self-forcing rollout (Self Forcing alg. 1, ``pipeline/self_forcing_training.py``):
   chunk after chunk, K student steps from noise (predict x0, re-noise to the next time),
   each step attending to the KV cache of the chunks generated before; one exit step per
   chunk, drawn uniformly from its steps and shared by the whole batch, ends the chunk and
   is the only step run with gradient; the chunk's clean output, re-noised to the context
   time (0 in the paper), is run once more without gradient to write its keys and values
   into the cache (``self_forcing_rollout``).
3. DMD on the whole generated video (DMD eqs. 7-8 through core's ``dm_term``; DMD2's
   two-time-scale fake-score updates): the real score is the bidirectional teacher on the
   full clip, the fake score a bidirectional copy trained on the student's detached videos
   (``SelfForcingDMD``, a core ``DMD2`` whose student sample is the rollout).
4. Streaming inference (``stream``): chunks are emitted one by one with the cache; a rolling
   window keeps the last W chunks so videos may run past the training length; First-Frame
   Enhancement (Towards One-step Causal Video Generation via Adversarial Self-Distillation,
   sec. 3.3) spends more steps on chunk 0, whose errors every later chunk inherits.
5. Adversarial self-distillation (same paper, sec. 3.2): a discriminator on the fake score's
   features separates the student's (K+1)-step videos ("real") from its K-step rollouts
   (DMD2's non-saturating GAN head, ``adversarial="self"``). LiveTalk's multimodal
   conditions: class labels, a clean first chunk (image conditioning: it is written into the
   cache before streaming) and a 1-D per-frame control signal (``CausalVideoDiT(control=
   True)``).
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch, index_cond
from fewstep.core.models import Denoiser, _batch_t, _output_of, trainable_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    check_choice,
    ode_step,
    sample_shape,
    step_fractions,
    unguided,
)
from fewstep.core.objectives.dmd import PairSet
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config, GANHead
from fewstep.video.causal import CausalDenoiser, KVCache

Fresh = Callable[[Tensor], Tensor]  # like -> standard normal noise of its shape


# ------------------------------------------------------------------------------- schedules


def chunk_fractions(
    n_chunks: int, steps: int, first_chunk_steps: int = 0, times: tuple[float, ...] = ()
) -> list[list[float]]:
    """Per chunk, its student step start fractions (1 = noise): ``times`` or ``steps``
    uniform ones; chunk 0 gets ``first_chunk_steps`` uniform ones when > 0 (First-Frame
    Enhancement)."""
    base = step_fractions("self_forcing", steps, times)
    first = step_fractions("self_forcing", first_chunk_steps) if first_chunk_steps else base
    return [first] + [base] * (n_chunks - 1)


def chunk_cond(cond: Any, k: int, chunk_frames: int) -> Any:
    """The condition of chunk k: labels as they are, a dict's per-frame ``control`` (B, T)
    sliced to the chunk's frames."""
    if isinstance(cond, dict) and cond.get("control") is not None:
        sl = slice(k * chunk_frames, (k + 1) * chunk_frames)
        return {**cond, "control": cond["control"][:, sl]}
    return cond


# ---------------------------------------------------------------------------- one chunk


def denoise_chunk(
    student: CausalDenoiser,
    noise: Tensor,
    fractions: list[float],
    cache: KVCache,
    cond: Any,
    fresh: Fresh,
    exit_step: int | None = None,
    trace: list | None = None,
) -> tuple[Tensor, int]:
    """Few-step denoising of one chunk against the cache: at each time predict x0, re-noise
    to the next time with fresh noise (the student's multistep sampler). ``exit_step`` s
    stops after step s, whose prediction is the output and the only one run with gradient
    (Self Forcing's random exit); None runs every step, all under the ambient grad mode.
    Returns (x0 (B, chunk_frames, ...), network evaluations). ``trace`` collects, per step,
    (input, prediction)."""
    path = student.path
    ts = [path.fraction_to_t(f) for f in fractions]
    last = len(ts) - 1 if exit_step is None else exit_step
    if not 0 <= last < len(ts):
        raise ValueError(f"exit step {exit_step} outside the chunk's {len(ts)} steps")
    x = path.noise(torch.zeros_like(noise), _batch_t(ts[0], noise), noise)
    x0 = x
    for i in range(last + 1):
        grad = torch.is_grad_enabled() and (exit_step is None or i == exit_step)
        with torch.set_grad_enabled(grad):
            x0 = student.chunk(x, _batch_t(ts[i], x), cache, cond)
        if trace is not None:
            trace.append((x, x0))
        if i < last:
            with torch.no_grad():
                x = path.noise(x0, _batch_t(ts[i + 1], x0), fresh(x0))
    return x0, last + 1


@torch.no_grad()
def write_context(
    student: CausalDenoiser, x0: Tensor, cache: KVCache, cond: Any, context_frac: float,
    fresh: Fresh,
) -> None:  # fmt: skip
    """Run the finished chunk once more, re-noised to ``context_frac`` of the path (0 =
    clean, the paper's default), writing its keys and values into the cache."""
    t = _batch_t(student.path.fraction_to_t(context_frac), x0)
    x = x0 if context_frac == 0 else student.path.noise(x0, t, fresh(x0))
    student.chunk(x.detach(), t, cache, cond, write=True)


def self_forcing_rollout(
    student: CausalDenoiser,
    noise: Tensor,
    cond: Any,
    fractions: list[list[float]],
    exits: list[int] | None,
    fresh: Fresh,
    context_frac: float = 0.0,
    trace: list | None = None,
    first_chunk: Tensor | None = None,
) -> Tensor:
    """Self Forcing's training rollout (alg. 1): noise (B, T, C, H, W) -> the student's video
    (B, T, C, H, W), chunk by chunk with a fresh KV cache. ``fractions[k]`` are chunk k's step
    times, ``exits[k]`` its exit step (None: run every step). Only the exit steps carry
    gradient; the cache is written without gradient, so chunk k's gradient never reaches
    earlier chunks. ``trace`` gets one list of (input, prediction) per chunk. ``first_chunk``
    (B, chunk_frames, ...), LiveTalk's image condition, replaces chunk 0: it is cached and
    returned as it is, and generation continues from it."""
    cf = student.net.chunk_frames
    n_chunks = noise.shape[1] // cf
    if len(fractions) != n_chunks or (exits is not None and len(exits) != n_chunks):
        raise ValueError(f"{n_chunks} chunks need as many step schedules and exits")
    cache = student.new_cache()
    out = []
    for k in range(n_chunks):
        ck = chunk_cond(cond, k, cf)
        steps: list | None = [] if trace is not None else None
        if k == 0 and first_chunk is not None:
            x0 = first_chunk.detach()
        else:
            x0, _ = denoise_chunk(
                student, noise[:, k * cf : (k + 1) * cf], fractions[k], cache, ck, fresh,
                None if exits is None else exits[k], steps,
            )  # fmt: skip
        if trace is not None:
            trace.append(steps)
        out.append(x0)
        if k + 1 < n_chunks:
            write_context(student, x0, cache, ck, context_frac, fresh)
    return torch.cat(out, 1)


# ------------------------------------------------------------------------ ODE-pair init


@torch.no_grad()
def ode_trajectories(
    teacher: Denoiser,
    noise: Tensor,
    cond: Any,
    fractions: list[float],
    steps: int,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Teacher probability-flow trajectories (Euler = DDIM, ``core.objectives.common.
    ode_step``) from ``noise`` (N, ...) on ``steps`` uniform steps, with the student's
    ``fractions`` added to the grid. Returns (states (N, len(fractions), ...) at those
    fractions, endpoints (N, ...))."""
    path = teacher.path
    teacher_grid = [1.0 - i / steps for i in range(steps)]
    extra = [g for g in teacher_grid if min(abs(g - f) for f in fractions) > 1e-9]
    grid = sorted([*fractions, *extra], reverse=True)
    want = {f: j for j, f in enumerate(fractions)}
    states = torch.empty(noise.shape[0], len(fractions), *noise.shape[1:], device=noise.device)
    ends = torch.empty_like(noise)
    for lo in range(0, noise.shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        z = noise[sl]
        c = index_cond(cond, torch.arange(lo, lo + z.shape[0]))
        x = path.noise(torch.zeros_like(z), _batch_t(path.fraction_to_t(grid[0]), z), z)
        for f, f_next in zip(grid, [*grid[1:], 0.0], strict=True):
            if f in want:
                states[sl, want[f]] = x
            t, tn = (_batch_t(path.fraction_to_t(v), x) for v in (f, f_next))
            x = ode_step(teacher, x, t, tn, c)
        ends[sl] = x
    return states, ends


@dataclass
class ODEInitConfig(ObjectiveConfig):
    num_pairs: int = 256  # teacher ODE trajectories (CausVid's ODE pairs)
    teacher_steps: int = 48  # Euler (DDIM) steps per trajectory
    pair_seed: int = 0  # seed of the pair noise and labels
    first_chunk_steps: int = 0  # chunk 0's student steps (FFE); 0 = student_steps


class ODEInit(Objective):
    """CausVid's student initialisation: regress the causal student, each chunk at one of its
    step times (drawn independently per chunk and sample), onto the teacher ODE endpoint:
    l2(x0_student(x_{t_k}), x0_ODE) (CausVid sec. 3.3, eq. 5 on pairs of the bidirectional
    teacher)."""

    name = "causvid_ode_init"
    config_cls = ODEInitConfig
    roles = ("student",)
    frozen_roles = ("pairs",)
    summary = "causal student regressed on teacher ODE pairs (CausVid init)"

    def fractions(self, student: CausalDenoiser) -> list[list[float]]:
        c = self.config
        n = student.net.n_chunks
        return chunk_fractions(n, c.student_steps, c.first_chunk_steps, c.student_times)

    def build_roles(self, student, example):
        if not isinstance(student, CausalDenoiser):
            raise TypeError(f"{self.name} trains a CausalDenoiser, got {type(student).__name__}")
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.pair_seed)
        device = example.rng.device
        noise = torch.randn(cfg.num_pairs, *sample_shape(example), generator=gen).to(device)
        cond = None
        if example.cond is not None:
            cond = index_cond(example.cond, torch.randint(0, example.size, (cfg.num_pairs,),
                                                          generator=gen))  # fmt: skip
        fr = sorted({f for fs in self.fractions(student) for f in fs}, reverse=True)
        states, ends = ode_trajectories(self.teacher, noise, cond, fr, cfg.teacher_steps)
        pairs = PairSet(states, ends, cond)
        pairs.fractions = fr
        return {"student": student, "pairs": pairs}

    def losses(self, roles, batch, update, step):
        student, pairs = roles["student"], roles["pairs"]
        states, target, cond = pairs.take(batch.rng.randint(0, len(pairs)))
        x, t = regression_inputs(student, states, pairs.fractions, self.fractions(student), batch)
        loss = F.mse_loss(student.predict(x, t, cond, kind="x0"), target)
        return {"student": loss}, {"ode_loss": loss.item()}


def regression_inputs(
    student: CausalDenoiser,
    states: Tensor,
    grid: list[float],
    fractions: list[list[float]],
    batch: Batch,
) -> tuple[Tensor, Tensor]:
    """(x (B, T, ...), per-frame native times (B, T)): each chunk of each sample at one of
    its own step times, drawn uniformly. ``states`` (B, len(grid), T, ...)."""
    cf, path = student.net.chunk_frames, student.path
    b, n_chunks = states.shape[0], len(fractions)
    u = batch.rng.rand(n_chunks)  # (B, n_chunks)
    xs, ts = [], []
    for k, fr in enumerate(fractions):
        pick = (u[:, k] * len(fr)).long().clamp(max=len(fr) - 1)
        col = torch.tensor([grid.index(f) for f in fr], device=states.device)[pick]
        sl = slice(k * cf, (k + 1) * cf)
        xs.append(states[torch.arange(b), col, sl])
        frac = torch.tensor(fr, device=states.device)[pick]
        ts.append(path.fraction_to_t(frac).to(states.device)[:, None].expand(b, cf))
    return torch.cat(xs, 1), torch.cat(ts, 1)


# ------------------------------------------------------------------------ Self Forcing DMD


@dataclass
class SelfForcingConfig(DMD2Config):
    first_chunk_steps: int = 0  # FFE: student steps on chunk 0 (0 = student_steps)
    context_frac: float = 0.0  # path fraction the finished chunk is re-noised to for the cache
    shared_exit: bool = False  # one exit step for every chunk (paper's same_step_across_blocks)
    adversarial: Literal["none", "data", "self"] = "none"  # GAN real side: data clips, or ASD
    asd_extra_steps: int = 1  # ASD: the "real" student runs student_steps + this many steps
    first_chunk_from_data: bool = False  # LiveTalk image condition: chunk 0 = a real first chunk


def dit_features(net: nn.Module, x: Tensor, time: Tensor, cond: Any) -> Tensor:
    """(B, dim) mean of a ``VideoDiT``'s tokens after its middle block (the GAN head's input;
    the layers after it are not run)."""
    blocks = net.blocks
    return _output_of(blocks[len(blocks) // 2], lambda: net(x, time, cond)).mean(1)


class SelfForcingDMD(DMD2):
    """DMD2 whose student sample is the self-forcing rollout of a causal student; with
    ``adversarial="self"`` the GAN head's real side is the student's own (K+1)-step video
    (adversarial self-distillation)."""

    name = "self_forcing"
    config_cls = SelfForcingConfig
    summary = "Self Forcing: DMD on the causal student's own KV-cached rollouts (Huang 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        check_choice("adversarial", cfg.adversarial, ("none", "data", "self"))
        if (cfg.adversarial != "none") != (cfg.gan_weight > 0):
            raise ValueError("adversarial 'data' or 'self' needs gan_weight > 0 and vice versa")
        if not 0.0 <= cfg.context_frac < 1.0:
            raise ValueError(f"context_frac must be in [0, 1), got {cfg.context_frac}")
        if cfg.asd_extra_steps < 1:
            raise ValueError(f"asd_extra_steps must be >= 1, got {cfg.asd_extra_steps}")

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.config.adversarial == "data" or self.config.first_chunk_from_data

    def first_chunk(self, student: CausalDenoiser, batch: Batch) -> Tensor | None:
        """The given chunk 0 (a real clip's first frames) under ``first_chunk_from_data``."""
        if not self.config.first_chunk_from_data:
            return None
        if batch.x is None:
            raise ValueError(f"{self.name} with first_chunk_from_data needs real clips")
        return batch.x[:, : student.net.chunk_frames]

    def fractions(self, student: CausalDenoiser, extra: int = 0) -> list[list[float]]:
        c = self.config
        first = c.first_chunk_steps + extra if c.first_chunk_steps else 0
        times = () if extra else c.student_times
        return chunk_fractions(student.net.n_chunks, c.student_steps + extra, first, times)

    def exits(self, fractions: list[list[float]], batch: Batch) -> list[int]:
        """Per chunk, the exit step: uniform over its steps, one draw for the whole batch
        (shared by every chunk with ``shared_exit``); the last step without backward
        simulation (the paper's ``last_step_only``)."""
        if not self.config.backward_simulation:
            return [len(f) - 1 for f in fractions]
        if self.config.shared_exit:
            u = batch.rng.shared_randint(0, 1 << 30)
            return [u % len(f) for f in fractions]
        return [batch.rng.shared_randint(0, len(f)) for f in fractions]

    def build_roles(self, student, example):
        if not isinstance(student, CausalDenoiser):
            raise TypeError(f"{self.name} trains a CausalDenoiser, got {type(student).__name__}")
        cfg = self.config
        if cfg.fake_lora_rank > 0:  # memory: teacher + LoRA adapters, as core's DMD2
            from fewstep.core.objectives.vsd import lora_critic

            rank, targets = cfg.fake_lora_rank, cfg.fake_lora_targets
            score = lora_critic(unguided(self.teacher), rank, float(rank), targets)
        else:
            score = trainable_copy(unguided(self.teacher))
        if self.config.gan_weight > 0:
            score.feature_fn = dit_features
        critic = nn.ModuleDict({"score": score})
        if self.config.gan_weight > 0:
            x = torch.zeros(1, *sample_shape(example), device=example.rng.device)
            t = self.path.fraction_to_t(0.5).to(x.device).expand(1)
            cond = None if example.cond is None else index_cond(example.cond, torch.zeros(1).long())
            with torch.no_grad():
                width = score.features(x, t, cond).shape[1]
            critic["head"] = GANHead(width).to(x.device)
        return {"student": student, "fake_score": critic}

    def generate(self, student: CausalDenoiser, batch: Batch) -> Tensor:
        fr = self.fractions(student)
        noise = batch.rng.randn(*sample_shape(batch))
        return self_forcing_rollout(
            student, noise, batch.cond, fr, self.exits(fr, batch), batch.rng.randn_like,
            self.config.context_frac, first_chunk=self.first_chunk(student, batch),
        )  # fmt: skip

    @torch.no_grad()
    def reference(self, student: CausalDenoiser, batch: Batch) -> Tensor:
        """ASD's "real" samples: the student's full (K + extra)-step rollout, detached."""
        fr = self.fractions(student, self.config.asd_extra_steps)
        noise = batch.rng.randn(*sample_shape(batch))
        return self_forcing_rollout(
            student, noise, batch.cond, fr, None, batch.rng.randn_like, self.config.context_frac,
            first_chunk=self.first_chunk(student, batch),
        )  # fmt: skip

    def losses(self, roles, batch, update, step):
        if self.config.adversarial == "self":
            batch = replace(batch, x=self.reference(roles["student"], batch))
        return super().losses(roles, batch, update, step)


# ------------------------------------------------------------------------------- streaming


@dataclass
class StreamStats:
    """What a stream spent: denoising evaluations, cache-writing passes, chunk latencies."""

    denoise_nfe: int = 0  # student evaluations on noisy chunks
    context_nfe: int = 0  # passes that write a finished chunk into the cache
    chunk_seconds: list[float] | None = None  # wall time of each emitted chunk

    @property
    def nfe(self) -> int:
        return self.denoise_nfe + self.context_nfe


@torch.no_grad()
def stream(
    student: CausalDenoiser,
    n_chunks: int,
    steps_per_chunk: int,
    first_chunk_steps: int = 0,
    window: int | None = None,
    cond: Any = None,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    first_chunk: Tensor | None = None,
    context_frac: float = 0.0,
    stats: StreamStats | None = None,
) -> Iterator[Tensor]:
    """Yield ``n_chunks`` chunks (B, chunk_frames, C, H, W), each generated with
    ``steps_per_chunk`` student steps (chunk 0: ``first_chunk_steps`` when > 0, First-Frame
    Enhancement) against a KV cache that keeps the last ``window`` chunks (None = all; set
    it for videos longer than training: see ``causal`` on positions). ``first_chunk`` (B,
    chunk_frames, ...) is LiveTalk-style image conditioning: it is emitted as chunk 0 and
    written into the cache, and generation continues from it. ``cond``: labels (B,) or a
    dict with per-frame ``control`` (B, n_chunks * chunk_frames)."""
    net = student.net
    cf = net.chunk_frames
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    b = batch_size or _cond_batch(cond) or (first_chunk.shape[0] if first_chunk is not None else 1)
    shape = (b, cf, net.cfg.channels, net.cfg.size, net.cfg.size)
    device = net.pos.device

    def fresh(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator).to(like)

    cache = student.new_cache(window)
    fractions = chunk_fractions(n_chunks, steps_per_chunk, first_chunk_steps)
    prev: tuple[Tensor, Any] | None = None
    for k in range(n_chunks):
        t0 = _time.perf_counter()
        if prev is not None:  # the last chunk's cache pass, run once it has been emitted
            write_context(student, prev[0], cache, prev[1], context_frac, fresh)
            if stats is not None:
                stats.context_nfe += 1
        ck = chunk_cond(cond, k, cf)
        if k == 0 and first_chunk is not None:
            x0 = first_chunk.to(device)
        else:
            noise = torch.randn(shape, generator=generator).to(device)
            x0, nfe = denoise_chunk(student, noise, fractions[k], cache, ck, fresh)
            if stats is not None:
                stats.denoise_nfe += nfe
        if stats is not None:
            stats.chunk_seconds = [*(stats.chunk_seconds or []), _time.perf_counter() - t0]
        prev = (x0, ck)
        yield x0


def _cond_batch(cond: Any) -> int | None:
    if isinstance(cond, Tensor):
        return cond.shape[0]
    if isinstance(cond, dict):
        for v in cond.values():
            if isinstance(v, Tensor):
                return v.shape[0]
    return None


__all__ = [
    "ODEInit",
    "ODEInitConfig",
    "SelfForcingConfig",
    "SelfForcingDMD",
    "StreamStats",
    "chunk_cond",
    "chunk_fractions",
    "denoise_chunk",
    "dit_features",
    "ode_trajectories",
    "regression_inputs",
    "self_forcing_rollout",
    "stream",
    "write_context",
]
