"""`fewstep distill image-digits` end to end at toy scale (quality is the benchmark's job)."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core import cli

# The module's run: 6 DMD2 steps, evaluated and checkpointed every 3.
_DMD2_RUN = (
    "--train.steps 6 --train.eval_every 3 --train.checkpoint_every 3 "
    "--objective.fake_updates_per_student 2"
)
DMD2_RUN = _DMD2_RUN.split()  # noqa: SIM905


@pytest.fixture(scope="module")
def dmd2_run(cache_dir, tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("run") / "dmd2"
    args = [
        "distill",
        "image-digits",
        "--out",
        str(out),
        *tiny,
        *DMD2_RUN,
    ]
    assert cli.main(args) == 0
    return out


def test_run_folder_contents(dmd2_run):
    for name in (
        "config.json",
        "metrics.json",
        "log.jsonl",
        "report.html",
        "teacher_samples.png",
        "student_samples.png",
        "student_by_class.png",
        "loss_curves.png",
        "student/diffusion_pytorch_model.safetensors",
        "student/config.json",
        "checkpoints/latest.json",
    ):
        assert (dmd2_run / name).exists(), name
    cfg = json.loads((dmd2_run / "config.json").read_text())
    assert cfg["recipe"] == "image-digits" and cfg["config"]["objective"] == "dmd2"
    assert cfg["config"]["train"]["steps"] == 6
    assert cfg["objective_config"]["fake_updates_per_student"] == 2
    assert cfg["config"]["train"]["betas"] == [0.0, 0.99]  # the recipe's DMD2 setting
    m = json.loads((dmd2_run / "metrics.json").read_text())
    assert m["student_nfe"] == 1 and m["teacher_nfe"] == 4
    assert m["student_samples_per_second"] > m["teacher_samples_per_second"]
    for k in ("teacher_fd", "student_fd", "student_class_accuracy", "teacher_class_accuracy"):
        assert m[k] == m[k]  # finite, present
    html = (dmd2_run / "report.html").read_text()
    assert "student_samples.png" in html and "Per-class accuracy" in html
    assert list((dmd2_run / "samples").glob("step_00000003_student.png"))


def test_student_folder_loads_in_diffusers_and_matches_run(dmd2_run):
    from diffusers import UNet2DModel

    from fewstep.core.checkpoint import latest_checkpoint
    from fewstep.image.digits_eval import load_student

    unet = UNet2DModel.from_pretrained(dmd2_run / "student")
    from safetensors.torch import load_file

    ema = load_file(str(latest_checkpoint(dmd2_run / "checkpoints") / "weights.safetensors"))
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ema[f"student_ema.unet.{k}"]), k
    student, _, _ = load_student(dmd2_run)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = student.predict(x, torch.ones(3), torch.tensor([1, 2, 3]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sample_eval_report_commands(dmd2_run, capsys):
    assert cli.main(["sample", str(dmd2_run), "--n", "20", "--out", str(dmd2_run / "s.png")]) == 0
    assert (dmd2_run / "s.png").exists()
    assert cli.main(["report", str(dmd2_run)]) == 0
    assert cli.main(["eval", str(dmd2_run)]) == 0
    assert '"student_fd"' in capsys.readouterr().out


def test_rerun_resumes_instead_of_restarting(dmd2_run, tiny):
    before = (dmd2_run / "log.jsonl").read_text()
    args = [
        "distill",
        "image-digits",
        "--out",
        str(dmd2_run),
        *tiny,
        *DMD2_RUN,
    ]
    assert cli.main(args) == 0
    assert (dmd2_run / "log.jsonl").read_text() == before  # no step trained again


def test_consistency_objective(cache_dir, tmp_path, tiny):
    out = tmp_path / "cd"
    assert (
        cli.main(
            [
                "distill",
                "image-digits",
                "--objective",
                "consistency",
                "--out",
                str(out),
                *tiny,
                "--train.steps",
                "4",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["student_nfe"] == 1
    assert json.loads((out / "student" / "fewstep.json").read_text())["objective"] == "consistency"


def test_bad_options_are_clear_errors(cache_dir, tmp_path, capsys):
    assert cli.main(["distill", "image-digits", "--train.stepz", "3"]) == 2
    assert "--train.steps" in capsys.readouterr().err  # lists valid keys
    assert cli.main(["distill", "image-digits", "--objective.nope", "1"]) == 2
    assert "fake_updates_per_student" in capsys.readouterr().err
    assert cli.main(["distill", "image-digits", "--objective", "zzz"]) == 2
    assert "available" in capsys.readouterr().err


def test_image_cli_lists_image_recipes(capsys):
    from fewstep.image.cli import main

    assert main(["list"]) == 0
    assert "image-digits" in capsys.readouterr().out
