"""Scene-completion metrics, as LiDiff / Distillation-DPO report them (PRBonn/LiDiff
``utils/metrics.py`` and ``utils/histogram_metrics.py``; happyw1nd/DistillationDPO the same).

All distances are Euclidean (not squared), in the clouds' units (metres). Inputs are (N, 3)
numpy arrays or torch tensors; nearest neighbours come from ``scipy.spatial.cKDTree`` and the
exact EMD from ``scipy.optimize.linear_sum_assignment``.

- :func:`chamfer`: ``(mean_p min_g |p - g| + mean_g min_p |g - p|) / 2``, LiDiff's CD.
- :func:`precision_recall_f`: at threshold t, precision = fraction of predicted points closer
  than t to the ground truth, recall = fraction of ground-truth points closer than t to the
  prediction, F = 2PR / (P + R) (0 when either is 0). Fractions in [0, 1] (LiDiff prints %).
- :func:`completion_iou`: |A ∩ B| / |A ∪ B| of the sets of occupied voxels floor(p / v).
- :func:`bev_jsd`: Jensen-Shannon divergence, in nats (ln 2 for disjoint supports), of the
  normalised 2-D x-y histograms. LiDiff reports ``scipy.spatial.distance.jensenshannon`` (the
  square root of the divergence) of a histogram of occupied 0.5 m voxels per column;
  ``bev_jsd(..., occupancy=True)`` counts the same occupied voxels, and the square root of the
  returned value is LiDiff's figure.
- :func:`emd`: exact earth mover's distance between equal-size random subsamples: the mean
  matched Euclidean distance of the optimal one-to-one assignment (LiDiff approximates it with
  Sinkhorn on voxelised clouds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.5)  # metres, for precision / recall / F
DEFAULT_VOXELS = (0.5, 0.2, 0.1)  # metres, LiDiff's CompletionIoU voxel sizes


def as_points(x: Any, name: str = "points") -> np.ndarray:
    """(N, 3) float64 numpy array from an array or tensor (extra columns dropped)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 3:
        raise ValueError(f"{name} must be an (N, 3) point array, got shape {a.shape}")
    if len(a) == 0:
        raise ValueError(f"{name} is empty; the metric needs at least one point")
    a = a[:, :3]
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite coordinates")
    return a


def nn_distances(src: Any, dst: Any) -> np.ndarray:
    """(N,) distance from each point of ``src`` to its nearest neighbour in ``dst``."""
    return cKDTree(as_points(dst, "dst")).query(as_points(src, "src"), k=1)[0]


def chamfer(pred: Any, gt: Any) -> float:
    """Chamfer distance: mean of the two directed mean nearest-neighbour distances (not squared)."""
    p, g = as_points(pred, "pred"), as_points(gt, "gt")
    return float((nn_distances(p, g).mean() + nn_distances(g, p).mean()) / 2)


def precision_recall_f(
    pred: Any, gt: Any, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[float, dict[str, float]]:
    """``{t: {"precision", "recall", "fscore"}}`` with distances strictly below t counted."""
    p, g = as_points(pred, "pred"), as_points(gt, "gt")
    d_pg, d_gp = nn_distances(p, g), nn_distances(g, p)
    out = {}
    for t in thresholds:
        if t <= 0:
            raise ValueError(f"thresholds must be positive, got {t}")
        pr, re = float(np.mean(d_pg < t)), float(np.mean(d_gp < t))
        f = 0.0 if pr == 0 or re == 0 else 2 * pr * re / (pr + re)
        out[float(t)] = {"precision": pr, "recall": re, "fscore": f}
    return out


def occupied_voxels(points: Any, voxel: float) -> np.ndarray:
    """(K, 3) int64 unique indices floor(p / voxel) of the voxels that hold points."""
    if voxel <= 0:
        raise ValueError(f"voxel size must be positive, got {voxel}")
    return np.unique(np.floor(as_points(points) / voxel).astype(np.int64), axis=0)


def completion_iou(
    pred: Any, gt: Any, voxel_sizes: Sequence[float] = DEFAULT_VOXELS
) -> dict[float, float]:
    """``{voxel: IoU}`` of the occupied-voxel sets of prediction and ground truth."""
    out = {}
    for v in voxel_sizes:
        a, b = occupied_voxels(pred, v), occupied_voxels(gt, v)
        _, counts = np.unique(np.concatenate([a, b]), axis=0, return_counts=True)
        inter = int(np.sum(counts == 2))  # each set is unique, so 2 means "in both"
        out[float(v)] = inter / len(counts)
    return out


def bev_histogram(
    points: Any, extent: float = 50.0, bins: int = 200, occupancy: bool = False
) -> np.ndarray:
    """(bins, bins) counts over x, y in [-extent, extent]; ``occupancy`` counts occupied
    voxels of the same size in z per column instead of points (LiDiff's BEV histogram)."""
    p = as_points(points)
    if bins < 1 or extent <= 0:
        raise ValueError(f"bev histogram needs bins >= 1 and extent > 0, got {bins}, {extent}")
    if not occupancy:
        return np.histogram2d(p[:, 0], p[:, 1], bins=bins, range=[[-extent, extent]] * 2)[0]
    size = 2 * extent / bins
    ij = np.floor((p[:, :2] + extent) / size).astype(np.int64)
    inside = np.all((ij >= 0) & (ij < bins), axis=1)
    cells = np.unique(np.column_stack([ij, np.floor(p[:, 2] / size)])[inside], axis=0)
    h = np.zeros((bins, bins))
    np.add.at(h, (cells[:, 0].astype(np.int64), cells[:, 1].astype(np.int64)), 1.0)
    return h


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in nats of two non-negative histograms (normalised here)."""
    p, q = np.asarray(p, dtype=np.float64).ravel(), np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in size: {p.shape} vs {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("a histogram is empty (no points inside the extent)")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return max(0.5 * kl(p) + 0.5 * kl(q), 0.0)


def bev_jsd(
    pred: Any, gt: Any, extent: float = 50.0, bins: int = 200, occupancy: bool = False
) -> float:
    """JS divergence (nats, in [0, ln 2]) between the bird's-eye-view histograms."""
    return js_divergence(
        bev_histogram(pred, extent, bins, occupancy), bev_histogram(gt, extent, bins, occupancy)
    )


def emd(pred: Any, gt: Any, n: int = 512, seed: int = 0) -> float:
    """Exact EMD (mean matched Euclidean distance under the optimal bijection) between
    ``min(n, len(pred), len(gt))`` points drawn without replacement from each cloud."""
    p, g = as_points(pred, "pred"), as_points(gt, "gt")
    if n < 1:
        raise ValueError(f"emd needs n >= 1, got {n}")
    m = min(n, len(p), len(g))
    rng = np.random.default_rng(seed)
    p = p[rng.choice(len(p), m, replace=False)]
    g = g[rng.choice(len(g), m, replace=False)]
    cost = np.linalg.norm(p[:, None, :] - g[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def evaluate_completion(
    pred: Any,
    gt: Any,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    voxel_sizes: Sequence[float] = DEFAULT_VOXELS,
    bev_extent: float = 50.0,
    bev_bins: int = 200,
    emd_points: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics in one flat JSON-friendly dict (keys like ``fscore@0.1``, ``iou@0.5``)."""
    out: dict[str, float] = {"chamfer": chamfer(pred, gt)}
    for t, v in precision_recall_f(pred, gt, thresholds).items():
        for k, x in v.items():
            out[f"{k}@{t:g}"] = x
    for v, iou in completion_iou(pred, gt, voxel_sizes).items():
        out[f"iou@{v:g}"] = iou
    out["bev_jsd"] = bev_jsd(pred, gt, bev_extent, bev_bins)
    out["emd"] = emd(pred, gt, emd_points, seed)
    return out


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Median wall-clock seconds of ``fn()`` (core's ``time_per_sample`` with one call per
    repeat, so CUDA is synchronised around the timing when in use)."""
    from fewstep.core.metrics import time_per_sample

    r = time_per_sample(lambda _b: fn(), n_samples=1, batch_size=1, warmup=warmup, repeats=repeats)
    s = r["seconds_per_sample"]
    return {
        "seconds": s,
        "calls_per_second": 1 / s if s > 0 else math.inf,
        "all": r["all_seconds_per_sample"],
    }
