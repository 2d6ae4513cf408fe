"""Calibration: temperature scaling of logits, calibration error, and the decision threshold.

A score an embryologist reads as "70%" should be right about 70% of the time. Temperature
scaling divides the logits by one number fit on validation data (minimising the negative
log-likelihood); it changes how confident the model is, never its ranking, so ROC AUC is
unchanged. The temperature and the threshold go into the bundle; the torch-free scorer applies
them.

Caveat (documented in docs/training.md): the same validation patients choose the best epoch, the
temperature and the threshold, so these validation numbers are slightly optimistic; a held-out
test split (`embryo-ml data split`) gives the honest figure.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from embryo_ml.numeric import softmax


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    probs = softmax(logits, temperature)
    picked = probs[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising validation NLL of softmax(logits / T)."""
    if len(targets) == 0 or len(np.unique(targets)) < 2:
        return 1.0  # nothing to calibrate against
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, targets, math.exp(log_t)),
        bounds=(math.log(0.05), math.log(20.0)), method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


def expected_calibration_error(y_true: np.ndarray, p_positive: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate - mean predicted probability| over equal-width probability bins,
    weighted by the bin's share of samples (binary, on the positive class)."""
    y_true = np.asarray(y_true, dtype=float)
    p_positive = np.asarray(p_positive, dtype=float)
    if len(y_true) == 0:
        return math.nan
    index = np.minimum((p_positive * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(y_true[members].mean() - p_positive[members].mean())
    return float(error)


def brier_score(y_true: np.ndarray, p_positive: np.ndarray) -> float:
    y_true = np.asarray(y_true, dtype=float)
    return float(np.mean((np.asarray(p_positive, dtype=float) - y_true) ** 2))


def reliability_bins(
    y_true: np.ndarray, p_positive: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed rate, count) per non-empty bin, for the reliability diagram."""
    y_true = np.asarray(y_true, dtype=float)
    p_positive = np.asarray(p_positive, dtype=float)
    index = np.minimum((p_positive * bins).astype(int), bins - 1)
    rows = [(p_positive[index == b].mean(), y_true[index == b].mean(), int((index == b).sum()))
            for b in range(bins) if (index == b).any()]
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)
    predicted, observed, counts = map(np.asarray, zip(*rows))
    return predicted, observed, counts


def choose_threshold(
    y_true: np.ndarray, p_positive: np.ndarray, method: str = "youden",
    target_sensitivity: float = 0.9, fixed: float = 0.5,
) -> float:
    """Decision threshold on the positive-class probability.

    `youden` maximises sensitivity + specificity - 1; `sensitivity` is the highest threshold
    that still reaches `target_sensitivity` (miss few good embryos); `fixed` returns `fixed`.
    With one class only, `fixed` is used.
    """
    y_true = np.asarray(y_true).astype(bool)
    p_positive = np.asarray(p_positive, dtype=float)
    if method == "fixed" or y_true.all() or not y_true.any():
        return float(fixed)
    candidates = np.unique(p_positive)[::-1]  # descending: sensitivity grows as we go
    n_pos, n_neg = y_true.sum(), (~y_true).sum()
    best, best_value = float(fixed), -math.inf
    for threshold in candidates:
        predicted = p_positive >= threshold
        sensitivity = (predicted & y_true).sum() / n_pos
        if method == "sensitivity":
            if sensitivity >= target_sensitivity:
                return float(threshold)
            continue
        specificity = (~predicted & ~y_true).sum() / n_neg
        if sensitivity + specificity - 1 > best_value:
            best, best_value = float(threshold), sensitivity + specificity - 1
    if method == "sensitivity":
        return float(candidates[-1])
    return best
