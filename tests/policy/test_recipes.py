"""The policy recipes end to end on CPU with tiny settings: teacher trained and cached,
method trained, closed-loop rollouts of student and teacher, saved student, CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.core import cli
from fewstep.policy.data import Normalizer, WindowConfig
from fewstep.policy.policy import ChunkPolicy

TINY = [
    "--teacher.demos", "8", "--teacher.steps", "20", "--teacher.batch-size", "64",
    "--teacher.unet.down-dims", "16,32", "--teacher.unet.time-embed-dim", "16",
    "--teacher.train-timesteps", "20", "--teacher.sample-steps", "20",
    "--train.steps", "4", "--train.batch-size", "32",
    "--eval.episodes", "3", "--eval.max-steps", "12", "--eval.latency-plans", "1",
    "--train.progress", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One teacher cache for the module: the first recipe trains it, the others load it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.mark.parametrize("recipe", ["policy-consistency", "policy-dmd", "policy-sdp"])
def test_recipe_runs_and_rolls_out(recipe, tmp_path, cache, capsys):
    out = tmp_path / recipe
    assert cli.main(["distill", recipe, "--out", str(out), *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for who in ("student", "teacher"):
        s = m[who]
        assert s["n_rollouts"] == 3 and 0.0 <= s["success_rate"] <= 1.0
        assert s["nfe_per_action"] > 0 and s["ms_per_action"] > 0
        assert (out / f"rollouts_{who}.png").exists()
    # the teacher spends its 20 DDPM steps per plan; one-step students 1, SDP 20 levels / 5
    # chunks = 4 (its first plan too: the buffer starts as the staircase)
    assert m["teacher"]["nfe_per_plan"] == 20
    assert m["student"]["nfe_per_plan"] == (4 if recipe == "policy-sdp" else 1)
    assert m["nfe_reduction"] > 1
    assert (out / "student.safetensors").exists() and (out / "report.html").exists()
    # the saved student reloads and runs through the CLI commands
    capsys.readouterr()
    assert cli.main(["sample", str(out), "--n", "2"]) == 0
    assert (out / "rollouts_2.png").exists()
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["student"]["n_rollouts"] == 3


def test_bad_options_are_named(tmp_path, cache, capsys):
    args = ["distill", "policy-sdp", "--sdp.buffer-init", "ones", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    assert "buffer_init" in capsys.readouterr().err
    assert cli.main(["distill", "policy-consistency", "--horizons.action", "20"]) == 2
    assert "obs_horizon - 1 + action_horizon" in capsys.readouterr().err


class _Counting(ChunkPolicy):
    """Plans action k = plan index * 100 + position, so the queue's order is visible."""

    def plan(self, obs):
        b, tp = obs.shape[0], self.horizons.pred_horizon
        pos = torch.arange(tp, dtype=torch.float32) + 100 * self.plans
        return pos.view(1, tp, 1).expand(b, tp, 2)


def test_action_queue_executes_from_the_current_step_and_replans():
    # identity normalizer on actions, so decoded actions are the planned numbers
    norm = Normalizer({"obs": (np.zeros(4), np.ones(4)), "action": (-np.ones(2), np.ones(2))})
    p = _Counting(norm, WindowConfig(obs_horizon=3, pred_horizon=16, action_horizon=4))
    got = [p.act(np.zeros(4, np.float32))[0] for _ in range(8)]
    assert got == [2, 3, 4, 5, 102, 103, 104, 105]  # positions To - 1 .. To - 1 + Ta - 1
    assert p.plans == 2
    p.reset()
    assert p.act(np.zeros((5, 4), np.float32)).shape == (5, 2)  # a batch of environments
    assert len(p._obs) == 3  # the first observation fills the window
