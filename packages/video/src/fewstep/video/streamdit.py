"""StreamDiT: streaming video generation from a moving buffer of frames at increasing noise
levels, and its chunk-wise multistep distillation.

Kodaira, Hou, Hou, Georgopoulos, Juefei-Xu, Tomizuka, Zhao, "StreamDiT: Real-Time Streaming
Text-to-Video Generation" (2025, arXiv 2507.03745; no public code).

Section numbers are not cited: only the abstract and secondary summaries of the paper
could be read here; the parts below follow its named components.

1. The buffer (buffered flow matching). A buffer of B frames is partitioned into N = B / c
   chunks of c frames; every frame has its own noise level (rectified flow,
   x = (1 - tau) x0 + tau eps per frame). Chunk k (0 = oldest) sits at level
   (k + 1 - u) / N: one model call moves every chunk by 1 / (N s) (s micro-steps per
   segment, u = j / s after j of them); after s calls chunk 0 is clean, is emitted, and a
   fresh noise chunk enters at level 1 (``staircase``). c = B is the uniform scheme of
   ordinary diffusion; c = one latent frame, s = 1 the diagonal scheme of FIFO-Diffusion.
   The buffer starts as pure noise and fills over N - 1 segments, chunk k stopping at its
   staircase level (``warmup_levels``): levels max((k + 1) / N, 1 - p / N), p in [0, N-1].
2. Mixed training (mixed partitioning schemes): the flow-matching loss on per-frame levels
   drawn from several partitions (chunk sizes ``chunk_options``; continuous phase u) and from
   the buffer-filling states, so one model serves every scheme (``BufferedFlowMatching``).
3. Model (time-varying adaLN DiT with window attention): the time embedding varies per
   frame, attention is bidirectional inside the buffer, optionally restricted to a temporal
   window. Here: ``BufferDiT``, the teacher's ``VideoDiT`` weights run through
   ``CausalVideoDiT``'s per-latent-frame adaLN with a *symmetric* band mask (every latent
   frame sees those within ``window`` latent frames on both sides; None = full attention)
   instead of the paper's shifted 3-D windows: at 16 x 16 frames a spatial window would
   cover the frame. Buffer positions are relative (the buffer always occupies the teacher's
   frame positions 0..B-1): the model re-reads the whole buffer at each call, no KV cache.
4. Multistep distillation: in each segment of the chosen partition the teacher's s
   micro-steps (Euler = DDIM, core's ``ode_step``, per-frame times) are regressed by one
   student step over the same segment (``ChunkwiseDistillation``), so a distilled stream
   makes one call per emitted chunk and every frame passes through N calls: the paper's
   "NFE reduced to the number of chunks in a buffer". Segment start states are data clips
   noised to the segment's levels (no teacher rollout), a choice made here.

Shapes: videos (B, T, C, H, W); per-chunk levels (B, N) as path *fractions* (1 = noise);
per-frame levels (B, T).
"""

from __future__ import annotations

import time as _time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.kernels import attention
from fewstep.core.models import Denoiser, ModuleDenoiser
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.classifier_free import drop_cond
from fewstep.core.objectives.common import noised, ode_step
from fewstep.video.causal import MASK_BLOCK, CausalVideoDiT
from fewstep.video.dit import VideoDiT, VideoDiTConfig

# ------------------------------------------------------------------------------- levels


def staircase(n_chunks: int, u: Tensor | float) -> Tensor:
    """(B, N) fractions (k + 1 - u) / N of chunks k = 0..N-1 at phase u (B,) or scalar in
    [0, 1] of the current segment (u = 0: segment start; u = 1: its end, chunk 0 clean)."""
    u = torch.as_tensor(u, dtype=torch.float32).reshape(-1, 1)
    k = torch.arange(n_chunks, dtype=torch.float32)[None]
    return (k + 1 - u) / n_chunks


def warmup_levels(n_chunks: int, p: Tensor | float) -> Tensor:
    """(B, N) fractions max((k + 1) / N, 1 - p / N) while the buffer fills: p = 0 is pure
    noise, p = N - 1 the staircase at a segment start; each unit of p is one segment."""
    p = torch.as_tensor(p, dtype=torch.float32).reshape(-1, 1)
    if (p < 0).any() or (p > n_chunks - 1).any():
        raise ValueError(f"warm-up progress must lie in [0, {n_chunks - 1}]")
    return torch.maximum(staircase(n_chunks, 0.0), 1 - p / n_chunks)


def per_frame(levels: Tensor, chunk_frames: int) -> Tensor:
    """(B, N) chunk levels -> (B, N * chunk_frames) frame levels."""
    return levels.repeat_interleave(chunk_frames, dim=1)


def mixed_levels(
    n_frames: int,
    chunk_options: tuple[int, ...],
    pick: Tensor,
    u: Tensor,
    warm: Tensor,
    p: Tensor,
) -> Tensor:
    """(B, T) per-frame fractions of the mixed partitions: sample b uses chunk size
    ``chunk_options[pick[b]]`` (N = T / c chunks); at staircase phase ``u[b]`` in [0, 1), or,
    where ``warm[b]`` and N > 1, at warm-up progress ``p[b]`` in [0, 1) scaled to [0, N-1)."""
    out = torch.empty(len(pick), n_frames)
    for i, c in enumerate(chunk_options):
        rows = pick == i
        if not rows.any():
            continue
        n = n_frames // c
        lv = staircase(n, u[rows])
        if n > 1:
            w = warm[rows]
            lv = torch.where(w[:, None], warmup_levels(n, p[rows] * (n - 1)), lv)
        out[rows] = per_frame(lv, c)
    return out


# -------------------------------------------------------------------------------- model


def window_mask(n_latent: int, tokens_per_latent: int, window: int) -> Tensor:
    """(Nb, Nb) bool block mask over ``n_latent * tokens_per_latent`` tokens in blocks of
    ``MASK_BLOCK``: latent frame i sees latent frames j with |i - j| <= ``window``."""
    if tokens_per_latent % MASK_BLOCK:
        raise ValueError(f"a latent frame holds {tokens_per_latent} tokens; window attention "
                         f"needs a multiple of {MASK_BLOCK}")  # fmt: skip
    per = tokens_per_latent // MASK_BLOCK
    frame = torch.arange(n_latent * per) // per
    return (frame[:, None] - frame[None, :]).abs() <= window


class BufferDiT(CausalVideoDiT):
    """The teacher's ``VideoDiT`` (same parameters) with a time per latent frame and
    bidirectional (optionally windowed) attention over the buffer.

    ``net(x (B, T, C, H, W), time (B,) | (B, T) | (B, T / patch_t), cond) -> (B, T, C, H, W)``;
    per-frame times must be equal inside each temporal patch."""

    def __init__(self, cfg: VideoDiTConfig, window: int | None = None):
        super().__init__(cfg, chunk_frames=cfg.patch[0])  # one time per latent frame
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 latent frames or None, got {window}")
        self.attn_window = window

    @classmethod
    def from_teacher(cls, teacher: VideoDiT, window: int | None = None) -> BufferDiT:  # type: ignore[override]
        net = cls(teacher.cfg, window).to(next(teacher.parameters()).device)
        missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or any(not m.startswith("control.") for m in missing):
            raise ValueError(f"teacher weights do not fit: missing {missing}, extra {unexpected}")
        return net

    def forward(self, x: Tensor, time: Tensor, cond: Any = None) -> Tensor:  # type: ignore[override]
        self._check(x)
        n_latent = x.shape[1] // self.chunk_frames
        t_latent = self.chunk_times(time, x.shape[0], n_latent, x.shape[1])
        mask = None
        if self.attn_window is not None and self.attn_window < n_latent - 1:
            mask = window_mask(n_latent, self.tokens_per_chunk, self.attn_window).to(x.device)

        def attend(_i, q, k, v):
            return attention(q, k, v, mask, block_size=MASK_BLOCK)

        return self._run(x, t_latent, cond, 0, attend)


def buffer_model(teacher: Denoiser, window: int | None = None) -> ModuleDenoiser:
    """A trainable ``BufferDiT`` denoiser carrying a ``VideoDiT`` teacher denoiser's weights
    (same path and parameterization; under a CFG wrapper its base is used)."""
    base = getattr(teacher, "base", teacher)
    net = BufferDiT.from_teacher(base.net, window)
    return ModuleDenoiser(net, base.path, base.prediction).train().requires_grad_(True)


# -------------------------------------------------------------------------- one segment


def segment(
    model: Denoiser, x: Tensor, f_from: Tensor, f_to: Tensor, steps: int, cond: Any = None
) -> Tensor:
    """Denoise the buffer x (B, T, ...) from per-frame fractions ``f_from`` to ``f_to``
    ((B, T) or (T,)) in ``steps`` Euler (DDIM) calls on the linear interpolation between them
    (core's ``ode_step`` with per-frame times). Frames whose levels do not move stay put."""
    if steps < 1:
        raise ValueError(f"a segment needs >= 1 step, got {steps}")
    path = model.path
    b, n = x.shape[:2]
    f_from = f_from.to(x.device).expand(b, n)
    f_to = f_to.to(x.device).expand(b, n)
    for j in range(steps):
        fa = f_from + (f_to - f_from) * (j / steps)
        fb = f_from + (f_to - f_from) * ((j + 1) / steps)
        x = ode_step(model, x, path.fraction_to_t(fa).to(x), path.fraction_to_t(fb).to(x), cond)
    return x


# ---------------------------------------------------------------------------- streaming


@dataclass
class BufferStats:
    """What a stream spent: network evaluations (CFG counts 2) and chunk latencies."""

    warmup_nfe: int = 0  # evaluations while the buffer filled
    chunk_nfe: list[int] = field(default_factory=list)  # evaluations per emitted chunk
    chunk_seconds: list[float] = field(default_factory=list)  # wall time to each chunk
    calls_per_chunk: int = 0  # model calls per emitted chunk (s)

    @property
    def nfe(self) -> int:
        return self.warmup_nfe + sum(self.chunk_nfe)


def check_partition(buffer_frames: int, chunk_frames: int, patch_t: int) -> int:
    """N = buffer_frames / chunk_frames; raises unless chunks are whole temporal patches
    that tile the buffer."""
    if chunk_frames < 1 or chunk_frames % patch_t or buffer_frames % chunk_frames:
        raise ValueError(
            f"chunk_frames {chunk_frames} must be a multiple of the temporal patch {patch_t} "
            f"and divide the buffer of {buffer_frames} frames"
        )
    return buffer_frames // chunk_frames


@torch.no_grad()
def stream_buffer(
    model: Denoiser,
    chunk_frames: int,
    n_chunks: int,
    micro_steps: int = 1,
    cond: Any = None,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    stats: BufferStats | None = None,
) -> Iterator[Tensor]:
    """Yield ``n_chunks`` clean chunks (B, chunk_frames, C, H, W) from a moving buffer of the
    model's frame count: fill it (N - 1 segments), then per chunk one segment of
    ``micro_steps`` calls (1 for a distilled student) that brings chunk 0 to clean, emit it,
    shift, and append fresh noise at level 1. ``model`` wraps a ``BufferDiT`` (possibly
    under CFG); ``cond``: labels (B,) or None."""
    net = getattr(model, "base", model).net
    cfg = net.cfg
    n = check_partition(cfg.frames, chunk_frames, cfg.patch[0])
    if n_chunks < 1 or micro_steps < 1:
        raise ValueError(f"need n_chunks >= 1 and micro_steps >= 1, got {n_chunks}, {micro_steps}")
    b = batch_size or (cond.shape[0] if isinstance(cond, Tensor) else 1)
    device = net.pos.device
    path, evals = model.path, getattr(model, "evals_per_call", 1)

    def noise(frames: int) -> Tensor:
        eps = torch.randn(b, frames, cfg.channels, cfg.size, cfg.size, generator=generator)
        return path.prior(eps.to(device))

    t0 = _time.perf_counter()
    x, levels = noise(cfg.frames), torch.ones(1, n)
    for w in range(n - 1):  # fill the buffer: chunk k stops at its staircase level
        target = warmup_levels(n, w + 1)
        x = segment(model, x, per_frame(levels, chunk_frames), per_frame(target, chunk_frames),
                    micro_steps, cond)  # fmt: skip
        levels = target
        if stats is not None:
            stats.warmup_nfe += micro_steps * evals
    for _ in range(n_chunks):
        target = staircase(n, 1.0)  # chunk 0 reaches 0 (clean)
        x = segment(model, x, per_frame(levels, chunk_frames), per_frame(target, chunk_frames),
                    micro_steps, cond)  # fmt: skip
        out = x[:, :chunk_frames]
        if stats is not None:
            stats.chunk_nfe.append(micro_steps * evals)
            stats.calls_per_chunk = micro_steps
            stats.chunk_seconds.append(_time.perf_counter() - t0)
        yield out
        t0 = _time.perf_counter()
        x = torch.cat([x[:, chunk_frames:], noise(chunk_frames)], 1)
        levels = staircase(n, 0.0)


# --------------------------------------------------------------------------- objectives


@dataclass
class BufferFMConfig(ObjectiveConfig):
    chunk_options: tuple[int, ...] = (2, 4, 8)  # chunk sizes (frames) of the mixed partitions
    warmup_prob: float = 0.2  # share of samples at buffer-filling levels
    cond_dropout: float = 0.1  # label dropout (keeps the unconditional model for CFG)
    null_label: int = 10  # the null class of CFG


class BufferedFlowMatching(Objective):
    """StreamDiT's buffered flow matching with mixed partitions (Kodaira et al. 2025):
    mean || v(x_tau, tau) - (eps - x0) ||^2 with a level tau per frame, drawn per sample from
    a random partition's staircase (continuous phase) or its buffer-filling states; the loss
    in the model's own parameterization through the path (Lipman et al. 2023 eq. 23 for
    velocity)."""

    name = "streamdit_buffer_fm"
    config_cls = BufferFMConfig
    roles = ("student",)
    needs_data = True
    summary = "StreamDiT buffered flow matching with mixed partitions"

    def build_roles(self, student, example):
        t, pt = example.x.shape[1], student.net.cfg.patch[0]
        for c in self.config.chunk_options:
            check_partition(t, c, pt)
        return {"student": student}

    def levels(self, n_frames: int, batch: Batch) -> Tensor:
        """(B, T) per-frame fractions of this batch."""
        rng, opts = batch.rng, self.config.chunk_options
        pick = rng.randint(0, len(opts)).cpu()
        u, warm, p = rng.rand().cpu(), rng.rand().cpu() < self.config.warmup_prob, rng.rand().cpu()
        return mixed_levels(n_frames, opts, pick, u, warm, p)

    def losses(self, roles, batch, update, step):
        model, x0 = roles["student"], batch.x
        cond = drop_cond(batch.cond, lambda c: torch.full_like(c, self.config.null_label),
                         self.config.cond_dropout, batch)  # fmt: skip
        t = model.path.fraction_to_t(self.levels(x0.shape[1], batch)).to(x0)
        x_t, eps = noised(model.path, x0, t, batch)
        target = model.path.from_x0_eps(x0, eps, model.prediction, t)
        loss = F.mse_loss(model(x_t, t, cond), target)
        return {"student": loss}, {"buffer_fm_loss": loss.item()}


@dataclass
class ChunkDistillConfig(ObjectiveConfig):
    chunk_frames: int = 2  # c of the distilled partition (N = buffer / c calls per frame)
    teacher_micro_steps: int = 8  # s: teacher Euler steps per segment; the student takes 1
    warmup_prob: float = 0.25  # share of samples on buffer-filling segments


def segment_endpoints(n_chunks: int, warm: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(from, to) chunk fractions (B, N) of one segment: a steady-state segment (staircase
    start to end, chunk 0 reaching 0) or, where ``warm``, warm-up segment ``w`` (B,) ints in
    [0, N - 2] (from progress w to w + 1)."""
    f0, f1 = staircase(n_chunks, 0.0), staircase(n_chunks, 1.0)
    if n_chunks == 1:
        return f0.expand(len(warm), 1), f1.expand(len(warm), 1)
    wf = w.float()
    w0, w1 = warmup_levels(n_chunks, wf), warmup_levels(n_chunks, wf + 1)
    return torch.where(warm[:, None], w0, f0), torch.where(warm[:, None], w1, f1)


class ChunkwiseDistillation(Objective):
    """StreamDiT multistep distillation (Kodaira et al. 2025): on one segment of the chosen
    partition, || x_student - x_teacher ||^2 * N^2, where x_teacher is the teacher's
    ``teacher_micro_steps`` Euler (DDIM) steps and x_student one student step (same solver,
    core's ``ode_step``) between the segment's per-frame levels, both from the same noised
    clip. N^2 rescales the per-segment displacement (~1/N) to a velocity-sized error."""

    name = "streamdit_distill"
    config_cls = ChunkDistillConfig
    roles = ("student",)
    needs_data = True
    summary = "StreamDiT chunk-wise multistep distillation (one step per segment)"

    def build_roles(self, student, example):
        c = self.config
        check_partition(example.x.shape[1], c.chunk_frames, student.net.cfg.patch[0])
        if c.teacher_micro_steps < 1:
            raise ValueError(f"teacher_micro_steps must be >= 1, got {c.teacher_micro_steps}")
        return {"student": student}

    def losses(self, roles, batch, update, step):
        c, student, x0 = self.config, roles["student"], batch.x
        n = x0.shape[1] // c.chunk_frames
        rng, path = batch.rng, self.path
        warm = (rng.rand().cpu() < c.warmup_prob) & (n > 1)
        w = rng.randint(0, max(n - 1, 1)).cpu()
        f_from, f_to = (per_frame(f, c.chunk_frames) for f in segment_endpoints(n, warm, w))
        t_from = path.fraction_to_t(f_from).to(x0)
        x, _ = noised(path, x0, t_from, batch)
        with torch.no_grad():
            target = segment(self.teacher, x, f_from, f_to, c.teacher_micro_steps, batch.cond)
        pred = segment(student, x, f_from, f_to, 1, batch.cond)
        loss = F.mse_loss(pred, target) * n**2
        return {"student": loss}, {"distill_loss": loss.item()}


__all__ = [
    "BufferDiT",
    "BufferFMConfig",
    "BufferStats",
    "BufferedFlowMatching",
    "ChunkDistillConfig",
    "ChunkwiseDistillation",
    "buffer_model",
    "check_partition",
    "mixed_levels",
    "per_frame",
    "segment",
    "segment_endpoints",
    "staircase",
    "stream_buffer",
    "warmup_levels",
]
