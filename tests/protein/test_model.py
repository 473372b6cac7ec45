"""The CA-backbone transformer and its denoiser: shapes, masking, centre of mass, rotation
sensitivity, Proteina's time density, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.protein.model import (
    BackboneDenoiser,
    BackboneTransformer,
    BackboneTransformerConfig,
    ProteinaFlow,
    build_denoiser,
    centre,
)
from fewstep.protein.teacher import random_rotations

TINY = BackboneTransformerConfig(dim=16, pair_dim=8, heads=2, layers=2, cond_dim=16, rbf_bins=8)
# with the pair-value attention and the EGNN coordinate head
FULL = BackboneTransformerConfig(
    dim=16, pair_dim=8, heads=2, layers=2, cond_dim=16, rbf_bins=8, pair_values=True,
    coord_head=True,
)  # fmt: skip


def test_output_shape_and_velocity_parameterisation():
    d = build_denoiser(TINY)
    assert d.prediction == "velocity" and d.path.name == "rectified_flow"
    x, t = torch.randn(3, 10, 3), torch.rand(3) * 0.9 + 0.05
    v = d(x, t)
    assert v.shape == (3, 10, 3) and torch.isfinite(v).all()
    # core's conversion: x0 = x_t - t v on rectified flow (t = 0 is data)
    x0 = d.predict(x, t, kind="x0")
    torch.testing.assert_close(x0, x - t.view(-1, 1, 1) * v)


def test_x0_predictions_are_centred_whatever_the_noise():
    """Un-centred input (core's SiD noises with un-centred eps): x0 is still centred, and the
    centre-of-mass velocity is the exact mean(x_t) / t."""
    d = build_denoiser(TINY)
    x0 = centre(torch.randn(4, 12, 3))
    eps = torch.randn(4, 12, 3)  # not centred
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    x_t = d.path.noise(x0, t, eps)
    x0_hat = d.predict(x_t, t, kind="x0")
    assert x0_hat.mean(dim=1).abs().max() < 1e-5
    v = d(x_t, t)
    torch.testing.assert_close(v.mean(1), eps.mean(1) - x0.mean(1), atol=1e-5, rtol=1e-4)


def test_input_translation_only_moves_the_centre():
    """The network sees centred coordinates: translating x_t changes only the COM velocity."""
    d = build_denoiser(TINY)
    x, t = torch.randn(2, 9, 3), torch.tensor([0.3, 0.6])
    shift = torch.tensor([1.0, -2.0, 0.5])
    a, b = d(x, t), d(x + shift, t)
    torch.testing.assert_close(centre(a), centre(b), atol=1e-5, rtol=1e-5)


def test_model_is_rotation_sensitive():
    """Not equivariant by construction (as Proteina): rotating the input does not rotate the
    output, which is why training augments with random rotations."""
    d = build_denoiser(TINY)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))  # leave the zero-initialised gates
    x, t = centre(torch.randn(1, 10, 3)), torch.tensor([0.5])
    rot = random_rotations(torch.tensor([[0.3, 0.8, -0.2, 0.5]]))[0]
    rotated_out = d(x @ rot.T, t)
    assert not torch.allclose(rotated_out, d(x, t) @ rot.T, atol=1e-3)


@pytest.mark.parametrize("cfg", [TINY, FULL], ids=["base", "pair_values+coord_head"])
def test_padding_mask_ignores_padded_residues(cfg):
    d = build_denoiser(cfg)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(1, 8, 3), torch.tensor([0.4])
    mask = torch.tensor([[True] * 6 + [False] * 2])
    padded = x.clone()
    padded[:, 6:] = 100.0  # garbage in padding
    full = d(x[:, :6], t)
    masked = d(padded, t, mask)
    torch.testing.assert_close(masked[:, :6], full, atol=1e-5, rtol=1e-4)
    assert (masked[:, 6:] == 0).all()


def test_proteina_time_density():
    """2 % uniform, else 1 - t ~ Beta(1.9, 1): E[1 - t] = 0.98 * 1.9 / 2.9 + 0.02 * 0.5."""
    path = ProteinaFlow()
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    t = path.sample_t(len(u), u)
    assert t.min() >= path.t_floor and t.max() <= 1.0
    expected = 0.98 * 1.9 / 2.9 + 0.02 * 0.5
    assert abs((1 - t).mean().item() - expected) < 3e-3
    # Beta(1.9, 1) CDF of t_P is t_P^1.9: P(t_P < 0.5) = 0.5^1.9 (+ the uniform share)
    p = ((1 - t) < 0.5).float().mean().item()
    assert abs(p - (0.98 * 0.5**1.9 + 0.02 * 0.5)) < 5e-3


def test_bad_shapes_are_named():
    d = build_denoiser(TINY)
    with pytest.raises(ValueError, match=r"\(B, L, 3\)"):
        d(torch.randn(2, 10), torch.rand(2))
    with pytest.raises(ValueError, match="mask must have shape"):
        d(torch.randn(2, 10, 3), torch.rand(2), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        BackboneTransformer(BackboneTransformerConfig(dim=10, heads=4))


def test_same_seed_same_weights():
    a, b = build_denoiser(TINY, seed=3), build_denoiser(TINY, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert isinstance(a, BackboneDenoiser)
    assert math.isfinite(sum(p.sum().item() for p in a.parameters()))


def test_pair_values_average_the_pair_rep_with_the_attention_weights():
    """With q = k = 0 the attention is uniform, so the pair term is the mean over j of z_ij;
    with it, the output also depends on the pair rep through the values, not only the bias."""
    from fewstep.protein.model import PairBiasAttention

    torch.manual_seed(0)
    att = PairBiasAttention(8, 2, pair_dim=4)
    with torch.no_grad():
        att.qkv.weight[:16].zero_()  # q and k rows
        att.qkv.bias[:16].zero_()
    x, pair = torch.randn(1, 5, 8), torch.randn(1, 5, 5, 4)
    bias = torch.zeros(1, 2, 5, 5)
    y = att(x, bias, None, pair)
    v = att.qkv(x)[..., 16:].mean(1, keepdim=True)  # uniform average of the values
    expected = att.out(v) + att.pair_out(pair.mean(2).repeat(1, 1, 2))
    torch.testing.assert_close(y, expected.expand_as(y), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(att(x, bias, None, pair + 1.0), y)


def test_coord_head_is_rotation_equivariant_and_starts_off():
    """For fixed tokens and an invariant pair rep, rotating x rotates the head's output (EGNN
    eq. 4 moves residues along x_i - x_j only); zero at initialisation."""
    from fewstep.protein.model import CoordHead

    torch.manual_seed(0)
    head = CoordHead(FULL)
    x, h, pair = torch.randn(2, 7, 3), torch.randn(2, 7, 16), torch.randn(2, 7, 7, 8)
    assert head(x, h, pair, None).abs().max() == 0
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rot = random_rotations(torch.tensor([[0.3, 0.8, -0.2, 0.5]]))[0]
    out = head(x, h, pair, None)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(head(x @ rot.T, h, pair, None), out @ rot.T, atol=1e-5, rtol=1e-4)
    # two residues: the term lies along their difference
    two = head(x[:1, :2], h[:1, :2], pair[:1, :2, :2], None)[0, 0]
    d = x[0, 0] - x[0, 1]
    torch.testing.assert_close(torch.linalg.cross(two, d), torch.zeros(3), atol=1e-5, rtol=0)


def test_full_net_output_is_centred_with_pair_values_and_coord_head():
    d = build_denoiser(FULL)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(1, 8, 3), torch.tensor([0.4])
    assert d.predict(x, t, kind="x0").mean(1).abs().max() < 1e-5
