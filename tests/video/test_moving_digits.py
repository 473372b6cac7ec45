"""The moving-digits recipe: determinism, bouncing inside the frame, metadata that matches
the pixels, real MP4 files the clip reader accepts, and a measurably worse low quality."""

import dataclasses
import json

import numpy as np
import pytest

from fewstep.video.io import VideoClipDataset, read_video
from fewstep.video.moving_digits import (
    MovingDigitsConfig,
    _sklearn_digits,
    bounce,
    generate_moving_digits,
    moving_digits_array,
    upstream_start,
)


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def test_deterministic_by_seed_and_independent_of_count():
    a = moving_digits_array(3, frames=8, size=32, seed=5)
    b = moving_digits_array(3, frames=8, size=32, seed=5)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.videos == b.videos
    np.testing.assert_array_equal(moving_digits_array(2, 8, 32, seed=5).frames, a.frames[:2])
    assert not np.array_equal(moving_digits_array(3, 8, 32, seed=6).frames, a.frames)


def test_shapes_labels_and_tensor_view():
    from sklearn.datasets import load_digits

    data = moving_digits_array(6, frames=5, size=48, seed=0)
    assert data.frames.shape == (6, 5, 48, 48, 3) and data.frames.dtype == np.uint8
    reference = load_digits()
    images, labels = _sklearn_digits()
    np.testing.assert_array_equal(images * 16, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
    target = reference.target
    for video in data.videos:
        assert 1 <= len(video["digits"]) <= 2 and video["digit_size"] == 24
        for digit in video["digits"]:
            assert digit["label"] == target[digit["sklearn_index"]]
    x = data.as_tensor()
    assert x.shape == (6, 5, 3, 48, 48) and x.min() >= -1.0 and x.max() <= 1.0


def test_bounce_reflects_at_both_walls():
    path = bounce(np.array([1.0, 9.0]), np.array([-2.0, 3.0]), steps=4, limit=10.0)
    np.testing.assert_allclose(path[:, 0], [1.0, 1.0, 3.0, 5.0])  # 1 -> -1 reflects to 1
    np.testing.assert_allclose(path[:, 1], [9.0, 8.0, 5.0, 2.0])  # 9 -> 12 reflects to 8


def test_digits_stay_inside_the_frame_and_bounce():
    size, frames = 32, 24
    data = moving_digits_array(20, frames=frames, size=size, seed=1)
    limit = size - data.videos[0]["digit_size"]
    bounced = 0
    for video in data.videos:
        for digit in video["digits"]:
            pos = np.array(digit["positions"])  # (T, 2) top-left x, y
            assert pos.shape == (frames, 2)
            assert pos.min() >= 0 and pos.max() <= limit
            steps = np.diff(pos, axis=0)
            assert np.abs(steps).max() <= MovingDigitsConfig().speed[1] + 1  # +1: rounding
            bounced += bool(np.any(np.diff(np.sign(steps[np.abs(steps).sum(1) > 0]), axis=0)))
    assert bounced > 0  # 24 frames at >= 1 px/frame in a 16 px range must hit a wall


def test_pixels_change_only_where_the_metadata_puts_digits():
    """The background is static, so frame t differs from frame 0 only inside the sprite
    boxes at frame t and at frame 0."""
    data = moving_digits_array(5, frames=6, size=32, seed=2)
    for frames, video in zip(data.frames, data.videos):
        d = video["digit_size"]
        for t in range(1, len(frames)):
            inside = np.zeros(frames.shape[1:3], bool)
            for digit in video["digits"]:
                for x, y in (digit["positions"][0], digit["positions"][t]):
                    inside[y : y + d, x : x + d] = True
            changed = np.any(frames[t] != frames[0], axis=-1)
            assert not np.any(changed & ~inside)
            assert np.any(changed)  # something moved


def test_no_spin_keeps_angles_fixed():
    data = moving_digits_array(4, frames=6, seed=0, config=MovingDigitsConfig(max_spin=0.0))
    for video in data.videos:
        for digit in video["digits"]:
            assert len(set(digit["angles"])) == 1


def test_files_metadata_and_the_clip_reader(tmp_path):
    paths = generate_moving_digits(tmp_path, n_videos=4, frames=10, size=32, seed=7)
    assert [p.name for p in paths] == [f"{i:05d}.mp4" for i in range(4)]
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["recipe"]["seed"] == 7 and meta["recipe"]["digit_size"] == 16
    assert [v["file"] for v in meta["videos"]] == [p.name for p in paths]
    in_memory = moving_digits_array(4, 10, 32, seed=7).videos
    assert [{k: v for k, v in m.items() if k != "file"} for m in meta["videos"]] == in_memory
    assert read_video(paths[0]).shape == (10, 32, 32, 3)
    ds = VideoClipDataset(tmp_path, clip_len=5, stride=2, random_clip=False)
    assert len(ds) == 4 and ds[3].shape == (5, 3, 32, 32)
    assert ds.videos[0].fps == pytest.approx(MovingDigitsConfig().fps)


def test_low_quality_is_measurably_worse(tmp_path):
    high = moving_digits_array(4, frames=8, size=32, seed=3)
    low = moving_digits_array(4, frames=8, size=32, seed=3, quality="low")
    assert low.videos == high.videos  # same content, degraded
    assert psnr(low.frames, high.frames) < 30.0  # noise of std 8 alone caps PSNR at 30 dB

    files_high = generate_moving_digits(tmp_path / "high", 4, frames=8, size=32, seed=3)
    files_low = generate_moving_digits(tmp_path / "low", 4, 8, 32, seed=3, quality="low")
    read_high = np.stack([read_video(p) for p in files_high])
    read_low = np.stack([read_video(p) for p in files_low])
    assert psnr(read_high, high.frames) > 28.0  # CRF 18; yuv420p colour alone costs ~33 dB
    assert psnr(read_low, high.frames) < psnr(read_high, high.frames) - 5.0


def test_upstream_start_never_bounces_where_the_path_fits():
    """Slow digits started upstream move one way through the whole clip (the direction shows
    in every frame), uniform starts bounce; the rest of each video's content is the same."""
    kw = dict(n_videos=30, frames=8, size=16, seed=3)
    slow = MovingDigitsConfig(digit_size=12, digits=(1, 1), max_spin=0, speed=(0.5, 0.57))
    up = moving_digits_array(**kw, config=dataclasses.replace(slow, start="upstream"))
    uniform = moving_digits_array(**kw, config=slow)
    reversals = []
    for video_up, video_uniform in zip(up.videos, uniform.videos, strict=True):
        (a,), (b,) = video_up["digits"], video_uniform["digits"]
        assert (a["label"], a["velocity"]) == (b["label"], b["velocity"])
        assert video_up["background"] == video_uniform["background"]
        for digit in (a, b):
            steps = np.diff(np.array(digit["positions"]), axis=0)  # (T-1, 2)
            signs = [set(np.sign(steps[:, k])) - {0} for k in range(2)]
            reversals.append(any(len(s) > 1 for s in signs))
    assert not any(reversals[0::2])  # upstream: no axis ever reverses
    assert any(reversals[1::2])  # uniform starts in a 4-pixel room do bounce
    # where the travel is longer than the room, the start is the wall behind the motion
    np.testing.assert_allclose(upstream_start(np.array([0.3, 0.9]), np.array([2.0, -2.0]), 8, 4.0),
                               [0.0, 4.0])  # fmt: skip


def test_bad_recipe_is_rejected_clearly():
    with pytest.raises(ValueError, match="quality must be one of"):
        moving_digits_array(1, quality="medium")
    with pytest.raises(ValueError, match="digit_size"):
        moving_digits_array(1, size=16, config=MovingDigitsConfig(digit_size=16))
    with pytest.raises(ValueError, match="backgrounds"):
        moving_digits_array(1, config=MovingDigitsConfig(backgrounds=("plaid",)))
    with pytest.raises(ValueError, match="start must be one of"):
        moving_digits_array(1, config=MovingDigitsConfig(start="random"))
