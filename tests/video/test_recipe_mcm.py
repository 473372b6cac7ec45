"""``fewstep distill video-mcm`` end to end on CPU with tiny settings: low-quality teacher
trained and cached, high-quality discriminator frames, MCM distillation, 1/2/4-step students
scored against held-out high-quality clips, saved student, sample / eval / report commands,
and clear errors."""

from __future__ import annotations

import json

import torch

from fewstep.core import cli

TINY = [
    "--teacher.data.videos", "8", "--teacher.data.frames", "4", "--teacher.data.size", "16",
    "--teacher.dim", "16", "--teacher.depth", "1", "--teacher.heads", "2",
    "--teacher.steps", "2", "--teacher.batch_size", "4",
    "--hq_videos", "3", "--mcm.num_intervals", "4",
    "--train.steps", "2", "--train.batch_size", "2", "--train.progress", "false",
    "--eval.samples", "3", "--eval.teacher_steps", "2", "--eval.reference_videos", "4",
    "--eval.classifier.videos", "12", "--eval.classifier.steps", "2",
    "--eval.classifier.batch_size", "4", "--eval.classifier.width", "8",
    "--eval.classifier.features", "8",
]  # fmt: skip


def test_recipe_distills_evaluates_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert cli.main(["distill", "video-mcm", "--out", str(out), *TINY]) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["motion"] == "diff" and m["adv_weight"] > 0 and m["steps"] == [1, 2, 4]
        rows = m["samplers"]
        assert set(rows) == {"student_1", "student_2", "student_4", "teacher",
                             "low_quality_data"}  # fmt: skip
        assert [rows[f"student_{k}"]["nfe"] for k in (1, 2, 4)] == [1, 2, 4]
        assert rows["teacher"]["nfe"] == 2
        for r in rows.values():
            assert r["video_fd"] >= 0 and r["warp_error"] >= 0 and r["sharpness_ratio"] > 0
        # the low-quality clips are blurred: less Laplacian energy than high-quality ones
        assert rows["low_quality_data"]["sharpness_ratio"] < 1
        assert m["disc_loss_last"] is not None and m["motion_loss_first"] is not None
        log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
        assert "loss/discriminator" in log[-1] and "hq_share" in log[-1]
        for name in ("student.safetensors", "student.json", "report.html",
                     "samples_student_1.gif", "samples_student_4.gif", "samples_teacher.gif",
                     "samples_high_quality_reference.gif"):  # fmt: skip
            assert (out / name).exists(), name
        assert cli.main(["sample", str(out), "--n", "2", "--steps", "2"]) == 0
        assert (out / "samples_2.gif").exists()
        assert cli.main(["eval", str(out)]) == 0
        assert cli.main(["report", str(out)]) == 0

        # plain consistency distillation through the same recipe: no discriminator role
        plain = tmp_path / "plain"
        flags = ["--mcm.motion", "raw", "--mcm.adv_weight", "0", "--mcm.mix_ratio", "0"]
        assert cli.main(["distill", "video-mcm", "--out", str(plain), *TINY, *flags]) == 0
        log = (plain / "train" / "log.jsonl").read_text()
        assert "loss/discriminator" not in log

        # bad input is a clear error (exit code 2) before any training
        bad = ["distill", "video-mcm", "--out", str(tmp_path / "bad"), *TINY]
        assert cli.main([*bad, "--mcm.motion", "optical_flow"]) == 2
        assert cli.main([*bad, "--mcm.gan_loss", "lsgan"]) == 2
        assert cli.main([*bad, "--eval.steps", "0"]) == 2
    finally:
        torch.set_num_threads(before)
