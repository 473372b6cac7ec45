"""Behavioural tests for fewstep.core.models (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.core.models import (
    GuidedDenoiser,
    ModuleDenoiser,
    frozen_copy,
    trainable_copy,
)
from fewstep.core.paths import PREDICTIONS, make_path


class Recorder(nn.Module):
    """A net that records what it is called with and returns a fixed function of it:
    out = w * x + time + cond (cond broadcast; 0 when None)."""

    def __init__(self, w: float = 0.5):
        super().__init__()
        self.w = w
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def forward(self, x, time, cond=None):
        self.calls.append((x.clone(), time.clone(), cond))
        out = self.w * x + time.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        if cond is not None:
            c = cond["c"] if isinstance(cond, dict) else cond
            out = out + c.reshape(c.shape[0], *([1] * (x.ndim - 1))).to(x)
        return out


def _x(b=3, seed=0):
    return torch.randn(b, 2, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name,t",
    [
        ("rectified_flow", [0.2, 0.5, 0.9]),
        ("vp", [0.1, 0.4, 0.8]),
        ("vp_discrete", [10.0, 500.0, 999.0]),
        ("edm", [0.05, 1.0, 20.0]),
        ("trigflow", [0.3, 0.8, 1.4]),
    ],
)
def test_module_denoiser_passes_network_time(name, t):
    path = make_path(name)
    net = Recorder()
    den = ModuleDenoiser(net, path, "eps")
    x, t = _x(), torch.tensor(t)
    out = den(x, t)
    (x_in, time_in, cond_in) = net.calls[-1]
    torch.testing.assert_close(x_in, x)
    torch.testing.assert_close(time_in, path.network_time(t))
    assert cond_in is None
    torch.testing.assert_close(out, net.w * x + path.network_time(t).reshape(-1, 1, 1))


def test_network_time_values_reach_the_net():
    net = Recorder()
    ModuleDenoiser(net, make_path("rectified_flow"), "velocity")(_x(), torch.tensor([0.25] * 3))
    torch.testing.assert_close(net.calls[-1][1], torch.full((3,), 250.0))
    ModuleDenoiser(net, make_path("edm"), "x0")(_x(), torch.tensor([math.e**4] * 3))
    torch.testing.assert_close(net.calls[-1][1], torch.ones(3))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_predict_is_convert_of_raw_output(prediction, kind):
    path = make_path("vp")
    den = ModuleDenoiser(Recorder(), path, prediction)
    x, t = _x(seed=1), torch.tensor([0.15, 0.5, 0.85])
    raw = den(x, t)
    want = path.convert(raw, prediction, kind, x, t)
    torch.testing.assert_close(den.predict(x, t, kind=kind), want)
    x0, eps = den.x0_eps(x, t)
    w_x0, w_eps = path.to_x0_eps(raw, prediction, x, t)
    torch.testing.assert_close(x0, w_x0)
    torch.testing.assert_close(eps, w_eps)


def test_default_predict_kind_is_x0():
    path = make_path("rectified_flow")
    den = ModuleDenoiser(Recorder(), path, "velocity")
    x, t = _x(), torch.tensor([0.3, 0.6, 0.9])
    torch.testing.assert_close(den.predict(x, t), path.convert(den(x, t), "velocity", "x0", x, t))


def test_scalar_t_broadcasts():
    path = make_path("rectified_flow")
    net = Recorder()
    den = ModuleDenoiser(net, path, "eps")
    x = _x()
    out_scalar = den(x, 0.4)
    assert net.calls[-1][1].shape == (3,)
    torch.testing.assert_close(net.calls[-1][1], torch.full((3,), 400.0))
    torch.testing.assert_close(out_scalar, den(x, torch.full((3,), 0.4)))
    torch.testing.assert_close(
        den.predict(x, 0.4, kind="v"), den.predict(x, torch.tensor(0.4), kind="v")
    )
    torch.testing.assert_close(
        den.predict(x, 0.4, kind="v"), den.predict(x, torch.full((3,), 0.4), kind="v")
    )


def test_precondition_scales_input_by_inverse_std():
    path = make_path("edm")
    net = Recorder()
    den = ModuleDenoiser(net, path, "x0", precondition=True, sigma_data=0.5)
    x, t = _x(), torch.tensor([0.1, 1.0, 10.0])
    den(x, t)
    c_in = 1.0 / torch.sqrt(0.25 + t**2)
    torch.testing.assert_close(net.calls[-1][0], x * c_in.reshape(-1, 1, 1))
    # without preconditioning the input is untouched
    ModuleDenoiser(net, path, "x0")(x, t)
    torch.testing.assert_close(net.calls[-1][0], x)


def test_condition_is_passed_through():
    net = Recorder()
    den = ModuleDenoiser(net, make_path("rectified_flow"), "velocity")
    c = torch.tensor([1.0, 2.0, 3.0])
    den(_x(), torch.full((3,), 0.5), c)
    assert net.calls[-1][2] is c


def test_features_with_and_without_feature_fn():
    path = make_path("edm")
    den = ModuleDenoiser(Recorder(), path, "x0")
    with pytest.raises(NotImplementedError, match="feature"):
        den.features(_x(), torch.ones(3))
    seen = {}

    def feature_fn(net, x, time, cond):
        seen.update(x=x, time=time, cond=cond)
        return x.mean(dim=-1)

    den = ModuleDenoiser(Recorder(), path, "x0", precondition=True, feature_fn=feature_fn)
    x, t = _x(), torch.tensor([0.5, 1.0, 2.0])
    f = den.features(x, t, "c")
    assert f.shape == (3, 2)
    torch.testing.assert_close(seen["time"], path.network_time(t))
    torch.testing.assert_close(seen["x"], x / torch.sqrt(1 + t**2).reshape(-1, 1, 1))
    assert seen["cond"] == "c"


def test_unknown_prediction_raises():
    with pytest.raises(ValueError, match="velocity"):
        ModuleDenoiser(Recorder(), make_path("edm"), "epsilon")


def test_frozen_and_trainable_copies():
    net = nn.Linear(2, 2)
    f = frozen_copy(net)
    assert not f.training and not any(p.requires_grad for p in f.parameters())
    assert f.weight is not net.weight
    torch.testing.assert_close(f.weight, net.weight)
    net.requires_grad_(False)
    tr = trainable_copy(net)
    assert tr.training and all(p.requires_grad for p in tr.parameters())


# --- classifier-free guidance ------------------------------------------------------------


def _null(cond):
    return torch.zeros_like(cond)


def _guided_setup(scale, prediction="eps", path_name="vp"):
    net = Recorder(w=0.5)
    base = ModuleDenoiser(net, make_path(path_name), prediction)
    return net, base, GuidedDenoiser(base, scale, _null)


def test_guidance_scale_one_is_conditional_and_single_eval():
    net, base, guided = _guided_setup(1.0)
    x, t, c = _x(), torch.tensor([0.2, 0.5, 0.7]), torch.tensor([1.0, -2.0, 3.0])
    assert guided.evals_per_call == 1
    out = guided(x, t, c)
    assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 3  # one un-doubled call
    torch.testing.assert_close(out, base(x, t, c))


def test_guidance_fixed_scale_by_hand():
    net, base, guided = _guided_setup(3.5)
    assert guided.evals_per_call == 2
    x, t, c = _x(), torch.tensor([0.2, 0.5, 0.7]), torch.tensor([1.0, -2.0, 3.0])
    cond = base(x, t, c)
    uncond = base(x, t, torch.zeros(3))
    net.calls.clear()
    out = guided(x, t, c)
    assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 6  # one batched call
    torch.testing.assert_close(out, uncond + 3.5 * (cond - uncond))
    # with this net cond - uncond = c, so the guided output is distinguishable from w=1
    torch.testing.assert_close(out - uncond, 3.5 * c.reshape(-1, 1, 1).expand_as(out))


def test_guidance_random_scale_per_sample():
    net, base, guided = _guided_setup((2.0, 6.0))
    assert guided.evals_per_call == 2
    guided.generator = torch.Generator().manual_seed(0)
    b = 64
    x = torch.randn(b, 2, 4, generator=torch.Generator().manual_seed(1))
    t, c = torch.full((b,), 0.5), torch.ones(b)
    out = guided(x, t, c)
    uncond = base(x, t, torch.zeros(b))
    w = out - uncond  # = w_i * (cond - uncond) = w_i * 1
    assert torch.allclose(w, w[:, :1, :1].expand_as(w), atol=1e-5)  # one scale per sample
    w = w[:, 0, 0]
    assert float(w.min()) >= 2.0 - 1e-5 and float(w.max()) <= 6.0 + 1e-5
    assert float(w.std()) > 0.5  # spread over the range, not a constant
    assert float(w.min()) < 3.0 and float(w.max()) > 5.0
    # reproducible through the generator
    guided.generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(guided(x, t, c), out)


def test_negative_condition_replaces_null():
    net = Recorder()
    base = ModuleDenoiser(net, make_path("rectified_flow"), "velocity")

    def no_null(cond):
        raise AssertionError("null_cond must not be used when a negative is given")

    neg = torch.tensor([5.0, 5.0, 5.0])
    guided = GuidedDenoiser(base, 2.0, no_null, negative=neg)
    x, t, c = _x(), torch.tensor([0.2, 0.5, 0.7]), torch.tensor([1.0, -2.0, 3.0])
    out = guided(x, t, c)
    cond, negp = base(x, t, c), base(x, t, neg)
    torch.testing.assert_close(out, negp + 2.0 * (cond - negp))
    assert guided.evals_per_call == 2


def test_guidance_with_dict_conditions():
    net = Recorder()
    base = ModuleDenoiser(net, make_path("rectified_flow"), "velocity")
    guided = GuidedDenoiser(base, 4.0, lambda d: {"c": torch.zeros_like(d["c"])})
    x, t = _x(), torch.tensor([0.2, 0.5, 0.7])
    c = {"c": torch.tensor([1.0, -2.0, 3.0])}
    cond, uncond = base(x, t, c), base(x, t, {"c": torch.zeros(3)})
    torch.testing.assert_close(guided(x, t, c), uncond + 4.0 * (cond - uncond))


def test_guidance_commutes_with_conversion():
    """Guiding eps and converting to x0 equals converting both branches and guiding."""
    for path_name in ("vp", "edm", "rectified_flow"):
        _, base, guided = _guided_setup(4.0, prediction="eps", path_name=path_name)
        path = base.path
        t = path.fraction_to_t(torch.tensor([0.2, 0.5, 0.8]))
        x, c = _x(seed=5), torch.tensor([1.0, -2.0, 3.0])
        for kind in ("x0", "v", "velocity", "score"):
            got = guided.predict(x, t, c, kind=kind)
            cond = path.convert(base(x, t, c), "eps", kind, x, t)
            uncond = path.convert(base(x, t, torch.zeros(3)), "eps", kind, x, t)
            torch.testing.assert_close(got, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
