"""nuScenes-style detection metrics for BEV boxes ``(x, y, w, l, yaw)`` of one class.

Follows nuscenes-devkit's ``eval/detection/algo.py`` (``accumulate``, ``calc_ap``, ``calc_tp``):

- Matching (per distance threshold d): predictions of all frames, sorted by descending score,
  each take the closest not yet matched ground-truth box of their frame whose BEV centre lies
  within d metres (a true positive); otherwise they are false positives.
- AP: precision ``tp / (tp + fp)`` and recall ``tp / n_gt`` along the sorted list, precision
  interpolated linearly at 101 recalls in [0, 1] (0 beyond the last recall), the recalls up to
  ``min_recall`` dropped, ``min_precision`` subtracted and clipped at 0, then the mean divided
  by ``1 - min_precision`` (nuScenes: 0.1 and 0.1). mAP = mean AP over the thresholds
  (0.5, 1, 2, 4 m as nuScenes).
- True-positive errors, over the matches at ``tp_threshold`` (2 m as nuScenes), simplified to a
  plain mean over matched pairs (nuScenes averages the errors along the recall curve above
  min_recall): ATE = BEV centre distance (m); ASE = 1 - IoU of the two footprints after
  aligning centre and heading (``1 - min(w) min(l) / (w l + w' l' - min(w) min(l))``);
  AOE = smallest heading difference in radians, modulo a half turn (car boxes here carry no
  front/back, so pi-periodic as nuScenes does for barriers). An error with no match is 1.
- Simplified NDS (no velocity or attribute errors, mAP keeping half the weight as in
  nuScenes' ``NDS = (5 mAP + sum_5 (1 - min(1, mTP))) / 10``):

      NDS = (3 mAP + (1 - min(1, ATE)) + (1 - min(1, ASE)) + (1 - min(1, AOE))) / 6
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # nuScenes centre-distance thresholds, metres


@dataclass
class MetricConfig:
    thresholds: tuple[float, ...] = THRESHOLDS  # centre-distance thresholds of mAP, metres
    tp_threshold: float = 2.0  # threshold whose matches give ATE / ASE / AOE
    min_recall: float = 0.1  # recalls at or below this are dropped from AP (nuScenes 0.1)
    min_precision: float = 0.1  # precision floor subtracted in AP (nuScenes 0.1)


def _check(boxes, name: str, with_score: bool) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6 if with_score else 5)
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{name} holds non-finite values")
    return b


def match(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], threshold: float
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Greedy nuScenes matching at one centre-distance threshold.

    preds: per frame (P_f, 6) ``(x, y, w, l, yaw, score)``; gts: per frame (G_f, 5).
    Returns (is_tp (P,) bool and scores (P,) in descending-score order, and the matches
    ``(frame, pred index, gt index)``)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} frames of predictions but {len(gts)} of ground truth")
    p = [_check(x, "predictions", True) for x in preds]
    g = [_check(x, "ground truth", False) for x in gts]
    flat = [(f, i, row[5]) for f, rows in enumerate(p) for i, row in enumerate(rows)]
    flat.sort(key=lambda r: -r[2])  # stable: ties keep frame / index order
    taken = [np.zeros(len(x), bool) for x in g]
    is_tp, scores, pairs = np.zeros(len(flat), bool), np.zeros(len(flat)), []
    for n, (f, i, s) in enumerate(flat):
        scores[n] = s
        if len(g[f]) == 0:
            continue
        d = np.linalg.norm(g[f][:, :2] - p[f][i, :2], axis=1)
        d[taken[f]] = np.inf
        j = int(np.argmin(d))
        if d[j] < threshold:
            taken[f][j], is_tp[n] = True, True
            pairs.append((f, i, j))
    return is_tp, scores, pairs


def average_precision(
    is_tp: np.ndarray, n_gt: int, min_recall: float = 0.1, min_precision: float = 0.1
) -> float:
    """nuScenes AP of a descending-score TP / FP sequence (see the module docstring)."""
    if n_gt <= 0:
        raise ValueError("average_precision needs at least one ground-truth box")
    if not 0.0 <= min_recall < 1.0 or not 0.0 <= min_precision < 1.0:
        raise ValueError("min_recall and min_precision must lie in [0, 1)")
    if len(is_tp) == 0:
        return 0.0
    tp = np.cumsum(is_tp).astype(np.float64)
    fp = np.cumsum(~np.asarray(is_tp, bool)).astype(np.float64)
    prec, rec = tp / (tp + fp), tp / n_gt
    prec = np.interp(np.linspace(0.0, 1.0, 101), rec, prec, right=0.0)
    prec = prec[int(round(100 * min_recall)) + 1 :] if min_recall > 0 else prec
    prec = np.clip(prec - min_precision, 0.0, None)
    return float(np.mean(prec)) / (1.0 - min_precision)


def tp_errors(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """(translation m, 1 - aligned IoU, heading rad mod pi) of one matched pair."""
    ate = float(np.linalg.norm(pred[:2] - gt[:2]))
    inter = min(pred[2], gt[2]) * min(pred[3], gt[3])
    ase = 1.0 - inter / (pred[2] * pred[3] + gt[2] * gt[3] - inter)
    d = abs((pred[4] - gt[4] + np.pi / 2) % np.pi - np.pi / 2)
    return ate, float(ase), float(d)


def detection_metrics(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], cfg: MetricConfig | None = None
) -> dict[str, float]:
    """mAP, AP per threshold, ATE / ASE / AOE and the simplified NDS over frames.

    preds: per frame (P_f, 6) ``(x, y, w, l, yaw, score)``; gts: per frame (G_f, 5)."""
    cfg = cfg or MetricConfig()
    n_gt = int(sum(len(_check(g, "ground truth", False)) for g in gts))
    if n_gt == 0:
        raise ValueError("detection_metrics needs at least one ground-truth box in some frame")
    out: dict[str, float] = {}
    for d in cfg.thresholds:
        is_tp, _, _ = match(preds, gts, d)
        out[f"ap@{d:g}"] = average_precision(is_tp, n_gt, cfg.min_recall, cfg.min_precision)
    out["mAP"] = float(np.mean([out[f"ap@{d:g}"] for d in cfg.thresholds]))
    _, _, pairs = match(preds, gts, cfg.tp_threshold)
    p = [_check(x, "predictions", True) for x in preds]
    g = [_check(x, "ground truth", False) for x in gts]
    errs = np.array([tp_errors(p[f][i], g[f][j]) for f, i, j in pairs]).reshape(-1, 3)
    for k, name in enumerate(("ATE", "ASE", "AOE")):
        out[name] = float(errs[:, k].mean()) if len(errs) else 1.0
    tp_terms = sum(1.0 - min(1.0, out[k]) for k in ("ATE", "ASE", "AOE"))
    out["NDS"] = (3.0 * out["mAP"] + tp_terms) / 6.0
    return out
