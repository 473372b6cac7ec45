"""Moving digits: a procedural video dataset, written as real MP4 files so that tests and
demos read it through the same decord path a user's videos take.

Recipe, for video ``i`` of a run with seed ``s``. Every draw comes from
``numpy.random.default_rng([s, i])``, so video ``i`` is the same whatever ``n_videos`` is,
and the low-quality variant shows exactly the content of the high-quality one.

1. Digits: 1-2 (``config.digits``) images drawn uniformly from scikit-learn's 1,797 8x8
   handwritten digits (values 0-16), each upscaled bilinearly to a square sprite of
   ``digit_size`` pixels (default half the frame) whose opacity is value / 16.
2. Motion: the sprite's top-left corner starts uniformly in [0, size - digit_size]^2 and
   moves at a constant speed (uniform in ``config.speed`` pixels per frame, direction
   uniform), bouncing off the frame edges (the unfolded position p0 + v t is reflected
   into [0, size - digit_size]); the sprite is placed at the nearest whole pixel, so the
   whole sprite, and the digit in it, stays inside the frame. With ``start = "upstream"``
   the same uniform draw u is mapped, per axis, into the starts from which the whole path
   p0 + v t (t < T) stays inside without a bounce (or to the wall behind the motion where
   the path is longer than the room): the clip then shows its direction in every frame.
3. Rotation: start angle uniform in [-30, 30] degrees, then a constant spin uniform in
   [-max_spin, max_spin] degrees per frame about the sprite centre (bilinear; ink rotated
   past the sprite square is cut). ``max_spin = 0`` keeps digits upright.
4. Colour: each digit a bright colour (HSV: hue uniform, saturation uniform in [0, 0.7],
   value 1); the background is darker (channel values in [0, 0.45]).
5. Background, static over the clip, one of ``config.backgrounds`` chosen uniformly:
   "noise" (smooth noise: a 4x4 grid of random colours upsampled bicubically), "stripes"
   (a sinusoid between two colours, random angle, period 5-14 px, phase), "gradient" (a
   linear ramp between two colours along a random direction).
6. Compositing: frame = background * (1 - alpha) + colour * alpha, digit by digit, on
   float RGB in [0, 1], rounded to uint8.
7. Low quality ("low"): the same frames, then a Gaussian blur (``blur_sigma`` px, per
   frame), additive Gaussian noise (``noise_std``, in 0-255 units, drawn from
   ``default_rng([s, i, 1])``) and a JPEG round trip at ``jpeg_quality``; MP4 files of
   this variant are also encoded at x264 CRF ``crf_low`` (35) instead of ``crf_high`` (18).

Frames are uint8 (T, size, size, 3) RGB, as :func:`fewstep.video.io.read_video` returns.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.video.io import write_video

QUALITIES = ("high", "low")
BACKGROUNDS = ("noise", "stripes", "gradient")
STARTS = ("uniform", "upstream")
_START_ANGLE = 30.0  # degrees: start angles are uniform in [-_START_ANGLE, _START_ANGLE]
_BG_MAX = 0.45  # background channel values lie in [0, _BG_MAX]; digits are brighter


@dataclass(frozen=True)
class MovingDigitsConfig:
    """The recipe's knobs beyond frame count, frame size, seed and quality."""

    digit_size: int | None = None  # sprite side in pixels; None: half the frame size
    digits: tuple[int, int] = (1, 2)  # fewest and most digits per video
    speed: tuple[float, float] = (1.0, 2.5)  # range of digit speeds, pixels per frame
    max_spin: float = 8.0  # largest rotation speed, degrees per frame; 0: no rotation
    backgrounds: tuple[str, ...] = BACKGROUNDS  # background kinds drawn from
    fps: float = 8.0  # frame rate written into the MP4 files
    crf_high: int = 18  # x264 CRF of "high" files (lower is better; 18 near-lossless)
    crf_low: int = 35  # x264 CRF of "low" files
    blur_sigma: float = 1.0  # "low": Gaussian blur standard deviation, pixels
    noise_std: float = 8.0  # "low": additive Gaussian noise std, in 0-255 units
    jpeg_quality: int = 20  # "low": JPEG quality of the per-frame round trip (1-95)
    start: str = "uniform"  # start positions: uniform, or upstream (no bounce where it fits)

    def validate(self, size: int) -> int:
        """The sprite side for frames of ``size``; raises on an inconsistent recipe."""
        d = self.digit_size or size // 2
        if not 4 <= d < size:
            raise ValueError(f"digit_size must be in [4, {size - 1}] for size {size}, got {d}")
        lo, hi = self.digits
        if not 1 <= lo <= hi:
            raise ValueError(f"digits must be (fewest, most) with 1 <= fewest <= most: {lo, hi}")
        if not 0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed must be (low, high) with 0 <= low <= high: {self.speed}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if not self.backgrounds or unknown:
            raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}")
        return d


@dataclass
class MovingDigits:
    """Videos in memory, with the metadata that :func:`generate_moving_digits` writes."""

    frames: np.ndarray  # (N, T, H, W, 3) uint8 RGB
    videos: list[dict] = field(default_factory=list)  # per video: seed, background, digits

    def as_tensor(self) -> Tensor:
        """(N, T, 3, H, W) float32 in [-1, 1], the datasets' convention."""
        return torch.from_numpy(self.frames).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


def moving_digits_array(
    n_videos: int,
    frames: int = 16,
    size: int = 32,
    seed: int = 0,
    quality: str = "high",
    config: MovingDigitsConfig | None = None,
) -> MovingDigits:
    """``n_videos`` videos of the recipe above, in memory: frames (N, T, size, size, 3)
    uint8. "low" applies blur, noise and JPEG (the files get x264 at CRF ``crf_low`` on
    top)."""
    config = config or MovingDigitsConfig()
    _check(n_videos, frames, size, seed, quality, config)
    out = np.empty((n_videos, frames, size, size, 3), np.uint8)
    videos = []
    for i in range(n_videos):
        out[i], meta = _video(i, frames, size, seed, quality, config)
        videos.append(meta)
    return MovingDigits(out, videos)


def generate_moving_digits(
    out_dir: str | Path,
    n_videos: int,
    frames: int = 16,
    size: int = 32,
    seed: int = 0,
    quality: str = "high",
    config: MovingDigitsConfig | None = None,
) -> list[Path]:
    """Write ``n_videos`` MP4 files ``00000.mp4``, ... into ``out_dir`` (one video in memory
    at a time) and a ``metadata.json`` beside them: the recipe, and per video its file,
    seed, background, and per digit its label, sklearn index, colour, velocity, per-frame
    top-left ``positions`` [x, y] (pixels) and ``angles`` (degrees). Returns the video
    paths in order. Files of the same names are overwritten; other files are left alone."""
    config = config or MovingDigitsConfig()
    digit_size = _check(n_videos, frames, size, seed, quality, config)
    out = Path(out_dir)
    crf = config.crf_high if quality == "high" else config.crf_low
    paths, videos = [], []
    for i in range(n_videos):
        video, meta = _video(i, frames, size, seed, quality, config)
        paths.append(write_video(out / f"{i:05d}.mp4", video, config.fps, crf=crf))
        videos.append({"file": paths[-1].name, **meta})
    recipe = {"frames": frames, "size": size, "seed": seed, "quality": quality, **asdict(config)}
    recipe["digit_size"] = digit_size
    tmp = out / ".metadata.json.partial"
    tmp.write_text(json.dumps({"recipe": recipe, "videos": videos}, indent=1))
    os.replace(tmp, out / "metadata.json")
    return paths


def _check(n_videos, frames, size, seed, quality, config: MovingDigitsConfig) -> int:
    """The sprite side; raises on arguments the recipe cannot use."""
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
    if n_videos < 1 or frames < 1 or seed < 0:
        raise ValueError(
            f"expected n_videos >= 1, frames >= 1, seed >= 0; got {n_videos}, {frames}, {seed}"
        )
    return config.validate(size)


def _video(i: int, frames: int, size: int, seed: int, quality: str, config) -> tuple:
    """Video ``i`` of a run: frames (T, size, size, 3) uint8 and its metadata."""
    digit_size = config.validate(size)
    video, meta = _render(np.random.default_rng([seed, i]), frames, size, digit_size, config)
    if quality == "low":
        video = _degrade(video, np.random.default_rng([seed, i, 1]), config)
    return video, {"seed": [seed, i], **meta}


# ---------------------------------------------------------------------------------------
# the recipe's steps


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as opacity (1797, 8, 8) float32 in [0, 1], and labels.

    Read straight from the ``digits.csv.gz`` that scikit-learn ships (the file its
    ``load_digits`` parses): importing sklearn.datasets costs seconds; this, milliseconds.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec else None
    csv = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if csv is not None and csv.is_file():
        data = np.loadtxt(csv, delimiter=",")
        images, labels = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:  # a scikit-learn that moved the file
        from sklearn.datasets import load_digits

        d = load_digits()
        images, labels = d.images, d.target
    return (images / 16.0).astype(np.float32), labels.astype(np.int64)


def bounce(start: np.ndarray, velocity: np.ndarray, steps: int, limit: float) -> np.ndarray:
    """Positions (steps, 2) of a point moving from ``start`` (2,) at ``velocity`` (2,) per
    step inside [0, limit], reflected at both ends: the unfolded path p0 + v t folded with
    a triangle wave of period 2 * limit."""
    t = np.arange(steps, dtype=np.float64)[:, None]
    m = np.mod(start[None] + velocity[None] * t, 2.0 * limit)
    return limit - np.abs(limit - m)


def upstream_start(u: np.ndarray, velocity: np.ndarray, steps: int, limit: float) -> np.ndarray:
    """Per axis, u (2,) in [0, 1) mapped uniformly into the starts p0 in [0, limit] whose
    path p0 + v t, t < ``steps``, stays in [0, limit]; where the travel |v| (steps - 1) is
    longer than ``limit``, the wall behind the motion (0 for v > 0, ``limit`` for v < 0)."""
    travel = velocity * (steps - 1)
    lo = np.clip(-travel, 0.0, limit)  # the path's lowest point must stay >= 0
    hi = np.clip(limit - travel, 0.0, limit)  # and its highest <= limit
    fits = np.abs(travel) <= limit
    return np.where(fits, lo + u * (hi - lo), np.where(velocity > 0, 0.0, limit))


def _render(rng, frames: int, size: int, d: int, cfg: MovingDigitsConfig):
    """One video (T, size, size, 3) uint8 and its metadata (background, digits)."""
    background, bg_meta = _background(rng, size, cfg.backgrounds)
    canvas = np.repeat(background[None], frames, axis=0)  # (T, H, W, 3) float in [0, 1]
    images, labels = _sklearn_digits()
    digits = []
    for _ in range(int(rng.integers(cfg.digits[0], cfg.digits[1] + 1))):
        k = int(rng.integers(len(images)))
        speed, direction = rng.uniform(*cfg.speed), rng.uniform(0.0, 2.0 * np.pi)
        velocity = speed * np.array([np.cos(direction), np.sin(direction)])
        start = rng.uniform(0, size - d, 2)
        if cfg.start == "upstream":
            start = upstream_start(start / (size - d), velocity, frames, size - d)
        positions = np.rint(bounce(start, velocity, frames, size - d))
        positions = positions.astype(int)  # (T, 2) top-left [x, y]
        angles = rng.uniform(-_START_ANGLE, _START_ANGLE) + rng.uniform(
            -cfg.max_spin, cfg.max_spin
        ) * np.arange(frames)
        colour = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.7), 1.0))
        sprites = _sprites(images[k], d, angles)  # (T, d, d) opacity
        for t, (x, y) in enumerate(positions):
            alpha = sprites[t][..., None]
            patch = canvas[t, y : y + d, x : x + d]
            canvas[t, y : y + d, x : x + d] = patch * (1.0 - alpha) + colour * alpha
        digits.append(
            {
                "label": int(labels[k]),
                "sklearn_index": k,
                "colour": np.round(colour, 4).tolist(),
                "velocity": np.round(velocity, 4).tolist(),
                "positions": positions.tolist(),
                "angles": np.round(angles, 3).tolist(),
            }
        )
    frames_u8 = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    return frames_u8, {"background": bg_meta, "digit_size": d, "digits": digits}


def _sprites(image: np.ndarray, d: int, angles: np.ndarray) -> np.ndarray:
    """An 8x8 opacity image upscaled to (d, d) and rotated by each angle: (T, d, d)."""
    from PIL import Image

    sprite = Image.fromarray(image).resize((d, d), Image.BILINEAR)
    out = [np.asarray(sprite.rotate(float(a), Image.BILINEAR)) for a in angles]
    return np.clip(np.stack(out), 0.0, 1.0)


def _background(rng, size: int, kinds: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """A static textured background (size, size, 3) float in [0, _BG_MAX], and its
    description."""
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "noise":
        grid = torch.from_numpy(rng.uniform(0.0, _BG_MAX, (1, 3, 4, 4)))
        bg = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)
        return bg[0].permute(1, 2, 0).clamp(0.0, _BG_MAX).numpy(), {"kind": kind}
    c0, c1 = rng.uniform(0.0, _BG_MAX, 3), rng.uniform(0.0, _BG_MAX, 3)
    theta = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    if kind == "stripes":
        period, phase = rng.uniform(5.0, 14.0), rng.uniform(0.0, 2.0 * np.pi)
        ramp = 0.5 + 0.5 * np.sin(2.0 * np.pi * along / period + phase)
        meta = {"kind": kind, "angle": round(float(theta), 4), "period": round(period, 3)}
    else:
        ramp = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        meta = {"kind": kind, "angle": round(float(theta), 4)}
    return c0 * (1.0 - ramp[..., None]) + c1 * ramp[..., None], meta


def _degrade(frames: np.ndarray, rng, cfg: MovingDigitsConfig) -> np.ndarray:
    """The low-quality variant of uint8 frames (T, H, W, 3): blur, noise, JPEG."""
    from PIL import Image

    x = gaussian_blur(frames.astype(np.float64), cfg.blur_sigma, axes=(1, 2))
    x = x + rng.normal(0.0, cfg.noise_std, x.shape)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    out = np.empty_like(frames)
    for t, frame in enumerate(x):
        buffer = BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=cfg.jpeg_quality)
        out[t] = np.asarray(Image.open(BytesIO(buffer.getvalue())).convert("RGB"))
    return out


def gaussian_blur(x: np.ndarray, sigma: float, axes: tuple[int, ...]) -> np.ndarray:
    """Separable Gaussian blur of ``x`` along ``axes`` (e.g. (1, 2), the H and W of
    (T, H, W, 3) frames), kernel radius ceil(3 sigma), edges replicated. sigma 0: x."""
    if sigma <= 0:
        return x
    radius = max(1, int(np.ceil(3.0 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in axes:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * padded.take(range(k, k + n), axis=axis) for k, w in enumerate(kernel))
    return x
