"""One evaluation of one set of predictions: subgroups, shortcut baselines, within-cohort ranking.

`evaluate_predictions(frame, cfg)` takes one row per image with `y` (true: the positive class),
`score` (the calibrated positive-class probability), `predicted` (the thresholded decision) and
whatever manifest columns there are (`patient_id`, `embryo_id`, `grade`, the subgroup columns),
and returns an `Evaluation`: as text (`format`), JSON (`to_json`: aggregates only), flat MLflow
metrics (`flat_metrics`), the subgroup table (`table`) and plots (`figures`). `train`, `cv` and
`embryo-ml evaluate` all call it, so the three print and store the same numbers the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.config import EvalConfig
from embryo_ml.evaluation.bootstrap import GroupBootstrap
from embryo_ml.evaluation.cohort_metrics import within_patient_metrics
from embryo_ml.evaluation.metrics import METRICS
from embryo_ml.evaluation.shortcut import (
    ShortcutResult,
    baseline_scores,
    column_values,
    compare,
)
from embryo_ml.evaluation.subgroups import ALL, subgroup_rows, within_group_summary

METRIC_NAMES = {"auc": "ROC AUC", "pr_auc": "PR AUC", "balanced_accuracy": "bal. acc.",
                "ece": "ECE"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")


def resampling_groups(frame: pd.DataFrame) -> tuple[str, np.ndarray]:
    """What a bootstrap resample draws: patients where known, else embryos, else images."""
    n = len(frame)
    rows = np.array([f"row:{i}" for i in range(n)], dtype=object)
    unit = "images"
    for column, prefix, name in (("embryo_id", "embryo:", "embryos"),
                                 ("patient_id", "", "patients")):
        if column in frame.columns:
            values = frame[column].astype("string")
            known = (values.notna() & (values != "")).to_numpy()
            if known.any():
                rows = np.where(known, prefix + values.fillna("").to_numpy(dtype=object), rows)
                unit = name if known.all() else f"{name} (images where unknown)"
    return unit, rows.astype(str)


@dataclass
class Evaluation:
    positive_class: str
    n_images: int
    unit: str  # what the bootstrap resamples
    n_boot: int
    rows: list[dict[str, Any]]  # subgroup table rows, overall first
    within: dict[str, dict[str, Any]]  # column -> mean within-group AUC summary
    shortcuts: list[ShortcutResult]
    cohort: dict[str, Any]
    missing_columns: list[str]
    baseline_source: str
    min_group_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def warnings(self) -> list[str]:
        return [s.message() for s in self.shortcuts if s.warning]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def headline(self) -> dict[str, float]:
        """The numbers to read beside the overall AUC (also `metrics.json` keys in `fit`)."""
        out = {"ece": self.overall["ece"]}
        for column, summary in self.within.items():
            out[f"within_{column}_auc"] = summary["auc"]
        for key in ("within_patient_auc", "top1_accuracy", "top1_chance", "kendall_tau",
                    "within_patient_kendall_tau"):
            if key in self.cohort:
                out[key] = self.cohort[key]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"positive_class": self.positive_class, "n_images": self.n_images,
                "bootstrap": {"unit": self.unit, "n_boot": self.n_boot, "level": 0.95},
                "min_group_size": self.min_group_size, "subgroups": self.rows,
                "within_group_auc": self.within,
                "shortcut_baselines": [s.to_json() for s in self.shortcuts],
                "baseline_fit_on": self.baseline_source,
                "within_patient": self.cohort, "missing_columns": self.missing_columns,
                "warnings": self.warnings, **self.extra}

    def flat_metrics(self) -> dict[str, float]:
        """Numbers for MLflow: overall and per-subgroup metrics with intervals, within-group
        and within-patient aggregates, shortcut baselines. Subgroup values appear in names
        (`subgroup.day.5.auc`); patient ids never do (only aggregates exist here)."""
        out: dict[str, float] = {}
        for row in self.rows:
            name = ("overall" if row["column"] == ALL
                    else f"subgroup.{_safe(row['column'])}.{_safe(row['value'])}")
            out[f"{name}.n"] = row["n"]
            for metric in METRICS:
                for suffix in ("", "_ci_low", "_ci_high"):
                    out[f"{name}.{metric}{suffix}"] = row[f"{metric}{suffix}"]
        for column, summary in self.within.items():
            out[f"within_{_safe(column)}_auc"] = summary["auc"]
            out[f"within_{_safe(column)}_auc_ci_low"] = summary["ci"][0]
            out[f"within_{_safe(column)}_auc_ci_high"] = summary["ci"][1]
        for s in self.shortcuts:
            name = f"shortcut.{_safe(s.column)}"
            out.update({f"{name}.baseline_auc": s.baseline_auc, f"{name}.gap": s.gap,
                        f"{name}.warning": float(s.warning)})
        for key, value in self.cohort.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                out[f"cohort.{key}"] = value
            elif key.endswith("_ci"):
                out[f"cohort.{key}_low"], out[f"cohort.{key}_high"] = value
        return {k: float(v) for k, v in out.items()
                if v is not None and not (isinstance(v, float) and math.isnan(v))}

    def format(self) -> str:
        """The evaluation as a person reads it (see the worked example in docs/evaluation.md)."""
        lines = [f"Evaluation of {self.n_images} images, positive class "
                 f"'{self.positive_class}'; 95% intervals resample {self.unit} "
                 f"({self.n_boot} times)" if self.n_boot else
                 f"Evaluation of {self.n_images} images, positive class "
                 f"'{self.positive_class}' (no intervals: eval.n_boot=0)"]
        header = f"{'group':<18} {'n':>5} {self.positive_class[:6]:>6}  {'status':<16}"
        for metric in METRICS:
            header += f" {METRIC_NAMES[metric]:<20}"
        lines.append(header.rstrip())
        for row in self.rows:
            label = "all" if row["column"] == ALL else f"{row['column']}={row['value']}"
            line = f"{label[:18]:<18} {row['n']:>5} {row['n_positive']:>6}  {row['status']:<16}"
            for metric in METRICS:
                cell = _with_ci(row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"])
                line += f" {cell:<20}"
            lines.append(line.rstrip())
        for column, summary in self.within.items():
            lines.append(f"within-{column} AUC (mean over {summary['n_groups_used']} of "
                         f"{summary['n_groups']} groups): "
                         f"{_with_ci(summary['auc'], *summary['ci'])}")
        if self.missing_columns:
            lines.append("subgroup columns not in the data: " + ", ".join(self.missing_columns))
        if self.shortcuts:
            lines.append(f"shortcut baselines (label predicted from one column alone, rates fit "
                         f"on {self.baseline_source}):")
            for s in self.shortcuts:
                lines.append(f"  {s.column:<14} baseline AUC {s.baseline_auc:.3f}  model AUC "
                             f"{s.model_auc:.3f}  gap {_with_ci(s.gap, *s.gap_ci, sign=True)}")
                if s.warning:
                    lines.append("  " + s.message())
        lines.extend(_cohort_lines(self.cohort))
        return "\n".join(lines)


def _safe(text: Any) -> str:
    return _UNSAFE.sub("_", str(text))


def _number(value: float, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def _with_ci(value: float, low: float, high: float, sign: bool = False) -> str:
    text = _number(value, sign)
    if value is not None and math.isfinite(value) and math.isfinite(low):
        text += f" [{_number(low, sign)}, {_number(high, sign)}]"
    return text


def _cohort_lines(cohort: dict[str, Any]) -> list[str]:
    if not cohort.get("available"):
        return [f"within-patient metrics: not available ({cohort.get('reason', '')})"]
    cohort_text = " + ".join(cohort["cohort"])
    lines = [f"within-patient ranking ({cohort['level']} level; a cohort is one {cohort_text}; "
             f"{cohort['n_cohorts_both_classes']} of {cohort['n_cohorts']} cohorts "
             f"({cohort['n_patients']} patients) have good and poor embryos):"]
    no_ci = [math.nan, math.nan]
    auc = _with_ci(cohort["within_patient_auc"], *cohort.get("within_patient_auc_ci", no_ci))
    top1 = _with_ci(cohort["top1_accuracy"], *cohort.get("top1_accuracy_ci", no_ci))
    lines.append(f"  within-patient AUC {auc}   top-1 accuracy {top1} "
                 f"(random order: {_number(cohort['top1_chance'])})")
    if cohort.get("n_graded_embryos"):
        tau = _number(cohort["kendall_tau"], True)
        lines.append(f"  Kendall tau, score vs Gardner grade: {tau} pooled over "
                     f"{cohort['n_graded_embryos']} graded embryos, "
                     f"{_number(cohort['within_patient_kendall_tau'], True)} within patient "
                     f"(mean of {cohort['n_cohorts_tau']} cohorts)")
    if cohort.get("n_grades_invalid"):
        lines.append(f"  {cohort['n_grades_invalid']} grade(s) did not parse and were not used")
    if cohort.get("n_rows_without_patient"):
        lines.append(f"  {cohort['n_rows_without_patient']} image(s) without a patient id "
                     "are in no cohort")
    return lines


def evaluate_predictions(
    frame: pd.DataFrame, cfg: EvalConfig, positive_class: str = "good", seed: int = 0,
    train: pd.DataFrame | None = None, baselines: dict[str, np.ndarray] | None = None,
    baseline_source: str | None = None,
) -> Evaluation:
    """Everything of the module text for `frame`. Shortcut baselines come from `baselines`
    (precomputed scores per column, e.g. out-of-fold), else are fit on `train` (rows with `y`
    and the columns), else on `frame` itself (in-sample: a slightly flattering baseline, so a
    warning is, if anything, conservative)."""
    frame = frame.reset_index(drop=True)
    y = frame["y"].to_numpy(bool)
    p = frame["score"].to_numpy(float)
    predicted = frame["predicted"].to_numpy(bool)
    present = [c for c in cfg.subgroups if c in frame.columns]
    missing = [c for c in cfg.subgroups if c not in frame.columns]
    unit, groups = resampling_groups(frame)
    bootstrap = GroupBootstrap(groups, cfg.n_boot, seed) if cfg.n_boot else None
    columns = {c: frame[c].to_numpy(dtype=object) for c in present}
    rows = subgroup_rows(y, p, predicted, columns, cfg.min_group_size, bootstrap)
    # A column with one value has nothing to hold fixed: its row is listed, nothing more.
    present = [c for c in present if len(set(column_values(columns[c]))) > 1]
    within = {c: within_group_summary(y, p, columns[c], cfg.min_group_size, bootstrap)
              for c in present}
    if baselines is None:
        source = train if train is not None else frame
        baselines = {c: baseline_scores(source[c].to_numpy(dtype=object),
                                        source["y"].to_numpy(bool), columns[c])
                     for c in present if c in source.columns}
        baseline_source = baseline_source or (
            "the training rows" if train is not None else "the evaluated rows (in-sample)")
    shortcuts = [compare(c, y, p, baselines[c], cfg.shortcut_margin, baseline_source or "",
                         bootstrap) for c in present if c in baselines]
    cohort = within_patient_metrics(frame, bootstrap if unit.startswith("patients") else None,
                                    cfg.cohort_by)
    return Evaluation(positive_class, len(frame), unit, cfg.n_boot, rows, within, shortcuts,
                      cohort, missing, baseline_source or "", cfg.min_group_size)


def evaluation_figures(
    frame: pd.DataFrame, evaluation: Evaluation, negative_class: str = "other",
    threshold: float | None = None,
) -> dict[str, Any]:
    """PNG name -> matplotlib figure: ROC and PR curves, the score distribution per class, and
    one ROC-per-subgroup figure per subgroup column (`roc_by_<column>.png`)."""
    from embryo_ml.evaluation.plots import (
        pr_figure,
        roc_figure,
        score_distribution_figure,
        subgroup_roc_figure,
    )

    y, p = frame["y"].to_numpy(bool), frame["score"].to_numpy(float)
    positive = evaluation.positive_class
    figures = {"roc_curve.png": roc_figure(y, p, positive),
               "pr_curve.png": pr_figure(y, p, positive),
               "score_distribution.png": score_distribution_figure(y, p, positive,
                                                                   negative_class, threshold)}
    for column in evaluation.within:
        figures[f"roc_by_{_safe(column)}.png"] = subgroup_roc_figure(
            y, p, frame[column].to_numpy(dtype=object), column, positive,
            evaluation.min_group_size)
    return figures
