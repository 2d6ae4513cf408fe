"""Binary classification metrics on positive-class probabilities.

A validation set with one class has no ROC AUC; we report NaN rather than a misleading number.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from embryo_ml.numeric import softmax  # noqa: F401  (re-exported for training code)


def binary_metrics(
    y_true: np.ndarray, p_positive: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """ROC AUC, balanced accuracy, F1, sensitivity, specificity, accuracy at `threshold`.

    `y_true` is 1 for the positive class. AUC is NaN when only one class is present.
    """
    y_true = np.asarray(y_true).astype(int)
    p_positive = np.asarray(p_positive, dtype=float)
    y_pred = (p_positive >= threshold).astype(int)
    both = len(np.unique(y_true)) == 2
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    return {
        "auc": float(roc_auc_score(y_true, p_positive)) if both else math.nan,
        "pr_auc": float(average_precision_score(y_true, p_positive)) if both else math.nan,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if both else math.nan,
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
        "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
        "accuracy": float((tp + tn) / len(y_true)) if len(y_true) else math.nan,
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def roc_points(y_true: np.ndarray, p_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(y_true, p_positive)
    return fpr, tpr
