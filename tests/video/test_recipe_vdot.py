"""``fewstep distill video-vdot`` end to end on CPU with tiny settings: class teacher trained
and cached, fine-tuned into the two-condition teacher, VDOT distillation, evaluation with the
direction check, saved student, sample / eval / report commands."""

from __future__ import annotations

import json

import torch

from fewstep.core import cli

TINY = [
    "--teacher.base.data.videos", "12", "--teacher.base.data.frames", "4",
    "--teacher.base.data.size", "16", "--teacher.base.dim", "32", "--teacher.base.depth", "1",
    "--teacher.base.heads", "2", "--teacher.base.steps", "3", "--teacher.base.batch_size", "4",
    "--teacher.steps", "3", "--teacher.batch_size", "4",
    "--objective.student_steps", "2", "--objective.fake_updates_per_student", "2",
    "--objective.ot_iters", "5",
    "--train.steps", "4", "--train.batch_size", "3", "--train.progress", "false",
    "--eval.samples", "4", "--eval.teacher_steps", "3",
    "--eval.classifier.videos", "8", "--eval.classifier.width", "4",
    "--eval.classifier.features", "8", "--eval.classifier.steps", "2",
    "--eval.classifier.batch_size", "4",
]  # fmt: skip


def test_recipe_distills_two_condition_student_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert cli.main(["distill", "video-vdot", "--out", str(out), *TINY]) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["conditions"] == ["digit", "direction"]
        assert m["student_nfe"] == 2 and m["teacher_nfe"] == 3 * 2  # CFG doubles
        assert m["ot_loss_first"] is not None and m["dm_loss_first"] is not None
        for who in ("student", "teacher"):
            for k in ("video_fd", "frame_fd", "warp_error"):
                assert m[f"{who}_{k}"] >= 0, (who, k)
            for k in ("digit_accuracy", "direction_accuracy"):
                assert 0 <= m[f"{who}_{k}"] <= 1, (who, k)
        for name in ("student.safetensors", "student.json", "report.html",
                     "side_by_side.gif", "directions.gif"):  # fmt: skip
            assert (out / name).exists(), name
        assert cli.main(["sample", str(out), "--n", "2"]) == 0
        assert (out / "samples_2.gif").exists()
        assert cli.main(["eval", str(out)]) == 0
        assert cli.main(["report", str(out)]) == 0
        bad = ["distill", "video-vdot", "--out", str(tmp_path / "bad"), *TINY]
        assert cli.main([*bad, "--train.batch_size", "1"]) == 2  # OT needs a batch
        assert cli.main([*bad, "--objective", "dmd2"]) == 2
    finally:
        torch.set_num_threads(before)
