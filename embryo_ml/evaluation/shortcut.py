"""Shortcut baselines: how far a single metadata column gets without looking at the embryo.

For a column such as `day`, the baseline "model" scores each row with the positive rate of its
value among the *training* rows (day 3: 12% good, day 5: 61% good, ...). Its ROC AUC is what a
classifier reaches by recognising that value in the image and nothing else. A model whose AUC
does not beat that by `margin` may have learnt the shortcut; its within-group AUCs tell whether
it has learnt anything else. Values unseen in training get the overall training rate; a missing
value is a value of its own (`(missing)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.evaluation.bootstrap import GroupBootstrap
from embryo_ml.evaluation.metrics import roc_auc

MISSING = "(missing)"


def column_values(values: pd.Series | np.ndarray) -> np.ndarray:
    """A column as text categories (`3` and `3.0` both read `3`), missing as `(missing)`."""
    out = []
    for value in pd.Series(values, dtype=object):
        if value is None or (not isinstance(value, str) and pd.isna(value)) or value == "":
            out.append(MISSING)
        elif isinstance(value, float) and value.is_integer():
            out.append(str(int(value)))
        else:
            out.append(str(value))
    return np.array(out, dtype=object)


def natural_key(value: str) -> tuple[int, float, str]:
    """Sort key for category values: numbers in numeric order first, then text."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, math.inf, value)


def fit_rates(values: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], float]:
    """Positive rate per value and overall, from training rows."""
    values, y = column_values(values), np.asarray(y, dtype=bool)
    prior = float(y.mean()) if len(y) else math.nan
    rates = {str(v): float(y[values == v].mean()) for v in np.unique(values)}
    return rates, prior


def baseline_scores(train_values: np.ndarray, train_y: np.ndarray, values: np.ndarray
                    ) -> np.ndarray:
    """Each row's score under the baseline fit on (train_values, train_y)."""
    rates, prior = fit_rates(train_values, train_y)
    return np.array([rates.get(v, prior) for v in column_values(values)], dtype=float)


@dataclass
class ShortcutResult:
    column: str
    baseline_auc: float
    model_auc: float
    margin: float
    gap_ci: tuple[float, float]  # 95% interval of model AUC - baseline AUC (patients resampled)
    fit_on: str  # where the per-value rates were learnt

    @property
    def gap(self) -> float:
        return self.model_auc - self.baseline_auc

    @property
    def warning(self) -> bool:
        """True when the model does not beat the column-only baseline by the margin."""
        return not (self.gap >= self.margin)  # NaN (no AUC) warns too: nothing is shown

    def message(self) -> str:
        if not self.warning:
            return (f"model AUC {self.model_auc:.3f} beats the '{self.column}'-only baseline "
                    f"{self.baseline_auc:.3f} by {self.gap:.3f}")
        text = (f"WARNING: model AUC {self.model_auc:.3f} does not beat the AUC of "
                f"'{self.column}' alone ({self.baseline_auc:.3f}) by {self.margin:.2f}: it tells "
                f"the classes apart no better than knowing the {self.column} does")
        if self.baseline_auc >= 0.5 + self.margin:  # the column itself is informative
            text += (f"; its overall AUC may come from recognising the {self.column}, not from "
                     "judging the embryo")
        return text + f"; judge it by its within-{self.column} AUCs"

    def to_json(self) -> dict[str, Any]:
        return {"column": self.column, "baseline_auc": self.baseline_auc,
                "model_auc": self.model_auc, "gap": self.gap, "gap_ci": list(self.gap_ci),
                "margin": self.margin, "warning": self.warning, "fit_on": self.fit_on}


def compare(column: str, y: np.ndarray, p: np.ndarray, baseline: np.ndarray, margin: float,
            fit_on: str, bootstrap: GroupBootstrap | None = None) -> ShortcutResult:
    """Model vs baseline AUC on the same rows; the interval of the gap resamples patients."""
    y = np.asarray(y, dtype=bool)
    model_auc = float(roc_auc(y, p)[0])
    baseline_auc = float(roc_auc(y, baseline)[0])
    gap_ci = (math.nan, math.nan)
    if bootstrap is not None:
        gap_ci = bootstrap.interval(lambda w: roc_auc(y, p, w) - roc_auc(y, baseline, w))
    return ShortcutResult(column, baseline_auc, model_auc, margin, gap_ci, fit_on)
