"""Fairness, utility and fidelity of synthetic tables.

Fairness of a classifier's predictions yhat on real rows with protected attribute s and true
label y (Hardt, Price, Srebro, "Equality of Opportunity in Supervised Learning", NeurIPS 2016):

    demographic parity gap  = | P(yhat=1 | s=0) - P(yhat=1 | s=1) |
    equalised-odds gap      = max over y in {0,1} of | P(yhat=1 | s=0, Y=y) - P(yhat=1 | s=1, Y=y) |

Utility ("train on synthetic, test on real", TSTR; Esteban et al. 2017): accuracy on real test
rows of a logistic regression trained on the synthetic rows' features (and protected
attribute) and labels.

Fidelity: per numeric column the 1-Wasserstein distance between real and synthetic values in
units of the real column's standard deviation, per categorical column the total-variation
distance between level frequencies, and the mean absolute difference between the Pearson
correlation matrices of the encoded feature columns.
"""

from __future__ import annotations

import torch

from fewstep.dataset_distill.fair.data import Encoding, Table


def _rate(pred: torch.Tensor, mask: torch.Tensor) -> float:
    return float(pred[mask].float().mean()) if bool(mask.any()) else float("nan")


def demographic_parity_gap(pred: torch.Tensor, protected: torch.Tensor) -> float:
    """|P(pred=1 | s=0) - P(pred=1 | s=1)| for binary tensors pred [n], protected [n]."""
    _check_binary(pred, protected)
    return abs(_rate(pred, protected == 0) - _rate(pred, protected == 1))


def equalized_odds_gap(pred: torch.Tensor, protected: torch.Tensor, label: torch.Tensor) -> float:
    """max_y |P(pred=1 | s=0, Y=y) - P(pred=1 | s=1, Y=y)| (Hardt et al. 2016, Def. 2.1)."""
    _check_binary(pred, protected, label)
    gaps = []
    for yv in (0, 1):
        a, b = (
            _rate(pred, (protected == 0) & (label == yv)),
            _rate(pred, (protected == 1) & (label == yv)),
        )
        if a == a and b == b:  # both groups present
            gaps.append(abs(a - b))
    return max(gaps) if gaps else float("nan")


def _check_binary(*ts: torch.Tensor) -> None:
    n = ts[0].numel()
    for t in ts:
        if t.numel() != n:
            raise ValueError(f"expected tensors of equal length, got {[x.numel() for x in ts]}")
        if t.numel() and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("expected binary (0/1) predictions, protected attribute and labels")


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int = 0):
    """A scikit-learn logistic regression on encoded features (the downstream model)."""
    from sklearn.linear_model import LogisticRegression

    if torch.unique(y).numel() < 2:
        raise ValueError("the training rows have a single label; a classifier needs both")
    return LogisticRegression(max_iter=1000, random_state=seed).fit(x.numpy(), y.numpy())


def features(t: Table, enc: Encoding, use_protected: bool) -> torch.Tensor:
    """Encoded feature columns, plus the protected attribute as a last column if asked."""
    x = enc.encode(t)
    return torch.cat([x, t.protected.float().unsqueeze(1)], 1) if use_protected else x


def downstream_metrics(
    train: Table, test: Table, enc: Encoding, seed: int = 0, use_protected: bool = True
) -> dict:
    """Train on ``train`` (synthetic or real), test on real ``test``: accuracy and the DP and
    EO gaps of the predictions on the test rows. The model sees every column but the label
    (``use_protected``: the protected attribute too, as in the fair-generation literature's
    evaluations, so data in which y and s are independent can teach it to undo proxies)."""
    clf = train_classifier(features(train, enc, use_protected), train.label, seed)
    pred = torch.tensor(clf.predict(features(test, enc, use_protected).numpy()))
    return {
        "accuracy": float((pred == test.label).float().mean()),
        "dp_gap": demographic_parity_gap(pred, test.protected),
        "eo_gap": equalized_odds_gap(pred, test.protected, test.label),
        "positive_rate": float(pred.float().mean()),
    }


def data_gap(t: Table) -> float:
    """Demographic-parity gap of the labels themselves."""
    return demographic_parity_gap(t.label, t.protected)


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """1-Wasserstein distance between two 1-D samples: the integral of |F_a^-1 - F_b^-1|,
    computed on the merged quantile grid."""
    a, b = torch.sort(a.double()).values, torch.sort(b.double()).values
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    na, nb = a.numel(), b.numel()
    grid = torch.unique(
        torch.cat(
            [
                torch.arange(1, na + 1, dtype=torch.float64) / na,
                torch.arange(1, nb + 1, dtype=torch.float64) / nb,
            ]
        )
    )
    lower = torch.cat([grid.new_zeros(1), grid[:-1]])
    widths, mid = grid - lower, (grid + lower) / 2  # F^-1 is constant on each (lower, grid]
    qa = a[torch.clamp(torch.floor(mid * na).long(), 0, na - 1)]
    qb = b[torch.clamp(torch.floor(mid * nb).long(), 0, nb - 1)]
    return float((widths * (qa - qb).abs()).sum())


def fidelity(real: Table, synth: Table, enc: Encoding) -> dict:
    """Per-column marginal distances and the correlation-matrix difference (module doc)."""
    out: dict = {"numeric_w1": {}, "categorical_tv": {}}
    for j, name in enumerate(real.numeric_names):
        sd = float(real.numeric[:, j].std().clamp(min=1e-6))
        out["numeric_w1"][name] = wasserstein_1d(real.numeric[:, j], synth.numeric[:, j]) / sd
    for j, name in enumerate(real.categorical_names):
        k = len(real.categories[j])
        pr = torch.bincount(real.categorical[:, j], minlength=k).double() / len(real)
        ps = torch.bincount(synth.categorical[:, j], minlength=k).double() / len(synth)
        out["categorical_tv"][name] = float(0.5 * (pr - ps).abs().sum())
    cr, cs = _corr(enc.encode(real)), _corr(enc.encode(synth))
    iu = torch.triu_indices(cr.shape[0], cr.shape[0], 1)
    out["correlation_mad"] = float((cr - cs)[iu[0], iu[1]].abs().mean())
    vals = list(out["numeric_w1"].values()) + list(out["categorical_tv"].values())
    out["mean_marginal_distance"] = sum(vals) / len(vals) if vals else 0.0
    return out


def _corr(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    sd = x.pow(2).mean(0).sqrt()
    c = (x.t() @ x) / x.shape[0] / (sd.unsqueeze(0) * sd.unsqueeze(1)).clamp(min=1e-12)
    return torch.where((sd.unsqueeze(0) * sd.unsqueeze(1)) > 1e-12, c, torch.zeros_like(c))
