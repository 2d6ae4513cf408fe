"""Binary metrics under row weights, many weightings at once.

Each function takes `weights` of shape (B, n): B weightings of the same n rows, and returns B
values. Integer weights are bootstrap multiplicities, so a weighted metric is exactly the metric
of the resampled rows; all-ones weights give the ordinary metric (the same numbers as
scikit-learn's `roc_auc_score`, `average_precision_score`, `balanced_accuracy_score` and this
package's `expected_calibration_error`, which tests check). A weighting without both classes
gives NaN for the metrics that need both.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 10
METRICS = ("auc", "pr_auc", "balanced_accuracy", "ece")


def _as_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones((1, n))
    weights = np.asarray(weights, dtype=float)
    return weights.reshape(1, -1) if weights.ndim == 1 else weights


def _tie_blocks(
    y: np.ndarray, p: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted positives and negatives per distinct score, highest score first: (B, K) each."""
    order = np.argsort(-p, kind="stable")
    ranked = p[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    w = weights[:, order]
    positive = y[order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    return pos, neg


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def roc_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=float)
    if len(y) == 0:
        return np.full(len(_as_weights(weights, 0)), np.nan)
    pos, neg = _tie_blocks(y, p, _as_weights(weights, len(y)))
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    below = n_neg[:, None] - np.cumsum(neg, axis=1)  # negatives scored lower than the block
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    both = (n_pos > 0) & (n_neg > 0)
    return np.where(both, _divide(wins, n_pos * n_neg), np.nan)


def average_precision(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None
                      ) -> np.ndarray:
    """PR AUC as average precision: sum over score thresholds of (recall step) x precision."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=float)
    if len(y) == 0:
        return np.full(len(_as_weights(weights, 0)), np.nan)
    pos, neg = _tie_blocks(y, p, _as_weights(weights, len(y)))
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    true_pos = np.cumsum(pos, axis=1)
    precision = _divide(true_pos, true_pos + np.cumsum(neg, axis=1))
    terms = np.where(pos > 0, pos * np.nan_to_num(precision), 0.0)
    value = _divide(terms.sum(axis=1), n_pos)
    return np.where((n_pos > 0) & (n_neg > 0), value, np.nan)


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray, weights: np.ndarray | None = None
                      ) -> np.ndarray:
    """Mean of sensitivity and specificity of the given decisions."""
    y, predicted = np.asarray(y, dtype=bool), np.asarray(predicted, dtype=bool)
    w = _as_weights(weights, len(y))
    n_pos, n_neg = w @ y, w @ ~y
    sensitivity = _divide(w @ (y & predicted), n_pos)
    specificity = _divide(w @ (~y & ~predicted), n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), (sensitivity + specificity) / 2, np.nan)


def share(hit: np.ndarray, among: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted share of `hit` rows among the `among` rows (sensitivity: hit = predicted
    positive, among = truly positive); NaN where no row counts."""
    hit, among = np.asarray(hit, dtype=bool), np.asarray(among, dtype=bool)
    w = _as_weights(weights, len(hit))
    return _divide(w @ (hit & among), w @ among)


def calibration_error(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None,
                      bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error over `bins` equal-width probability bins (see
    `embryo_ml.evaluation.calibration.expected_calibration_error`): sum over bins of
    |positives - sum of probabilities| / total weight."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    w = _as_weights(weights, len(y))
    index = np.minimum((p * bins).astype(int), bins - 1)
    members = np.zeros((len(y), bins))
    members[np.arange(len(y)), index] = 1.0
    gap = np.abs((w * y) @ members - (w * p) @ members).sum(axis=1)
    return _divide(gap, w.sum(axis=1))


def metric_values(
    y: np.ndarray, p: np.ndarray, predicted: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every metric of `METRICS` for each weighting: {name: (B,) array}."""
    return {"auc": roc_auc(y, p, weights), "pr_auc": average_precision(y, p, weights),
            "balanced_accuracy": balanced_accuracy(y, predicted, weights),
            "ece": calibration_error(y, p, weights)}


def point_metrics(y: np.ndarray, p: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """`metric_values` of the rows as they are (no resampling), as plain floats."""
    return {k: float(v[0]) for k, v in metric_values(y, p, predicted).items()}
