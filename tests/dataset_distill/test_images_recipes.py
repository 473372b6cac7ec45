"""``fewstep distill data-<method>`` for the six image recipes, end to end on CPU with tiny
settings (quality is the benchmark's job: benchmarks/dataset_distill.py)."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core.cli import main


def _args(text: str) -> list[str]:
    return text.split()


EVAL = _args("--eval.repeats 2 --eval.steps 10 --eval.archs convnet --threads 1 --net.width 8")
TINY = {
    "data-random": [],
    "data-herding": _args("--herding.feature_steps 20"),
    "data-dc": _args("--dc.iterations 2 --dc.outer_loop 2 --dc.inner_loop 1 --dc.batch_real 16"),
    "data-dm": _args("--dm.iterations 3 --dm.batch_real 16"),
    "data-mtt": _args(
        "--mtt.iterations 2 --mtt.syn_steps 2 --mtt.max_start_epoch 1 --mtt.expert_epochs 1 "
        "--mtt.experts.num_experts 1 --mtt.experts.epochs 1 --mtt.experts.batch_size 256"
    ),
    "data-ftd": _args(
        "--ftd.iterations 2 --ftd.syn_steps 2 --ftd.max_start_epoch 1 --ftd.expert_epochs 1 "
        "--ftd.experts.num_experts 1 --ftd.experts.epochs 1 --ftd.experts.batch_size 256"
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per test worker: tiny networks gain nothing from more, and with
    ``-n 2`` on two cores more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("fewstep-cache")
    mp.setenv("FEWSTEP_CACHE", str(path))
    yield path
    mp.undo()


@pytest.mark.parametrize("recipe", sorted(TINY))
def test_recipe_smoke(recipe, tmp_path, cache, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["distill", recipe, "--ipc", "2", "--out", str(out), *EVAL, *TINY[recipe]]) == 0
    for name in (
        "config.json",
        "metrics.json",
        "distilled.safetensors",
        "distilled.png",
        "report.html",
    ):
        assert (out / name).exists(), name
    t = load_file(str(out / "distilled.safetensors"))
    assert t["images"].shape == (20, 1, 8, 8)
    assert t["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    m = json.loads((out / "metrics.json").read_text())
    acc = m["accuracy"]["convnet"]
    assert len(acc["runs"]) == 2 and 0.0 <= acc["mean"] <= 1.0
    learned = recipe in ("data-mtt", "data-ftd")
    assert ("lr" in t) == learned and (m["learned_lr"] is not None) == learned
    if recipe in ("data-random", "data-herding"):  # coresets: real training images
        from fewstep.dataset_distill.images.data import DataConfig, load_image_data

        train = load_image_data(DataConfig()).x_train.flatten(1)
        assert all(bool((train == img.flatten()).all(1).any()) for img in t["images"])
    else:
        assert (out / "loss.png").exists() and len(m["curve"]) >= 2
    assert "test accuracy" in (out / "report.html").read_text()
    capsys.readouterr()


def test_sample_eval_report_on_a_run(tmp_path, cache, capsys):
    out = tmp_path / "run"
    argv = ["distill", "data-mtt", "--ipc", "1", "--out", str(out), *EVAL, *TINY["data-mtt"]]
    assert main([*argv, "--eval.archs", "convnet,mlp,resnet", "--eval.repeats", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["accuracy"]) == {"convnet", "mlp", "resnet"}
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    # the saved set and the learned step size give back the same evaluation
    assert again["accuracy"]["convnet"]["runs"] == m["accuracy"]["convnet"]["runs"]
    assert again["learned_lr"] == pytest.approx(m["learned_lr"])
    assert main(["sample", str(out), "--n", "20", "--out", str(tmp_path / "s.png")]) == 0
    from PIL import Image

    # ipc 1: one image (8 px, upscaled 4x) per class row, however many were asked for
    assert Image.open(tmp_path / "s.png").size == (32, 10 * 32 + 9)
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()


def test_zca_run_and_the_distilled_images_move(tmp_path, cache, capsys):
    from safetensors.torch import load_file

    from fewstep.dataset_distill.images.data import DataConfig, load_image_data

    out = tmp_path / "run"
    argv = ["distill", "data-dm", "--ipc", "1", "--out", str(out), "--data.zca", "true",
            "--dm.init", "real", *EVAL, *TINY["data-dm"]]  # fmt: skip
    assert main(argv) == 0
    t = load_file(str(out / "distilled.safetensors"))
    train = load_image_data(DataConfig(zca=True)).x_train.flatten(1)
    # DM started from real images; after three updates none is a training image any more
    assert not any(bool((train - img.flatten()).abs().max(1).values.lt(1e-6).any())
                   for img in t["images"])  # fmt: skip
    capsys.readouterr()


def test_bad_options_are_clear_errors(tmp_path, cache, capsys):
    assert main(["distill", "data-dc", "--ipc", "200", "--out", str(tmp_path / "a")]) == 2
    assert "ipc=200 needs at least 200 training images in every class" in capsys.readouterr().err
    assert main(["distill", "data-dm", "--dm.iters", "3"]) == 2
    assert "--dm.iterations" in capsys.readouterr().err  # the valid keys are listed
    argv = ["distill", "data-mtt", "--out", str(tmp_path / "b"), "--mtt.max_start_epoch", "99"]
    assert main(argv) == 2
    assert "the target epoch must be in the buffer" in capsys.readouterr().err
    assert main(["distill", "data-random", "--eval.archs", "vit", "--out", str(tmp_path / "c"),
                 "--ipc", "1"]) == 2  # fmt: skip
    assert "available: convnet, mlp, resnet" in capsys.readouterr().err
