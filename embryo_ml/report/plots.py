"""Evaluation plots as matplotlib figures (Agg backend: works headless, in CI and on servers)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import auc as area_under  # noqa: E402
from sklearn.metrics import roc_curve


def confusion_matrix_figure(
    matrix: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix"
) -> Figure:
    """Counts with the row-normalised rate in each cell: rows are true classes."""
    fig, ax = plt.subplots(figsize=(3.6 + 0.4 * len(classes), 3.2 + 0.4 * len(classes)))
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if rates[row, col] > 0.5 else "black"
        ax.text(col, row, f"{count}\n{rates[row, col]:.0%}", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_figure(y_true: np.ndarray, p_positive: np.ndarray, positive_class: str) -> Figure:
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, p_positive)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {area_under(fpr, tpr):.3f}")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive_class})")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def training_curves_figure(history: Sequence[dict[str, float]]) -> Figure:
    """Loss (left) and validation AUC (right) per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(epochs, [row["train_loss"] for row in history], label="train")
    left.plot(epochs, [row["val_loss"] for row in history], label="validation")
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    right.plot(epochs, [row["val_auc"] for row in history], c="C2")
    right.set_xlabel("epoch")
    right.set_title("validation ROC AUC")
    fig.tight_layout()
    return fig


def reliability_figure(
    y_true: np.ndarray, p_before: np.ndarray, p_after: np.ndarray, temperature: float
) -> Figure:
    """Observed positive rate against mean predicted probability per bin, before and after
    temperature scaling; the diagonal is perfect calibration."""
    from embryo_ml.train.calibration import expected_calibration_error, reliability_bins

    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for p, name in ((p_before, "before"), (p_after, f"after (T={temperature:.2f})")):
        predicted, observed, _ = reliability_bins(y_true, p)
        ece = expected_calibration_error(y_true, p)
        ax.plot(predicted, observed, marker="o", label=f"{name}, ECE {ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed rate")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
