"""``fewstep distill video-livetalk`` end to end on CPU with tiny settings: control teacher,
converged init, on-policy DMD with a real first chunk and the control, adherence metrics."""

from __future__ import annotations

import json

import torch

from fewstep.core import cli


def test_livetalk_recipe_distills_with_all_three_conditions(
    tmp_path, monkeypatch, self_forcing_tiny
):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    out = tmp_path / "run"
    tiny = [*self_forcing_tiny, "--control_teacher.steps", "3", "--control_teacher.batch_size", "4"]
    try:
        assert cli.main(["distill", "video-livetalk", "--out", str(out), *tiny]) == 0
        m = json.loads((out / "metrics.json").read_text())
        for who in ("student", "teacher"):
            for pre in ("", "shuffled_"):
                assert -1 <= m[f"{who}_{pre}control_correlation"] <= 1
                assert m[f"{who}_{pre}control_motion_gap"] >= 0
        # the student is given a real first chunk: its first-chunk pass is a cache write only
        assert m["student_denoise_nfe_per_video"] == 2  # chunk 1 only, K = 2
        assert "Control adherence" in (out / "report.html").read_text()
        assert cli.main(["sample", str(out), "--n", "2"]) == 0
        assert cli.main(["eval", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
