"""``fewstep distill threed-triplane-turbo`` end to end on CPU with an analytic prior."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fewstep.core.cli import main
from fewstep.threed.recipes import score as score_recipes

pytestmark = pytest.mark.usefixtures("single_thread", "isolated_cache")

TINY = [
    "--prior", "test-target", "--train.train_steps", "2", "--train.objects", "2",
    "--generator.steps", "2", "--generator.decoder_width", "8",
    "--generator.triplane.channels", "4", "--generator.triplane.resolution", "8",
    "--cameras.views", "2", "--cameras.size", "8", "--train.field_samples", "8",
    "--eval_views", "4", "--mesh_resolution", "16", "--gif_views", "2",
    "--method.guidance_scale", "2",
]  # fmt: skip


@pytest.fixture
def test_prior(monkeypatch, score_mixed_prior):
    monkeypatch.setitem(score_recipes.PRIOR_LOADERS, "test-target", lambda: score_mixed_prior)


def test_distill_eval_sample_through_the_cli(test_prior, tmp_path, capsys):
    pytest.importorskip("open3d")
    from fewstep.threed.geometry_eval import read_mesh

    run = tmp_path / "run"
    assert main(["distill", "threed-triplane-turbo", "--out", str(run), *TINY]) == 0
    for name in ("student.safetensors", "metrics.json", "report.html", "turntable.png",
                 "turntable.gif", "config.json", "loss.png"):  # fmt: skip
        assert (run / name).exists(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 2 and m["train_steps"] == 2
    assert len(m["per_class_accuracy"]) == 2 and len(m["predicted"][0]) == 4
    assert 0.0 <= m["view_accuracy"] <= 1.0
    assert m["seconds_per_object"] > 0 and m["seconds_single_object"] > 0
    assert m["parameters"]["adapter"] > 0 and m["trainable_fraction"] > 0
    # the exported meshes open in open3d with the triangle counts the run recorded
    assert any(m["mesh_triangles"])
    for c, n_tri in enumerate(m["mesh_triangles"]):
        if n_tri:
            for suffix in ("ply", "obj"):
                mesh = read_mesh(run / "meshes" / f"class_{c}.{suffix}")
                assert len(mesh.triangles) == n_tri
                assert np.isfinite(np.asarray(mesh.vertices)).all()
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0  # reloads adapters + decoders onto a fresh base
    ev = json.loads(capsys.readouterr().out)
    assert ev["per_class_accuracy"] == pytest.approx(m["per_class_accuracy"])
    assert ev["predicted"] == m["predicted"]
    assert main(["sample", str(run), "--n", "3", "--steps", "1"]) == 0
    assert (run / "samples_3.png").exists()


def _log(run):
    from fewstep.core.checkpoint import latest_checkpoint

    return json.loads((latest_checkpoint(run / "checkpoints") / "state.json").read_text())["log"]


def test_resume_continues_from_the_checkpoint(test_prior, tmp_path):
    run = tmp_path / "run"
    assert main(["distill", "threed-triplane-turbo", "--out", str(run), *TINY]) == 0
    first = _log(run)
    more = [*TINY[:3], "3", *TINY[4:]]  # --train.train_steps 3
    assert main(["distill", "threed-triplane-turbo", "--out", str(run), *more]) == 0
    log = _log(run)
    assert [r["step"] for r in log] == [0, 1, 2]  # one new step, the first two kept
    assert log[:2] == first


def test_unconditional_prior_is_refused(monkeypatch, tmp_path, score_gaussian_prior, capsys):
    monkeypatch.setitem(score_recipes.PRIOR_LOADERS, "uncond", lambda: score_gaussian_prior)
    argv = ["distill", "threed-triplane-turbo", "--out", str(tmp_path / "r"), "--prior", "uncond"]
    assert main(argv) != 0
    assert "needs a class-conditional prior" in capsys.readouterr().err
