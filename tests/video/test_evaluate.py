"""Video evaluation: direction labels from the generator's metadata, Fréchet-distance wiring
(core's tested ``frechet_distance`` on the classifier's features), warp error, a tiny
classifier that learns above chance, and ``evaluate_videos``."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.metrics import frechet_from_stats, gaussian_stats
from fewstep.video.evaluate import (
    ClassifierConfig,
    VideoClassifier,
    class_accuracy,
    direction_bin,
    evaluate_videos,
    frame_fd,
    labelled_clips,
    load_classifier,
    train_classifier,
    video_fd,
    video_features,
    warp_error,
)

TINY = ClassifierConfig(videos=400, frames=3, size=16, width=8, features=16, steps=200,
                        batch_size=32, lr=5e-3, max_digits=1, max_spin=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two test workers share two cores
    try:
        return train_classifier(TINY)
    finally:
        torch.set_num_threads(before)


def test_direction_bins():
    assert [direction_bin(v) for v in ([1, 0], [0, 1], [-1, 0], [0, -1])] == [0, 1, 2, 3]
    assert direction_bin([1.0, 0.9]) == 0 and direction_bin([1.0, 1.1]) == 1  # 45° boundary


def test_labelled_clips_follow_the_metadata():
    clips, digits, dirs = labelled_clips(6, 3, 16, 0, max_digits=2)
    assert clips.shape == (6, 3, 3, 16, 16) and clips.min() >= -1 and clips.max() <= 1
    assert ((digits.sum(1) >= 1) & (digits.sum(1) <= 2)).all()  # 1-2 digits per clip
    assert ((dirs.sum(1) >= 1) & (dirs.sum(1) <= 2)).all()


def test_fd_is_core_frechet_on_the_features():
    torch.manual_seed(0)
    clf = VideoClassifier(8, 16).eval()
    a, b = torch.rand(12, 4, 3, 16, 16) * 2 - 1, torch.rand(10, 4, 3, 16, 16) * 2 - 1
    assert video_fd(clf, a, a) < 1e-8 and frame_fd(clf, a, a) < 1e-8
    with torch.no_grad():
        fa, fb = clf.features(a), clf.features(b)
    want = frechet_from_stats(*gaussian_stats(fa), *gaussian_stats(fb))
    assert video_fd(clf, a, b) == pytest.approx(want, rel=1e-6) and want > 0
    assert video_features(clf, a).shape == (12, 16)
    assert frame_fd(clf, a, b) > 0


def test_warp_error():
    torch.manual_seed(0)
    frame = torch.rand(2, 1, 3, 16, 16) * 2 - 1
    static = frame.expand(2, 5, 3, 16, 16)
    assert warp_error(static) == 0.0
    moving = torch.cat([torch.roll(frame, (s, -2 * s), (-2, -1)) for s in range(5)], 1)
    assert warp_error(moving, radius=2) < 1e-12  # (1, -2) px per frame, within r = 2
    assert warp_error(moving, radius=1) > 1e-3  # outside r = 1
    noise = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    assert warp_error(noise) > 0.05
    with pytest.raises(ValueError, match="T >= 2"):
        warp_error(frame)
    with pytest.raises(ValueError, match="block"):
        warp_error(static, block=5)


def test_tiny_classifier_learns_above_chance(tiny):
    model, info = tiny
    # held-out clips; chance is 1 / 4 for the direction of a single digit (the digit head
    # needs the full-size training of ``load_classifier``)
    assert info["val_direction_hit"] > 0.4, info
    assert info["final_loss"] < 3.0  # chance level: ln 10 + ln 4 = 3.69
    clips, digits, _ = labelled_clips(60, 3, 16, 77, max_digits=1, max_spin=0.0)
    acc = class_accuracy(model, clips, digits.argmax(1))
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(model, clips, digits)


def test_evaluate_videos_and_cache(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    clips, digits, _ = labelled_clips(24, 3, 16, 5, max_digits=1, max_spin=0.0)
    labels = digits.argmax(1)
    noise = torch.rand_like(clips) * 2 - 1
    real = evaluate_videos(clips[:12], labels[:12], clips[12:], model, labels[12:])
    fake = evaluate_videos(noise[:12], labels[:12], clips[12:], model)
    assert set(real) >= {"video_fd", "frame_fd", "digit_accuracy", "warp_error"}
    assert fake["video_fd"] > real["video_fd"] and fake["frame_fd"] > real["frame_fd"]
    assert fake["warp_error"] > real["warp_error"]
    assert real["reference_digit_accuracy"] >= 0.0
    with pytest.raises(ValueError, match="share"):
        evaluate_videos(clips[:, :2], labels, clips, model)
    # the cache: a second load returns the stored weights, not a fresh training
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    cfg = ClassifierConfig(videos=8, frames=2, size=16, width=4, features=8, steps=2,
                           batch_size=4)  # fmt: skip
    a, _ = load_classifier(cfg)
    b, _ = load_classifier(cfg)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert (tmp_path / "video-classifier").is_dir()
