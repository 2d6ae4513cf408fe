"""Evaluation plots as matplotlib figures, drawn headless (works in CI and on servers).

ROC and PR curves with their AUC, ROC curves of each subgroup on one figure, the score
distribution per class, the confusion matrix, the reliability diagram and training curves.
Training and cross-validation log them to MLflow; `embryo-ml evaluate` saves them as PNGs.

Each figure is a `matplotlib.figure.Figure` on its own Agg canvas (`_figure`), outside pyplot:
drawing one changes no global state, so importing this module (or training code) from a
notebook leaves the user's backend and pyplot's figures as they were. A notebook displays the
returned figure like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc as area_under
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from embryo_ml.fileio import atomic_path


def _figure(figsize: tuple[float, float], ncols: int = 1) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas (not registered with pyplot) and its axes (one, or a row
    of `ncols`), as `pyplot.subplots(1, ncols, figsize=figsize)` would make them."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def confusion_matrix_figure(
    matrix: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix"
) -> Figure:
    """Counts with the row-normalised rate in each cell: rows are true classes."""
    fig, ax = _figure((3.6 + 0.4 * len(classes), 3.2 + 0.4 * len(classes)))
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
    fig, ax = _figure((4.2, 4.2))
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
    """Loss (left) and validation AUC (right) per epoch; the right panel also shows the
    within-group AUC that selects the checkpoint (`val_within_<column>_auc`) when there is one.
    Epochs that were not validated (warm-up, `train.validate_warmup`) have no validation point;
    validation points are marked, so that a single one shows."""
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = _figure((8, 3.2), ncols=2)
    left.plot(epochs, [row["train_loss"] for row in history], label="train")
    left.plot(epochs, [row.get("val_loss", np.nan) for row in history], marker=".",
              label="validation")
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    right.plot(epochs, [row.get("val_auc", np.nan) for row in history], c="C2", marker=".",
               label="overall")
    within = sorted({k for row in history for k in row if k.startswith("val_within_")})
    for i, key in enumerate(within):
        right.plot(epochs, [row.get(key, np.nan) for row in history], c=f"C{3 + i}", marker=".",
                   label=key.removeprefix("val_").replace("_", " "))
    if within:
        right.legend(fontsize="small")
    right.set_xlabel("epoch")
    right.set_title("validation ROC AUC")
    fig.tight_layout()
    return fig


def reliability_figure(
    y_true: np.ndarray, p_before: np.ndarray | None, p_after: np.ndarray,
    temperature: float | None = None,
) -> Figure:
    """Observed positive rate against mean predicted probability per bin, before and after
    temperature scaling (or, with `p_before=None`, of the scores as given); the diagonal is
    perfect calibration."""
    from embryo_ml.evaluation.calibration import expected_calibration_error, reliability_bins

    fig, ax = _figure((4.4, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    curves = [(p_after, "scores" if temperature is None else f"after (T={temperature:.2f})")]
    if p_before is not None:
        curves.insert(0, (p_before, "before"))
    for p, name in curves:
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


def pr_figure(y_true: np.ndarray, p_positive: np.ndarray, positive_class: str) -> Figure:
    """Precision against recall; the dotted line is the share of positives (a random score)."""
    y_true = np.asarray(y_true, dtype=bool)
    fig, ax = _figure((4.2, 4.2))
    if len(np.unique(y_true)) == 2:
        precision, recall, _ = precision_recall_curve(y_true, p_positive)
        ap = average_precision_score(y_true, p_positive)
        ax.step(recall, precision, where="post", lw=2, label=f"PR AUC (AP) = {ap:.3f}")
        ax.axhline(y_true.mean(), ls=":", c="grey", lw=1,
                   label=f"share of {positive_class} = {y_true.mean():.2f}")
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "one class only: no PR curve", ha="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"recall ({positive_class})")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall curve")
    fig.tight_layout()
    return fig


def score_distribution_figure(
    y_true: np.ndarray, p_positive: np.ndarray, positive_class: str,
    negative_class: str = "other", threshold: float | None = None,
) -> Figure:
    """Histograms of the positive-class score for each true class (and the threshold)."""
    y_true = np.asarray(y_true, dtype=bool)
    p_positive = np.asarray(p_positive, dtype=float)
    fig, ax = _figure((5.0, 3.4))
    bins = np.linspace(0, 1, 21)
    for mask, name, colour in ((~y_true, negative_class, "C1"), (y_true, positive_class, "C0")):
        ax.hist(p_positive[mask], bins=bins, alpha=0.55, color=colour,
                label=f"true {name} (n={int(mask.sum())})")
    if threshold is not None:
        ax.axvline(threshold, ls="--", c="black", lw=1, label=f"threshold {threshold:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"score (probability of {positive_class})")
    ax.set_ylabel("images")
    ax.set_title("Score distribution per class")
    ax.legend(loc="upper center", fontsize="small")
    fig.tight_layout()
    return fig


def subgroup_roc_figure(
    y_true: np.ndarray, p_positive: np.ndarray, values: np.ndarray, column: str,
    positive_class: str, min_size: int = 1,
) -> Figure:
    """One ROC curve per value of `column` (groups with both classes and `min_size` images),
    and the overall curve dashed, on one figure: curves far below the overall one mean the
    overall AUC comes partly from telling the groups apart."""
    y_true = np.asarray(y_true, dtype=bool)
    p_positive = np.asarray(p_positive, dtype=float)
    from embryo_ml.evaluation.shortcut import column_values, natural_key

    values = column_values(values)
    fig, ax = _figure((4.8, 4.6))
    skipped = []
    for value in sorted(set(values), key=natural_key):
        mask = values == value
        y, p = y_true[mask], p_positive[mask]
        if mask.sum() < min_size or len(np.unique(y)) < 2:
            skipped.append(value)
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.6, label=f"{column}={value}: AUC {area_under(fpr, tpr):.3f} "
                                         f"(n={int(mask.sum())})")
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, p_positive)
        ax.plot(fpr, tpr, lw=1.4, ls="--", c="black",
                label=f"all: AUC {area_under(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    if skipped:
        ax.text(0.98, 0.02, "not drawn (one class or too few): " + ", ".join(skipped),
                ha="right", va="bottom", fontsize="x-small", transform=ax.transAxes)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive_class})")
    ax.set_title(f"ROC curve per {column}")
    ax.legend(loc="center right", fontsize="x-small")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str) -> None:
    """Write the figure (format from the extension) atomically and durably, then close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        _close(fig)


def _close(fig: Figure) -> None:
    """Let pyplot forget a figure it manages (a caller's own `plt.figure()`); the figures drawn
    here have no manager and are freed with their last reference."""
    if fig.canvas.manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
