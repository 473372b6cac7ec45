"""CPU smoke tests of ``fewstep distill lidar-vcd`` (with and without distillation) on a tiny
street: run folder, metrics, report, the apprentice reloads, and clear config errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

_TINY = (
    "--data.streets 1",
    "--data.held-out 1",
    "--data.samples-per-street 3",
    "--data.min-points 1",
    "--data.scene.length 40",
    "--data.scene.n-buildings 2",
    "--data.scene.n-cars 6",
    "--data.scene.n-poles 1",
    "--data.scene.n-trees 1",
    "--data.lidar.beams 16",
    "--data.lidar.horizontal-resolution 1",
    "--data.camera.height 16",
    "--data.camera.width 32",
    "--expert.enc-channels 4",
    "--expert.channels 3",
    "--expert.bev-channels 4",
    "--expert.depth-bins 4",
    "--apprentice.enc-channels 4",
    "--apprentice.channels 3",
    "--apprentice.bev-channels 4",
    "--apprentice.depth-bins 4",
    "--expert-train.steps 2",
    "--expert-train.batch-size 2",
    "--train.steps 2",
    "--train.batch-size 2",
    "--eval.plots 1",
    "--eval.latency-samples 1",
)
TINY = [word for option in _TINY for word in option.split()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("FEWSTEP_CACHE")
    os.environ["FEWSTEP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("FEWSTEP_CACHE")
    else:
        os.environ["FEWSTEP_CACHE"] = old


def _distill(out, *extra) -> int:
    from fewstep.core.cli import main

    return main(["distill", "lidar-vcd", "--out", str(out), *TINY, *extra])


@pytest.mark.parametrize("distill", ["true", "false"])
def test_distill_runs_and_writes_a_run_folder(cache, tmp_path, distill):
    from fewstep.core.cli import main

    out = tmp_path / "run"
    assert _distill(out, "--distill", distill) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["distill"] == (distill == "true")
    for role in ("apprentice", "expert"):
        for k in ("mAP", "NDS", "ap@0.5", "ap@4", "ATE", "ASE", "AOE", "latency_ms"):
            assert k in m[role]
        assert 0.0 <= m[role]["mAP"] <= 1.0 and 0.0 <= m[role]["NDS"] <= 1.0
    assert ("feature" in m["train_log"][0]) == (distill == "true")
    assert (out / "student.safetensors").exists() and (out / "report.html").exists()
    assert list((out / "bev").glob("*.png"))
    assert main(["eval", str(out)]) == 0
    assert main(["sample", str(out), "--n", "1"]) == 0
    assert (out / "samples" / "000.png").exists()


def test_bad_config_is_a_clear_error(cache, tmp_path, capsys):
    assert _distill(tmp_path / "bad", "--apprentice.lidar-depth", "true") == 2
    assert "camera-only" in capsys.readouterr().err
    assert _distill(tmp_path / "bad2", "--weights.feature", "-1") == 2


def test_learning_rate_warms_up_then_decays():
    from fewstep.lidar.recipes.vcd import Schedule, _lr

    s = Schedule(steps=100, lr=1.0, warmup=10)
    lrs = [_lr(k, s) for k in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear rise
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert 0.05 <= lrs[-1] < 0.06  # cosine down to 5 %
    assert _lr(0, Schedule(steps=100, lr=1.0)) == pytest.approx(1.0)  # no warm-up


def test_validation_streets_are_cut_from_training_and_never_the_test_streets(monkeypatch):
    from fewstep.lidar.recipes.vcd import VCD, VCDConfig

    with pytest.raises(ValueError, match="val_streets"):
        VCDConfig(val_streets=8)
    cfg = VCDConfig(val_streets=1)
    per = cfg.data.samples_per_street
    fake = {"rgb": torch.arange(cfg.data.streets * per)}  # training samples in street order

    import fewstep.lidar.detection_data as dd

    calls = []

    def load(data_cfg, split):
        calls.append(split)
        return fake

    monkeypatch.setattr(dd, "load_split", load)
    train, val = VCD._data(cfg)
    assert calls == ["train"]  # the test streets are not even loaded
    assert train["rgb"].tolist() == list(range((cfg.data.streets - 1) * per))
    assert val["rgb"].tolist() == list(range((cfg.data.streets - 1) * per, cfg.data.streets * per))
