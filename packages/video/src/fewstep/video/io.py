"""Video and image files: writing MP4 / GIF, reading whole videos, and two datasets that
survive bad files (a clip dataset over a folder of videos read with decord, and an image
folder for appearance data).

Value conventions: files and :func:`read_video` hold uint8 frames (T, H, W, 3), RGB;
datasets return float tensors in [-1, 1], channels first, as the rest of fewstep expects.
decord and av are imported inside the functions that use them, so ``import fewstep.video``
stays light.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WRITE_SUFFIXES = (".mp4", ".gif")
_NAMES_IN_WARNING = 5  # how many skipped files a warning names before "and N more"


# ---------------------------------------------------------------------------------------
# writing and reading whole videos


def to_uint8_frames(frames, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Frames as a contiguous uint8 array (T, H, W, 3).

    ``frames``: numpy array or torch tensor, (T, H, W, 3) or channels-first (T, 3, H, W).
    uint8 is taken as is; floats are mapped from ``value_range`` (default [-1, 1], the
    fewstep convention; pass (0, 1) for [0, 1] frames) and clipped. Floats far outside the
    range (e.g. 0-255 floats) are an error rather than a silently white video.
    """
    if isinstance(frames, Tensor):
        frames = frames.detach().cpu().numpy()
    x = np.asarray(frames)
    if x.ndim != 4 or 3 not in (x.shape[-1], x.shape[1]):
        raise ValueError(f"expected frames (T, H, W, 3) or (T, 3, H, W), got shape {x.shape}")
    if x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected uint8 or float frames, got dtype {x.dtype}")
    lo, hi = value_range
    if not np.isfinite(x).all():
        raise ValueError("frames contain NaN or inf")
    margin = 0.5 * (hi - lo)
    if x.size and (x.min() < lo - margin or x.max() > hi + margin):
        raise ValueError(
            f"float frames span [{x.min():.3g}, {x.max():.3g}], far outside value_range "
            f"{value_range}; pass value_range=(0, 1) or (0, 255), or uint8 frames"
        )
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return np.ascontiguousarray(np.round(x * 255.0).astype(np.uint8))


def write_video(
    path: str | Path,
    frames,
    fps: float,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    crf: int = 18,
) -> Path:
    """Write frames to ``path``: H.264 / yuv420p MP4 (via av) or GIF (via PIL), by suffix.

    ``frames``: (T, H, W, 3) or (T, 3, H, W); uint8, or floats in ``value_range`` (default
    [-1, 1]; see :func:`to_uint8_frames`). ``crf``: x264 constant rate factor for MP4, 0
    (lossless luma) to 51 (worst); 18 is visually near-lossless. yuv420p needs even sizes,
    so an MP4 of odd height or width is padded by repeating the last row / column (read
    back one pixel larger). GIF frames are quantized to 256 colours each. The file is
    written beside ``path`` and renamed into place, so a killed write leaves no half file.
    Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write {path.name}: expected one of {WRITE_SUFFIXES}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    x = to_uint8_frames(frames, value_range)
    if len(x) == 0:
        raise ValueError(f"no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # per process: two runs filling the same cache folder must not share a temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if suffix == ".mp4":
            _write_mp4(tmp, x, fps, crf)
        else:
            _write_gif(tmp, x, fps)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_mp4(path: Path, x: np.ndarray, fps: float, crf: int) -> None:
    import av

    pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
    if pad_h or pad_w:
        log.info("padding %dx%d frames to even size for yuv420p", x.shape[1], x.shape[2])
        x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = x.shape[2], x.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        stream.codec_context.thread_count = 1  # tiny frames; threads only add overhead
        for frame in x:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def _write_gif(path: Path, x: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in x]
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], loop=0,
        duration=max(1, round(1000 / fps)),
    )  # fmt: skip


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video as uint8 (T, H, W, 3), RGB.

    Read with decord. Only when decord cannot *open* the file is it decoded with av instead:
    decord refuses some formats ffmpeg itself reads, such as GIF ("Failed to measure
    duration/frame"). A file neither can read raises ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    try:
        reader = _open_decord(path)
    except Exception as decord_err:  # decord raises RuntimeError or DECORDError
        try:
            return _read_av(path)
        except Exception as av_err:
            raise ValueError(
                f"cannot read video {path}: decord: {_short(decord_err)}; av: {_short(av_err)}"
            ) from av_err
    if len(reader) == 0:
        raise ValueError(f"video {path} has no frames")
    try:
        return _decord_frames(reader, list(range(len(reader))))
    except Exception as e:
        raise ValueError(f"cannot decode video {path}: {_short(e)}") from e


def _open_decord(path: Path, num_threads: int = 1):
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)


def _decord_frames(reader, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` of a decord ``VideoReader`` as uint8 (N, H, W, 3).

    decord 0.6.0 takes a frame's channel count to be ffmpeg's row stride divided by the
    width. For widths whose RGB rows ffmpeg pads (8, 12, 16, 24, 48, 72 px, ...) that is
    not 3: ``get_batch`` fails ("The size must exactly match") and a single frame comes
    back as (H, W, stride / W) bytes. Those frames are read one by one and the row padding
    is cut off, which gives exactly the frames av decodes.
    """
    try:
        frames = reader.get_batch(indices).asnumpy()
        if frames.shape[-1] == 3:
            return frames
    except Exception as e:  # DECORDError
        if "must exactly match" not in str(e):
            raise
    out = []
    for i in indices:
        x = reader[i].asnumpy()
        h, w, c = x.shape
        if c < 3:
            raise ValueError(f"decord returned a frame of shape {x.shape}, expected (H, W, 3)")
        out.append(x.reshape(h, w * c)[:, : w * 3].reshape(h, w, 3))
    return np.stack(out)


def _read_av(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no video frames")
    return np.stack(frames)


def _short(err: Exception, limit: int = 160) -> str:
    """First line of an exception message, shortened (decord's carry C++ file names)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit] if text else ''}"


# ---------------------------------------------------------------------------------------
# datasets that skip bad files


def _scan(folder: str | Path, extensions: Sequence[str], kind: str) -> tuple[Path, list[Path]]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{kind} folder {root} not found")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    return root, files


def _describe(skipped: Sequence[tuple[Path, str]]) -> str:
    names = [f"{p.name} ({why})" for p, why in skipped[:_NAMES_IN_WARNING]]
    more = len(skipped) - len(names)
    return "; ".join(names) + (f"; and {more} more" if more > 0 else "")


def _size_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive (h, w), got {size}")
    return int(h), int(w)


class _SkippingDataset(Dataset):
    """Shared behaviour: items that fail to load at run time are recorded in ``skipped``,
    warned about once, and replaced by the next item that loads."""

    root: Path
    skipped: list[tuple[Path, str]]
    _failed: set[int]

    def _path(self, index: int) -> Path:
        raise NotImplementedError

    def _load_with_fallback(self, index: int, load: Callable[[int], Tensor]) -> Tensor:
        """``load(position)`` for the first position from ``index`` on that loads."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for offset in range(n):
            position = (index + offset) % n
            if position in self._failed:
                continue
            try:
                return load(position)
            except Exception as e:
                path = self._path(position)
                reason = f"failed during the run: {_short(e)}"
                self._failed.add(position)
                self.skipped.append((path, reason))
                warnings.warn(f"skipping {path} ({reason}); using another item", stacklevel=3)
        raise RuntimeError(f"every file in {self.root} failed to load: {_describe(self.skipped)}")


@dataclass(frozen=True)
class VideoInfo:
    """What validating a video file found."""

    path: Path  # the file
    num_frames: int  # frames decord reports
    fps: float  # decord's average frame rate
    height: int  # frame height in pixels, as stored
    width: int  # frame width in pixels, as stored


class VideoClipDataset(_SkippingDataset):
    """Clips of ``clip_len`` frames, every ``stride``-th frame, from the videos of a folder.

    The folder is scanned recursively for ``extensions``; every file is opened once with
    decord's ``VideoReader`` (and its first frame decoded) to validate it and record its
    length and fps (``.videos``). Unreadable files and files shorter than a clip
    (``(clip_len - 1) * stride + 1`` frames) are listed in ``.skipped`` as (path, reason),
    with one warning giving their count and first names; no usable video is a ValueError
    naming the folder. A file that becomes unreadable later is recorded there too and the
    next video's clip returned instead.

    ``dataset[i]`` is a float tensor (clip_len, 3, H, W) in [-1, 1]; ``size=(h, w)`` resizes
    (stretching, bilinear with antialiasing, via torch: decord's own resize returns
    misshaped arrays for some small widths). With ``random_clip`` the start frame is drawn
    uniformly from a generator seeded by (seed, i, epoch, n-th draw of i in this process):
    reproducible for a seed, different on each call; call :meth:`set_epoch` each epoch when
    DataLoader workers are re-created, or every epoch repeats the first one's clips. Without
    ``random_clip`` the clip starts at frame 0.
    """

    def __init__(
        self,
        folder: str | Path,
        clip_len: int,
        stride: int = 1,
        size: int | tuple[int, int] | None = None,
        random_clip: bool = True,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        seed: int = 0,
    ) -> None:
        if clip_len < 1 or stride < 1 or seed < 0:
            raise ValueError(
                f"expected clip_len >= 1, stride >= 1, seed >= 0; got {clip_len}, {stride}, {seed}"
            )
        self.clip_len, self.stride, self.size = clip_len, stride, _size_hw(size)
        self.random_clip, self.seed, self.epoch = random_clip, seed, 0
        self.span = (clip_len - 1) * stride + 1  # frames one clip covers
        self.root, files = _scan(folder, extensions, "video")
        self.videos: list[VideoInfo] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in files:
            try:
                info = _probe_video(path)
            except Exception as e:
                self.skipped.append((path, f"unreadable: {_short(e)}"))
                continue
            if info.num_frames < self.span:
                why = f"too short: {info.num_frames} frames, a clip needs {self.span}"
                self.skipped.append((path, why))
            else:
                self.videos.append(info)
        if not self.videos:
            raise ValueError(
                f"no usable video in {self.root}: {len(files)} files with extensions "
                f"{tuple(extensions)}, clip_len={clip_len} stride={stride}; skipped: "
                f"{_describe(self.skipped) or 'none'}"
            )
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} of {len(files)} videos in {self.root}: "
                f"{_describe(self.skipped)}",
                stacklevel=2,
            )
        self._failed: set[int] = set()
        self._draws = [0] * len(self.videos)

    def __len__(self) -> int:
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        """Make the random clip starts depend on ``epoch`` (as DistributedSampler does)."""
        self.epoch = epoch

    def clip_start(self, index: int) -> int:
        """The start frame for the next clip of video ``index`` (advances its draw count)."""
        if not self.random_clip:
            return 0
        room = self.videos[index].num_frames - self.span + 1
        draw = self._draws[index]
        self._draws[index] += 1
        rng = np.random.default_rng([self.seed, index, self.epoch, draw])
        return int(rng.integers(room))

    def frame_indices(self, start: int) -> list[int]:
        """The clip_len frame indices of a clip starting at ``start``."""
        return list(range(start, start + self.span, self.stride))

    def __getitem__(self, index: int) -> Tensor:
        return self._load_with_fallback(index, self._load_clip)

    def _path(self, index: int) -> Path:
        return self.videos[index].path

    def _load_clip(self, position: int) -> Tensor:
        reader = _open_decord(self.videos[position].path)
        frames = _decord_frames(reader, self.frame_indices(self.clip_start(position)))
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True)
            x = x.clamp(-1.0, 1.0)
        return x


def _probe_video(path: Path) -> VideoInfo:
    reader = _open_decord(path)
    if len(reader) == 0:
        raise ValueError("no frames")
    h, w = reader[0].shape[:2]  # decoding one frame catches files that open but cannot decode
    return VideoInfo(path, len(reader), float(reader.get_avg_fps()), int(h), int(w))


class ImageFolderDataset(_SkippingDataset):
    """Images of a folder (recursive), for appearance data: ``dataset[i]`` is a float tensor
    (3, h, w) in [-1, 1], RGB, resized so it covers ``size`` (bicubic) and centre-cropped.

    Every file is checked with PIL's ``verify`` when the dataset is built; unreadable ones go
    to ``.skipped`` as (path, reason) with one warning, as for :class:`VideoClipDataset`,
    and no usable image is a ValueError naming the folder.
    """

    def __init__(
        self,
        folder: str | Path,
        size: int | tuple[int, int],
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        from PIL import Image

        self.size = _size_hw(size)
        self.root, files = _scan(folder, extensions, "image")
        self.paths: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in files:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for a broken file
                self.skipped.append((path, f"unreadable: {_short(e)}"))
                continue
            self.paths.append(path)
        if not self.paths:
            raise ValueError(
                f"no usable image in {self.root}: {len(files)} files with extensions "
                f"{tuple(extensions)}; skipped: {_describe(self.skipped) or 'none'}"
            )
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} of {len(files)} images in {self.root}: "
                f"{_describe(self.skipped)}",
                stacklevel=2,
            )
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self._load_with_fallback(index, self._load)

    def _path(self, index: int) -> Path:
        return self.paths[index]

    def _load(self, position: int) -> Tensor:
        from PIL import Image

        with Image.open(self.paths[position]) as im:
            img = im.convert("RGB")
        h, w = self.size
        scale = max(h / img.height, w / img.width)
        new_w, new_h = max(w, round(img.width * scale)), max(h, round(img.height * scale))
        img = img.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - w) // 2, (new_h - h) // 2
        img = img.crop((left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return x.permute(2, 0, 1).float() / 127.5 - 1.0
