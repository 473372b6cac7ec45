"""Video and image I/O: MP4/GIF round trips through the reader a user's files take, clip
sampling (length, stride, start, resize, seeds), and bad files that are skipped by name."""

import os
import warnings

import numpy as np
import pytest
import torch

from fewstep.video.io import (
    ImageFolderDataset,
    VideoClipDataset,
    _read_av,
    read_video,
    to_uint8_frames,
    write_video,
)

BASE, STEP = 20, 8  # flat test videos: frame t of video k has grey level BASE + STEP * t + k


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def flat_video(n_frames: int, offset: int = 0, h: int = 16, w: int = 32) -> np.ndarray:
    """Frames whose uniform grey level encodes their index: (T, h, w, 3) uint8."""
    levels = BASE + STEP * np.arange(n_frames) + offset
    return np.broadcast_to(levels[:, None, None, None], (n_frames, h, w, 3)).astype(np.uint8)


def frame_ids(clip: torch.Tensor, offset: int = 0) -> list[int]:
    """Frame indices of a dataset clip (T, 3, H, W) in [-1, 1] made from flat_video."""
    grey = (clip.mean(dim=(1, 2, 3)) + 1.0) * 127.5
    return [round(v) for v in ((grey - BASE - offset) / STEP).tolist()]


def smooth_grey(t: int = 12, h: int = 32, w: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.stack([0.5 + 0.4 * np.sin((xx + 2 * i) / 6.0) * np.cos(yy / 9.0) for i in range(t)])
    return (np.repeat(g[..., None], 3, -1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------
# writing and reading


def test_mp4_round_trip_is_near_lossless_and_accepts_float_and_channels_first(tmp_path):
    u = smooth_grey()
    write_video(tmp_path / "u.mp4", u, fps=8)
    back = read_video(tmp_path / "u.mp4")
    assert back.shape == u.shape and back.dtype == np.uint8
    assert psnr(back, u) > 40.0  # CRF 18 on grey content: visually lossless

    as_float = torch.from_numpy(u).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    write_video(tmp_path / "f.mp4", as_float, fps=8)
    np.testing.assert_array_equal(read_video(tmp_path / "f.mp4"), back)
    write_video(tmp_path / "z.mp4", u / 255.0, fps=8, value_range=(0.0, 1.0))
    np.testing.assert_array_equal(read_video(tmp_path / "z.mp4"), back)


def test_higher_crf_loses_more(tmp_path):
    u = smooth_grey()
    errors = []
    for crf in (10, 45):
        write_video(tmp_path / f"{crf}.mp4", u, fps=8, crf=crf)
        errors.append(psnr(read_video(tmp_path / f"{crf}.mp4"), u))
    assert errors[0] > errors[1]


@pytest.mark.parametrize("w", [16, 24, 48])
def test_widths_decord_pads_read_exactly(tmp_path, w):
    """decord 0.6.0 mis-shapes frames of these widths; the reader must still return what
    ffmpeg decodes (av as the reference)."""
    frames = np.random.default_rng(w).integers(0, 256, (5, 12, w, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mp4", frames, fps=8)
    got = read_video(tmp_path / "v.mp4")
    np.testing.assert_array_equal(got, _read_av(tmp_path / "v.mp4"))
    clip = VideoClipDataset(tmp_path, clip_len=3, random_clip=False)[0]
    assert clip.shape == (3, 3, 12, w)
    np.testing.assert_allclose(clip.permute(0, 2, 3, 1).numpy(), got[:3] / 127.5 - 1, atol=1e-6)


def test_odd_sizes_are_padded_to_even(tmp_path):
    u = smooth_grey(4, 31, 45)
    write_video(tmp_path / "odd.mp4", u, fps=8)
    back = read_video(tmp_path / "odd.mp4")
    assert back.shape == (4, 32, 46, 3)
    assert psnr(back[:, :31, :45], u) > 40.0


def test_gif_round_trip_through_the_av_fallback(tmp_path):
    u = smooth_grey(6)
    write_video(tmp_path / "u.gif", u, fps=10)
    back = read_video(tmp_path / "u.gif")  # decord cannot open GIF; av reads it
    assert back.shape == u.shape
    assert psnr(back, u) > 40.0  # 256 palette colours hold every grey level


def test_write_rejects_bad_input_clearly(tmp_path):
    u = smooth_grey(2)
    with pytest.raises(ValueError, match=r"\.mp4"):
        write_video(tmp_path / "u.mov", u, fps=8)
    with pytest.raises(ValueError, match="value_range"):
        write_video(tmp_path / "u.mp4", u.astype(np.float32), fps=8)  # 0-255 floats
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "u.mp4", u[..., :2], fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "u.mp4", u, fps=0)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_to_uint8_maps_the_stated_range():
    x = np.array([-1.0, 0.0, 1.0, 1.02]).reshape(1, 1, 4, 1).repeat(3, -1)
    assert to_uint8_frames(x)[0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_read_video_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(3000))
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(bad)


# ---------------------------------------------------------------------------------------
# clip dataset


@pytest.fixture
def video_folder(tmp_path):
    """Two 24-frame flat videos (offsets 0 and 2), one in a subfolder."""
    write_video(tmp_path / "a.mp4", flat_video(24, 0), fps=8)
    write_video(tmp_path / "sub" / "b.mp4", flat_video(24, 2), fps=8)
    return tmp_path


def test_clip_length_stride_and_range(video_folder):
    ds = VideoClipDataset(video_folder, clip_len=4, stride=3, random_clip=False)
    assert len(ds) == 2 and not ds.skipped
    assert [v.num_frames for v in ds.videos] == [24, 24]
    clip = ds[0]
    assert clip.shape == (4, 3, 16, 32) and clip.dtype == torch.float32
    assert clip.min() >= -1.0 and clip.max() <= 1.0
    assert frame_ids(clip) == [0, 3, 6, 9]
    assert frame_ids(ds[1], offset=2) == [0, 3, 6, 9]


def test_random_clips_are_valid_varied_and_seeded(video_folder):
    ds = VideoClipDataset(video_folder, clip_len=5, stride=2, seed=3)
    starts = []
    for _ in range(12):
        ids = frame_ids(ds[0])
        assert np.all(np.diff(ids) == 2) and ids[0] >= 0 and ids[-1] <= 23
        starts.append(ids[0])
    assert len(set(starts)) > 1  # 15 possible starts: 12 equal draws would be a bug

    same = VideoClipDataset(video_folder, clip_len=5, stride=2, seed=3)
    assert [frame_ids(same[0])[0] for _ in range(12)] == starts
    other = VideoClipDataset(video_folder, clip_len=5, stride=2, seed=4)
    assert [frame_ids(other[0])[0] for _ in range(12)] != starts
    epoch1 = VideoClipDataset(video_folder, clip_len=5, stride=2, seed=3)
    epoch1.set_epoch(1)
    assert [frame_ids(epoch1[0])[0] for _ in range(12)] != starts


def test_resize(video_folder):
    ds = VideoClipDataset(video_folder, clip_len=2, size=(8, 12), random_clip=False)
    clip = ds[0]
    assert clip.shape == (2, 3, 8, 12)
    assert frame_ids(clip) == [0, 1]  # a flat frame stays flat at its grey level


def test_bad_files_are_skipped_by_name_with_one_warning(video_folder):
    (video_folder / "random.mp4").write_bytes(os.urandom(4000))
    (video_folder / "empty.mp4").write_bytes(b"")
    good = (video_folder / "a.mp4").read_bytes()
    (video_folder / "truncated.mp4").write_bytes(good[: len(good) // 2])
    write_video(video_folder / "short.mp4", flat_video(3), fps=8)
    (video_folder / "notes.txt").write_text("not a video")
    with pytest.warns(UserWarning, match="skipped 4 of 6 videos") as record:
        ds = VideoClipDataset(video_folder, clip_len=4, stride=2)
    assert len(record) == 1
    assert len(ds) == 2
    reasons = {p.name: why for p, why in ds.skipped}
    assert set(reasons) == {"random.mp4", "empty.mp4", "truncated.mp4", "short.mp4"}
    assert reasons["short.mp4"].startswith("too short")
    assert all(reasons[n].startswith("unreadable") for n in ("random.mp4", "empty.mp4"))
    assert ds[0].shape == (4, 3, 16, 32)


def test_a_folder_of_bad_files_raises_naming_it(tmp_path):
    folder = tmp_path / "all_bad"
    folder.mkdir()
    (folder / "x.mp4").write_bytes(os.urandom(2000))
    (folder / "y.webm").write_bytes(b"")
    with pytest.raises(ValueError, match="all_bad") as err:
        VideoClipDataset(folder, clip_len=2)
    assert "x.mp4" in str(err.value) and "y.webm" in str(err.value)
    with pytest.raises(ValueError, match="no usable video"):
        VideoClipDataset(tmp_path / "all_bad", clip_len=2, extensions=(".avi",))


def test_a_file_broken_after_the_scan_is_replaced_by_another(video_folder):
    ds = VideoClipDataset(video_folder, clip_len=3, random_clip=False)
    path = video_folder / "a.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="a.mp4"):
        clip = ds[0]
    assert frame_ids(clip, offset=2) == [0, 1, 2]  # the clip of b.mp4
    assert [p.name for p, _ in ds.skipped] == ["a.mp4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; now silently skipped
        assert frame_ids(ds[0], offset=2) == [0, 1, 2]

    (video_folder / "sub" / "b.mp4").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="every file"):
        ds[1]


# ---------------------------------------------------------------------------------------
# image folder


def test_image_folder_resizes_crops_and_skips_bad_images(tmp_path):
    from PIL import Image

    half = np.zeros((30, 60, 3), np.uint8)
    half[:, 30:] = 255  # left half black, right half white
    Image.fromarray(half).save(tmp_path / "wide.png")
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(tmp_path / "white.jpg")
    (tmp_path / "broken.png").write_bytes(os.urandom(500))
    with pytest.warns(UserWarning, match="broken.png"):
        ds = ImageFolderDataset(tmp_path, size=16)
    assert len(ds) == 2 and [p.name for p, _ in ds.skipped] == ["broken.png"]
    wide = ds[0] if ds.paths[0].name == "wide.png" else ds[1]
    assert wide.shape == (3, 16, 16)
    assert wide[:, :, :6].max() < -0.9 and wide[:, :, -6:].min() > 0.9  # centre crop

    ds.paths[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=ds.paths[0].name):
        assert ds[0].shape == (3, 16, 16)


def test_an_image_folder_without_images_raises_naming_it(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not png")
    with pytest.raises(ValueError, match=str(tmp_path.name)):
        ImageFolderDataset(tmp_path, size=(8, 8))
