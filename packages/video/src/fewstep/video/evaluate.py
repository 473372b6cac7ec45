"""Video evaluation without internet: a small 3-D conv classifier trained by fewstep on
procedural moving digits gives Fréchet distances on video and per-frame features and the
digit accuracy of class-conditional samples; a flow-free warp error measures temporal
consistency.

- ``VideoClassifier``: a per-frame 2-D stem (its pooled output is the *frame* feature),
  then 3-D convolutions over (time, rows, cols), global pooling and a penultimate layer (the
  *video* feature), with two heads: digit (10) and motion direction (``DIRECTION_BINS``
  bins of the velocity angle recorded in the moving-digits metadata). Clips hold 1-2 digits,
  so both heads are trained on the multi-hot set of what the clip shows (cross-entropy
  against the uniform distribution over present digits / directions): the top digit of a
  two-digit clip is one of its two digits, which caps digit accuracy below 1 on real clips
  (``evaluate_videos`` reports the real clips' accuracy beside the samples').
- ``video_fd`` / ``frame_fd``: the Fréchet distance (Heusel et al. 2017, FID; core's
  ``frechet_distance``) on video features and on frame features (FVD-style, Unterthiner et
  al. 2018, with a feature net trained here instead of I3D, which needs a download).
- ``warp_error``: a flow-free stand-in for the flow-warping error of Lai et al. ("Learning
  Blind Video Temporal Consistency", ECCV 2018): optical flow is replaced by exhaustive
  block matching (Jain & Jain 1981) over integer shifts within ±r pixels (see its docstring).

Labels come from the generator's metadata (``moving_digits_array``), so no edit to the
dataset is needed; the classifier trains on in-memory clips (no MP4 round trip: a small
domain shift against the teacher's decoded training clips, stated, not hidden).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.metrics import frechet_distance

NUM_DIGITS = 10  # digit classes
DIRECTION_BINS = 4  # motion direction bins: right, down, left, up (image coordinates)


@dataclass
class ClassifierConfig:
    videos: int = 1200  # procedural training clips (moving_digits_array)
    frames: int = 8  # frames per clip (the classifier pools, so any length runs)
    size: int = 16  # frame height and width
    seed: int = 1000  # clip recipe seed (away from the teacher's seed 0)
    width: int = 32  # channels of the 2-D stem; the 3-D layers use twice this
    features: int = 64  # penultimate (video feature) width
    steps: int = 600  # AdamW steps
    batch_size: int = 64  # clips per step
    lr: float = 2e-3  # AdamW learning rate
    train_seed: int = 0  # initialisation and batch order
    # the clip recipe of the teacher's data (``VideoDataConfig``): a classifier trained on
    # 8-pixel digits reads only a third of 12-pixel real clips (session 11)
    max_digits: int = 1  # digits per clip drawn from 1..max_digits
    max_spin: float = 0.0  # digit spin, degrees per frame
    digit_size: int = 12  # digit sprite side in pixels (0: half the frame)
    speed: tuple[float, float] = (1.0, 2.5)  # digit speeds, pixels per frame (as the data)
    start: str = "uniform"  # start positions (moving_digits: uniform, or upstream: no bounce)


# fields added after cached classifiers were keyed: left out of the key at their defaults,
# so those classifiers stay valid
_KEYED_IF_CHANGED = {"speed": (1.0, 2.5), "start": "uniform"}


def direction_bin(velocity: tuple[float, float] | list[float]) -> int:
    """Bin of a velocity [vx, vy] (pixels per frame, image coordinates, y down): the angle
    atan2(vy, vx) rounded to the nearest of ``DIRECTION_BINS`` equally spaced directions
    (0 = right, 1 = down, 2 = left, 3 = up)."""
    angle = math.atan2(float(velocity[1]), float(velocity[0]))
    return int(round(angle / (2 * math.pi / DIRECTION_BINS))) % DIRECTION_BINS


def labelled_clips(
    n: int, frames: int, size: int, seed: int, max_digits: int = 2, max_spin: float = 8.0,
    digit_size: int = 0, speed: tuple[float, float] = (1.0, 2.5), start: str = "uniform",
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(clips (N, T, 3, H, W) in [-1, 1], digit multi-hot (N, 10), direction multi-hot
    (N, DIRECTION_BINS)) from the moving-digits recipe's metadata (1..``max_digits`` digits
    of ``digit_size`` pixels (0: half the frame) spinning up to ``max_spin`` degrees per
    frame, moving at ``speed`` from ``start`` positions; the rest of the recipe as the
    teacher's)."""
    from fewstep.video.moving_digits import MovingDigitsConfig, moving_digits_array

    config = MovingDigitsConfig(digits=(1, max_digits), max_spin=max_spin,
                                digit_size=digit_size or None, speed=tuple(speed),
                                start=start)  # fmt: skip
    md = moving_digits_array(n, frames, size, seed, config=config)
    digits = torch.zeros(n, NUM_DIGITS)
    dirs = torch.zeros(n, DIRECTION_BINS)
    for i, v in enumerate(md.videos):
        for d in v["digits"]:
            digits[i, d["label"]] = 1.0
            dirs[i, direction_bin(d["velocity"])] = 1.0
    return md.as_tensor(), digits, dirs


class VideoClassifier(nn.Module):
    """``forward(videos (B, T, 3, H, W) in [-1, 1]) -> (digit logits (B, 10), direction
    logits (B, DIRECTION_BINS))``; ``features`` (B, features), ``frame_features``
    (B * T, width). Every layer pools globally at the end, so any T, H, W >= 4 runs."""

    def __init__(self, width: int = 32, features: int = 64, channels: int = 3):
        super().__init__()
        w = width
        # GroupNorm (batch-independent, so features do not depend on the evaluated set)
        # makes the small net train in a few hundred steps
        self.stem = nn.Sequential(  # per frame
            nn.Conv2d(channels, w, 3, padding=1), nn.GroupNorm(4, w), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(4, w), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GroupNorm(4, w), nn.GELU(),
        )  # fmt: skip
        self.spacetime = nn.Sequential(
            nn.Conv3d(w, 2 * w, 3, padding=1), nn.GroupNorm(4, 2 * w), nn.GELU(),
            nn.Conv3d(2 * w, 2 * w, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(4, 2 * w),
            nn.GELU(),
        )  # fmt: skip
        self.penultimate = nn.Sequential(nn.Linear(4 * w, features), nn.GELU())
        self.digit = nn.Linear(features, NUM_DIGITS)
        self.direction = nn.Linear(features, DIRECTION_BINS)

    @staticmethod
    def _check(videos: Tensor) -> None:
        if videos.ndim != 5 or videos.shape[2] != 3 or min(videos.shape[-2:]) < 4:
            raise ValueError(f"expected videos (B, T, 3, H, W) with H, W >= 4, got "
                             f"{tuple(videos.shape)}")  # fmt: skip

    def _stem(self, videos: Tensor) -> Tensor:
        """(B, T, 3, H, W) -> (B * T, width, H / 2, W / 2)."""
        self._check(videos)
        return self.stem(videos.flatten(0, 1).float())

    def frame_features(self, videos: Tensor) -> Tensor:
        """(B * T, width): the stem's output, mean-pooled over space, per frame."""
        return self._stem(videos).mean((-2, -1))

    def features(self, videos: Tensor) -> Tensor:
        """(B, features): the penultimate layer (the video feature of ``video_fd``)."""
        b, t = videos.shape[:2]
        h = self._stem(videos)
        h = h.view(b, t, *h.shape[1:]).transpose(1, 2)  # (B, width, T, H', W')
        h = self.spacetime(h)
        pooled = torch.cat([h.mean((2, 3, 4)), h.amax((2, 3, 4))], 1)
        return self.penultimate(pooled)

    def forward(self, videos: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(videos)
        return self.digit(f), self.direction(f)


def _multi_hot_ce(logits: Tensor, multi_hot: Tensor) -> Tensor:
    """Cross-entropy against the uniform distribution over the positives of each row."""
    target = multi_hot / multi_hot.sum(1, keepdim=True).clamp_min(1.0)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def train_classifier(
    cfg: ClassifierConfig, model: VideoClassifier | None = None, progress: bool = False
) -> tuple[VideoClassifier, dict]:
    """Train on ``cfg.videos`` procedural clips (AdamW, multi-hot cross-entropy on both heads,
    random horizontal-flip-free batches: a flip would change the direction label); returns
    (model in eval mode, info with train_seconds, final loss and held-out accuracies)."""
    torch.manual_seed(cfg.train_seed)
    model = model or VideoClassifier(cfg.width, cfg.features)
    clips, digits, dirs = labelled_clips(
        cfg.videos, cfg.frames, cfg.size, cfg.seed, cfg.max_digits, cfg.max_spin, cfg.digit_size,
        cfg.speed, cfg.start,
    )  # fmt: skip
    n_val = max(cfg.videos // 10, 2)
    tr, va = slice(n_val, None), slice(0, n_val)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    gen = torch.Generator().manual_seed(cfg.train_seed)
    n_tr = cfg.videos - n_val
    t0, losses = time.perf_counter(), []
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, n_tr, (min(cfg.batch_size, n_tr),), generator=gen)
        x, yd, ym = clips[tr][idx], digits[tr][idx], dirs[tr][idx]
        ld, lm = model(x)
        loss = _multi_hot_ce(ld, yd) + _multi_hot_ce(lm, ym)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    with torch.no_grad():
        ld, lm = model(clips[va])
    hit = lambda logits, mh: mh.gather(1, logits.argmax(1, keepdim=True)).mean().item()  # noqa: E731
    tail = losses[-20:]
    info = {
        "train_seconds": time.perf_counter() - t0,
        "final_loss": sum(tail) / len(tail),
        "val_digit_hit": hit(ld, digits[va]),  # top digit is one the clip shows
        "val_direction_hit": hit(lm, dirs[va]),  # top direction is one a digit moves in
    }
    if progress:
        print(f"video classifier: {info}")
    return model, info


def load_classifier(cfg: ClassifierConfig | None = None) -> tuple[VideoClassifier, dict]:
    """(frozen classifier, info); trained on first use and cached by config (core's
    ``cached_module``, ``$FEWSTEP_CACHE/video-classifier``)."""
    from fewstep.core.cache import cached_module

    cfg = cfg or ClassifierConfig()
    spec = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in _KEYED_IF_CHANGED or v != _KEYED_IF_CHANGED[k]}  # fmt: skip
    spec["model"] = "video-classifier-v2"
    model = VideoClassifier(cfg.width, cfg.features)

    def train(m: nn.Module) -> dict:
        return train_classifier(cfg, m)[1]

    model, info, _ = cached_module("video-classifier", spec, model, train)
    return model.eval().requires_grad_(False), info


# ------------------------------------------------------------------------------ metrics


@torch.no_grad()
def _batched(fn, videos: Tensor, batch: int = 64) -> Tensor:
    return torch.cat([fn(videos[i : i + batch]) for i in range(0, len(videos), batch)])


def video_features(classifier: VideoClassifier, videos: Tensor) -> Tensor:
    """(N, features) penultimate features of videos (N, T, 3, H, W) in [-1, 1] (clamped:
    a few-step sample may overshoot the data range)."""
    dev = next(classifier.parameters()).device
    return _batched(lambda v: classifier.features(v.to(dev).clamp(-1, 1)).cpu(), videos)


def frame_features(classifier: VideoClassifier, videos: Tensor) -> Tensor:
    """(N * T, width) per-frame features of videos (N, T, 3, H, W)."""
    dev = next(classifier.parameters()).device
    return _batched(lambda v: classifier.frame_features(v.to(dev).clamp(-1, 1)).cpu(), videos)


def video_fd(classifier: VideoClassifier, a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the video features of two video sets
    (Heusel et al. 2017; core's ``frechet_distance``)."""
    return frechet_distance(video_features(classifier, a), video_features(classifier, b))


def frame_fd(classifier: VideoClassifier, a: Tensor, b: Tensor) -> float:
    """Fréchet distance between the per-frame features of two video sets (every frame of
    every video is one sample)."""
    return frechet_distance(frame_features(classifier, a), frame_features(classifier, b))


def class_accuracy(classifier: VideoClassifier, videos: Tensor, labels: Tensor) -> float:
    """Fraction of videos whose top digit is ``labels`` (N,) (the class they were generated
    for, the first digit of a real clip)."""
    if labels.shape != (len(videos),):
        raise ValueError(f"labels must be ({len(videos)},), got {tuple(labels.shape)}")
    dev = next(classifier.parameters()).device
    logits = _batched(lambda v: classifier(v.to(dev).clamp(-1, 1))[0].cpu(), videos)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def warp_error(videos: Tensor, radius: int = 2, block: int = 8) -> float:
    """Flow-free temporal consistency: the mean over consecutive frame pairs (t, t+1) and
    over blocks of ``block`` x ``block`` pixels of

        min_{|dx|, |dy| <= radius} mean_{p in block, channels} (f_{t+1}(p) - f_t(p - d))^2 / 4,

    with f_t shifted circularly (``torch.roll``). Each block takes its best integer shift
    (block-matching motion estimation, Jain & Jain 1981) in place of the optical flow of
    Lai et al.'s warping error (ECCV 2018), so it is a proxy: 0 for a static video and for one
    that translates (circularly) by an integer shift within ``radius``; rotation, sub-pixel
    motion, occlusion and flicker raise it. The 1/4 maps squared differences of [-1, 1]
    pixels to [0, 1]. videos: (N, T, C, H, W), T >= 2, H and W divisible by ``block``."""
    if videos.ndim != 5 or videos.shape[1] < 2:
        raise ValueError(f"expected videos (N, T >= 2, C, H, W), got {tuple(videos.shape)}")
    h, w = videos.shape[-2:]
    if radius < 0 or block < 1 or h % block or w % block:
        raise ValueError(f"need radius >= 0 and a block ({block}) dividing the frame {h}x{w}")
    v = videos.detach().float().clamp(-1, 1)
    prev, nxt = v[:, :-1].flatten(0, 1), v[:, 1:].flatten(0, 1)  # (N (T-1), C, H, W)
    best = None
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            err = (nxt - torch.roll(prev, (dy, dx), (-2, -1))).pow(2).mean(1, keepdim=True)
            err = F.avg_pool2d(err, block) / 4.0  # (N (T-1), 1, H / block, W / block)
            best = err if best is None else torch.minimum(best, err)
    return best.mean().item()


def evaluate_videos(
    videos: Tensor,
    labels: Tensor,
    reference: Tensor,
    classifier: VideoClassifier | None = None,
    reference_labels: Tensor | None = None,
) -> dict[str, float]:
    """Quality of generated ``videos`` (N, T, 3, H, W) made for digit ``labels`` (N,)
    against real ``reference`` clips (M, T, 3, H, W): video FD, per-frame FD, digit
    accuracy, warp error (and the reference's own warp error, and its digit accuracy when
    ``reference_labels`` are given, as ceilings). ``classifier``: default
    ``load_classifier()``."""
    if videos.shape[1:] != reference.shape[1:]:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} "
                         "must share (T, C, H, W)")  # fmt: skip
    clf = classifier if classifier is not None else load_classifier()[0]
    out = {
        "video_fd": video_fd(clf, videos, reference),
        "frame_fd": frame_fd(clf, videos, reference),
        "digit_accuracy": class_accuracy(clf, videos, labels),
        "warp_error": warp_error(videos),
        "reference_warp_error": warp_error(reference),
    }
    if reference_labels is not None:
        out["reference_digit_accuracy"] = class_accuracy(clf, reference, reference_labels)
    return out


__all__ = [
    "DIRECTION_BINS",
    "ClassifierConfig",
    "VideoClassifier",
    "class_accuracy",
    "direction_bin",
    "evaluate_videos",
    "frame_fd",
    "frame_features",
    "labelled_clips",
    "load_classifier",
    "train_classifier",
    "video_fd",
    "video_features",
    "warp_error",
]
