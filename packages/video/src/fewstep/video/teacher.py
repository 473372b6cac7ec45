"""The video teacher: a class-conditional spatio-temporal DiT on rectified flow, trained by
fewstep on moving digits and cached by its config.

The training clips take the path a user's videos take: the moving-digits videos are written
as MP4 files (``generate_moving_digits``) and read back through ``VideoClipDataset``
(decord), so compression and the reader are part of the data. The class of a clip is the
label of its first digit; labels are dropped 10 % of the time so the teacher also learns the
unconditional velocity that classifier-free guidance needs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import make_path
from fewstep.video.dit import VideoDiT, VideoDiTConfig

NUM_CLASSES = 10  # digit labels; label 10 is the null class of CFG


@dataclass
class VideoDataConfig:
    videos: int = 1000  # moving-digits videos written as MP4 and read back
    frames: int = 8  # frames per clip
    size: int = 16  # frame height and width
    seed: int = 0  # recipe seed of the videos
    quality: str = "high"  # high, or low (blur, noise, JPEG and strong x264 compression)
    # digits per clip, drawn from 1..max_digits. 1 (since session 10): the label, the first
    # digit's, then names the clip; with 2 the teacher learnt to ignore it (session 9)
    max_digits: int = 1
    # digit sprite side in pixels (0: half the frame). 12 of 16 (session 11): with 8-pixel
    # digits the identity costs so few pixels that the teacher drew blobs of the right colour
    # and ignored the label (digit accuracy 0.20 at CFG 3 vs 0.75 real); at 12 its samples
    # are read as their label as often as real clips are (benchmarks/video_teacher.py V1)
    digit_size: int = 12
    max_spin: float = 0.0  # digit spin, degrees per frame (upright digits, as in V1)

    def recipe(self):
        """The moving-digits recipe knobs of these clips."""
        from fewstep.video.moving_digits import MovingDigitsConfig

        return MovingDigitsConfig(digits=(1, self.max_digits), max_spin=self.max_spin,
                                  digit_size=self.digit_size or None)  # fmt: skip


@dataclass
class VideoTeacherConfig:
    data: VideoDataConfig = field(default_factory=VideoDataConfig)  # training videos
    # DiT patch (frames, rows, cols). A token must be narrower than the model: with (2, 4, 4)
    # (96 values at dim 96) the teacher never beat the data mean at high noise (session 8)
    patch: tuple[int, int, int] = (1, 4, 4)
    dim: int = 96  # DiT width
    depth: int = 4  # DiT blocks
    heads: int = 4  # attention heads
    attention: str = "full"  # full or factorised
    steps: int = 2000  # training steps (1,500 at lr 1e-3 already follows labels: V1)
    batch_size: int = 32  # training batch
    lr: float = 1e-3  # AdamW learning rate
    cond_dropout: float = 0.1  # label dropout for CFG
    seed: int = 0  # training seed

    def dit(self) -> VideoDiTConfig:
        d = self.data
        return VideoDiTConfig(
            frames=d.frames, size=d.size, patch=self.patch, dim=self.dim, depth=self.depth,
            heads=self.heads, attention=self.attention, num_classes=NUM_CLASSES,
        )  # fmt: skip


def null_labels(labels: Tensor) -> Tensor:
    return torch.full_like(labels, NUM_CLASSES)


def load_clips(cfg: VideoDataConfig, folder: Path | None = None, with_meta: bool = False,
               recipe=None):  # fmt: skip
    """(clips (N, T, 3, H, W) in [-1, 1], first-digit labels (N,)), generated as MP4 files
    under ``folder`` (default: the fewstep cache) and read back with decord; with
    ``with_meta`` also each clip's moving-digits metadata (positions, angles, ...).
    ``recipe``: a ``MovingDigitsConfig`` replacing ``cfg.recipe()`` (it joins the cache key)."""
    from fewstep.core.cache import cache_key, cache_root
    from fewstep.video.io import VideoClipDataset
    from fewstep.video.moving_digits import generate_moving_digits

    spec = dataclasses.asdict(cfg)
    if recipe is not None:
        spec["recipe"] = dataclasses.asdict(recipe)
    folder = folder or cache_root() / "video-data" / cache_key(spec)
    meta_file = folder / "metadata.json"
    if not meta_file.exists():
        generate_moving_digits(folder, cfg.videos, cfg.frames, cfg.size, cfg.seed, cfg.quality,
                               recipe or cfg.recipe())  # fmt: skip
    meta = json.loads(meta_file.read_text())
    meta_of = {v["file"]: v for v in meta["videos"]}
    ds = VideoClipDataset(folder, clip_len=cfg.frames, random_clip=False)
    clips = torch.stack([ds[i] for i in range(len(ds))])
    metas = [meta_of[info.path.name] for info in ds.videos]
    labels = torch.tensor([m["digits"][0]["label"] for m in metas])
    return (clips, labels, metas) if with_meta else (clips, labels)


def build_teacher(cfg: VideoTeacherConfig) -> ModuleDenoiser:
    torch.manual_seed(cfg.seed)
    return ModuleDenoiser(VideoDiT(cfg.dit()), make_path("rectified_flow"), "velocity")


def train_cached(kind: str, spec: dict, model: ModuleDenoiser, data, cfg, null_cond,
                 progress: bool = True) -> tuple[ModuleDenoiser, dict]:  # fmt: skip
    """(frozen model, info): ``model`` trained by core's ``train_denoiser`` on ``data()`` (a
    ``TensorData``, built only when the cache misses) with ``cfg``'s steps, batch_size, lr,
    seed and cond_dropout, its EMA weights cached under ``kind`` and ``spec``."""
    from fewstep.core.cache import cached_module
    from fewstep.core.pretrain import train_denoiser

    def train(m: ModuleDenoiser) -> dict:
        examples = data()
        t0 = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU trains it in a minute
        ema, losses = train_denoiser(
            m, examples, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
            cond_dropout=cfg.cond_dropout, null_cond=null_cond, progress=progress, device=device,
        )  # fmt: skip
        m.load_state_dict(ema.state_dict())
        m.cpu()  # as a cache hit returns it
        tail = losses[-50:]
        return {"train_seconds": time.perf_counter() - t0, "final_loss": sum(tail) / len(tail)}

    model, info, _ = cached_module(kind, spec, model, train)
    return model.eval().requires_grad_(False), info


def load_teacher(cfg: VideoTeacherConfig, progress: bool = True) -> tuple[ModuleDenoiser, dict]:
    """(frozen teacher, info with train_seconds); trains and caches on first use."""
    from fewstep.core.training import TensorData

    spec = {**dataclasses.asdict(cfg), "model": "video-dit-v2"}  # v2: time embedded once
    return train_cached("video-teacher", spec, build_teacher(cfg),
                        lambda: TensorData(*load_clips(cfg.data)), cfg, null_labels,
                        progress)  # fmt: skip
