"""Which validation number picks the best checkpoint (`train.select_metric`).

- `auc`: the overall ROC AUC.
- `mean_subgroup_auc`: the within-group AUC of the column `train.select_subgroup` (default
  `day`), pooled over its validation groups with both classes, each group weighted by its
  positive x negative pairs (`subgroups.pooled_group_auc`): named `pooled_within_<column>_auc`,
  e.g. `pooled_within_day_auc`. Weighting by pairs is the small-subgroup rule: a validation
  split of 118 images whose day 3 holds 4 good embryos would otherwise let that day's AUC (noise
  at n=4) decide half of every comparison. The final report still shows the unweighted mean
  (`within_day_auc`) with its interval; the gate reads that one.
- `within_patient_auc`: the mean AUC within each patient's cohort (see `cohort_metrics`).
- `auto` (default): `mean_subgroup_auc` when the data has the `select_subgroup` column and
  the validation split has a group to compute it on, else `auc`. On data with a `day` column a
  model is then chosen for ranking embryos of one day, not for telling the days apart.

Which epoch is kept (`train.select_within_se`, default true): the latest epoch whose score is
within one standard error of the best score so far (the one-standard-error rule, preferring the
later, longer-trained and lower-learning-rate epoch). On a validation split of ~100 images an
AUC's standard error is ~0.05, so "best" among epochs 0.02 apart is noise; the rule keeps the
schedule's end point unless an earlier epoch was clearly better. The standard error is Hanley &
McNeil's for an AUC from the positives and negatives the metric compares (pooled over the
groups for a within-group metric: an approximation). `false`: the maximum, as before.

The metric is chosen once, before training, from the validation rows' metadata (which groups
have both classes does not change between epochs), so every epoch is judged by the same
number; an explicit choice that cannot be computed on this split is a `ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from embryo_ml.config import Config
from embryo_ml.errors import ConfigError
from embryo_ml.evaluation.cohort_metrics import within_patient_metrics
from embryo_ml.evaluation.metrics import roc_auc
from embryo_ml.evaluation.shortcut import column_values, natural_key
from embryo_ml.evaluation.subgroups import ok_groups, pooled_group_auc


@dataclass
class Selection:
    metric: str  # the resolved name: auc, within_<column>_auc or within_patient_auc
    note: str  # why, for the log
    meta: pd.DataFrame | None = None  # validation rows' metadata, in validation order
    column: str | None = None
    min_size: int = 1
    cohort_by: tuple[str, ...] = ()

    n_positive: int = 0  # what the metric compares: positives and negatives it ranks
    n_negative: int = 0

    def standard_error(self, auc: float) -> float:
        """Hanley & McNeil's standard error of an AUC of `auc` over this metric's counts."""
        return auc_standard_error(auc, self.n_positive, self.n_negative)

    def score(self, y: np.ndarray, p: np.ndarray) -> float:
        """The selection metric of validation predictions `p` (positive-class probability)."""
        y = np.asarray(y, dtype=bool)
        if self.metric == "auc":
            return float(roc_auc(y, p)[0])
        assert self.meta is not None
        if self.metric == "within_patient_auc":
            frame = self.meta.assign(y=y, score=np.asarray(p, dtype=float))
            return float(within_patient_metrics(frame, None, self.cohort_by)[self.metric])
        values = self.meta[self.column].to_numpy(dtype=object)
        return pooled_group_auc(y, p, values)[0]


def keep_epoch(score: float, best_so_far: float, tolerance: float) -> tuple[bool, bool]:
    """(is a new best, keep this epoch): kept when it is a new best or within `tolerance`
    (one standard error, or 0) of the best so far: the latest such epoch wins."""
    improved = score > best_so_far
    return improved, improved or score >= best_so_far - tolerance


def auc_standard_error(auc: float, n_positive: int, n_negative: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUC from its class counts; inf when
    either class is missing (nothing can be told apart)."""
    if n_positive < 1 or n_negative < 1 or not np.isfinite(auc):
        return math.inf
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc * auc)
                + (n_negative - 1) * (q2 - auc * auc)) / (n_positive * n_negative)
    return math.sqrt(max(variance, 0.0))


def _counts(y: np.ndarray, values: np.ndarray | None = None) -> tuple[int, int]:
    """Positives and negatives a metric ranks: all rows, or those of groups with both."""
    if values is None:
        return int(y.sum()), int((~y).sum())
    n_pos = n_neg = 0
    for value in set(values):
        rows = values == value
        if y[rows].any() and not y[rows].all():
            n_pos, n_neg = n_pos + int(y[rows].sum()), n_neg + int((~y[rows]).sum())
    return n_pos, n_neg


def resolve_selection(cfg: Config, meta: pd.DataFrame, y: np.ndarray) -> Selection:
    """The `Selection` for validation rows `meta` (manifest columns) with labels `y`."""
    selection = _resolve(cfg, meta, y)
    y = np.asarray(y, dtype=bool)
    column = selection.column
    values = (column_values(meta[column].to_numpy(dtype=object)) if column else None)
    if selection.metric == "within_patient_auc":
        values = column_values(meta["patient_id"].to_numpy(dtype=object))
    selection.n_positive, selection.n_negative = _counts(y, values)
    return selection


def _resolve(cfg: Config, meta: pd.DataFrame, y: np.ndarray) -> Selection:
    choice, column = cfg.train.select_metric, cfg.train.select_subgroup
    min_size = cfg.eval.min_group_size
    y = np.asarray(y, dtype=bool)
    meta = meta.reset_index(drop=True)
    if choice == "auc":
        return Selection("auc", "train.select_metric=auc")
    if choice == "within_patient_auc":
        if "patient_id" not in meta.columns:
            raise ConfigError("train.select_metric=within_patient_auc needs a patient_id "
                              "column in the data")
        keep = [c for c in ("patient_id", "embryo_id", *cfg.eval.cohort_by) if c in meta.columns]
        selection = Selection("within_patient_auc", "train.select_metric=within_patient_auc",
                              meta[keep], cohort_by=tuple(cfg.eval.cohort_by))
        probe = within_patient_metrics(meta[keep].assign(y=y, score=0.0), None,
                                       cfg.eval.cohort_by)
        if not probe["n_cohorts_both_classes"]:
            raise ConfigError("train.select_metric=within_patient_auc: no patient cohort in "
                              "the validation split has both classes")
        return selection
    present = column in meta.columns
    usable = present and bool(ok_groups(y, meta[column].to_numpy(dtype=object), min_size))
    if choice == "mean_subgroup_auc" and not usable:
        why = ("the data has no column" if not present else
               f"no value of it in the validation split has both classes and "
               f"eval.min_group_size={min_size} images")
        raise ConfigError(f"train.select_metric=mean_subgroup_auc with "
                          f"train.select_subgroup={column}: {why}")
    if usable:
        values = column_values(meta[column].to_numpy(dtype=object))
        sizes = ", ".join(f"{v}: {int(y[values == v].sum())}+{int((~y[values == v]).sum())}"
                          for v in sorted(set(values), key=natural_key))
        return Selection(f"pooled_within_{column}_auc", f"train.select_metric={choice}: "
                         f"within-{column} AUC pooled over same-{column} pairs (each {column} "
                         f"weighted by its positive x negative pairs; validation "
                         f"positives+negatives per {column}: {sizes})", meta[[column]], column,
                         min_size)
    note = (f"train.select_metric=auto: overall AUC (the data has no '{column}' column)"
            if not present else f"train.select_metric=auto: overall AUC (no '{column}' group "
            "of the validation split has both classes and eval.min_group_size images)")
    return Selection("auc", note)
