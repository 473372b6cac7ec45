"""The seed-diversity metrics used to compare SDS and VSD: zero for identical renders,
positive and ordered for different ones, symmetric, scale-free where promised, and the
penultimate-feature hook against a hand-computed forward."""

import pytest
import torch
from torch import nn

from fewstep.threed.diversity import (
    pairwise_feature_distance,
    pairwise_render_distance,
    penultimate_features,
)


def _renders(n=4, v=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, v, size, size, 3, generator=g)


@pytest.mark.parametrize("metric", ["l2", "dssim"])
def test_identical_renders_have_zero_diversity(metric):
    one = _renders(1)
    same = one.expand(4, *one.shape[1:]).clone()
    assert pairwise_render_distance(same, metric) == pytest.approx(0.0, abs=1e-9)


def test_l2_matches_a_hand_computed_pair_and_grows_with_the_difference():
    base = torch.full((1, 2, 8, 8, 3), 0.5)
    a = torch.cat([base, base + 0.1])
    b = torch.cat([base, base + 0.3])
    assert pairwise_render_distance(a, "l2") == pytest.approx(0.1, rel=1e-5)  # RMS of 0.1
    assert pairwise_render_distance(b, "l2") > pairwise_render_distance(a, "l2")


def test_dssim_orders_noise_levels_and_is_symmetric():
    g = torch.Generator().manual_seed(1)
    clean = _renders(1, v=2, size=24)
    small = (clean + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    large = (clean + 0.3 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    d_small = pairwise_render_distance(torch.cat([clean, small]), "dssim")
    d_large = pairwise_render_distance(torch.cat([clean, large]), "dssim")
    assert 0 < d_small < d_large
    assert pairwise_render_distance(torch.cat([small, clean]), "dssim") == pytest.approx(d_small)


def test_only_the_same_camera_is_compared():
    """Two seeds that render the same images, but in a different camera order, are still
    diverse per camera: a metric pooling all views would call them identical."""
    r = _renders(1, v=2)
    swapped = r[:, [1, 0]]
    assert pairwise_render_distance(torch.cat([r, swapped]), "l2") > 0.1


def test_feature_distance_zero_scale_free_and_positive():
    f = torch.randn(1, 5, 8).expand(4, 5, 8)
    assert pairwise_feature_distance(f) == pytest.approx(0.0, abs=1e-7)
    g = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    d = pairwise_feature_distance(g)
    assert d > 0
    assert pairwise_feature_distance(10.0 * g) == pytest.approx(d, rel=1e-5)
    assert pairwise_feature_distance(10.0 * g, normalize=False) == pytest.approx(
        10.0 * pairwise_feature_distance(g, normalize=False), rel=1e-5
    )
    # two seeds: exactly the mean per-camera Euclidean distance (unnormalised)
    two = g[:2]
    ref = (two[0] - two[1]).norm(dim=-1).mean()
    assert pairwise_feature_distance(two, normalize=False) == pytest.approx(float(ref), rel=1e-6)


def test_penultimate_features_read_the_last_linear_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 3))
    x = torch.randn(5, 2, 2)
    expect = torch.nn.functional.silu(net[1](x.flatten(1)))
    torch.testing.assert_close(penultimate_features(net, x), expect)
    assert not net[3]._forward_pre_hooks  # the hook is removed


def test_clear_errors():
    with pytest.raises(ValueError, match="N seeds >= 2"):
        pairwise_render_distance(_renders(1))
    with pytest.raises(ValueError, match="unknown metric"):
        pairwise_render_distance(_renders(2), "lpips")
    with pytest.raises(ValueError, match="N seeds >= 2"):
        pairwise_feature_distance(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.ReLU()), torch.zeros(1, 2))
