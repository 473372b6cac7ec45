"""nuScenes-style detection metrics (fewstep.lidar.detection_metrics): perfect and shifted
boxes, a hand-worked AP, true-positive errors, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

GT = [
    np.array([[0.0, 0.0, 1.8, 4.0, 0.0], [10.0, 3.0, 1.8, 4.5, 0.1]]),
    np.array([[-5.0, 2.0, 1.8, 4.2, 0.0]]),
]


def _with_score(boxes, score=0.9):
    return np.concatenate([boxes, np.full((len(boxes), 1), score)], 1)


def test_perfect_predictions_score_one():
    from fewstep.lidar.detection_metrics import detection_metrics

    m = detection_metrics([_with_score(g) for g in GT], GT)
    assert m["mAP"] == pytest.approx(1.0) and m["NDS"] == pytest.approx(1.0)
    assert m["ATE"] == pytest.approx(0.0) and m["ASE"] == pytest.approx(0.0)


def test_shifted_boxes_drop_below_the_shift_threshold_only():
    from fewstep.lidar.detection_metrics import detection_metrics

    preds = [_with_score(g + np.array([0.75, 0.0, 0, 0, 0])) for g in GT]
    m = detection_metrics(preds, GT)
    assert m["ap@0.5"] == pytest.approx(0.0)
    assert m["ap@1"] == m["ap@2"] == m["ap@4"] == pytest.approx(1.0)
    assert m["mAP"] == pytest.approx(0.75)
    assert m["ATE"] == pytest.approx(0.75)
    assert m["NDS"] == pytest.approx((3 * 0.75 + 0.25 + 1 + 1) / 6)
    far = [_with_score(g + np.array([3.0, 0.0, 0, 0, 0])) for g in GT]
    m = detection_metrics(far, GT)
    assert m["mAP"] == pytest.approx(0.25) and m["ATE"] == 1.0  # no match at 2 m: error 1


def test_average_precision_matches_a_hand_worked_curve():
    """Scores 0.9 TP, 0.8 TP, 0.7 FP, 0.6 TP against 4 boxes: recall .25 .5 .5 .75, precision
    1 1 2/3 3/4. At the 101 recalls r = i / 100 (linear interpolation as nuScenes, 0 beyond
    .75): 1 for i < 50 (50 values), 2/3 at .5, 2/3 + (r - .5) / .25 / 12 for i = 51..74
    (sum 24 * 2/3 + (1 + ... + 24) / 300 = 16 + 1), .75 at i = 75, 0 after."""
    from fewstep.lidar.detection_metrics import average_precision

    is_tp = np.array([True, True, False, True])
    hand = (50 + 2 / 3 + 16 + 1 + 0.75) / 101
    assert average_precision(is_tp, 4, 0.0, 0.0) == pytest.approx(hand)
    # nuScenes clipping: recalls <= .1 dropped, precision floor .1
    prec = np.interp(np.linspace(0, 1, 101), [0.25, 0.5, 0.5, 0.75], [1, 1, 2 / 3, 0.75], right=0)
    clipped = np.clip(prec[11:] - 0.1, 0, None).mean() / 0.9
    assert average_precision(is_tp, 4) == pytest.approx(clipped)


def test_matching_is_greedy_by_score_and_tp_errors():
    from fewstep.lidar.detection_metrics import match, tp_errors

    gt = [np.array([[0.0, 0.0, 2, 4, 0.0], [1.2, 0.0, 2, 4, 0.0]])]
    # the higher score takes its closest box (the first); the second then matches the other
    preds = [np.array([[0.5, 0.0, 2, 4, 0, 0.5], [0.4, 0.0, 2, 4, 0, 0.9]])]
    is_tp, scores, pairs = match(preds, gt, 1.0)
    assert scores.tolist() == [0.9, 0.5] and is_tp.tolist() == [True, True]
    assert pairs == [(0, 1, 0), (0, 0, 1)]
    ate, ase, aoe = tp_errors(np.array([0, 0, 2, 5, np.pi - 0.1]), np.array([0, 0, 2, 4, 0.1]))
    assert ate == 0.0 and ase == pytest.approx(0.2) and aoe == pytest.approx(0.2)


def test_metric_errors_are_clear():
    from fewstep.lidar.detection_metrics import average_precision, detection_metrics, match

    with pytest.raises(ValueError, match="frames"):
        match([np.zeros((0, 6))], [], 1.0)
    with pytest.raises(ValueError, match="at least one ground-truth"):
        detection_metrics([np.zeros((0, 6))], [np.zeros((0, 5))])
    with pytest.raises(ValueError, match="non-finite"):
        detection_metrics([np.full((1, 6), np.nan)], GT[:1])
    with pytest.raises(ValueError, match="ground-truth"):
        average_precision(np.array([True]), 0)
