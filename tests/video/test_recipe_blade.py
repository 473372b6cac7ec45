"""``fewstep distill video-blade`` end to end on CPU with tiny settings: teacher trained and
cached, sparsity-aware TDM on the ASA student, evaluation against the dense teacher, saved
student, sample / eval / report commands."""

from __future__ import annotations

import json

import torch

from fewstep.core import cli

TINY = [
    "--teacher.data.videos", "12", "--teacher.data.frames", "4", "--teacher.data.size", "16",
    "--teacher.dim", "32", "--teacher.depth", "2", "--teacher.heads", "2",
    "--teacher.patch", "2,4,4", "--teacher.steps", "3", "--teacher.batch_size", "4",
    "--asa.block_size", "16", "--asa.tile", "1,4,4", "--asa.max_retain", "0.5",
    "--objective.student_steps", "2", "--objective.fake_updates_per_student", "2",
    "--train.steps", "4", "--train.batch_size", "2", "--train.progress", "false",
    "--eval.samples", "4", "--eval.teacher_steps", "4",
    "--eval.classifier.videos", "8", "--eval.classifier.width", "4",
    "--eval.classifier.features", "8", "--eval.classifier.steps", "2",
    "--eval.classifier.batch_size", "4",
]  # fmt: skip


def test_recipe_distills_sparse_student_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert cli.main(["distill", "video-blade", "--out", str(out), *TINY]) == 0
        m = json.loads((out / "metrics.json").read_text())
        # 4 frames of 16 x 16 in (2, 4, 4) patches: 2 x 4 x 4 = 32 tokens, 2 tiles of 16;
        # max_retain 0.5 keeps 1 of 2 key tiles per query tile in every layer
        assert m["tokens"] == 32
        assert m["attn_density_per_layer"] == [0.5, 0.5]
        assert m["attn_flops_saved"] == 0.5
        # the student trained with its sparse attention on (not dense, claimed sparse)
        assert m["train_attn_density_last"] == 0.5
        assert m["student_nfe"] == 2 and m["teacher_nfe"] == 4 * 2  # CFG doubles
        assert m["flops_ratio_vs_teacher"] > 4.0  # fewer calls, each cheaper
        for who in ("student", "dense_student", "teacher"):
            for k in ("video_fd", "frame_fd", "digit_accuracy", "warp_error"):
                assert m[f"{who}_{k}"] >= 0, (who, k)
        for name in ("student.safetensors", "student.json", "report.html",
                     "side_by_side.gif", "density.png"):  # fmt: skip
            assert (out / name).exists(), name
        assert cli.main(["sample", str(out), "--n", "2"]) == 0
        assert (out / "samples_2.gif").exists()
        assert cli.main(["eval", str(out)]) == 0
        assert cli.main(["report", str(out)]) == 0
        bad = ["distill", "video-blade", "--out", str(tmp_path / "bad"), *TINY]
        assert cli.main([*bad, "--asa.tile", "1,2,4"]) == 2  # 8 tokens != block of 16
        assert cli.main([*bad, "--objective", "dmd2"]) == 2  # BLADE trains with TDM
    finally:
        torch.set_num_threads(before)
