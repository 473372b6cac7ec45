"""Behavioural tests for fewstep.core.metrics (CPU, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.core import metrics
from fewstep.core.metrics import (
    collapse_check,
    diversity,
    frechet_distance,
    frechet_from_stats,
    gaussian_stats,
    mmd,
    mode_coverage,
    precision_recall,
    sliced_wasserstein,
    time_per_sample,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ring_centers(k: int = 8, r: float = 4.0) -> torch.Tensor:
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return torch.stack([r * ang.cos(), r * ang.sin()], dim=1)


def _mixture(centers: torch.Tensor, modes: list[int], n: int, std: float, seed: int):
    g = _gen(seed)
    idx = torch.tensor(modes)[torch.randint(len(modes), (n,), generator=g)]
    return centers[idx] + std * torch.randn(n, centers.shape[1], generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- SW


def test_sw_self_is_zero():
    x = torch.randn(500, 5, generator=_gen(1))
    assert sliced_wasserstein(x, x, generator=_gen(0)) == pytest.approx(0.0, abs=1e-9)
    assert sliced_wasserstein(x, x.clone()[torch.randperm(500)]) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("sizes", [(4000, 4000), (3000, 5000)])
def test_sw_1d_shifted_gaussians(p, sizes):
    n, m = sizes
    x = torch.randn(n, 1, generator=_gen(1))
    y = torch.randn(m, 1, generator=_gen(2)) + 3.0
    # In 1-D every direction is +-1, so a few projections suffice.
    sw = sliced_wasserstein(x, y, n_projections=4, p=p, generator=_gen(0))
    assert sw == pytest.approx(3.0, abs=0.1)
    # Shapes (N,) are read as (N, 1).
    assert sliced_wasserstein(x[:, 0], y[:, 0], n_projections=4, p=p) == pytest.approx(sw)


def test_sw_unequal_sizes_exact_1d():
    # Quantile functions: x -> 0 on [0, 1/2), 1 on [1/2, 1); y -> 0, 0.5, 1 on thirds.
    # They differ by 0.5 on [1/3, 2/3), so W1 = 1/6 and W2 = sqrt(1/12).
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[1.0], [0.0], [0.5]])
    assert sliced_wasserstein(x, y, p=1) == pytest.approx(1 / 6, abs=1e-9)
    assert sliced_wasserstein(x, y, p=2) == pytest.approx(math.sqrt(1 / 12), abs=1e-9)


def test_sw_multidim_closed_form_and_symmetry():
    # For N(0, I) vs N(mu, I), projections differ by a shift theta.mu, so
    # SW_2^2 = E[(theta.mu)^2] = |mu|^2 / D.
    d = 4
    x = torch.randn(2000, d, generator=_gen(1))
    y = torch.randn(2000, d, generator=_gen(2)) + torch.tensor([2.0, 0.0, 0.0, 0.0])
    sw_xy = sliced_wasserstein(x, y, n_projections=600, generator=_gen(5))
    sw_yx = sliced_wasserstein(y, x, n_projections=600, generator=_gen(5))
    assert sw_xy == pytest.approx(1.0, abs=0.1)
    assert sw_xy == pytest.approx(sw_yx, rel=1e-9)
    y2 = y[:1500]
    assert sliced_wasserstein(x, y2, generator=_gen(3)) == pytest.approx(
        sliced_wasserstein(y2, x, generator=_gen(3)), rel=1e-9
    )


def test_sw_deterministic_given_generator():
    x = torch.randn(200, 6, generator=_gen(1))
    y = torch.randn(200, 6, generator=_gen(2)) * 2
    a = sliced_wasserstein(x, y, n_projections=16, generator=_gen(7))
    b = sliced_wasserstein(x, y, n_projections=16, generator=_gen(7))
    c = sliced_wasserstein(x, y, n_projections=16, generator=_gen(8))
    assert a == b
    assert a != c
    assert sliced_wasserstein(x, y, n_projections=16) == sliced_wasserstein(x, y, n_projections=16)


# ----------------------------------------------------------------------------- MMD


def test_mmd_same_vs_shifted():
    x = torch.randn(600, 3, generator=_gen(1))
    y = torch.randn(600, 3, generator=_gen(2))
    z = torch.randn(600, 3, generator=_gen(3)) + 1.5
    same = mmd(x, y)
    shifted = mmd(x, z)
    assert abs(same) < 0.02
    assert shifted > 0.5
    assert shifted > 20 * abs(same)
    assert mmd(x, z) == pytest.approx(mmd(z, x), rel=1e-9)


def test_mmd_matches_bruteforce(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # exercise the chunked path
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 4))
    y = rng.normal(size=(17, 4)) + 0.5
    bws = [0.7, 2.0]

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * h * h)) for h in bws)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    expected = (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )
    assert mmd(torch.from_numpy(x), torch.from_numpy(y), bandwidths=bws) == pytest.approx(
        expected, rel=1e-9
    )


# ----------------------------------------------------------------------------- Fréchet


def test_frechet_diagonal_closed_form():
    mu1 = torch.tensor([0.0, 1.0, -2.0])
    mu2 = torch.tensor([1.0, 1.0, 0.0])
    std1 = torch.tensor([1.0, 2.0, 0.5])
    std2 = torch.tensor([3.0, 2.0, 1.5])
    expected = float(((mu1 - mu2) ** 2).sum() + ((std1 - std2) ** 2).sum())  # 5 + 4 + 0 + 1
    got = frechet_from_stats(mu1, torch.diag(std1**2), mu2, torch.diag(std2**2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(10.0)


def test_frechet_nondiagonal_against_independent_formula():
    rng = np.random.default_rng(0)
    d = 6
    a = rng.normal(size=(d, d))
    b = rng.normal(size=(d, d))
    s1 = a @ a.T + 0.1 * np.eye(d)
    s2 = b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Independent route: Tr((S1 S2)^{1/2}) = sum of sqrt of the (real, positive) eigenvalues
    # of the non-symmetric product S1 S2.
    ev = np.linalg.eigvals(s1 @ s2)
    assert np.all(ev.real > 0) and np.allclose(ev.imag, 0, atol=1e-8)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev.real).sum()
    # And a third route via an explicit eigh square root of S2 (sym. in the other order).
    w, v = np.linalg.eigh(s2)
    r2 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r2 @ s1 @ r2)
    expected2 = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(inner).sum()
    got = frechet_from_stats(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8)
    assert got == pytest.approx(expected2, rel=1e-8)
    assert frechet_from_stats(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)
    assert frechet_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_from_samples():
    g = _gen(1)
    x = torch.randn(4000, 3, generator=g)
    y = torch.randn(4000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 0.0])
    fd = frechet_distance(x, y)
    # Closed form for N(0, I) vs N(mu, 4I): |mu|^2 + 3 * (2 - 1)^2 = 4.
    assert fd == pytest.approx(4.0, abs=0.25)
    assert frechet_distance(x[torch.randperm(4000, generator=g)], y) == pytest.approx(fd, rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Cached statistics give the same answer; a singular covariance is fine.
    assert frechet_from_stats(*gaussian_stats(x), *gaussian_stats(y)) == pytest.approx(fd)
    flat = torch.cat([x[:, :2], torch.zeros(4000, 1)], dim=1)
    assert math.isfinite(frechet_distance(flat, y))


def test_gaussian_stats_matches_numpy():
    x = torch.randn(50, 2, 2, generator=_gen(4))  # (N, ...) is flattened to (N, 4)
    mu, sigma = gaussian_stats(x)
    flat = x.reshape(50, 4).double().numpy()
    np.testing.assert_allclose(mu.numpy(), flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(flat, rowvar=False), rtol=1e-10)


# ----------------------------------------------------------------------------- modes


def test_mode_coverage_all_vs_some_modes():
    centers = _ring_centers()
    full = mode_coverage(_mixture(centers, list(range(8)), 2000, 0.05, 1), centers, radius=0.15)
    assert full["covered"] == 8
    assert full["n_modes"] == 8
    assert full["fraction_in_radius"] > 0.95
    assert sum(full["mode_histogram"]) == pytest.approx(2000 * full["fraction_in_radius"])

    part = mode_coverage(_mixture(centers, [0, 3, 5], 2000, 0.05, 2), centers, radius=0.15)
    assert part["covered"] == 3
    hist = part["mode_histogram"]
    assert [i for i, c in enumerate(hist) if c > 0] == [0, 3, 5]

    # Samples between modes are low quality and cover nothing.
    off = mode_coverage(torch.zeros(100, 2), centers, radius=0.15)
    assert off["covered"] == 0 and off["fraction_in_radius"] == 0.0


def test_mode_coverage_threshold():
    centers = _ring_centers()
    # 8 modes, N = 800 -> uniform share 100, threshold 20 with min_fraction 0.2.
    counts = [100, 100, 100, 100, 100, 100, 181, 19]
    samples = torch.cat([centers[i].expand(c, 2) for i, c in enumerate(counts)])
    res = mode_coverage(samples, centers, radius=0.1)
    assert res["mode_histogram"] == counts
    assert res["covered"] == 7
    assert mode_coverage(samples, centers, radius=0.1, min_fraction=0.1)["covered"] == 8


# ----------------------------------------------------------------------------- P/R


def test_precision_recall():
    real = torch.randn(800, 2, generator=_gen(1))
    fake = torch.randn(800, 2, generator=_gen(2))
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.9 and r > 0.9

    p, r = precision_recall(real, fake + 20.0, k=3)
    assert p < 0.02 and r < 0.02

    # Mode dropping: fake covers only the x > 0 half -> high precision, recall about 0.5.
    half = fake[fake[:, 0] > 0]
    p, r = precision_recall(real, half, k=3)
    assert p > 0.9
    assert 0.4 < r < 0.7


def test_precision_recall_exact_radii():
    # Real points 0..9 on a line: with k=1 every radius is 1; with k=2 the end points get
    # radius 2 (interior ones keep 1). Self-matches must not count as neighbours.
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[10.5], [4.5], [-3.0], [20.0]])
    p1, r1 = precision_recall(real, fake, k=1)
    p2, r2 = precision_recall(real, fake, k=2)
    assert p1 == pytest.approx(0.25)  # only 4.5
    assert p2 == pytest.approx(0.5)  # 4.5 and 10.5 (within 2 of the end point 9)
    assert r1 == 1.0 and r2 == 1.0


# ----------------------------------------------------------------------------- diversity


def test_diversity_values():
    assert diversity(torch.tensor([[0.0], [1.0], [2.0]])) == pytest.approx(4 / 3)
    assert diversity(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert diversity(torch.zeros(1, 3)) == 0.0
    x = torch.randn(3000, 8, generator=_gen(1))
    d1 = diversity(x)
    assert d1 == diversity(x)  # deterministic subsample
    assert diversity(2 * x) == pytest.approx(2 * d1, rel=1e-9)
    # E|x - y| for x, y ~ N(0, I_8) is 2 * Gamma(4.5) / Gamma(4) ~= 3.88.
    assert d1 == pytest.approx(2 * math.gamma(4.5) / math.gamma(4), rel=0.03)


def test_collapse_check():
    ref = torch.randn(500, 4, 4, generator=_gen(1))
    healthy = torch.randn(300, 4, 4, generator=_gen(2)) * 0.8
    assert collapse_check(healthy, ref) is None

    const = torch.ones(300, 4, 4) * 0.3
    res = collapse_check(const, ref)
    assert res is not None and res["kind"] == "constant"

    tiny = 0.7 + 0.01 * torch.randn(300, 4, 4, generator=_gen(3))
    res = collapse_check(tiny, ref)
    assert res is not None and res["kind"] == "low_diversity"
    assert res["ratio"] < 0.25
    assert res["student_diversity"] < res["reference_diversity"]

    # Ratio threshold is respected: 0.3x the spread passes at 0.25, fails at 0.5.
    narrow = 0.3 * torch.randn(300, 4, 4, generator=_gen(4))
    assert collapse_check(narrow, ref) is None
    assert collapse_check(narrow, ref, ratio=0.5)["kind"] == "low_diversity"

    bad = healthy.clone()
    bad[0, 0, 0] = float("nan")
    assert collapse_check(bad, ref)["kind"] == "non_finite"


# ----------------------------------------------------------------------------- speed


def test_time_per_sample():
    calls = []

    def fn(b):
        calls.append(b)
        return torch.randn(b, 64) @ torch.randn(64, 64)

    res = time_per_sample(fn, n_samples=50, batch_size=16, warmup=2, repeats=3)
    assert calls == [16] * (2 + 3 * 4)
    assert res["seconds_per_sample"] > 0
    assert res["samples_per_second"] > 0
    assert res["samples_per_second"] == pytest.approx(1 / res["seconds_per_sample"])
    assert res["repeats"] == 3
    assert res["n_samples"] == 64
    assert len(res["all_seconds_per_sample"]) == 3
