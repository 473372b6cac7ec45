"""HiPA (Zhang & Hooi 2023): high-pass operators, the adaptation loss, and a one-step LoRA
adaptation of a tiny image denoiser that restores the high frequencies one step loses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.core.models import Denoiser, ModuleDenoiser, trainable_copy
from fewstep.core.objectives.hipa import (
    HIGH_PASS,
    HiPA,
    HiPAConfig,
    hf_distance,
    high_pass,
    hipa_loss,
)
from fewstep.core.paths import make_path
from fewstep.core.pretrain import train_denoiser
from fewstep.core.training import TensorData, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

N = 16


def _grid():
    i = torch.arange(N, dtype=torch.float64)
    return i[:, None], i[None, :]


def _patterns() -> dict[str, torch.Tensor]:
    """(1, 1, N, N) test images."""
    y, x = _grid()
    ones = torch.ones(N, N, dtype=torch.float64)
    pats = {
        "constant": 3.0 * ones,
        # lowest non-constant DCT-II basis function and a linear ramp: smooth
        "smooth": torch.cos(math.pi * (x + 0.5) / N) * ones,
        "ramp": (x + 2 * y) / (3 * N) * ones,
        "checkerboard": (-1.0) ** (x + y),
        "stripes": torch.cos(math.pi * x / 2) * ones,  # period 4 (a quarter of the rate)
    }
    return {k: v.float()[None, None] for k, v in pats.items()}


def _energy_ratio(op: str, x: torch.Tensor) -> float:
    return (high_pass(op)(x, 0.25).pow(2).mean() / x.pow(2).mean()).item()


@pytest.mark.parametrize("op", sorted(HIGH_PASS))
def test_high_pass_removes_constants_and_low_frequencies(op):
    p = _patterns()
    assert high_pass(op)(p["constant"], 0.25).abs().max() < 1e-5
    smooth_tol = 0.02 if op == "sobel" else 1e-3  # a first derivative passes a slope
    assert _energy_ratio(op, p["smooth"]) < smooth_tol
    assert _energy_ratio(op, p["ramp"]) < smooth_tol
    # high frequencies pass: the Nyquist checkerboard for fft / laplacian; sobel's smoothed
    # central difference peaks at a quarter of the sampling rate
    hf = "stripes" if op == "sobel" else "checkerboard"
    assert _energy_ratio(op, p[hf]) > 0.4
    assert _energy_ratio(op, p[hf]) > 20 * _energy_ratio(op, p["smooth"])


def test_sobel_is_blind_to_the_checkerboard_so_the_default_adds_fft():
    cb = _patterns()["checkerboard"]
    assert high_pass("sobel")(cb, 0.25).abs().max() < 1e-5
    assert "fft" in HiPAConfig().high_pass


def test_operators_match_scipy_references():
    ndimage = pytest.importorskip("scipy.ndimage")
    sfft = pytest.importorskip("scipy.fft")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 12, generator=g, dtype=torch.float64)
    xn = x.numpy()
    # torch 'reflect' padding = scipy 'mirror'
    lap = high_pass("laplacian")(x, 0.0)
    assert lap.shape == (2, 3, 1, 9, 12)

    def per_plane(fn, **kw):
        return torch.tensor(np.array([[fn(p, mode="mirror", **kw) / 8 for p in b] for b in xn]))

    torch.testing.assert_close(lap[:, :, 0], per_plane(ndimage.laplace))
    sob = high_pass("sobel")(x, 0.0)
    torch.testing.assert_close(sob[:, :, 0], per_plane(ndimage.sobel, axis=1))
    torch.testing.assert_close(sob[:, :, 1], per_plane(ndimage.sobel, axis=0))
    # fft: a DCT-II high-pass (coefficient (ky, kx) has radial frequency |k / N| of Nyquist)
    cutoff = 0.3
    coef = sfft.dctn(xn, type=2, axes=(-2, -1), norm="ortho")
    ky = torch.arange(9, dtype=torch.float64)[:, None] / 9
    kx = torch.arange(12, dtype=torch.float64)[None, :] / 12
    keep = (torch.sqrt(ky**2 + kx**2) > cutoff).numpy()
    ref = sfft.idctn(coef * keep, type=2, axes=(-2, -1), norm="ortho")
    torch.testing.assert_close(high_pass("fft")(x, cutoff)[:, :, 0], torch.tensor(ref))


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur per plane (reflect padding)."""
    planes = x.reshape(-1, 1, *x.shape[-2:])
    k = torch.ones(1, 1, 3, 3) / 9
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(planes, (1,) * 4, mode="reflect"), k)
    return out.reshape(x.shape)


def _textured(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, N, N, generator=g)


def test_loss_is_zero_at_the_teacher_endpoint_and_the_hf_term_punishes_blur():
    target = _textured()
    blurred = _blur(target)
    total, spatial, hf = hipa_loss(target, target, hf_weight=1.0)
    assert total.abs().max() == 0 and hf.abs().max() == 0
    with_hf, spatial, hf = hipa_loss(blurred, target, hf_weight=1.0)
    without, spatial0, _ = hipa_loss(blurred, target, hf_weight=0.0)
    torch.testing.assert_close(spatial, spatial0)
    torch.testing.assert_close(without, spatial0)
    # the HF term adds to the loss of a blurred copy (fails if ignored or its sign flipped)
    assert (with_hf > without + 0.5 * hf).all() and (hf > 0.1 * spatial).all()
    torch.testing.assert_close(with_hf, spatial + hf)
    # and it grows with lambda_hf
    w3, _, _ = hipa_loss(blurred, target, hf_weight=3.0)
    torch.testing.assert_close(w3 - with_hf, 2 * hf)


def test_hf_term_ranks_blur_above_a_low_frequency_error_of_equal_size():
    """The point of the HF term: a blur (lost detail) costs more than a smooth shift of the
    same spatial error."""
    target = _textured(1)
    blurred = _blur(target)
    err = (blurred - target).pow(2).mean().sqrt()
    y, x = _grid()
    smooth = torch.cos(math.pi * (x + 0.5) / N).float() * torch.ones(N, N)
    shifted = target + err * smooth / smooth.pow(2).mean().sqrt()
    _, sp_b, hf_b = hipa_loss(blurred, target, 1.0, spatial_metric="l2")
    _, sp_s, hf_s = hipa_loss(shifted, target, 1.0, spatial_metric="l2")
    torch.testing.assert_close(sp_b.mean(), sp_s.mean(), rtol=1e-4, atol=0)
    assert hf_b.mean() > 10 * hf_s.mean()


# ---------------------------------------------------------------- the objective itself


class ConstantX0(Denoiser):
    """Predicts the fixed image ``x0`` whatever the input (its ODE ends at x0 in any number
    of steps, so its one-step sample equals its multi-step sample)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__(make_path("rectified_flow"), "x0")
        self.register_buffer("x0", x0)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x_t, t, cond=None):
        return self.scale * self.x0.expand(x_t.shape[0], *self.x0.shape)


def _batch(shape, size=4, seed=0):
    from fewstep.core.batch import Batch, StepRNG

    rng = StepRNG(seed, 0, 0, size, 0, size)
    return Batch(None, None, rng, extras={"sample_shape": shape})


def test_objective_loss_zero_for_the_teacher_endpoint_and_larger_for_a_blurred_student():
    x0 = _textured(2)[0]
    teacher = ConstantX0(x0)
    batch = _batch(tuple(x0.shape))
    for w in (0.0, 1.0):
        obj = HiPA(teacher, HiPAConfig(teacher_steps=4, hf_weight=w))
        roles = obj.build_roles(ConstantX0(x0), batch)
        loss, logs = obj.losses(roles, batch, ["student"], 0)
        assert loss["student"].item() == 0.0 and logs["hipa_hf"] == 0.0
    blurry = ConstantX0(_blur(x0[None])[0])
    got = {}
    for w in (0.0, 1.0):
        obj = HiPA(teacher, HiPAConfig(teacher_steps=4, hf_weight=w))
        got[w] = obj.losses({"student": blurry}, batch, ["student"], 0)[0]["student"]
    assert got[1.0] > got[0.0] > 0
    got[1.0].backward()
    assert blurry.scale.grad is not None and blurry.scale.grad.abs() > 0


class EndpointStudent(Denoiser):
    """A "student" whose one step is exactly the teacher's multi-step ODE endpoint from the
    same noise: it runs the teacher's sampler from the noise inside its input x_t = z."""

    def __init__(self, teacher: Denoiser, steps: int):
        super().__init__(teacher.path, "x0")
        self.teacher, self.steps = teacher, steps

    def forward(self, x_t, t, cond=None):
        from fewstep.core.samplers import EulerSampler

        z = x_t / self.path.sigma(t).reshape(-1, 1, 1, 1)  # x_t = sigma(t_max) z
        return EulerSampler(self.steps).sample(self.teacher, z, cond).x


def test_target_is_the_teacher_endpoint_from_the_students_own_noise():
    torch.manual_seed(0)
    teacher = ModuleDenoiser(TinyConvNet(8), make_path("rectified_flow"), "velocity")
    batch = _batch((1, 8, 8), size=3)
    obj = HiPA(teacher, HiPAConfig(teacher_steps=5))
    loss, logs = obj.losses({"student": EndpointStudent(teacher, 5)}, batch, ["student"], 0)
    assert loss["student"].item() < 1e-10 and logs["hipa_hf"] < 1e-10
    # the same student against a 2-step target (another endpoint) is not at zero
    obj2 = HiPA(teacher, HiPAConfig(teacher_steps=2))
    assert (
        obj2.losses({"student": EndpointStudent(teacher, 5)}, batch, ["student"], 0)[0][
            "student"
        ].item()
        > 1e-6
    )


def test_decode_hook_moves_the_loss_to_decoded_samples():
    x0 = _textured(3)[0]
    batch = _batch(tuple(x0.shape))
    obj = HiPA(ConstantX0(x0), HiPAConfig(teacher_steps=2))
    roles = {"student": ConstantX0(_blur(x0[None])[0])}
    plain = obj.losses(roles, batch, ["student"], 0)[0]["student"]
    calls = []

    def decode(x):  # a "decoder" that keeps only the mean colour: no high frequencies left
        calls.append(x.shape)
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).contiguous()

    obj.decode_fn = decode
    decoded = obj.losses(roles, batch, ["student"], 0)[0]["student"]
    assert len(calls) == 2 and decoded < 0.01 * plain  # blur keeps the mean
    obj.config.pixel_space = False
    torch.testing.assert_close(obj.losses(roles, batch, ["student"], 0)[0]["student"], plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"high_pass": ("fft", "wavelet")}, "unknown high-pass operator 'wavelet'.*laplacian"),
        ({"high_pass": ()}, "high_pass needs at least one"),
        ({"spatial_metric": "lpips"}, "spatial_metric must be one of"),
        ({"fft_cutoff": 0.0}, "fft_cutoff"),
        ({"hf_weight": -1.0}, "hf_weight"),
        ({"student_steps": 2}, "one-step"),
        ({"solver": "rk4"}, "solver must be one of"),
    ],
)
def test_bad_config_is_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiPA(ConstantX0(torch.zeros(1, 4, 4)), HiPAConfig(**kwargs))


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="unknown high-pass operator 'edge'; available"):
        high_pass("edge")
    with pytest.raises(ValueError, match=r"two spatial axes \(\.\.\., H, W\)"):
        high_pass("sobel")(torch.zeros(8, 1), 0.25)
    with pytest.raises(ValueError, match="differ"):
        hipa_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), 1.0)


# ------------------------------------------------- one-step LoRA adaptation that learns


class TinyConvNet(nn.Module):
    """``net(x, network_time, cond)`` on (B, 1, 8, 8) images: three 3x3 convolutions with an
    additive time embedding."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.inp = nn.Conv2d(1, width, 3, padding=1)
        self.time = nn.Linear(2, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 1, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x, t, cond=None):
        s = t.float()[:, None] * 1e-3  # rectified flow's network time is ~0..1000
        emb = self.time(torch.cat([s, (6 * s).sin()], 1))[:, :, None, None]
        h = self.act(self.inp(x) + emb)
        h = self.act(self.mid(h) + emb)
        return self.out(h)


def _textures(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 8, 8): a checkerboard of random sign and amplitude on a random smooth
    gradient: images whose detail is all at the highest frequency."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(8.0)
    cb = (-1.0) ** (i[:, None] + i[None, :])
    grad = (i[None, :] - 3.5) / 3.5 * torch.ones(8, 8)
    a = (0.5 + 0.3 * torch.rand(n, generator=g)) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1, 1
    )
    b = torch.rand(n, generator=g) * 1.2 - 0.6
    return (a[:, None, None] * cb + b[:, None, None] * grad)[:, None]


@pytest.fixture(scope="module")
def image_teacher():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures start before the single_thread one)
    torch.manual_seed(0)
    model = ModuleDenoiser(TinyConvNet(), make_path("rectified_flow"), "velocity")
    data = TensorData(_textures(2048))
    teacher, _ = train_denoiser(model, data, steps=300, batch_size=64, lr=2e-3, progress=False)
    torch.set_num_threads(threads)
    return teacher, data


def _hf_error(obj: HiPA, model: Denoiser, z: torch.Tensor) -> float:
    with torch.no_grad():
        one = obj.one_step(model, z, None)
        target = obj.teacher_endpoint(z, None)
        return hf_distance(one, target, ("fft",), "l2", 0.25).mean().item()


def test_one_step_lora_adaptation_restores_high_frequencies(image_teacher, tmp_path):
    teacher, data = image_teacher
    cfg = HiPAConfig(teacher_steps=8, hf_weight=1.0, lora_rank=4)
    obj = HiPA(teacher, cfg)
    z = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    target = obj.teacher_endpoint(z, None)
    # the teacher's 8-step samples carry the checkerboard; its one-step sample does not
    before = _hf_error(obj, teacher, z)
    hf_energy = high_pass("fft")(target, 0.25).pow(2).mean()
    one = obj.one_step(teacher, z, None).detach()
    assert hf_energy > 0.1 and high_pass("fft")(one, 0.25).pow(2).mean() < 0.9 * hf_energy
    assert before > 0.25 * hf_energy
    student = trainable_copy(teacher)
    train = TrainConfig(steps=60, batch_size=32, lr=1e-2, ema_decay=0.0, progress=False)
    trainer = Trainer(obj, student, data, train, tmp_path)
    trainer.fit()
    adapted = trainer.roles["student"]
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    # the base weights did not move: only the adapters learned
    base = {
        n.replace("base_layer.", ""): p for n, p in adapted.named_parameters() if "lora_" not in n
    }
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(base[n], p)
    after = _hf_error(obj, adapted, z)
    assert after < 0.6 * before, (before, after)  # measured 0.089 -> 0.040
