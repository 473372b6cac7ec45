"""The fewstep command and typed config overrides."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from fewstep.core import cli
from fewstep.core.config import apply_overrides, from_dict, parse_overrides, to_dict, valid_keys
from fewstep.core.training import TrainConfig


@dataclass
class Inner:
    steps: int = 10  # steps
    betas: tuple[float, float] = (0.9, 0.99)  # betas


@dataclass
class Outer:
    name: str = "a"  # a name
    scale: float = 1.0  # a scale
    flag: bool = False  # a flag
    mode: Literal["x", "y"] = "x"  # a choice
    maybe: int | None = None  # optional
    times: tuple[float, ...] = ()  # variable tuple
    inner: Inner = field(default_factory=Inner)  # nested


def test_parse_overrides_forms():
    got = parse_overrides(["--a", "1", "--b-c=x", "--flag", "--inner.steps", "5"])
    assert got == {"a": "1", "b_c": "x", "flag": "true", "inner.steps": "5"}
    with pytest.raises(ValueError, match="expected --key value"):
        parse_overrides(["oops"])


def test_apply_overrides_converts_by_annotation():
    cfg = apply_overrides(
        Outer(),
        {
            "scale": "2.5",
            "flag": "true",
            "mode": "y",
            "maybe": "3",
            "times": "1.0,0.5",
            "inner.steps": "7",
            "inner.betas": "0.5,0.6",
        },
    )
    assert cfg.scale == 2.5 and cfg.flag is True and cfg.mode == "y" and cfg.maybe == 3
    assert cfg.times == (1.0, 0.5) and cfg.inner.steps == 7 and cfg.inner.betas == (0.5, 0.6)
    assert Outer().inner.steps == 10  # defaults untouched
    assert apply_overrides(Outer(), {"maybe": "none"}).maybe is None
    for text in ("[0.0, 0.5]", "(0.0, 0.5)"):  # bracketed like JSON or Python
        assert apply_overrides(Outer(), {"inner.betas": text}).inner.betas == (0.0, 0.5)


def test_bad_values_and_unknown_keys_are_clear():
    with pytest.raises(KeyError, match="--inner.steps"):  # lists valid keys
        apply_overrides(Outer(), {"stepz": "1"})
    with pytest.raises(ValueError, match="not one of"):
        apply_overrides(Outer(), {"mode": "z"})
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(Outer(), {"inner.steps": "ten"})
    with pytest.raises(ValueError, match="true/false"):
        apply_overrides(Outer(), {"flag": "maybe"})


def test_round_trip_through_json():
    cfg = apply_overrides(Outer(), {"times": "1,0.25", "inner.steps": "3"})
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert "inner.betas" in valid_keys(Outer)


def test_train_config_dict_field():
    cfg = apply_overrides(TrainConfig(), {"role_lr": '{"fake_score": 0.001}'})
    assert cfg.role_lr == {"fake_score": 0.001}


def test_list_prints_objectives(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "objectives:" in out and "dmd2" in out and "consistency" in out


def test_recipe_config_defaults_apply_per_objective_and_yield_to_the_user():
    @dataclass
    class Cfg:
        objective: str = "dmd2"  # objective
        train: TrainConfig = field(default_factory=TrainConfig)  # loop

    class Recipe:
        config_cls = Cfg

        def objective_defaults(self, objective):
            return {}

        def config_defaults(self, objective):
            return {"dmd2": {"train.betas": "0,0.99", "train.lr": "3e-4"}}.get(objective, {})

    cfg, _ = cli.resolve(Recipe(), {})
    assert cfg.train.betas == (0.0, 0.99) and cfg.train.lr == 3e-4
    cfg, _ = cli.resolve(Recipe(), {"train.lr": "1e-3"})
    assert cfg.train.betas == (0.0, 0.99) and cfg.train.lr == 1e-3
    cfg, _ = cli.resolve(Recipe(), {"objective": "consistency"})
    assert cfg.train.betas == TrainConfig().betas and cfg.train.lr == TrainConfig().lr


def test_recipe_without_objective_field_gets_no_objective_config():
    @dataclass
    class Cfg:
        ipc: int = 10  # a dataset-distillation knob: the method is the recipe
        train: TrainConfig = field(default_factory=TrainConfig)  # loop

    class Recipe:
        config_cls = Cfg

    cfg, obj = cli.resolve(Recipe(), {"ipc": "50"})
    assert cfg.ipc == 50 and obj is None
    with pytest.raises(KeyError, match="ipc"):
        cli.resolve(Recipe(), {"objective": "dmd2"})


def test_unknown_recipe_is_an_error_listing_valid(capsys):
    assert cli.main(["distill", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'no-such-recipe'" in err and "installed recipes" in err


def test_unknown_objective_lists_valid():
    from fewstep.core.objectives import get_objective

    with pytest.raises(KeyError, match=r"available: .*consistency, .*dmd2, "):
        get_objective("nope")


def test_help_is_fast_and_lazy():
    code = (
        "import sys; from fewstep.core import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'fewstep --help imported torch'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "distill" in r.stdout
