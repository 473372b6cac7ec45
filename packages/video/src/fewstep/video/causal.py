"""A block-causal video DiT for streaming generation (CausVid, Yin et al. 2025; Self Forcing,
Huang et al. 2025): the blocks and weights of ``VideoDiT``, with attention restricted so that
the tokens of frame chunk k see chunks <= k (full attention inside a chunk), one noise level
per chunk (adaLN per token from its chunk's time), and a KV cache so a video can be generated
chunk after chunk.

Two ways to run the same function:

- ``forward(x, time, cond)``: all chunks at once (teacher forcing, ODE-pair regression), the
  chunk structure as a block mask through ``fewstep.core.kernels.attention`` (Triton on CUDA,
  PyTorch elsewhere);
- ``forward_chunk(x_chunk, t_chunk, cache, cond, write=...)``: one chunk against the cached
  keys and values of the chunks before it (streaming; Self Forcing's training rollout).

With ``write=True`` the chunk's keys and values are appended to the cache; a cache with a
``window`` of W keeps only the last W chunks (the rolling KV cache of Self Forcing's long
videos), and ``forward(..., window=W)`` is the same banded block mask, so both agree exactly.

Positions. The teacher adds fixed sinusoidal (frame, row, column) positions to its input
tokens. A chunk at stream position k gets the sinusoids of its own latent frames
(k * chunk_latent_frames, ...), computed for any index, so a cached key keeps the position
it was computed with and a rolled cache still matches the banded full forward (the same
reason Self Forcing caches keys after RoPE at their absolute frame index: only offsets
inside the window matter to a relative code). Past the training length the temporal
sinusoids are extrapolated (frames the teacher never saw); that is the price of not
re-encoding the window each chunk, and ``stream`` documents it.

``net(x (B, T, C, H, W), time (B,) | (B, n_chunks) | (B, T), cond) -> (B, T, C, H, W)``;
``cond`` is class labels (B,), or a dict with ``labels`` and an optional per-frame 1-D
``control`` (B, T) signal (LiveTalk's audio stand-in, added through a zero-initialised
embedding so a teacher-initialised student starts as the teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.kernels import attention
from fewstep.core.models import ModuleDenoiser, _batch_t
from fewstep.core.paths import Path
from fewstep.video.dit import VideoDiT, VideoDiTConfig, _sincos_batch, positions_3d

MASK_BLOCK = 16  # smallest block of core's block-sparse attention (tokens)


@dataclass
class LayerKV:
    """Keys and values of the cached chunks of one layer, (B, heads, tokens, head_dim)."""

    k: Tensor | None = None  # cached keys, oldest chunk first
    v: Tensor | None = None  # cached values


@dataclass
class KVCache:
    """Per-layer keys/values of finished chunks. ``window`` W keeps the last W chunks (None:
    all); ``chunks`` counts every chunk written, so the next chunk's frame positions follow
    on even after old chunks were dropped."""

    layers: list[LayerKV]  # one entry per transformer block
    tokens_per_chunk: int  # tokens one chunk adds to each layer
    window: int | None = None  # chunks kept (rolling window); None = unbounded
    chunks: int = 0  # chunks written so far (= stream index of the next chunk)

    def cached_chunks(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[-2] // self.tokens_per_chunk

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Add one chunk's keys/values to ``layer`` (detached), dropping chunks that fall out
        of the window."""
        kv = self.layers[layer]
        k, v = k.detach(), v.detach()
        kv.k = k if kv.k is None else torch.cat([kv.k, k], -2)
        kv.v = v if kv.v is None else torch.cat([kv.v, v], -2)
        if self.window is not None:
            keep = self.window * self.tokens_per_chunk
            drop = max(kv.k.shape[-2] - keep, 0)
            kv.k, kv.v = kv.k[..., drop:, :], kv.v[..., drop:, :]


def block_causal_mask(
    n_chunks: int, tokens_per_chunk: int, window: int | None = None, block_size: int = MASK_BLOCK
) -> Tensor:
    """(Nb, Nb) bool block mask over ``n_chunks * tokens_per_chunk`` tokens in blocks of
    ``block_size``: a block of chunk i sees the blocks of chunks j with i - W <= j <= i
    (W = ``window``, None = all earlier chunks). ``tokens_per_chunk`` must be a multiple of
    ``block_size`` so that no block straddles two chunks."""
    if tokens_per_chunk % block_size:
        raise ValueError(
            f"a chunk holds {tokens_per_chunk} tokens; block-causal attention needs a multiple "
            f"of {block_size} (choose chunk frames / patch / size so that it is)"
        )
    per = tokens_per_chunk // block_size
    chunk = torch.arange(n_chunks * per) // per
    diff = chunk[:, None] - chunk[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff <= window
    return mask


def _split_cond(cond: Any) -> tuple[Tensor | None, Tensor | None]:
    """(labels, control) from labels, a dict {labels, control}, or None."""
    if cond is None or isinstance(cond, Tensor):
        return cond, None
    if isinstance(cond, dict):
        unknown = set(cond) - {"labels", "control"}
        if unknown:
            raise ValueError(f"unknown condition keys {sorted(unknown)}; expected labels, control")
        return cond.get("labels"), cond.get("control")
    raise TypeError(f"cond must be labels, a dict or None, got {type(cond).__name__}")


class CausalVideoDiT(VideoDiT):
    """``VideoDiT`` (same parameter names: ``load_state_dict`` of the bidirectional teacher
    works) with block-causal attention over chunks of ``chunk_frames`` frames."""

    def __init__(
        self,
        cfg: VideoDiTConfig,
        chunk_frames: int,
        window: int | None = None,
        control: bool = False,
    ):
        super().__init__(cfg)
        if cfg.attention != "full":
            raise ValueError("the causal DiT needs attention='full' (one attention per block)")
        pt = cfg.patch[0]
        if chunk_frames < 1 or chunk_frames % pt or cfg.frames % chunk_frames:
            raise ValueError(
                f"chunk_frames {chunk_frames} must be a multiple of the temporal patch {pt} and "
                f"divide the clip length {cfg.frames}"
            )
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 chunks or None, got {window}")
        self.chunk_frames = chunk_frames
        self.chunk_latent = chunk_frames // pt  # latent (patch) frames per chunk
        _, gh, gw = self.grid
        self.frame_tokens = gh * gw
        self.tokens_per_chunk = self.chunk_latent * self.frame_tokens
        self.window = window
        self.n_chunks = cfg.frames // chunk_frames  # chunks in a training-length clip
        # LiveTalk-style 1-D control (audio stand-in), zero-initialised: the teacher's function
        self.control = nn.Linear(1, cfg.dim) if control else None
        if self.control is not None:
            nn.init.zeros_(self.control.weight)
            nn.init.zeros_(self.control.bias)

    @classmethod
    def from_teacher(cls, teacher: VideoDiT, chunk_frames: int, **kw) -> CausalVideoDiT:
        """A causal student carrying the bidirectional teacher's weights."""
        net = cls(teacher.cfg, chunk_frames, **kw).to(next(teacher.parameters()).device)
        missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or any(not m.startswith("control.") for m in missing):
            raise ValueError(f"teacher weights do not fit: missing {missing}, extra {unexpected}")
        return net

    def new_cache(self, window: int | None = None) -> KVCache:
        """An empty KV cache (``window`` chunks kept; None = this model's window)."""
        w = self.window if window is None else window
        layers = [LayerKV() for _ in self.blocks]
        return KVCache(layers, self.tokens_per_chunk, w)

    # --- pieces ----------------------------------------------------------------------------
    def positions(self, first_latent: int, n_latent: int) -> Tensor:
        """(n_latent * rows * cols, dim) sinusoidal positions of latent frames
        first_latent .. first_latent + n_latent - 1 (the teacher's for frames it knows)."""
        _, gh, gw = self.grid
        pos = positions_3d((first_latent + n_latent, gh, gw), self.cfg.dim)
        return pos[first_latent * gh * gw :].to(self.pos.device)

    def chunk_times(self, time: Tensor, batch: int, n_chunks: int, n_frames: int) -> Tensor:
        """Network time as (B, n_chunks) from (B,), (B, n_chunks) or (B, frames) (per-frame
        times must be constant inside a chunk; the chunk's first frame is read)."""
        time = torch.as_tensor(time, dtype=torch.float32, device=self.pos.device)
        if time.ndim == 0:
            time = time.expand(batch)
        if time.ndim == 1:
            return time[:, None].expand(batch, n_chunks)
        if time.shape == (batch, n_chunks):
            return time
        if time.shape == (batch, n_frames):
            return time[:, :: self.chunk_frames]
        raise ValueError(
            f"time must be (B,), (B, n_chunks={n_chunks}) or (B, frames={n_frames}), got "
            f"{tuple(time.shape)}"
        )

    def _cond_per_latent(self, t_chunks: Tensor, cond: Any, n_frames: int) -> Tensor:
        """(B, n_latent, dim) adaLN input of each latent frame: its chunk's time embedding +
        label embedding (+ control embedding of its frames)."""
        cfg = self.cfg
        b, n_chunks = t_chunks.shape
        c = self.time(_sincos_batch(t_chunks.flatten() * cfg.time_scale, cfg.dim))
        c = c.view(b, n_chunks, -1).repeat_interleave(self.chunk_latent, 1)
        labels, control = _split_cond(cond)
        if self.label is not None:
            if labels is None:
                labels = torch.full((b,), cfg.num_classes, device=c.device)
            c = c + self.label(labels.long())[:, None]
        if control is not None:
            if self.control is None:
                raise ValueError("a control signal was given to a model built with control=False")
            if control.shape != (b, n_frames):
                raise ValueError(f"control must be (B, frames)=({b}, {n_frames}), got "
                                 f"{tuple(control.shape)}")  # fmt: skip
            per_latent = control.float().view(b, -1, cfg.patch[0]).mean(-1, keepdim=True)
            c = c + self.control(per_latent)
        return c

    def _unpatchify(self, tokens: Tensor, n_latent: int) -> Tensor:
        b = tokens.shape[0]
        (_, gh, gw), (pt, ph, pw), c = self.grid, self.cfg.patch, self.cfg.channels
        x = tokens.reshape(b, n_latent, gh, gw, c, pt, ph, pw).permute(0, 1, 5, 4, 2, 6, 3, 7)
        return x.reshape(b, n_latent * pt, c, gh * ph, gw * pw)

    def _run(
        self,
        x: Tensor,
        t_chunks: Tensor,
        cond: Any,
        first_latent: int,
        attend: Callable[[int, Tensor, Tensor, Tensor], Tensor],
    ) -> Tensor:
        """Embed, run the blocks with ``attend(layer, q, k, v)``, and unpatchify."""
        cfg = self.cfg
        b, n_frames = x.shape[:2]
        n_latent = n_frames // cfg.patch[0]
        h = self.embed(self.patchify(x)) + self.positions(first_latent, n_latent)
        c = self._cond_per_latent(t_chunks, cond, n_frames)  # (B, n_latent, D)

        def per_token(m: Tensor) -> Tensor:  # (B, n_latent, D) -> (B, N, D)
            return m.repeat_interleave(self.frame_tokens, 1)

        for i, block in enumerate(self.blocks):
            mods = [per_token(m) for m in block.ada(c).chunk(6, -1)]
            s1, g1, a1, s2, g2, a2 = mods
            y = block.norm1(h) * (1 + g1) + s1
            n, d, heads = y.shape[1], y.shape[2], block.attn.heads
            q, k, v = block.attn.qkv(y).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            o = attend(i, q, k, v).transpose(1, 2).reshape(b, n, d)
            h = h + a1 * block.attn.out(o)
            h = h + a2 * block.mlp(block.norm2(h) * (1 + g2) + s2)
        shift, scale = (per_token(m) for m in self.final_ada(c).chunk(2, -1))
        return self._unpatchify(self.head(self.final_norm(h) * (1 + scale) + shift), n_latent)

    def _check(self, x: Tensor) -> None:
        cfg = self.cfg
        if (
            x.ndim != 5
            or tuple(x.shape[2:]) != (cfg.channels, cfg.size, cfg.size)
            or x.shape[1] % self.chunk_frames
            or x.shape[1] == 0
        ):
            raise ValueError(
                f"expected clips (B, k * {self.chunk_frames}, {cfg.channels}, {cfg.size}, "
                f"{cfg.size}), got {tuple(x.shape)}"
            )

    # --- the two entry points --------------------------------------------------------------
    def forward(self, x: Tensor, time: Tensor, cond: Any = None, window: int | None = -1) -> Tensor:  # type: ignore[override]
        """All chunks at once under the block-causal (banded when ``window`` is set; -1 =
        the model's window) mask. Clips may be longer than the training length."""
        self._check(x)
        window = self.window if window == -1 else window
        n_chunks = x.shape[1] // self.chunk_frames
        t_chunks = self.chunk_times(time, x.shape[0], n_chunks, x.shape[1])
        mask = None
        if n_chunks > 1:
            mask = block_causal_mask(n_chunks, self.tokens_per_chunk, window).to(x.device)

        def attend(_i, q, k, v):
            return attention(q, k, v, mask, block_size=MASK_BLOCK)

        return self._run(x, t_chunks, cond, 0, attend)

    def forward_chunk(
        self, x_chunk: Tensor, t_chunk: Tensor, cache: KVCache, cond: Any = None,
        write: bool = False,
    ) -> Tensor:  # fmt: skip
        """One chunk (B, chunk_frames, C, H, W) at network time ``t_chunk`` (B,) attending to
        itself and to the cached chunks; ``write`` appends its keys/values to the cache
        (Self Forcing writes the clean, re-noised-to-context chunk, never the noisy steps)."""
        self._check(x_chunk)
        if x_chunk.shape[1] != self.chunk_frames:
            raise ValueError(f"forward_chunk takes one chunk of {self.chunk_frames} frames, "
                             f"got {x_chunk.shape[1]}")  # fmt: skip
        if len(cache.layers) != len(self.blocks) or cache.tokens_per_chunk != self.tokens_per_chunk:
            raise ValueError("the KV cache was made for another model (see new_cache)")
        t_chunks = self.chunk_times(t_chunk, x_chunk.shape[0], 1, self.chunk_frames)

        def attend(i, q, k, v):
            kv = cache.layers[i]
            k_all = k if kv.k is None else torch.cat([kv.k, k], -2)
            v_all = v if kv.v is None else torch.cat([kv.v, v], -2)
            out = attention(q, k_all, v_all, None, block_size=MASK_BLOCK)
            if write:  # after attending: the cache then holds the chunks the next one sees
                cache.append(i, k, v)
            return out

        out = self._run(x_chunk, t_chunks, cond, cache.chunks * self.chunk_latent, attend)
        if write:
            cache.chunks += 1
        return out


class CausalDenoiser(ModuleDenoiser):
    """``ModuleDenoiser`` around a ``CausalVideoDiT``: ``forward`` is the full block-causal
    pass (times (B,) or per frame (B, T)), ``chunk`` one streamed chunk in any
    parameterization (``kind``)."""

    net: CausalVideoDiT

    def __init__(self, net: CausalVideoDiT, path: Path, prediction: str):
        if not isinstance(net, CausalVideoDiT):
            raise TypeError(f"CausalDenoiser wraps a CausalVideoDiT, got {type(net).__name__}")
        super().__init__(net, path, prediction)

    def new_cache(self, window: int | None = None) -> KVCache:
        return self.net.new_cache(window)

    def chunk(
        self, x: Tensor, t: Tensor | float, cache: KVCache, cond: Any = None,
        write: bool = False, kind: str = "x0",
    ) -> Tensor:  # fmt: skip
        """The prediction (``kind``) for one chunk x (B, chunk_frames, ...) at native time t."""
        t = _batch_t(t, x)
        raw = self.net.forward_chunk(x, self.path.network_time(t), cache, cond, write)
        return self.path.convert(raw, self.prediction, kind, x, t)


def causal_student(teacher: ModuleDenoiser, chunk_frames: int, **kw) -> CausalDenoiser:
    """A causal student initialised from a bidirectional ``VideoDiT`` teacher denoiser (same
    path and parameterization); ``kw`` go to ``CausalVideoDiT`` (window, control)."""
    base = getattr(teacher, "base", teacher)  # under a CFG wrapper
    net = CausalVideoDiT.from_teacher(base.net, chunk_frames, **kw)
    return CausalDenoiser(net, base.path, base.prediction).train().requires_grad_(True)


__all__ = [
    "MASK_BLOCK",
    "CausalDenoiser",
    "CausalVideoDiT",
    "KVCache",
    "LayerKV",
    "block_causal_mask",
    "causal_student",
]
