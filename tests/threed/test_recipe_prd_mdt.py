"""CPU smoke tests of ``fewstep distill threed-prd`` and ``threed-mdt-dist`` through the CLI,
with tiny settings; the run folders are re-read (weights, meshes, GIFs, metrics, report)."""

import json

import pytest
from PIL import Image

from fewstep.core.cli import main
from fewstep.core.recipes import load_recipe
from fewstep.threed.geometry_eval import read_mesh

PRD_TINY = [
    "--prd.steps", "12", "--prd.eval-every", "6", "--scene.views", "3", "--scene.test-views", "2",
    "--scene.size", "8", "--scene.samples", "16", "--resolution", "6", "--mesh-resolution", "20",
    "--turntable", "2", "--baseline", "true",
]  # fmt: skip

MDT_TINY = [
    "--data.resolution", "4", "--data.n-train", "24", "--data.n-held-out", "8", "--channels", "4",
    "--teacher-steps", "6", "--teacher-batch", "8", "--train.steps", "3", "--train.batch-size",
    "4", "--eval-samples", "4", "--meshes", "1", "--turntable", "2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_prd_recipe_cli_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "threed-prd", "--out", str(out), *PRD_TINY]) == 0
    for f in ("config.json", "student.safetensors", "metrics.json", "mesh.ply", "turntable.gif",
              "relight.gif", "loss.png", "report.html"):  # fmt: skip
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 12 and m["progress_mode"] == "learned"
    assert "baseline_fixed_progress" in m
    assert m["chamfer_vs_reference"] < 0.1 and m["normal_consistency_vs_reference"] > 0.8
    assert Image.open(out / "turntable.gif").n_frames == 2
    assert len(read_mesh(out / "mesh.ply").triangles) == m["mesh_triangles"]
    assert "turntable.gif" in (out / "report.html").read_text()
    recipe = load_recipe("threed-prd")
    ev = recipe.evaluate(out)
    assert ev["relit_psnr"] == pytest.approx(m["relit_psnr"], abs=1e-4)  # weights round-trip


def test_prd_recipe_rejects_unknown_progress_mode(tmp_path, capsys):
    rc = main(["distill", "threed-prd", "--out", str(tmp_path / "x"), "--prd.progress", "ramp"])
    assert rc == 2
    assert "prd.progress must be one of" in capsys.readouterr().err


def test_mdt_recipe_cli_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "threed-mdt-dist", "--out", str(out), *MDT_TINY]) == 0
    for f in ("config.json", "student.safetensors", "metrics.json", "turntable.gif",
              "loss.png", "report.html"):  # fmt: skip
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["samplers"]) == {"teacher_25", "untrained_student_1", "student_1", "student_2"}
    assert m["samplers"]["teacher_25"]["mse_to_teacher"] == 0.0
    assert m["samplers"]["student_1"]["nfe"] == 1 and m["teacher_cached"] is False
    assert Image.open(out / "turntable.gif").size[0] == 3 * 3 * 32  # three samples side by side
    recipe = load_recipe("threed-mdt-dist")
    ev = recipe.evaluate(out)
    assert ev["student_1"]["nearest_iou"] == pytest.approx(
        m["samplers"]["student_1"]["nearest_iou"], abs=1e-5
    )  # weights round-trip
    out2 = tmp_path / "run2"
    assert main(["distill", "threed-mdt-dist", "--out", str(out2), *MDT_TINY]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["teacher_cached"] is True
