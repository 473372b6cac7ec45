"""``fewstep distill video-accvideo`` end to end on CPU with tiny settings: teacher trained and
cached, SynVid made and cached, guidance + key-time GAN training, evaluation against the
teacher, saved student, sample / eval / report commands, clear config errors."""

from __future__ import annotations

import json

import torch

from fewstep.core import cli

TINY = [
    "--teacher.data.videos", "12", "--teacher.data.frames", "4", "--teacher.data.size", "16",
    "--teacher.dim", "32", "--teacher.depth", "2", "--teacher.heads", "2",
    "--teacher.patch", "2,4,4", "--teacher.steps", "3", "--teacher.batch_size", "4",
    "--synvid.videos", "6", "--synvid.steps", "6", "--synvid.batch", "4", "--keys", "3",
    "--train.steps", "4", "--train.batch_size", "2", "--train.progress", "false",
    "--eval.samples", "4", "--eval.extra_steps", "2",
    "--eval.classifier.videos", "8", "--eval.classifier.width", "4",
    "--eval.classifier.features", "8", "--eval.classifier.steps", "2",
    "--eval.classifier.batch_size", "4",
]  # fmt: skip


def test_recipe_distills_the_student_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert cli.main(["distill", "video-accvideo", "--out", str(out), *TINY]) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["key_indices"] == [0, 2, 4, 6]
        assert m["key_times"][0] == 1.0 and m["key_times"][-1] == 0.0
        # the teacher: 6 Euler steps under CFG (2 calls each); the student: 1 call per step
        assert m["teacher_nfe"] == 12 and m["teacher_3_nfe"] == 6
        assert m["student_3_nfe"] == 3 and m["student_2_nfe"] == 2
        assert not m["synvid_cached"] and m["synvid_videos"] == 6
        assert m["guide_loss_first"] is not None and m["disc_loss_last"] is not None
        for who in ("teacher", "teacher_3", "student_3", "student_2"):
            for k in ("video_fd", "frame_fd", "digit_accuracy", "warp_error", "s_per_video"):
                assert m[f"{who}_{k}"] >= 0, (who, k)
        assert m["teacher_mse_to_teacher"] == 0.0
        for name in ("student.safetensors", "student.json", "report.html", "side_by_side.gif",
                     "samples_student_3.gif"):  # fmt: skip
            assert (out / name).exists(), name
        assert cli.main(["sample", str(out), "--n", "2"]) == 0
        assert (out / "samples_2.gif").exists()
        assert cli.main(["eval", str(out)]) == 0
        assert cli.main(["report", str(out)]) == 0
        # a second run reuses the cached SynVid (guidance only: no discriminator updates)
        again = tmp_path / "again"
        args = ["distill", "video-accvideo", "--out", str(again), *TINY]
        assert cli.main([*args, "--accvideo.adv_weight", "0"]) == 0
        m2 = json.loads((again / "metrics.json").read_text())
        assert m2["synvid_cached"] and m2["disc_loss_last"] is None
        bad = ["distill", "video-accvideo", "--out", str(tmp_path / "bad"), *TINY]
        assert cli.main([*bad, "--keys", "7"]) == 2  # more key steps than teacher steps
        assert cli.main([*bad, "--key_indices", "0,3,2,6"]) == 2  # not increasing
        assert cli.main([*bad, "--accvideo.guide_form", "x0"]) == 2
    finally:
        torch.set_num_threads(before)
