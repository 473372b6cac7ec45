"""LiveTalk's control signal: metadata -> control, the pixel measure of adherence, the
label-only null condition, and a control teacher that learns from the signal."""

from __future__ import annotations

import torch

from fewstep.video.control import (
    ControlTeacherConfig,
    control_adherence,
    ink_height,
    load_conditions,
    load_control_teacher,
    null_labels_keep_control,
)
from fewstep.video.teacher import NUM_CLASSES, VideoDataConfig, VideoTeacherConfig

DATA = VideoDataConfig(videos=24, frames=6, size=16)


def test_real_clips_follow_their_control_and_not_a_shuffled_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    clips, labels, control = load_conditions(DATA)
    assert control.shape == (24, 6) and control.min() >= -1 and control.max() <= 1
    from fewstep.video.teacher import load_clips

    _, _, meta = load_clips(DATA, with_meta=True)
    one = torch.tensor([len(m["digits"]) == 1 for m in meta])
    own = control_adherence(clips[one], control[one])
    shuffled = control_adherence(clips[one], control[one].roll(1, 0))
    # one digit: its ink height is its position (up to the sprite's shape and compression)
    assert own["control_correlation"] > 0.85, own
    assert shuffled["control_correlation"] < own["control_correlation"] - 0.5, shuffled
    assert own["control_motion_gap"] < shuffled["control_motion_gap"]


def test_ink_height_tracks_a_bright_square():
    video = torch.full((1, 3, 3, 16, 16), -1.0)  # black frames
    for t, row in enumerate((0, 7, 15)):
        video[0, t, :, row] = 1.0  # a white row
    h = ink_height(video)[0]
    torch.testing.assert_close(h, torch.tensor([-1.0, 7 / 15 * 2 - 1, 1.0]))
    assert ink_height(torch.full((1, 2, 3, 8, 8), -1.0)).eq(0).all()  # no ink: 0


def test_null_condition_drops_the_label_and_keeps_the_control():
    cond = {"labels": torch.tensor([3, 4]), "control": torch.randn(2, 6)}
    null = null_labels_keep_control(cond)
    assert null["labels"].eq(NUM_CLASSES).all()
    assert null["control"] is cond["control"]


def test_control_teacher_learns_to_use_the_signal(tmp_path, monkeypatch):
    """Zero-initialised, the control layer is silent; fine-tuning on (clip, label, control)
    must move it, so the teacher's prediction then depends on the control."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    tcfg = VideoTeacherConfig(data=DATA, dim=32, depth=1, heads=2, steps=3, batch_size=4)
    teacher, info = load_control_teacher(
        tcfg, ControlTeacherConfig(steps=20, batch_size=4, lr=1e-2), progress=False
    )
    assert teacher.net.control.weight.abs().sum() > 0 and info["train_seconds"] > 0
    x, t = torch.randn(2, 6, 3, 16, 16), torch.full((2,), 0.5)
    labels = torch.tensor([1, 2])
    a = teacher(x, t, {"labels": labels, "control": torch.zeros(2, 6)})
    b = teacher(x, t, {"labels": labels, "control": torch.ones(2, 6)})
    assert (a - b).abs().max() > 1e-4
    # cached: a second call loads the same weights
    again, _ = load_control_teacher(
        tcfg, ControlTeacherConfig(steps=20, batch_size=4, lr=1e-2), progress=False
    )
    torch.testing.assert_close(again.net.control.weight, teacher.net.control.weight)
