"""Metrics per subgroup: each value of a manifest column (day, clinic, focal plane, ...).

Every group is listed, none silently dropped: a group with fewer than `min_size` images is
reported as `too few` (no metrics: a 95% interval on 6 images says nothing), and a group with
one class only as `one class` (calibration error only: AUC, PR AUC and balanced accuracy need
both classes). The mean within-group AUC of a column, over its `ok` groups, is the number to
read beside the overall AUC: it is what the model does once the column is held fixed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from embryo_ml.evaluation.bootstrap import GroupBootstrap, normal_interval, percentile_interval
from embryo_ml.evaluation.metrics import METRICS, metric_values, roc_auc
from embryo_ml.evaluation.shortcut import column_values, natural_key

ALL = "(all)"


def group_status(y: np.ndarray, min_size: int) -> str:
    if len(y) < min_size:
        return f"too few (n < {min_size})"
    if y.all() or not y.any():
        return "one class"
    return "ok"


def ok_groups(y: np.ndarray, values: np.ndarray, min_size: int) -> list[np.ndarray]:
    """Row indices of each group of `values` that has both classes and `min_size` rows."""
    values = column_values(values)
    groups = []
    for value in sorted(set(values), key=natural_key):
        rows = np.flatnonzero(values == value)
        if group_status(y[rows], min_size) == "ok":
            groups.append(rows)
    return groups


def mean_group_auc(y: np.ndarray, p: np.ndarray, values: np.ndarray, min_size: int,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Unweighted mean over `ok` groups of each group's AUC; NaN when no group is `ok`.
    With `weights` (B, n): one value per weighting."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=float)
    groups = ok_groups(y, values, min_size)
    n_rows = 1 if weights is None else len(weights)
    if not groups:
        return np.full(n_rows, np.nan)
    per_group = np.stack([roc_auc(y[g], p[g], None if weights is None else weights[:, g])
                          for g in groups])
    with np.errstate(all="ignore"):
        counted = np.isfinite(per_group).sum(axis=0)
        total = np.nansum(per_group, axis=0)
    return np.where(counted > 0, total / np.maximum(counted, 1), np.nan)


def pooled_group_auc(y: np.ndarray, p: np.ndarray, values: np.ndarray) -> tuple[float, int]:
    """Within-group AUC pooled over groups, each weighted by its positive x negative pairs:
    the share of same-group (good, poor) pairs the scores put in the right order, and how many
    pairs that is. A day with 3 good and 10 poor embryos weighs 30 pairs, not as much as a day
    with 40 x 60: a small group cannot dominate, where an unweighted mean lets its noise
    decide. (NaN, 0) when no group has both classes."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=float)
    values = column_values(values)
    total, pairs = 0.0, 0
    for value in set(values):
        rows = values == value
        n_pos, n_neg = int(y[rows].sum()), int((~y[rows]).sum())
        if n_pos and n_neg:
            total += float(roc_auc(y[rows], p[rows])[0]) * n_pos * n_neg
            pairs += n_pos * n_neg
    return (total / pairs if pairs else math.nan), pairs


def _metric_row(column: str, value: str, y: np.ndarray, p: np.ndarray, predicted: np.ndarray,
                rows: np.ndarray, status: str, bootstrap: GroupBootstrap | None
                ) -> dict[str, Any]:
    row: dict[str, Any] = {"column": column, "value": value, "n": len(rows),
                           "n_positive": int(y[rows].sum()), "n_negative": int((~y[rows]).sum()),
                           "status": status}
    if status.startswith("too few"):
        values = {m: math.nan for m in METRICS}
    else:
        values = {k: float(v[0]) for k, v in metric_values(y[rows], p[rows],
                                                           predicted[rows]).items()}
    intervals = {m: (math.nan, math.nan) for m in METRICS}
    if bootstrap is not None and not status.startswith("too few"):
        draws = bootstrap.values(lambda w: np.stack(list(metric_values(
            y[rows], p[rows], predicted[rows], w).values()), axis=1), rows)
        intervals = {m: (normal_interval(draws[:, i], values[m]) if m == "ece"
                         else percentile_interval(draws[:, i]))
                     for i, m in enumerate(METRICS)}
    for metric in METRICS:
        row[metric] = values[metric]
        row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = intervals[metric]
    return row


def subgroup_rows(
    y: np.ndarray, p: np.ndarray, predicted: np.ndarray, columns: dict[str, np.ndarray],
    min_size: int, bootstrap: GroupBootstrap | None = None,
) -> list[dict[str, Any]]:
    """The overall row (`(all)`), then one row per value of each column, values in natural
    order. Each row: column, value, n, n_positive, n_negative, status, and per metric its value
    and 95% interval (`<metric>_ci_low`, `<metric>_ci_high`)."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=float)
    predicted = np.asarray(predicted, dtype=bool)
    everything = np.arange(len(y))
    rows = [_metric_row(ALL, ALL, y, p, predicted, everything,
                        group_status(y, 1), bootstrap)]
    for column, raw in columns.items():
        values = column_values(raw)
        for value in sorted(set(values), key=natural_key):
            members = np.flatnonzero(values == value)
            rows.append(_metric_row(column, value, y, p, predicted, members,
                                    group_status(y[members], min_size), bootstrap))
    return rows


def within_group_summary(y: np.ndarray, p: np.ndarray, values: np.ndarray, min_size: int,
                         bootstrap: GroupBootstrap | None = None) -> dict[str, Any]:
    """Mean within-group AUC of one column, with its interval and how many groups count."""
    y = np.asarray(y, dtype=bool)
    value = float(mean_group_auc(y, p, values, min_size)[0])
    low = high = math.nan
    if bootstrap is not None and math.isfinite(value):
        low, high = bootstrap.interval(lambda w: mean_group_auc(y, p, values, min_size, w))
    n_ok = len(ok_groups(y, values, min_size))
    return {"auc": value, "ci": [low, high], "n_groups": len(set(column_values(values))),
            "n_groups_used": n_ok}
