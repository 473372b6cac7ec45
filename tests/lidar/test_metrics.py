"""Completion metrics: hand cases, parity with plain references, clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, jensenshannon

from fewstep.lidar import metrics


@pytest.fixture(scope="module")
def clouds():
    rng = np.random.default_rng(0)
    return rng.standard_normal((300, 3)) * 5, rng.standard_normal((250, 3)) * 5


def test_chamfer_zero_for_identical_and_hand_cases():
    a = np.random.default_rng(1).standard_normal((50, 3))
    assert metrics.chamfer(a, a) == 0.0
    assert metrics.chamfer([[0.0, 0, 0]], [[3.0, 4, 0]]) == pytest.approx(5.0)
    # pred {0, 1} on a line, gt {0}: pred->gt mean 0.5, gt->pred 0, CD = 0.25 (not squared)
    assert metrics.chamfer([[0.0, 0, 0], [1.0, 0, 0]], [[0.0, 0, 0]]) == pytest.approx(0.25)


def test_chamfer_matches_brute_force(clouds):
    p, g = clouds
    d = cdist(p, g)
    ref = (d.min(1).mean() + d.min(0).mean()) / 2
    assert metrics.chamfer(p, g) == pytest.approx(ref, rel=1e-12)
    assert metrics.chamfer(torch.tensor(p), torch.tensor(g)) == pytest.approx(ref, rel=1e-12)


def test_fscore_one_above_the_shift_zero_below(clouds):
    g, _ = clouds
    p = g + [0.05, 0.0, 0.0]
    out = metrics.precision_recall_f(p, g, [0.01, 0.1])
    assert out[0.1] == {"precision": 1.0, "recall": 1.0, "fscore": 1.0}
    assert out[0.01]["fscore"] == 0.0


def test_precision_recall_are_directed(clouds):
    g, _ = clouds
    extra = np.vstack([g, g[:100] + 50.0])  # 100 far-away false points
    out = metrics.precision_recall_f(extra, g, [0.1])[0.1]
    assert out["recall"] == 1.0 and out["precision"] == pytest.approx(300 / 400)
    assert out["fscore"] == pytest.approx(2 * 0.75 / 1.75)


def _block(shift=0.0):
    i = np.arange(4) + 0.5
    return np.stack(np.meshgrid(i + shift, i, i, indexing="ij"), -1).reshape(-1, 3)


def test_completion_iou_on_constructed_grids():
    # 4x4x4 unit voxels vs the block moved one voxel in x: 48 shared of 80 at v = 1;
    # at v = 2 the x voxels are {0,1} vs {0,1,2}: 8 shared of 12
    out = metrics.completion_iou(_block(), _block(1.0), [1.0, 2.0])
    assert out[1.0] == pytest.approx(48 / 80) and out[2.0] == pytest.approx(8 / 12)
    assert metrics.completion_iou(_block(), _block(), [0.5])[0.5] == 1.0
    assert metrics.completion_iou(_block(), _block(10.0), [1.0])[1.0] == 0.0


def test_jsd_zero_same_ln2_disjoint_and_parity_with_scipy():
    assert metrics.js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-15)
    assert metrics.js_divergence([1, 0], [0, 3]) == pytest.approx(math.log(2))
    p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    assert metrics.js_divergence(p, q) == pytest.approx(0.2157615543388357)
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    assert metrics.js_divergence(a, b) == pytest.approx(jensenshannon(a, b) ** 2, rel=1e-9)


def test_bev_jsd(clouds):
    p, _ = clouds
    assert metrics.bev_jsd(p, p, extent=20, bins=40) == pytest.approx(0.0, abs=1e-15)
    left, right = np.abs(p) * [1, 1, 1], -np.abs(p)
    assert metrics.bev_jsd(left, right, extent=20, bins=40) == pytest.approx(math.log(2))
    # occupancy counts each occupied voxel once: two stacked duplicates weigh as one point
    a = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [5.1, 5.1, 0.1]])
    b = np.array([[0.1, 0.1, 0.1], [5.1, 5.1, 0.1]])
    assert metrics.bev_jsd(a, b, extent=10, bins=20, occupancy=True) == pytest.approx(
        0.0, abs=1e-15
    )
    assert metrics.bev_jsd(a, b, extent=10, bins=20) > 0.01
    with pytest.raises(ValueError, match="empty"):
        metrics.bev_jsd(p + 1000, p, extent=20, bins=40)


def test_emd_exact_on_permutation_and_shift(clouds):
    p, _ = clouds
    perm = p[np.random.default_rng(4).permutation(len(p))]
    assert metrics.emd(p, perm, n=len(p)) == pytest.approx(0.0, abs=1e-12)
    s = np.array([0.3, -0.4, 1.2])  # |s| = 1.3; a translation's W1 is exactly |s|
    assert metrics.emd(p[:200], perm[:200] * 0 + p[:200][::-1] + s, n=200) == pytest.approx(1.3)
    # hand case where nearest neighbours are not a bijection: EMD 1.5 but chamfer 0.5
    a, b = [[0.0, 0, 0], [1.0, 0, 0]], [[1.0, 0, 0], [3.0, 0, 0]]
    assert metrics.emd(a, b) == pytest.approx(1.5)


def test_evaluate_completion_is_json_friendly(clouds):
    p, g = clouds
    out = metrics.evaluate_completion(p, g, bev_extent=20, bev_bins=20, emd_points=64)
    assert {"chamfer", "fscore@0.1", "precision@0.5", "iou@0.2", "bev_jsd", "emd"} <= set(out)
    json.dumps(out)
    assert out["chamfer"] == pytest.approx(metrics.chamfer(p, g))


def test_bad_inputs_are_clear_errors(clouds):
    p, _ = clouds
    with pytest.raises(ValueError, match=r"pred must be an \(N, 3\)"):
        metrics.chamfer(p[:, :2], p)
    with pytest.raises(ValueError, match="gt is empty"):
        metrics.chamfer(p, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.chamfer(p, p * np.nan)
    with pytest.raises(ValueError, match="positive"):
        metrics.completion_iou(p, p, [0.0])


def test_time_call():
    out = metrics.time_call(lambda: sum(range(1000)), repeats=3)
    assert out["seconds"] > 0 and len(out["all"]) == 3
