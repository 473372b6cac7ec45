"""``fewstep distill threed-<method>`` end to end on CPU with an analytic prior."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core.cli import main
from fewstep.threed.recipes import score as recipe_module

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = [
    "--prior", "test-target", "--label", "1", "--distill.steps", "2",
    "--scene.n_gaussians", "40", "--distill.cameras.views", "2",
    "--distill.cameras.size", "16", "--eval_views", "4", "--method.guidance_scale", "2",
]  # fmt: skip


@pytest.fixture
def test_prior(monkeypatch, score_target_prior):
    monkeypatch.setitem(recipe_module.PRIOR_LOADERS, "test-target", lambda: score_target_prior)


@pytest.mark.parametrize("method", ["sds", "vsd", "cds", "tsm"])
def test_distill_smoke_through_the_cli(test_prior, tmp_path, method, capsys):
    run = tmp_path / method
    assert main(["distill", f"threed-{method}", "--out", str(run), *TINY]) == 0
    for name in ("scene.ply", "metrics.json", "report.html", "turntable.png", "config.json"):
        assert (run / name).exists(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == method and m["label"] == 1 and m["steps"] == 2
    assert 0.0 <= m["view_accuracy"] <= 1.0 and len(m["predicted"]) == 4
    assert m["wall_seconds"] > 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["view_accuracy"] == pytest.approx(m["view_accuracy"])  # recomputed from the PLY
    assert ev["predicted"] == m["predicted"]
    assert main(["sample", str(run), "--n", "3"]) == 0
    assert (run / "views_3.png").exists()


def test_recipe_evaluation_reads_the_classifier(test_prior, score_target_prior):
    """A scene that is exactly the class-0 target bar from every view scores 1."""
    from fewstep.threed.distill3d import Distill3DConfig
    from fewstep.threed.gaussians import Gaussians
    from fewstep.threed.prior import PriorAdapter

    # a column of opaque white Gaussians along world z: a vertical bar in every orbit view
    z = torch.linspace(-0.9, 0.9, 30)
    pts = torch.stack([torch.zeros(30), torch.zeros(30), z], -1)
    scene = Gaussians.from_points(pts, torch.ones(30, 3), opacity=0.99,
                                  scales=torch.full((30, 3), 0.12))  # fmt: skip
    res = recipe_module.evaluate_views(
        scene, PriorAdapter(score_target_prior), 0, 6, Distill3DConfig()
    )
    assert res["view_accuracy"] == 1.0 and res["mean_confidence"] > 0.5


def test_bad_label_and_prior_are_named(test_prior, tmp_path, capsys):
    assert main(["distill", "threed-sds", "--out", str(tmp_path / "x"), *TINY[:2],
                 "--label", "7"]) == 2  # fmt: skip
    assert "label 7" in capsys.readouterr().err
    assert main(["distill", "threed-sds", "--out", str(tmp_path / "y"), "--prior", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
