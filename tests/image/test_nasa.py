"""SNOOPI's Negative-Away Steer Attention: parity with a plain two-attention computation, the
stock layer at alpha = 0, cross-attention only, and its effect on a one-step pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.image import nasa as N

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def unet():
    """A bare tiny SD-style UNet (two cross-attention transformer blocks' worth of layers)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip


def _layer(seed: int = 0):
    """A diffusers cross-attention layer: 16-wide queries, 8-wide context, 2 heads of 4."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=4, out_bias=True)


def _plain(layer, x, context):
    """softmax(Q K^T / sqrt(d)) V per head, heads concatenated: (B, N, 8)."""
    q, k, v = layer.to_q(x), layer.to_k(context), layer.to_v(context)
    out = []
    for h in range(layer.heads):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1)
        out.append(w @ v[..., s])
    return torch.cat(out, dim=-1)


def _nasa_layer(alpha, negative, seed=0):
    from diffusers.models.attention_processor import AttnProcessor2_0

    layer = _layer(seed)
    state = N.NasaState(alpha=alpha, negative=negative)
    layer.set_processor(N.NasaAttnProcessor(state, AttnProcessor2_0()))
    return layer


def test_processor_matches_a_plain_recomputation_of_both_attentions():
    g = torch.Generator().manual_seed(1)
    x, pos, neg = (torch.randn(2, n, d, generator=g) for n, d in ((6, 16), (5, 8), (3, 8)))
    layer = _nasa_layer(0.7, neg)
    with torch.no_grad():
        got = layer(x, encoder_hidden_states=pos)
        want = layer.to_out[0](_plain(layer, x, pos) - 0.7 * _plain(layer, x, neg))
        # one negative prompt for the whole batch broadcasts
        layer.processor.state.negative = neg[:1]
        one = layer(x, encoder_hidden_states=pos)
        want_one = layer.to_out[0](
            _plain(layer, x, pos) - 0.7 * _plain(layer, x, neg[:1].expand(2, 3, 8))
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, want_one, rtol=1e-5, atol=1e-6)
    layer.processor.state.negative = neg.repeat(2, 1, 1)  # 4 negatives for a batch of 2
    with pytest.raises(ValueError, match="expected 1 or the layer's batch 2"):
        layer(x, encoder_hidden_states=pos)


def test_identical_prompts_at_alpha_one_cancel_the_attention():
    """Z+ - Z- = 0: the layer returns its output projection of zero features (its bias)."""
    g = torch.Generator().manual_seed(2)
    x, pos = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 8, generator=g)
    layer = _nasa_layer(1.0, pos.clone())
    with torch.no_grad():
        out = layer(x, encoder_hidden_states=pos)
        assert layer.to_out[0].bias.abs().max() > 0
        torch.testing.assert_close(out, layer.to_out[0].bias.expand_as(out), rtol=0, atol=1e-6)
        layer.processor.state.negative = torch.randn(2, 5, 8, generator=g)
        assert (layer(x, encoder_hidden_states=pos) - out).abs().max() > 1e-3


def test_alpha_zero_is_the_stock_unet_bit_for_bit_and_remove_restores(unet):
    before = dict(unet.attn_processors)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 500])
    cond, neg = torch.randn(2, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        stock = unet(x, t, cond).sample
        with N.nasa_attention(unet, neg, 0.0) as handle:
            off = unet(x, t, cond).sample
            handle.state.alpha = 0.5
            on = unet(x, t, cond).sample
    assert torch.equal(off, stock)
    assert (on - stock).abs().max() > 1e-4
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)  # the same processor objects back


def test_only_cross_attention_layers_are_replaced(unet):
    before = dict(unet.attn_processors)
    handle = N.install_nasa(unet, 0.5, torch.zeros(1, 16, 32))
    try:
        now = unet.attn_processors
        cross = {k for k, p in now.items() if isinstance(p, N.NasaAttnProcessor)}
        assert cross and cross == {k for k in now if k.endswith("attn2.processor")}
        assert all(now[k] is before[k] for k in now if k not in cross)  # self-attention kept
        assert all(now[k].base is before[k] for k in cross)
    finally:
        handle.remove()


def test_one_step_sample_changes_with_alpha_and_the_negative_prompt(tmp_path):
    from fewstep.image.tiny import sd_pipeline

    pipe = sd_pipeline(tmp_path / "sd")
    pipe.set_progress_bar_config(disable=True)

    def one_step(neg, alpha):
        return N.sample_with_nasa(pipe, PROMPTS, neg, alpha, steps=1, seed=4, output_type="latent")

    g = torch.Generator().manual_seed(4)
    stock = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, generator=g,
                 output_type="latent").images  # fmt: skip
    assert torch.equal(one_step("blurry", 0.0), stock)
    a, b, c = one_step("blurry", 0.5), one_step("blurry", 1.0), one_step("a dog", 0.5)
    for other in (b, c, stock):
        assert (a - other).abs().max() > 1e-4
    # alpha scales the steering: half-way between alpha 0 and 1 is close to linear for a
    # tiny step, and the difference to the stock sample grows with alpha
    assert (b - stock).abs().mean() > (a - stock).abs().mean()
    assert not any(isinstance(p, N.NasaAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_joint_attention_transformers_are_refused():
    from diffusers import SD3Transformer2DModel

    net = SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="no separate cross-attention"):
        N.install_nasa(net, 0.5)
    with pytest.raises(TypeError, match="no diffusers attention processors"):
        N.install_nasa(torch.nn.Linear(2, 2), 0.5)
