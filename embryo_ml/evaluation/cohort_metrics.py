"""Within-cohort ranking metrics: how well the scores choose among one patient's embryos.

The clinical question is which of *this patient's* embryos, assessed on the same day, to
transfer first. A cohort is therefore one patient's embryos of one day: `patient_id` plus the
`cohort_by` columns (`eval.cohort_by`, default `[day]`; absent columns are skipped). Splitting
by day matters: a patient's day-3 and day-5 embryos differ visibly and in how often they are
good, so a day detector would rank "well" inside a mixed cohort without judging any embryo.

- `within_patient_auc`: each cohort's own ROC AUC (a good embryo scored above a poor one of the
  same cohort), averaged over cohorts that have both good and poor embryos, each cohort counting
  once. Chance is 0.5 whatever the patient's prognosis.
- `top1_accuracy`: over the same cohorts, the share whose best-scored embryo is a good one (a
  tie for first place counts the good share of the tied embryos). `top1_chance` is the same for
  a random order: the mean share of good embryos in those cohorts.
- `kendall_tau`: Kendall's tau-b between score and Gardner grade over graded embryos (pooled),
  and `within_patient_kendall_tau`, its mean over cohorts with at least two different grades.
  A grade becomes a number as expansion (1-6) + ICM + TE points (A = 3, B = 2, C = 1, not
  assessable = 0; sub-grades ignored): `4AA` = 10, `3BC` = 6, `2` = 2. Grades that do not parse
  are counted (`n_grades_invalid`), not used.

Rows are first merged into embryos when `embryo_id` is there (several focal planes or time
points are one embryo): the embryo's score is the mean of its images' scores and it is good when
at least half of its images are labelled good (one label per embryo is the usual case). Rows
without a patient id take part in no cohort (`n_rows_without_patient`). Intervals resample
patients (all cohorts of a drawn patient come along). Only aggregates leave this module:
per-patient values are never returned, so nothing here can carry a patient id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from embryo_ml.data.labels import parse_gardner
from embryo_ml.evaluation.bootstrap import GroupBootstrap
from embryo_ml.evaluation.metrics import roc_auc
from embryo_ml.evaluation.shortcut import column_values

LETTER_POINTS = {"A": 3, "B": 2, "C": 1}


def grade_points(text: Any) -> float:
    """A Gardner grade as one ordinal number (see the module text); NaN when missing, and
    ValueError when it does not parse."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or pd.isna(text):
        return math.nan
    if not str(text).strip():
        return math.nan
    grade = parse_gardner(str(text))
    return float(grade.expansion + LETTER_POINTS.get(grade.icm or "", 0)
                 + LETTER_POINTS.get(grade.te or "", 0))


def _grades(values: pd.Series) -> tuple[np.ndarray, int]:
    points, invalid = [], 0
    for value in values:
        try:
            points.append(grade_points(value))
        except ValueError:
            points.append(math.nan)
            invalid += 1
    return np.array(points, dtype=float), invalid


def embryo_rows(frame: pd.DataFrame, cohort_by: Sequence[str] = ()) -> pd.DataFrame:
    """One row per embryo of the rows that have a patient id: `patient_id`, `cohort`, `y`,
    `score`, `grade_points` (NaN if none). `frame` has `y`, `score`, `patient_id` and optionally
    `embryo_id`, `grade_points` and the `cohort_by` columns."""
    rows = frame[frame["patient_id"].notna() & (frame["patient_id"].astype(str) != "")]
    rows = rows.assign(patient_id=rows["patient_id"].astype(str))
    cohort = rows["patient_id"].copy()
    for column in cohort_by:
        cohort = cohort + "|" + column_values(rows[column])
    if "embryo_id" in rows.columns and rows["embryo_id"].notna().any():
        embryo = rows["embryo_id"].astype("string").fillna("")
        key = embryo.where(embryo != "", "row:" + rows.index.astype(str))
    else:
        key = pd.Series("row:" + rows.index.astype(str), index=rows.index)
    grades = rows["grade_points"] if "grade_points" in rows.columns else np.nan
    parts = rows.assign(_cohort=cohort.to_numpy(), _embryo=key.to_numpy(),
                        y=rows["y"].astype(float), grade_points=grades)
    grouped = parts.groupby(["_cohort", "_embryo"], sort=True)
    return pd.DataFrame({
        "patient_id": grouped["patient_id"].first(),
        "cohort": grouped["_cohort"].first(),
        "y": grouped["y"].mean() >= 0.5,
        "score": grouped["score"].mean(),
        "grade_points": grouped["grade_points"].first(),
    }).reset_index(drop=True)


def _tau(score: np.ndarray, grade: np.ndarray) -> float:
    if len(score) < 2 or len(np.unique(grade)) < 2 or len(np.unique(score)) < 2:
        return math.nan
    return float(kendalltau(score, grade).statistic)


def within_patient_metrics(
    frame: pd.DataFrame, bootstrap: GroupBootstrap | None = None,
    cohort_by: Sequence[str] = ("day",),
) -> dict[str, Any]:
    """The metrics of the module text for `frame` (`y`, `score`, `patient_id`, optional
    `embryo_id`, `grade`, `cohort_by` columns); intervals from `bootstrap` when given (it must
    resample groups named by patient id). Returns only aggregates."""
    result: dict[str, Any] = {"available": "patient_id" in frame.columns}
    if not result["available"]:
        result["reason"] = "no patient_id column"
        return result
    frame = frame.copy()
    invalid = 0
    if "grade" in frame.columns:
        frame["grade_points"], invalid = _grades(frame["grade"])
    cohort_by = [c for c in cohort_by if c in frame.columns]
    embryos = embryo_rows(frame, cohort_by)
    has_patient = frame["patient_id"].notna() & (frame["patient_id"].astype(str) != "")
    result.update({
        "level": "embryo" if "embryo_id" in frame.columns else "image",
        "cohort": ["patient_id", *cohort_by],
        "n_rows_without_patient": int((~has_patient).sum()),
        "n_patients": int(embryos["patient_id"].nunique()),
        "n_cohorts": int(embryos["cohort"].nunique()),
        "n_embryos": len(embryos),
    })
    aucs, tops, chances, taus, owners = [], [], [], [], []
    for _, cohort in embryos.groupby("cohort", sort=True):
        y, score = cohort["y"].to_numpy(bool), cohort["score"].to_numpy(float)
        graded = cohort["grade_points"].notna().to_numpy()
        if graded.sum() >= 2:
            taus.append(_tau(score[graded], cohort["grade_points"].to_numpy(float)[graded]))
        if y.all() or not y.any():
            continue
        owners.append(cohort["patient_id"].iloc[0])
        aucs.append(float(roc_auc(y, score)[0]))
        top = score == score.max()
        tops.append(float(y[top].mean()))
        chances.append(float(y.mean()))
    result["n_cohorts_both_classes"] = len(owners)
    result["within_patient_auc"] = float(np.mean(aucs)) if aucs else math.nan
    result["top1_accuracy"] = float(np.mean(tops)) if tops else math.nan
    result["top1_chance"] = float(np.mean(chances)) if chances else math.nan
    if bootstrap is not None and owners:
        index = bootstrap.index_of(np.array(owners))
        result["within_patient_auc_ci"] = list(
            bootstrap.group_values_interval(np.array(aucs), index))
        result["top1_accuracy_ci"] = list(bootstrap.group_values_interval(np.array(tops), index))
    graded = embryos[embryos["grade_points"].notna()]
    result["n_graded_embryos"] = len(graded)
    result["n_grades_invalid"] = invalid
    if len(graded):
        result["kendall_tau"] = _tau(graded["score"].to_numpy(float),
                                     graded["grade_points"].to_numpy(float))
        finite = [t for t in taus if not math.isnan(t)]
        result["within_patient_kendall_tau"] = float(np.mean(finite)) if finite else math.nan
        result["n_cohorts_tau"] = len(finite)
    return result
