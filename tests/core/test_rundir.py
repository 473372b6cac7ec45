import json
from dataclasses import dataclass

import pytest
import torch

from fewstep.core.rundir import load_run_config, load_student, save_student


def test_student_parts_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    save_student(tmp_path, {"student": net, "normalizer": {"mean": torch.ones(3)}}, {"k": 4})
    state, meta = load_student(tmp_path, "student")
    assert meta == {"k": 4} and set(state) == {"weight", "bias"}
    torch.testing.assert_close(state["weight"], net.weight.detach())
    assert torch.equal(load_student(tmp_path, "normalizer")[0]["mean"], torch.ones(3))
    save_student(tmp_path, {"": net}, {})
    assert set(load_student(tmp_path)[0]) == {"weight", "bias"}


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="student.safetensors"):
        load_student(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run_config(tmp_path, dict)


def test_run_config_is_read_into_the_recipe_dataclass(tmp_path):
    @dataclass
    class Cfg:
        steps: int = 1

    (tmp_path / "config.json").write_text(json.dumps({"config": {"steps": 7}, "recipe": "x"}))
    cfg, resolved = load_run_config(tmp_path, Cfg)
    assert cfg == Cfg(steps=7) and resolved["recipe"] == "x"
