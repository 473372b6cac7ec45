"""``fewstep distill video-self-forcing`` end to end on CPU with tiny settings: teacher trained
and cached, ODE-pair init, self-forcing DMD, streaming vs teacher evaluation, saved student,
sample / eval / report commands."""

from __future__ import annotations

import json

import torch

from fewstep.core import cli


def test_recipe_distills_streams_and_reports(tmp_path, monkeypatch, self_forcing_tiny):
    TINY = self_forcing_tiny
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert cli.main(["distill", "video-self-forcing", "--out", str(out), *TINY]) == 0
        m = json.loads((out / "metrics.json").read_text())
        # 2 chunks: chunk 0 with 3 steps (FFE), chunk 1 with 2, one cache pass between them
        assert m["student_denoise_nfe_per_video"] == 5 and m["student_context_nfe_per_video"] == 1
        assert m["student_nfe_per_frame"] == 3.0
        assert m["teacher_nfe_per_frame"] == 4 * 2  # 4 Euler steps under CFG
        assert m["nfe_reduction"] > 1
        assert m["student_first_chunk_latency"] > 0 and m["student_frames_per_second"] > 0
        assert len(m["long_chunk_seconds"]) == 4
        # both samplers scored by the classifier against the same real clips, each on its own
        # videos
        assert m["student_reference_warp_error"] == m["teacher_reference_warp_error"]
        assert m["student_video_fd"] != m["teacher_video_fd"]
        assert m["student_warp_error"] != m["teacher_warp_error"]
        for who in ("student", "teacher"):
            assert m[f"{who}_video_fd"] >= 0 and 0 <= m[f"{who}_digit_accuracy"] <= 1
        assert m["classifier"]["frames"] == 4 and m["reference_clips"] == 12
        for name in ("student.safetensors", "report.html", "samples_student.gif",
                     "samples_teacher.gif", "samples_long.mp4", "frames_student.png"):  # fmt: skip
            assert (out / name).exists(), name
        assert (out / "init" / "checkpoints").exists() and (out / "dmd" / "checkpoints").exists()
        assert cli.main(["sample", str(out), "--n", "2"]) == 0
        assert (out / "samples_2.gif").exists()
        assert cli.main(["eval", str(out)]) == 0
        assert cli.main(["report", str(out)]) == 0
        # a window below -1 is a clear error
        bad = ["distill", "video-self-forcing", "--out", str(tmp_path / "bad"), *TINY]
        assert cli.main([*bad, "--window", "-2"]) == 2
    finally:
        torch.set_num_threads(before)
