"""Class-conditional (Mondrian) split-conformal prediction sets: the `uncertain` flag.

Fit at export on the run's validation images (`val_predictions.csv`: true label and calibrated
probabilities). An image's nonconformity for class c is 1 - p_c, its calibrated probability of
c. For each class c, with n_c validation images of that class, q_c is the ceil((n_c + 1)(1 -
alpha))-th smallest of their nonconformities (1.0, i.e. "always in the set", when that rank is
above n_c: too few images of the class to promise anything tighter). A scored image's prediction
set is every class c with 1 - p_c <= q_c.

The guarantee, in plain words: for images like the validation ones, an image whose true class
is c has c in its set at least 1 - alpha of the time, for every class separately (so the rare
class is covered as well as the common one). It holds on average over images and calibration
sets, not for each image, and only for images exchangeable with the validation images: under
dataset shift (another clinic, microscope or protocol) it does not hold, which is what the
out-of-distribution flag and the dataset-shift warning are for.

A set with exactly one class is a confident call. A set with both (all) classes means the model
cannot decide at this confidence, and an empty set that no class is plausible: both add the flag
`uncertain`. The score is always reported.

Scoring uses the unaugmented view's calibrated probabilities (the ones the quantiles were fitted
on), also with test-time augmentation. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["NONCONFORMITY", "conformal_flags", "fit_conformal", "prediction_sets"]

NONCONFORMITY = "1 - calibrated probability of the class"


def class_quantile(nonconformity: np.ndarray, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest value, 1.0 when that rank exceeds n."""
    values = np.sort(np.asarray(nonconformity, dtype=np.float64))
    rank = math.ceil((values.size + 1) * (1.0 - alpha))
    return 1.0 if rank > values.size else float(values[rank - 1])


def fit_conformal(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                  alpha: float) -> dict[str, Any]:
    """The bundle's `conformal` record from calibration probabilities (N, C) and true class
    indices (N,): {"alpha", "score", "quantiles": {class: q}, "n_calibration": {class: n}}."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if probs.ndim != 2 or probs.shape != (len(targets), len(classes)):
        raise ValueError(f"expected probabilities (N, {len(classes)}) for {len(targets)} "
                         f"labels, got {probs.shape}")
    quantiles, counts = {}, {}
    for c, name in enumerate(classes):
        own = targets == c
        counts[name] = int(own.sum())
        quantiles[name] = class_quantile(1.0 - probs[own, c], alpha)
    return {"alpha": float(alpha), "score": NONCONFORMITY, "quantiles": quantiles,
            "n_calibration": counts}


def prediction_sets(probs: np.ndarray, record: dict[str, Any],
                    classes: Sequence[str]) -> np.ndarray:
    """(N, C) bool: class c is in row n's set when 1 - p[n, c] <= q_c."""
    q = np.array([float(record["quantiles"][c]) for c in classes])
    return (1.0 - np.asarray(probs, dtype=np.float64)) <= q[None, :] + 1e-12


def conformal_flags(probs: np.ndarray, record: dict[str, Any] | None,
                    classes: Sequence[str]) -> list[list[str]]:
    """Per row: ["uncertain"] unless its prediction set holds exactly one class; all [] without
    a record (a bundle from before conformal sets)."""
    if record is None:
        return [[] for _ in range(len(probs))]
    sizes = prediction_sets(probs, record, classes).sum(axis=1)
    return [[] if size == 1 else ["uncertain"] for size in sizes.tolist()]
