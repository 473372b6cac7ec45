"""TriplaneTurbo's generator: PETA adapters start as the identity, only adapters train, the
cross-plane attention mixes planes, progressive generation re-noises each step's x0 and
depends on the class, and every progressive step is rendered and scored (PRD)."""

from __future__ import annotations

import pytest
import torch

from fewstep.threed.distill3d import CameraConfig, Distill3DConfig
from fewstep.threed.prior import PriorAdapter
from fewstep.threed.score.sds import SDSConfig
from fewstep.threed.triplane import TriplaneConfig
from fewstep.threed.triplane_turbo import (
    NOISE_ADDITION,
    AdapterConfig,
    GeneratorConfig,
    TriplaneGenerator,
    TurboTrainConfig,
    generate,
    prd_step,
    progressive_fractions,
    progressive_steps,
    score_methods,
    train_generator,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = TriplaneConfig(channels=4, resolution=8, hidden=16)


def _gen(prior, steps: int = 3, **kw) -> TriplaneGenerator:
    cfg = GeneratorConfig(steps=steps, triplane=TINY, decoder_width=8, **kw)
    return TriplaneGenerator(prior.denoiser, (1, 8, 8), cfg)


def _tiny_unet_prior():
    """A 3-class diffusers UNet2DModel (class embedding, mid-block attention) on 8x8."""
    diffusers = pytest.importorskip("diffusers")
    from fewstep.core.models import DiffusersUNetDenoiser
    from fewstep.core.paths import RectifiedFlow
    from fewstep.core.priors import Prior2D

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3,
        attention_head_dim=8,
    )  # fmt: skip
    with torch.no_grad():  # non-trivial weights everywhere (diffusers zero-inits some)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    den = DiffusersUNetDenoiser(unet, RectifiedFlow(), "velocity").eval().requires_grad_(False)
    return Prior2D(den, channels=1, size=8, num_classes=2, null_cond=lambda c: c * 0 + 2)


def _inputs(n_obj: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_obj * 3, 1, 8, 8, generator=g)
    t = torch.full((n_obj * 3,), 600.0)
    c = torch.tensor([0, 1]).repeat_interleave(3)[: n_obj * 3]
    return x, t, c


# ---------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("train", [False, True])
def test_adapted_unet_equals_the_base_at_init(train):
    prior = _tiny_unet_prior()
    gen = _gen(prior)
    gen.train(train)
    x, t, c = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(gen.denoiser(x, t, c), prior.denoiser(x, t, c),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    kinds = {type(m).__name__ for m in gen.denoiser.modules()}
    assert {"CrossPlaneAttention", "PlaneConditionBias"} <= kinds  # the PETA pieces are in
    assert any("lora_" in n for n, _ in gen.denoiser.named_parameters())


def test_generic_network_gets_lora_and_an_input_bias(score_mixed_prior):
    gen = _gen(score_mixed_prior)
    assert gen.input_bias is not None  # no class embedding to bias
    x = torch.randn(1, 3, 1, 8, 8)
    t, lab = torch.tensor([0.5]), torch.tensor([1])
    x0, _ = gen.denoise(x, t, lab)
    base_x0 = score_mixed_prior.denoiser.predict(x[0], t.expand(3), lab.expand(3), "x0")
    torch.testing.assert_close(x0[0], base_x0)


def test_only_adapters_train_and_the_base_stays_frozen():
    prior = _tiny_unet_prior()
    gen = _gen(prior)
    base = {k: v.clone() for k, v in prior.denoiser.state_dict().items()}
    trainable = {n for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n or n.endswith(".gate") or n.endswith("class_embedding.bias") for n in trainable
    ), trainable
    opt = torch.optim.SGD(gen.adapter_parameters(), lr=0.1)
    x, t, c = _inputs()
    gen.train()
    gen.denoiser(x, t, c).pow(2).sum().backward()
    opt.step()
    frozen = {n: p for n, p in gen.denoiser.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(base)
    for k, v in prior.denoiser.state_dict().items():
        torch.testing.assert_close(v, base[k])  # the prior itself is untouched


def test_cross_plane_attention_mixes_planes_only_when_its_gate_opens():
    prior = _tiny_unet_prior()
    gen = _gen(prior).eval()
    x, t, c = _inputs(n_obj=1)
    x2 = x.clone()
    x2[2] += 1.0  # change plane 2 (yz) of the object only

    def plane0(inp):
        with torch.no_grad():
            return gen.denoiser(inp, t, c)[0]

    torch.testing.assert_close(plane0(x), plane0(x2))  # gate 0: planes independent
    gates = [m.gate for m in gen.denoiser.modules() if type(m).__name__ == "CrossPlaneAttention"]
    assert gates
    with torch.no_grad():
        for g in gates:
            g.fill_(0.5)
    assert (plane0(x) - plane0(x2)).abs().max() > 1e-4  # now plane 0 sees plane 2


def test_plane_bias_distinguishes_planes():
    prior = _tiny_unet_prior()
    gen = _gen(prior).eval()
    x, t, c = _inputs(n_obj=1)
    x = x[:1].expand(3, -1, -1, -1).contiguous()  # the same image in all three planes
    with torch.no_grad():
        out = gen.denoiser(x, t, c)
        torch.testing.assert_close(out[0], out[1])
        mod = next(m for m in gen.denoiser.modules() if type(m).__name__ == "PlaneConditionBias")
        mod.bias[1].fill_(0.3)
        out = gen.denoiser(x, t, c)
    assert (out[0] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(out[0], out[2])


def test_bad_configs_raise():
    prior = _tiny_unet_prior()
    with pytest.raises(ValueError, match="noise_addition"):
        _gen(prior, noise_addition="brownian")
    with pytest.raises(ValueError, match="rank"):
        _gen(prior, adapter=AdapterConfig(rank=0))
    with pytest.raises(ValueError, match=">= 1 progressive step"):
        _gen(prior, steps=0)
    gen = _gen(prior)
    with pytest.raises(ValueError, match="triplane latents must be"):
        gen.denoise(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2).long())


# --------------------------------------------------------------------- progressive steps


def test_progressive_fractions():
    assert progressive_fractions(4) == [1.0, 0.75, 0.5, 0.25]
    g = torch.Generator().manual_seed(0)
    f = progressive_fractions(4, jitter=True, generator=g)
    for k, v in enumerate(f):
        assert (3 - k) / 4 <= v <= (4 - k) / 4
    assert set(NOISE_ADDITION) == {"gaussian", "pred", "zero"}


def test_each_step_renoises_the_previous_x0_with_fresh_noise(score_mixed_prior):
    """Rectified flow: x_t = (1 - t) x0 + t eps. Step k's input must be the previous step's
    x0 re-noised to t_k with the next fresh draw (not the previous x_t, not x0 itself)."""
    gen = _gen(score_mixed_prior, steps=3)
    labels = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, *gen.latent_shape, generator=g)
    draws = []

    def draw(like):
        draws.append(torch.randn(like.shape, generator=g))
        return draws[-1]

    fr = progressive_fractions(3)
    with torch.no_grad():
        steps = list(progressive_steps(gen, labels, fr, noise, draw))
    torch.testing.assert_close(steps[0].x_t, noise)  # t_1 = 1: pure noise
    assert len(draws) == 2
    for k in (1, 2):
        t = fr[k]
        expect = (1 - t) * steps[k - 1].x0 + t * draws[k - 1]
        torch.testing.assert_close(steps[k].x_t, expect)
        assert not steps[k].x_t.requires_grad
    # the re-noising changes the result: the x_t-dependent prior gives another x0
    assert (steps[2].x0 - steps[1].x0).abs().max() > 1e-3


def test_generate_runs_the_renoised_chain(score_mixed_prior):
    """``generate`` with K = 2, written out: x0_1 = D(noise at t=1); x_{1/2} = x0_1 / 2 +
    e / 2 with the generator's next draw e; the triplane decodes D(x_{1/2})."""
    gen = _gen(score_mixed_prior, steps=2).eval()
    labels = torch.tensor([0, 1])
    got = generate(gen, labels, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, *gen.latent_shape, generator=g)
    with torch.no_grad():
        x0, _ = gen.denoise(noise, torch.ones(2), labels)
        e = torch.randn(noise.shape, generator=g)
        x0, _ = gen.denoise(0.5 * x0 + 0.5 * e, torch.full((2,), 0.5), labels)
        torch.testing.assert_close(got, gen.decode(x0))
        one_step = gen.decode(gen.denoise(noise, torch.ones(2), labels)[0])
    assert (got - one_step).abs().max() > 1e-3  # the second step matters


def test_generation_depends_on_the_class_and_is_seeded(score_mixed_prior):
    gen = _gen(score_mixed_prior, steps=2).eval()

    def planes(labels, seed):
        return generate(gen, torch.tensor(labels), generator=torch.Generator().manual_seed(seed))

    a, b = planes([0, 0], 1), planes([1, 1], 1)
    assert a.shape == (2, 3, TINY.channels, TINY.resolution, TINY.resolution)
    assert (a - b).abs().amax() > 1e-3  # the class reaches the triplane
    torch.testing.assert_close(planes([0, 1], 1), torch.stack([a[0], b[1]]))  # seeded, per row


# ------------------------------------------------------------------------------ training


def _render_cfg():
    return Distill3DConfig(cameras=CameraConfig(views=2, size=8), field_samples=8)


def test_every_progressive_step_is_rendered_scored_and_backpropagated(score_mixed_prior):
    gen = _gen(score_mixed_prior, steps=3)
    adapter = PriorAdapter(score_mixed_prior)
    calls = []

    class Recording:
        def __init__(self, inner):
            self.inner, self.adapter = inner, inner.adapter

        def loss(self, x, cond, *args, **kwargs):
            calls.append((x.shape, cond.clone(), x.requires_grad))
            return self.inner.loss(x, cond, *args, **kwargs)

    scores = [Recording(s) for s in score_methods(adapter, SDSConfig(guidance_scale=2), 3,
                                                  False, 0)]  # fmt: skip
    labels = torch.tensor([1, 0])
    cfg = TurboTrainConfig(objects=2, field_samples=8)
    logs = prd_step(gen, scores, labels, 0, 10, cfg, _render_cfg(),
                    torch.Generator().manual_seed(0))  # fmt: skip
    assert len(calls) == 3  # one score per progressive step
    for shape, cond, grad in calls:
        assert shape == (4, 1, 8, 8) and grad  # 2 objects x 2 views, with a graph
        assert cond.tolist() == [1, 1, 0, 0]  # each object's views carry its label
    assert all(f"grad_norm_{k}" in logs for k in range(3))
    assert all(p.grad is not None for p in gen.decoder_parameters())
    # LoRA's B starts at 0, so the gradient first reaches B (A's is B^T-scaled: zero)
    lora_b = [p for n, p in gen.denoiser.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_per_step_guidance_times_cover_the_parts(score_target_prior):
    adapter = PriorAdapter(score_target_prior)
    methods = score_methods(adapter, SDSConfig(), 4, True, 0)
    ranges = [(m.config.schedule.t_min, m.config.schedule.t_max) for m in methods]
    assert ranges == [(0.75, 0.98), (0.5, 0.75), (0.25, 0.5), (0.02, 0.25)]


def test_training_moves_renders_toward_the_class(score_target_prior):
    """A few PRD steps on the analytic prior (class 0: a vertical bar): the prior-space
    renders of class 0 get closer to its target (the SDS direction reaches the generator)."""
    from fewstep.threed.distill3d import turntable

    gen = _gen(score_target_prior, steps=2)
    adapter = PriorAdapter(score_target_prior)
    target = score_target_prior.denoiser.net.targets[0]

    def distance() -> float:
        planes = generate(gen.eval(), torch.tensor([0]), generator=torch.Generator().manual_seed(0))
        x = adapter.to_prior(turntable(gen.field(planes[0]), 4, _render_cfg()))
        return (x - target).pow(2).mean().item()

    before = distance()
    cfg = TurboTrainConfig(train_steps=25, objects=1, lr_adapter=1e-2, lr_decoder=1e-2,
                           field_samples=8)  # fmt: skip
    train_generator(gen, adapter, SDSConfig(guidance_scale=1), cfg, _render_cfg(), 1)
    assert distance() < 0.7 * before
