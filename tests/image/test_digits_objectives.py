"""Every objective the digits recipe supports runs through `fewstep distill image-digits`,
saves its student and reloads it exactly (quality is the benchmark's job)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fewstep.core import cli
from fewstep.image.recipes.digits import RECIPE, UNSUPPORTED_WHY

# A couple of steps each; objective options that keep multi-stage objectives and build-time
# pair sets small enough for CI.
STEPS = 4
_TINY_OBJECTIVE = {
    "dmd": "--objective.num_pairs 16 --objective.pair_steps 2",
    "disback": "--objective.record_steps 2 --objective.num_checkpoints 1 "
    "--objective.backtrack_steps 1 --objective.fake_updates_per_student 1",
    "reflow": "--objective.num_pairs 32 --objective.pair_steps 2",
    "instaflow": "--objective.num_pairs 32 --objective.pair_steps 2 --objective.reflow_steps 2 "
    "--objective.target_steps 2",
    "slimflow": "--objective.num_pairs 32 --objective.pair_steps 2 --objective.reflow_steps 2 "
    "--objective.anneal_steps 2 --objective.target_steps 2",
    "progressive": "--objective.teacher_steps 4 --objective.round_steps 2",
    "hipa": "--objective.teacher_steps 4",
}
TINY_OBJECTIVE = {k: v.split() for k, v in _TINY_OBJECTIVE.items()}


@pytest.mark.parametrize("name", RECIPE.supported_objectives)
def test_objective_runs_saves_and_reloads(name, cache_dir, tiny, tmp_path):
    from fewstep.image.digits_eval import load_student

    out = tmp_path / name
    args = ["distill", "image-digits", "--out", str(out), *tiny, "--objective", name]
    args += ["--train.steps", str(STEPS), "--eval-samples", "20", "--probe-samples", "10"]
    assert cli.main(args + TINY_OBJECTIVE.get(name, [])) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["student_fd"]), metrics
    # the reloaded student reproduces the run's own final evaluation exactly
    again = RECIPE.evaluate(out)
    assert again["student_fd"] == pytest.approx(metrics["student_fd"], rel=1e-5, abs=1e-6)
    assert again["student_nfe"] == metrics["student_nfe"]
    student, _, sampler = load_student(out)
    x = sampler.sample(student, torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])).x
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_WHY))
def test_unsupported_objective_says_why(name, capsys):
    assert cli.main(["distill", "image-digits", "--objective", name, "--show-config"]) == 2
    assert UNSUPPORTED_WHY[name] in capsys.readouterr().err
