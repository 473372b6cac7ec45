"""``fewstep distill video-streamdit`` end to end on CPU with tiny settings: teacher trained
and cached, buffered flow matching, chunk-wise distillation, streaming evaluation with the
video classifier, saved student, sample / eval / report commands."""

from __future__ import annotations

import json

import torch

from fewstep.core import cli

TINY = [
    "--teacher.data.videos", "12", "--teacher.data.frames", "4", "--teacher.data.size", "16",
    "--teacher.dim", "32", "--teacher.depth", "1", "--teacher.heads", "2",
    "--teacher.steps", "3", "--teacher.batch_size", "4",
    "--chunk_frames", "2", "--window", "1", "--buffer.chunk_options", "2,4",
    "--buffer.train.steps", "3", "--buffer.train.batch_size", "4",
    "--buffer.train.progress", "false",
    "--distill.teacher_micro_steps", "3",
    "--distill.train.steps", "3", "--distill.train.batch_size", "4",
    "--distill.train.progress", "false",
    "--eval.samples", "4", "--eval.teacher_steps", "4",
    "--eval.classifier.videos", "8", "--eval.classifier.width", "4",
    "--eval.classifier.features", "8", "--eval.classifier.steps", "2",
    "--eval.classifier.batch_size", "4",
]  # fmt: skip


def test_recipe_distills_streams_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert cli.main(["distill", "video-streamdit", "--out", str(out), *TINY]) == 0
        m = json.loads((out / "metrics.json").read_text())
        # 4 frames, chunks of 2: N = 2 chunks in the buffer; the student makes one call per
        # emitted chunk, so each frame goes through N = 2 calls
        assert m["chunks_in_buffer"] == 2
        assert m["student_calls_per_chunk"] == 1 and m["student_nfe_per_chunk"] == 1
        assert m["student_nfe_per_frame"] == 2
        assert m["stream_teacher_nfe_per_chunk"] == 3 * 2  # 3 micro-steps under CFG
        assert m["teacher_nfe_per_frame"] == 4 * 2  # 4 Euler steps under CFG
        for who in ("student", "stream_teacher", "teacher"):
            for k in ("video_fd", "frame_fd", "digit_accuracy", "warp_error"):
                assert m[f"{who}_{k}"] >= 0, (who, k)
            assert m[f"{who}_frames_per_second"] > 0
        assert m["student_first_chunk_latency"] > 0
        for name in ("student.safetensors", "stream_teacher.safetensors", "report.html",
                     "side_by_side.gif", "metrics.json"):  # fmt: skip
            assert (out / name).exists(), name
        assert (out / "buffer" / "checkpoints").exists()
        assert (out / "distill" / "checkpoints").exists()
        assert cli.main(["sample", str(out), "--n", "2"]) == 0
        assert (out / "samples_2.gif").exists()
        assert cli.main(["eval", str(out)]) == 0
        assert cli.main(["report", str(out)]) == 0
        bad = ["distill", "video-streamdit", "--out", str(tmp_path / "bad"), *TINY]
        assert cli.main([*bad, "--window", "-2"]) == 2
        assert cli.main([*bad, "--chunk_frames", "3"]) == 2
    finally:
        torch.set_num_threads(before)
