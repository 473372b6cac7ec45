"""Distances between sample sets, and the speed side of evaluation.

Every function here is a pure function of tensors that needs no internet and no feature
network: pass raw samples for low-dimensional data, or features from any extractor (a
classifier trained on digits, a point-cloud encoder, ...) for high-dimensional data.

Conventions
-----------
* Sample sets are tensors (or arrays) of shape ``(N, D)``. Anything of shape ``(N, ...)`` is
  flattened to ``(N, prod(...))``; a 1-D tensor of shape ``(N,)`` is read as ``(N, 1)``.
* Quality metrics compute in float64 on the device of the inputs and return Python floats.
* Anything random takes a ``generator`` (a CPU :class:`torch.Generator`). When it is
  ``None`` a fresh generator seeded with 0 is used, so results are reproducible by default.
* Work that is quadratic in N is done in row chunks so memory stays ``O(chunk * N)``.

Metric summary
--------------
==========================  ==================================================================
:func:`sliced_wasserstein`  SW_p between empirical sets (Rabin et al. 2011; Bonneel et al. 2015)
:func:`mmd`                 unbiased squared MMD, sum of RBF kernels (Gretton et al. 2012)
:func:`frechet_distance`    FD between fitted Gaussians (Dowson & Landau 1982; Heusel et al. 2017)
:func:`mode_coverage`       modes hit / high-quality fraction (Metz et al. 2017; Srivastava 2017)
:func:`precision_recall`    k-NN manifold precision / recall (Kynkäänniemi et al. 2019)
:func:`diversity`           mean pairwise L2 distance
:func:`collapse_check`      "student collapsed" detector built on :func:`diversity`
:func:`time_per_sample`     wall-clock seconds per sample and throughput of a sampler
==========================  ==================================================================
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "collapse_check",
    "diversity",
    "frechet_distance",
    "frechet_from_stats",
    "gaussian_stats",
    "mmd",
    "mode_coverage",
    "precision_recall",
    "sliced_wasserstein",
    "time_per_sample",
]

# Rows processed at once by the quadratic (pairwise-distance) routines.
_CHUNK = 1024


# ----------------------------------------------------------------------------- helpers


def _as_2d(x: Any, name: str = "x", dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Return ``x`` as a floating tensor of shape ``(N, D)``.

    ``(N,)`` becomes ``(N, 1)``; ``(N, ...)`` is flattened. ``dtype=None`` keeps a floating
    input's dtype (integers become float32).
    """
    t = torch.as_tensor(x)
    if t.ndim == 0:
        raise ValueError(f"{name} must have a leading sample dimension, got a scalar")
    t = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.float()
    return t


def _check_pair(x: torch.Tensor, y: torch.Tensor, min_n: int = 1) -> torch.Tensor:
    """Check that two ``(N, D)`` sets are compatible; return ``y`` moved to ``x``'s device."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < min_n or y.shape[0] < min_n:
        raise ValueError(
            f"need at least {min_n} samples per set, got {x.shape[0]} and {y.shape[0]}"
        )
    return y.to(x.device)


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return generator


def _subsample(
    x: torch.Tensor, max_samples: int | None, generator: torch.Generator
) -> torch.Tensor:
    """Rows of ``x``, at most ``max_samples`` of them, drawn without replacement."""
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    idx = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:max_samples]
    return x[idx.to(x.device)]


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, ``(n, d), (m, d) -> (n, m)``, clamped at 0."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0.0)


# ----------------------------------------------------------------------------- SW


def sliced_wasserstein(
    x: Any,
    y: Any,
    n_projections: int = 256,
    p: float = 2,
    generator: torch.Generator | None = None,
) -> float:
    r"""Sliced Wasserstein distance :math:`SW_p` between two empirical distributions.

    .. math::
        SW_p(\mu, \nu) = \Big(\mathbb{E}_{\theta \sim U(S^{D-1})}
        W_p^p(\theta_\# \mu, \theta_\# \nu)\Big)^{1/p}

    The expectation is estimated with ``n_projections`` random unit directions. Each 1-D
    :math:`W_p^p` is computed exactly from sorted projections: the two empirical quantile
    functions are step functions, so they are compared on the union of their breakpoints
    ``{i/N} ∪ {j/M}`` (common quantile levels), which handles ``N != M`` without resampling.

    Args:
        x: samples, shape ``(N, D)`` (or ``(N, ...)``, flattened).
        y: samples, shape ``(M, D)``.
        n_projections: number of random directions ``L``.
        p: order, ``p >= 1``.
        generator: CPU generator for the directions (default: seeded with 0).

    Returns:
        ``SW_p`` as a float (same units as the samples). For ``D == 1`` this is exactly
        the 1-D ``W_p`` between the two sets.

    References:
        Rabin, Peyré, Delon, Bernot. "Wasserstein Barycenter and its Application to Texture
        Mixing", SSVM 2011. Bonneel, Rabin, Peyré, Pfister. "Sliced and Radon Wasserstein
        Barycenters of Measures", JMIV 2015.
    """
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    x = _as_2d(x, "x")
    y = _check_pair(x, _as_2d(y, "y"))
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    generator = _default_generator(generator)

    theta = torch.randn(d, n_projections, generator=generator, device=generator.device)
    theta = theta.to(device=x.device, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True).clamp_min(1e-12)

    px = torch.sort(x @ theta, dim=0).values  # (N, L)
    py = torch.sort(y @ theta, dim=0).values  # (M, L)

    if n == m:
        cost = (px - py).abs().pow(p).mean(0)  # (L,)
    else:
        # Union of the breakpoints of both step quantile functions on (0, 1].
        levels = (
            torch.cat(
                [
                    torch.arange(1, n + 1, dtype=torch.float64) / n,
                    torch.arange(1, m + 1, dtype=torch.float64) / m,
                ]
            )
            .sort()
            .values
        )
        levels[-1] = 1.0
        lo = torch.cat([torch.zeros(1, dtype=torch.float64), levels[:-1]])
        weights = (levels - lo).clamp_min(0.0)  # interval lengths, sum to 1
        mid = 0.5 * (levels + lo)
        ix = (mid * n).floor().long().clamp_(0, n - 1).to(x.device)
        iy = (mid * m).floor().long().clamp_(0, m - 1).to(x.device)
        w = weights.to(device=x.device, dtype=x.dtype)[:, None]
        cost = (w * (px[ix] - py[iy]).abs().pow(p)).sum(0)  # (L,)
    return float(cost.mean().clamp_min(0.0) ** (1.0 / p))


# ----------------------------------------------------------------------------- MMD


def _rbf_kernel_sum(
    a: torch.Tensor, b: torch.Tensor, inv_two_bw2: torch.Tensor, exclude_diagonal: bool
) -> torch.Tensor:
    """``sum_{i,j} sum_h exp(-|a_i - b_j|^2 / (2 h^2))`` in row chunks.

    With ``exclude_diagonal`` (only meaningful when ``a is b``) the ``i == j`` terms are
    skipped.
    """
    total = torch.zeros((), dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], _CHUNK):
        d2 = _sq_dists(a[start : start + _CHUNK], b)  # (c, m)
        k = torch.zeros_like(d2)
        for coef in inv_two_bw2.tolist():
            k += torch.exp(-coef * d2)
        if exclude_diagonal:
            rows = torch.arange(k.shape[0], device=k.device)
            k[rows, rows + start] = 0.0
        total = total + k.sum()
    return total


def _median_pairwise_distance(x: torch.Tensor, y: torch.Tensor, max_per_set: int = 500) -> float:
    """Median off-diagonal pairwise L2 distance in the pooled set ``x ∪ y``.

    Each set is subsampled on its own (fresh seed-0 generators), so the result does not
    depend on the argument order.
    """
    xs = _subsample(x, max_per_set, torch.Generator().manual_seed(0))
    ys = _subsample(y, max_per_set, torch.Generator().manual_seed(0))
    z = torch.cat([xs, ys])
    d = _sq_dists(z, z).sqrt()
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    return float(d[iu[0], iu[1]].median())


def mmd(x: Any, y: Any, bandwidths: Any = None) -> float:
    r"""Unbiased estimate of the squared maximum mean discrepancy :math:`\mathrm{MMD}_u^2`.

    The kernel is a sum of Gaussian (RBF) kernels

    .. math:: k(a, b) = \sum_h \exp\!\big(-\|a - b\|^2 / (2 h^2)\big)

    and the estimator (Gretton et al. 2012, Eq. 3) is

    .. math::
        \frac{1}{N(N-1)} \sum_{i \ne j} k(x_i, x_j) + \frac{1}{M(M-1)} \sum_{i \ne j}
        k(y_i, y_j) - \frac{2}{NM} \sum_{i, j} k(x_i, y_j).

    Being unbiased it can be slightly negative when the two sets share a distribution.

    Args:
        x: samples, shape ``(N, D)``, ``N >= 2``.
        y: samples, shape ``(M, D)``, ``M >= 2``.
        bandwidths: kernel length scales ``h`` (float or sequence). Default: the median
            pairwise distance ``m`` of the pooled set (at most 500 points from each, fixed
            seed)
            times ``(0.5, 1, 2)``.

    Returns:
        ``MMD_u^2`` as a float (dimensionless; between ``-2K`` and ``2K`` for ``K`` kernels).

    References:
        Gretton, Borgwardt, Rasch, Schölkopf, Smola. "A Kernel Two-Sample Test", JMLR 2012.
    """
    x = _as_2d(x, "x")
    y = _check_pair(x, _as_2d(y, "y"), min_n=2)
    n, m = x.shape[0], y.shape[0]
    if bandwidths is None:
        med = _median_pairwise_distance(x, y)
        med = med if med > 0 else 1.0
        bw = torch.tensor([0.5 * med, med, 2.0 * med], dtype=x.dtype)
    else:
        bw = torch.as_tensor(bandwidths, dtype=x.dtype).reshape(-1)
        if bw.numel() == 0 or bool((bw <= 0).any()):
            raise ValueError(f"bandwidths must be positive, got {bandwidths!r}")
    inv_two_bw2 = (1.0 / (2.0 * bw**2)).to(x.device)

    kxx = _rbf_kernel_sum(x, x, inv_two_bw2, exclude_diagonal=True) / (n * (n - 1))
    kyy = _rbf_kernel_sum(y, y, inv_two_bw2, exclude_diagonal=True) / (m * (m - 1))
    kxy = _rbf_kernel_sum(x, y, inv_two_bw2, exclude_diagonal=False) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


# ----------------------------------------------------------------------------- Fréchet


def gaussian_stats(feats: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a feature set, for caching a reference's statistics.

    Args:
        feats: features, shape ``(N, D)`` (or ``(N, ...)``, flattened), ``N >= 2``.

    Returns:
        ``(mu, sigma)``: float64 tensors of shapes ``(D,)`` and ``(D, D)``; ``sigma`` is the
        unbiased sample covariance (divisor ``N - 1``), as in the reference FID code.

    References:
        Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter. "GANs Trained by a Two Time-Scale
        Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017.
    """
    f = _as_2d(feats, "feats")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root via ``eigh`` (negative round-off eigenvalues clamped)."""
    evals, evecs = torch.linalg.eigh(0.5 * (s + s.T))
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def frechet_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    r"""Fréchet (2-Wasserstein) distance between :math:`N(\mu_1, \Sigma_1)` and
    :math:`N(\mu_2, \Sigma_2)`:

    .. math::
        d^2 = \|\mu_1 - \mu_2\|^2 + \mathrm{Tr}\Big(\Sigma_1 + \Sigma_2
        - 2\big(\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}\big)^{1/2}\Big)

    Computed in float64 with two symmetric eigendecompositions (``Σ1^{1/2}``, then the
    eigenvalues of the symmetric PSD matrix ``Σ1^{1/2} Σ2 Σ1^{1/2}``), which is stable for
    singular covariances and needs no scipy. Note ``Tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2})`` equals
    ``Tr((Σ1 Σ2)^{1/2})`` of the usual FID code.

    Args:
        mu1, mu2: means, shape ``(D,)`` (tensors or arrays).
        sigma1, sigma2: covariances, shape ``(D, D)``.

    Returns:
        The squared distance ``d^2`` as a float (this is what "FID" reports), clamped at 0.

    References:
        Dowson & Landau. "The Fréchet distance between multivariate normal distributions",
        J. Multivariate Anal. 1982. Heusel et al. "GANs Trained by a Two Time-Scale Update
        Rule Converge to a Local Nash Equilibrium", NeurIPS 2017.
    """
    mu1 = torch.as_tensor(mu1).to(torch.float64).reshape(-1)
    mu2 = torch.as_tensor(mu2).to(device=mu1.device, dtype=torch.float64).reshape(-1)
    s1 = torch.as_tensor(sigma1).to(device=mu1.device, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2).to(device=mu1.device, dtype=torch.float64)
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"sigma1 {tuple(s1.shape)}, sigma2 {tuple(s2.shape)}"
        )
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    evals = torch.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = evals.clamp_min(0.0).sqrt().sum()
    diff = mu1 - mu2
    fd = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean
    return max(float(fd), 0.0)


def frechet_distance(feat_x: Any, feat_y: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID-style).

    Equivalent to ``frechet_from_stats(*gaussian_stats(feat_x), *gaussian_stats(feat_y))``.

    Args:
        feat_x: features, shape ``(N, D)``, ``N >= 2``.
        feat_y: features, shape ``(M, D)``, ``M >= 2``.

    Returns:
        The squared Fréchet distance as a float.

    References:
        Heusel et al. "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
        Equilibrium", NeurIPS 2017.
    """
    fx = _as_2d(feat_x, "feat_x")
    fy = _check_pair(fx, _as_2d(feat_y, "feat_y"), min_n=2)
    return frechet_from_stats(*gaussian_stats(fx), *gaussian_stats(fy))


# ----------------------------------------------------------------------------- modes


def mode_coverage(
    samples: Any, centers: Any, radius: float, min_fraction: float = 0.2
) -> dict[str, Any]:
    """Mode coverage of samples from a mixture whose component centres are known.

    Each sample is assigned to its nearest centre; it is *high quality* when it lies within
    ``radius`` of that centre. A mode is *covered* when at least ``min_fraction * N / K``
    high-quality samples are assigned to it (``min_fraction`` of its share under a uniform
    mixture), the protocol used for the 2-D ring / grid of Gaussians.

    Args:
        samples: shape ``(N, D)``.
        centers: shape ``(K, D)``.
        radius: distance to the nearest centre under which a sample counts (often 3 std).
        min_fraction: fraction of the uniform share ``N / K`` a mode needs to be covered.

    Returns:
        ``{"covered": int, "n_modes": K, "fraction_in_radius": float,
        "mode_histogram": list[int], "min_count": float}`` where ``fraction_in_radius`` is
        the high-quality fraction of all samples, ``mode_histogram[k]`` the number of
        high-quality samples assigned to centre ``k`` and ``min_count`` the threshold used.

    References:
        Metz, Poole, Pfau, Sohl-Dickstein. "Unrolled Generative Adversarial Networks",
        ICLR 2017. Srivastava, Valkov, Russell, Gutmann, Sutton. "VEEGAN", NeurIPS 2017.
    """
    s = _as_2d(samples, "samples")
    c = _check_pair(s, _as_2d(centers, "centers"))
    n, k = s.shape[0], c.shape[0]
    nearest_d = torch.empty(n, dtype=s.dtype, device=s.device)
    nearest_i = torch.empty(n, dtype=torch.long, device=s.device)
    for start in range(0, n, _CHUNK):
        d2 = _sq_dists(s[start : start + _CHUNK], c)
        val, idx = d2.min(dim=1)
        nearest_d[start : start + _CHUNK] = val.sqrt()
        nearest_i[start : start + _CHUNK] = idx
    good = nearest_d <= radius
    hist = torch.bincount(nearest_i[good], minlength=k)
    min_count = min_fraction * n / k
    return {
        "covered": int((hist >= min_count).sum()),
        "n_modes": k,
        "fraction_in_radius": float(good.to(torch.float64).mean()),
        "mode_histogram": [int(v) for v in hist.tolist()],
        "min_count": float(min_count),
    }


# ----------------------------------------------------------------------------- P/R


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row, shape ``(N,)``."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        d2 = _sq_dists(x[start : start + _CHUNK], x)
        rows = torch.arange(d2.shape[0], device=x.device)
        d2[rows, rows + start] = -1.0  # self is always the first neighbour; drop it below
        out[start : start + _CHUNK] = d2.topk(k + 1, dim=1, largest=False).values[:, k]
    return out.clamp_min(0.0).sqrt()


def _fraction_in_manifold(manifold: torch.Tensor, radii: torch.Tensor, q: torch.Tensor) -> float:
    """Fraction of rows of ``q`` inside at least one ball ``B(manifold_i, radii_i)``."""
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    r2 = (radii * radii)[None, :]
    for start in range(0, q.shape[0], _CHUNK):
        d2 = _sq_dists(q[start : start + _CHUNK], manifold)
        inside[start : start + _CHUNK] = (d2 <= r2).any(dim=1)
    return float(inside.to(torch.float64).mean())


def precision_recall(x_real: Any, x_fake: Any, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall from k-NN manifold estimates.

    The real manifold is the union of balls around each real sample with radius equal to
    its distance to its k-th nearest real neighbour; likewise for the fake manifold.
    Precision is the fraction of fake samples inside the real manifold (quality); recall is
    the fraction of real samples inside the fake manifold (coverage).

    Args:
        x_real: real samples or features, shape ``(N, D)``, ``N > k``.
        x_fake: generated samples or features, shape ``(M, D)``, ``M > k``.
        k: neighbourhood size (the paper uses 3).

    Returns:
        ``(precision, recall)``, both in ``[0, 1]``.

    References:
        Kynkäänniemi, Karras, Laine, Lehtinen, Aila. "Improved Precision and Recall Metric for
        Assessing Generative Models", NeurIPS 2019.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = _as_2d(x_real, "x_real")
    fake = _check_pair(real, _as_2d(x_fake, "x_fake"), min_n=k + 1)
    precision = _fraction_in_manifold(real, _knn_radii(real, k), fake)
    recall = _fraction_in_manifold(fake, _knn_radii(fake, k), real)
    return precision, recall


# ----------------------------------------------------------------------------- diversity


def diversity(x: Any, max_samples: int = 1000, generator: torch.Generator | None = None) -> float:
    """Mean pairwise L2 distance between distinct samples.

    Args:
        x: samples, shape ``(N, D)`` (or ``(N, ...)``, flattened).
        max_samples: at most this many rows (drawn without replacement) are used.
        generator: CPU generator for the subsample (default: seeded with 0).

    Returns:
        ``mean_{i < j} ||x_i - x_j||`` as a float; 0.0 when fewer than 2 samples.

    References:
        The pairwise-distance diversity score used e.g. in Mao, Tang, Lin et al. "Mode Seeking
        Generative Adversarial Networks for Diverse Image Synthesis", CVPR 2019 (there on LPIPS
        features).
    """
    x = _as_2d(x, "x")
    x = _subsample(x, max_samples, _default_generator(generator))
    n = x.shape[0]
    if n < 2:
        return 0.0
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for start in range(0, n, _CHUNK):
        d2 = _sq_dists(x[start : start + _CHUNK], x)
        rows = torch.arange(d2.shape[0], device=x.device)
        d2[rows, rows + start] = 0.0  # exact zeros on the diagonal despite round-off
        total = total + d2.sqrt().sum()
    return float(total / (n * (n - 1)))


def collapse_check(
    student: Any,
    reference: Any,
    ratio: float = 0.25,
    *,
    constant_tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> dict[str, Any] | None:
    """Detect a collapsed student: non-finite, (near-)constant or low-diversity samples.

    Checks, in order:

    1. ``"non_finite"``: the student produced NaN or inf.
    2. ``"constant"``: the largest per-dimension std across student samples is at most
       ``constant_tol`` times the reference's mean per-dimension std (absolute ``constant_tol``
       when the reference itself is constant).
    3. ``"low_diversity"``: :func:`diversity` of the student is below ``ratio`` times that of
       the reference.

    Args:
        student: student samples, shape ``(N, ...)``.
        reference: teacher or data samples, shape ``(M, ...)`` with the same per-sample size.
        ratio: minimum allowed ``diversity(student) / diversity(reference)``.
        constant_tol: relative std under which the samples count as constant.
        generator: generator for the diversity subsample (default: seeded with 0).

    Returns:
        ``None`` when healthy (or when the student has fewer than 2 samples, which cannot be
        judged), else a dict with ``"kind"`` and the measured quantities, e.g.
        ``{"kind": "low_diversity", "student_diversity": 0.01, "reference_diversity": 1.9,
        "ratio": 0.005, "threshold": 0.25}``.
    """
    s = _as_2d(student, "student")
    r = _check_pair(s, _as_2d(reference, "reference"), min_n=1)
    n_bad = int((~torch.isfinite(s)).sum())
    if n_bad:
        return {"kind": "non_finite", "n_non_finite": n_bad, "n_values": s.numel()}
    if s.shape[0] < 2:
        return None
    student_std = float(s.std(dim=0).max())
    ref_std = float(r.std(dim=0).mean()) if r.shape[0] >= 2 else 0.0
    scale = ref_std if ref_std > 0 else 1.0
    if student_std <= constant_tol * scale:
        return {
            "kind": "constant",
            "student_max_std": student_std,
            "reference_mean_std": ref_std,
        }
    gen = _default_generator(generator)
    d_student = diversity(s, generator=gen)
    d_ref = diversity(r, generator=gen)
    rel = d_student / d_ref if d_ref > 0 else math.inf
    if rel < ratio:
        return {
            "kind": "low_diversity",
            "student_diversity": d_student,
            "reference_diversity": d_ref,
            "ratio": rel,
            "threshold": ratio,
        }
    return None


# ----------------------------------------------------------------------------- speed


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_per_sample(
    fn: Callable[[int], Any],
    n_samples: int,
    batch_size: int,
    warmup: int = 1,
    repeats: int = 3,
) -> dict[str, Any]:
    """Wall-clock time per generated sample of a sampler.

    Each repeat calls ``fn(batch_size)`` ``ceil(n_samples / batch_size)`` times (always the
    full batch size, so compiled or graph-captured samplers are not re-specialised) and is
    timed with :func:`time.perf_counter`, synchronising CUDA before and after when it is in
    use. ``warmup`` untimed calls come first.

    Args:
        fn: callable generating one batch; its argument is the batch size.
        n_samples: samples to generate per repeat (rounded up to whole batches).
        batch_size: batch size passed to ``fn``.
        warmup: number of untimed ``fn(batch_size)`` calls before timing.
        repeats: number of timed repeats; the median is reported.

    Returns:
        ``{"seconds_per_sample": float (median over repeats), "samples_per_second": float,
        "repeats": int, "n_samples": int (generated per repeat), "batch_size": int,
        "all_seconds_per_sample": list[float]}``.
    """
    if n_samples < 1 or batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("need n_samples >= 1, batch_size >= 1, repeats >= 1, warmup >= 0")
    n_batches = math.ceil(n_samples / batch_size)
    produced = n_batches * batch_size
    for _ in range(warmup):
        fn(batch_size)
    per_sample = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            fn(batch_size)
        _sync()
        per_sample.append((time.perf_counter() - t0) / produced)
    med = statistics.median(per_sample)
    return {
        "seconds_per_sample": med,
        "samples_per_second": 1.0 / med if med > 0 else math.inf,
        "repeats": repeats,
        "n_samples": produced,
        "batch_size": batch_size,
        "all_seconds_per_sample": per_sample,
    }
