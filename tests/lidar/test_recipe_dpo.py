"""CPU smoke tests of ``fewstep distill lidar-dpo`` (Distillation-DPO and the DMD2 ablation)
with a tiny teacher: run folder, metrics, and completed scans that open3d reads back."""

from __future__ import annotations

import json
import os

import pytest

from fewstep.lidar.recipes.dpo import STUDENT_TIMES

# a tiny street, 2 x 2 scans, 16 partial / 32 dense points, an 8-wide network, 3 steps
_TINY = (
    "--teacher.n-sequences 2",
    "--teacher.scans-per-seq 2",
    "--teacher.data.scene.length 40",
    "--teacher.data.scene.n-buildings 3",
    "--teacher.data.scene.n-cars 2",
    "--teacher.data.scene.n-poles 2",
    "--teacher.data.scene.n-trees 2",
    "--teacher.data.speed 20",
    "--teacher.data.map-extra-scans 1",
    "--teacher.pairs.max-range 15",
    "--teacher.pairs.n-partial 16",
    "--teacher.pairs.n-dense 32",
    "--teacher.repeat 2",
    "--teacher.net.hidden 8",
    "--teacher.net.k 4",
    "--teacher.net.k-partial 2",
    "--teacher.net.layers 1",
    "--teacher.train-steps 3",
    "--teacher.batch-size 2",
    "--train.steps 3",
    "--train.batch-size 2",
    "--train.progress false",
    "--eval.teacher-steps 3",
    "--val_scans 1",  # of the 2 training scans (the default 4 needs more)
)
TINY = [word for option in _TINY for word in option.split()]
N_POINTS = 32  # repeat * n_partial


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One fewstep cache (tiny data set and teacher) for every run in this module."""
    old = os.environ.get("FEWSTEP_CACHE")
    os.environ["FEWSTEP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("FEWSTEP_CACHE")
    else:
        os.environ["FEWSTEP_CACHE"] = old


def _distill(out, *extra) -> int:
    from fewstep.core.cli import main

    return main(["distill", "lidar-dpo", "--out", str(out), *TINY, *extra])


def _read(path):
    from fewstep.lidar.scenes import o3d_module

    return o3d_module().io.read_point_cloud(str(path))


def _check_run(out, objective):
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["objective"] == objective
    assert cfg["objective_config"]["student_steps"] == 4
    assert cfg["objective_config"]["fake_updates_per_student"] == 1  # the paper's 1:1 schedule
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == objective and m["n_scans"] == 2
    for k in ("chamfer", "fscore@0.1", "iou@0.5", "bev_jsd", "emd", "seconds_per_scan"):
        assert k in m["student"] and k in m["teacher"]
    assert m["student"]["nfe"] == 4 and m["teacher"]["nfe"] == 3
    # the student samples at the recipe's tuned times, not core's uniform ones
    assert m["student_times"] == pytest.approx(list(STUDENT_TIMES))
    assert (out / "student.safetensors").is_file() and (out / "report.html").is_file()
    for name in ("student", "teacher", "partial", "gt"):
        pcd = _read(out / "scans" / f"000_{name}.ply")
        assert len(pcd.points) == (16 if name == "partial" else N_POINTS), name
    log = [r for r in m["train_log"] if "loss/student" in r]
    assert log and "loss/fake_score" in log[-1]
    return m, log[-1]


def test_cli_smoke_distillation_dpo_then_sample_and_eval(cache, tmp_path):
    import numpy as np

    from fewstep.core.cli import main

    run = tmp_path / "dpo"
    assert _distill(run) == 0  # distillation_dpo is the recipe's default objective
    m, last = _check_run(run, "distillation_dpo")
    assert all(k in last for k in ("reward", "dpo_weight", "fake_win_loss", "fake_lose_loss"))
    # the run folder reloads: `fewstep sample` writes completions, `fewstep eval` re-scores
    assert main(["sample", str(run), "--n", "1", "--out", str(tmp_path / "s")]) == 0
    pcd = _read(tmp_path / "s" / "000_student.ply")
    assert np.asarray(pcd.points).shape == (N_POINTS, 3)
    assert main(["eval", str(run)]) == 0
    # same weights, same seeds: the re-evaluation reproduces the run's Chamfer
    again = json.loads((run / "eval.json").read_text())
    assert again["student"]["chamfer"] == pytest.approx(m["student"]["chamfer"], rel=1e-5)


def test_cli_smoke_dmd2_ablation_through_the_same_recipe(cache, tmp_path):
    out = tmp_path / "dmd2"
    assert _distill(out, "--objective", "dmd2") == 0
    _, last = _check_run(out, "dmd2")
    assert "dm_grad_norm" in last and "dpo_weight" not in last  # no preference pairs


def test_unsupported_objective_and_reward_are_clear_errors(cache, tmp_path, capsys):
    assert _distill(tmp_path / "x", "--objective", "consistency") == 2
    assert "does not support objective 'consistency'" in capsys.readouterr().err
    assert _distill(tmp_path / "y", "--reward", "hausdorff") == 2
    assert "reward must be one of" in capsys.readouterr().err
    # a new step count with the default times would be silently ignored by core's sampler
    assert _distill(tmp_path / "z", "--objective.student_steps", "8") == 2
    assert "does not match" in capsys.readouterr().err


def test_validation_scans_pick_the_best_checkpoint(cache, tmp_path):
    """``val_scans``: scans held out of the training streets (never the test street) score
    the student every ``eval_every`` steps; the saved student is the best-scoring one."""
    from fewstep.lidar.recipes.dpo import DPO
    from fewstep.lidar.teacher import split_pairs

    run = tmp_path / "val"
    assert _distill(run, "--train.eval_every", "1") == 0  # TINY holds out 1 scan
    m = json.loads((run / "metrics.json").read_text())
    ck = m["checkpoint"]
    evals = [r for r in m["train_log"] if "eval/val_chamfer" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    best = min(evals, key=lambda r: r["eval/val_chamfer"])
    assert ck["step"] == best["step"] and ck["val_scans"] == 1
    cfg, _, student, times, held = DPO.load(run)
    train, val = DPO.split_validation(split_pairs(cfg.teacher)[0], 1)
    assert len(train.offsets) == 1 and len(held.offsets) == 2  # the test street is untouched
    # the saved weights are the chosen checkpoint's: they reproduce its validation Chamfer
    assert DPO.val_chamfer(cfg, student, times, val) == pytest.approx(ck["val_chamfer"], rel=1e-5)


def test_resumed_run_keeps_the_earlier_best_checkpoint(cache, tmp_path, monkeypatch):
    """The best-on-validation student (step, Chamfer, weights) is saved in the run folder, so a
    run resumed from its trainer checkpoint still returns the earlier best when no later
    checkpoint beats it. Validation Chamfer is scripted: steps 1-2 in the first run, 3-4 after
    resuming; step 1 is the best."""
    from fewstep.lidar.recipes import dpo as dpo_mod
    from fewstep.lidar.recipes.dpo import DPO

    # run 1: init, steps 1, 2; run 2: init, steps 3, 4; run 3 (fresh): init, step 1
    script = iter([1.0, 0.3, 0.9, 1.0, 0.8, 0.7, 1.0, 1.0])
    prints = []  # a fingerprint of the weights each call scored

    def scripted(self, cfg, model, times, val):
        prints.append(sum(float(p.double().sum()) for p in model.parameters()))
        return next(script)

    monkeypatch.setattr(dpo_mod.DPORecipe, "val_chamfer", scripted)
    run = tmp_path / "resume"
    every = ["--train.eval_every", "1", "--train.checkpoint_every", "1"]
    assert _distill(run, *every, "--train.steps", "2") == 0
    assert (run / dpo_mod.BEST_FILE).is_file()
    first = json.loads((run / "metrics.json").read_text())["checkpoint"]
    assert first["step"] == 1 and first["val_chamfer"] == pytest.approx(0.3)
    assert _distill(run, *every, "--train.steps", "4") == 0  # resumes at step 2
    m = json.loads((run / "metrics.json").read_text())
    steps = [r["step"] for r in m["train_log"] if "eval/val_chamfer" in r]
    # the resumed history, not a fresh run (core's trainer writes its last checkpoint before
    # the final evaluation, so step 2's record is not in the resumed history)
    assert steps[0] == 1 and steps[-2:] == [3, 4]
    assert m["checkpoint"]["step"] == 1 and m["checkpoint"]["val_chamfer"] == pytest.approx(0.3)
    _, _, student, _, _ = DPO.load(run)
    saved = sum(float(p.double().sum()) for p in student.parameters())
    assert saved == pytest.approx(prints[1], rel=1e-6)  # the step-1 weights, not step 4's
    assert saved != pytest.approx(prints[-1], rel=1e-6)
    # a fresh run in the same folder (resume off) does not inherit that best
    assert _distill(run, *every, "--train.steps", "1", "--train.resume", "false") == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["checkpoint"]["step"] == 1 and m["checkpoint"]["val_chamfer"] == pytest.approx(1.0)
