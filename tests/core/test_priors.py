from types import SimpleNamespace

import pytest
import torch

from fewstep.core import priors
from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import make_path


def _eps(monkeypatch, loaders):
    eps = [SimpleNamespace(name=k, load=lambda f=f: f) for k, f in loaders.items()]
    monkeypatch.setattr(priors, "entry_points", lambda group: eps if group == priors.GROUP else [])


def test_load_prior_calls_the_registered_loader_with_kwargs(monkeypatch):
    net = ModuleDenoiser(torch.nn.Identity(), make_path("rectified_flow"), "x0")
    seen = {}

    def loader(scale=1.0):
        seen["scale"] = scale
        return priors.Prior2D(denoiser=net, channels=3, size=4)

    _eps(monkeypatch, {"toy": loader})
    assert priors.prior_names() == ["toy"]
    assert priors.load_prior("toy", scale=3.0).size == 4 and seen["scale"] == 3.0


def test_unknown_prior_and_wrong_type_are_refused(monkeypatch):
    _eps(monkeypatch, {"toy": lambda: object()})
    with pytest.raises(KeyError, match="installed priors: toy"):
        priors.load_prior("nope")
    with pytest.raises(TypeError, match="not Prior2D"):
        priors.load_prior("toy")
