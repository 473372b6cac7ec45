"""The video teacher's data path (MP4 files written, read back through decord) and a short
training run that is cached by its config."""

from __future__ import annotations

import torch

from fewstep.core.samplers import EulerSampler
from fewstep.video.moving_digits import moving_digits_array
from fewstep.video.teacher import (
    VideoDataConfig,
    VideoTeacherConfig,
    load_clips,
    load_teacher,
    null_labels,
)

TINY = VideoTeacherConfig(
    data=VideoDataConfig(videos=12, frames=4, size=16), dim=32, depth=1, heads=2, steps=3,
    batch_size=4,
)  # fmt: skip


def test_clips_come_from_the_files_and_keep_their_labels(tmp_path):
    clips, labels = load_clips(TINY.data, tmp_path)
    assert clips.shape == (12, 4, 3, 16, 16) and clips.min() >= -1 and clips.max() <= 1
    assert len(list(tmp_path.glob("*.mp4"))) == 12
    ref = moving_digits_array(12, 4, 16, seed=0, config=TINY.data.recipe())
    assert all(len(v["digits"]) == 1 for v in ref.videos)  # the default: one digit per clip
    assert TINY.data.recipe().validate(16) == 12  # the default: 12-pixel digits
    assert labels.tolist() == [v["digits"][0]["label"] for v in ref.videos]
    # the decoded files are close to the rendered frames (H.264 at CRF 18)
    err = (clips - ref.as_tensor()).abs().mean()
    assert err < 0.1


def test_teacher_trains_caches_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    teacher, info = load_teacher(TINY, progress=False)
    assert info["train_seconds"] > 0
    again, _ = load_teacher(TINY, progress=False)  # from the cache: same weights
    for a, b in zip(teacher.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    noise = torch.randn(2, 4, 3, 16, 16)
    labels = torch.tensor([3, 7])
    out = EulerSampler(4).sample(teacher, noise, labels)
    assert out.x.shape == noise.shape and out.nfe == 4 and torch.isfinite(out.x).all()
    assert null_labels(labels).tolist() == [10, 10]
