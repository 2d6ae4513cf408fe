"""Grouped k-fold cross-validation: one MLflow parent run, a child run per fold.

Each fold trains with `fit` on the other folds and validates (calibrates, picks its threshold)
on its own patients. The out-of-fold predictions of all folds together give one prediction per
image from a model that never saw that patient; the summary reports, per metric, the mean and
standard deviation over folds and a 95% bootstrap confidence interval that resamples *patients*
(images of one patient are not independent evidence).

A Gardner run (`labels.task=gardner`) adds the grade heads' accuracies (`expansion_accuracy`,
`icm_accuracy`, `te_accuracy`, over the rows where that grade is assessable) to the summary.

The pooled out-of-fold predictions are also evaluated by `embryo_ml.evaluation`: metrics per
subgroup (`cv_subgroups.csv`), shortcut baselines whose per-value rates are fit on each fold's
training rows (so the baseline is out-of-fold too), and within-patient ranking. Their headline
numbers (`ece`, `within_<column>_auc`, `within_patient_auc`, `top1_accuracy`, ...) join the
summary table (before the grade heads): per-fold values from each fold's own evaluation, the
interval from the pooled one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.config import Config, save_config
from embryo_ml.data.heads import GRADE_HEADS, head_layout
from embryo_ml.data.labels import build_targets
from embryo_ml.data.manifest import load_table, read_manifest
from embryo_ml.data.splits import group_keys, make_splits
from embryo_ml.errors import DataError
from embryo_ml.evaluation import metrics as weighted
from embryo_ml.evaluation.bootstrap import GroupBootstrap
from embryo_ml.evaluation.plots import reliability_figure
from embryo_ml.evaluation.report import Evaluation, evaluate_predictions, evaluation_figures
from embryo_ml.evaluation.shortcut import baseline_scores
from embryo_ml.fileio import atomic_write_text
from embryo_ml.train.fit import fit
from embryo_ml.train.run_data import evaluation_frame
from embryo_ml.train.run_folder import (
    CONFIG_FILE,
    CV_SUBGROUPS_FILE,
    CV_SUMMARY_FILE,
    CV_SUMMARY_JSON_FILE,
    OOF_PREDICTIONS_FILE,
    VAL_PREDICTIONS_FILE,
    fold_folder,
)
from embryo_ml.train.tracking import RunTracker

SUMMARY_METRICS = ("auc", "pr_auc", "balanced_accuracy", "sensitivity", "specificity")
# `<head>_accuracy` -> head: a grade head's accuracy on its assessable rows (gardner runs)
HEAD_METRICS = {f"{name}_accuracy": name for name, _ in GRADE_HEADS}


@dataclass
class CVResult:
    parent_run_id: str
    out_dir: Path
    summary: pd.DataFrame  # one row per metric: mean, std, ci_low, ci_high, per-fold values
    oof: pd.DataFrame
    evaluation: Evaluation | None = field(default=None)  # the pooled out-of-fold evaluation


def fold_indices(
    table: pd.DataFrame, folds: int, seed: int, splits_file: str | os.PathLike[str] | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) row indices per fold, from a splits.csv (its `train` rows) or made
    here; `test` rows of a splits file are left out of cross-validation entirely."""
    if splits_file is None:
        splits = make_splits(table, folds=folds, test_fraction=0.0, seed=seed)
        fold = splits["fold"].to_numpy()
    else:
        splits = read_manifest(splits_file)
        lookup = dict(zip(splits["path"], zip(splits["split"], splits["fold"].astype(int))))
        missing = [p for p in table["path"] if p not in lookup]
        if missing:
            raise DataError(f"{splits_file}: {len(missing)} image(s) of the data are not in the "
                            f"splits file, first: {missing[0]}")
        fold = np.array([lookup[p][1] if lookup[p][0] == "train" else -1 for p in table["path"]])
    result = []
    for k in sorted(set(fold) - {-1}):
        result.append((np.flatnonzero((fold != k) & (fold != -1)), np.flatnonzero(fold == k)))
    if len(result) < 2:
        raise DataError("cross-validation needs at least 2 folds")
    return result


def bootstrap_ci(
    oof: pd.DataFrame, positive_class: str, metric: str, n_boot: int = 1000, seed: int = 0,
) -> tuple[float, float]:
    """95% percentile interval of `metric` over bootstrap resamples of groups (patients), by
    `embryo_ml.evaluation.bootstrap`; thresholded metrics use each fold's own decision."""
    resampler = GroupBootstrap(oof["group"].to_numpy(), n_boot, seed)
    return resampler.interval(_weighted_metric(oof, positive_class, metric))


def _weighted_metric(
    oof: pd.DataFrame, positive_class: str, metric: str
) -> Callable[[np.ndarray], np.ndarray]:
    """`metric` of the pooled out-of-fold rows under bootstrap row weights."""
    if metric in HEAD_METRICS:  # a grade head's accuracy over its assessable rows
        head = HEAD_METRICS[metric]
        truth = oof[head].fillna("").astype(str).to_numpy()
        right = truth == oof[f"{head}_pred"].astype(str).to_numpy()
        return lambda w: weighted.share(right, truth != "", w)
    y = (oof["label"] == positive_class).to_numpy()
    p = oof[f"p_{positive_class}"].to_numpy(dtype=float)
    predicted = (oof["label_pred"] == positive_class).to_numpy()
    functions: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "auc": lambda w: weighted.roc_auc(y, p, w),
        "pr_auc": lambda w: weighted.average_precision(y, p, w),
        "balanced_accuracy": lambda w: weighted.balanced_accuracy(y, predicted, w),
        "sensitivity": lambda w: weighted.share(predicted, y, w),
        "specificity": lambda w: weighted.share(~predicted, ~y, w),
    }
    return functions[metric]


def _pooled_evaluation(
    cfg: Config, table: pd.DataFrame, oof: pd.DataFrame,
    fold_splits: list[tuple[np.ndarray, np.ndarray]], n_boot: int,
) -> tuple[Evaluation, pd.DataFrame]:
    """The out-of-fold rows through `embryo_ml.evaluation`; each row's shortcut-baseline score
    comes from the rates of its own fold's training rows. Returns the frame it read too."""
    positive = cfg.data.positive_class
    row_of = {path: i for i, path in enumerate(table["path"])}
    rows = np.array([row_of[path] for path in oof["path"]])
    frame = evaluation_frame(table, rows, positive, cfg.labels.grade_column).assign(
        score=oof[f"p_{positive}"].to_numpy(dtype=float),
        predicted=(oof["label_pred"] == positive).to_numpy())
    position = {path: i for i, path in enumerate(oof["path"])}
    y = (table["label"] == positive).to_numpy()
    columns = [c for c in cfg.eval.subgroups if c in table.columns]
    baselines = {c: np.full(len(oof), np.nan) for c in columns}
    for train_idx, val_idx in fold_splits:
        where = [position[table["path"].iloc[i]] for i in val_idx]
        for column in columns:
            values = table[column].to_numpy(dtype=object)
            baselines[column][where] = baseline_scores(values[train_idx], y[train_idx],
                                                       values[val_idx])
    eval_cfg = cfg.eval.model_copy(update={"n_boot": n_boot})
    evaluation = evaluate_predictions(frame, eval_cfg, positive, cfg.seed, baselines=baselines,
                                      baseline_source="each fold's training rows (out of fold)")
    return evaluation, frame


def _pooled_interval(evaluation: Evaluation, metric: str) -> tuple[float, float]:
    """The pooled evaluation's 95% interval of a headline metric (NaN where it has none)."""
    if metric == "ece":
        return evaluation.overall["ece_ci_low"], evaluation.overall["ece_ci_high"]
    column = metric.removeprefix("within_").removesuffix("_auc")
    if metric.startswith("within_") and column in evaluation.within:
        low, high = evaluation.within[column]["ci"]
        return low, high
    low, high = evaluation.cohort.get(f"{metric}_ci", [math.nan, math.nan])
    return low, high


def cross_validate(
    cfg: Config, data: str | os.PathLike[str], folds: int, out_dir: str | os.PathLike[str],
    splits_file: str | os.PathLike[str] | None = None, progress: bool = True,
    n_boot: int | None = None,
) -> CVResult:
    """`folds` grouped folds (or those of `splits_file`), each a nested `fit`; `n_boot`
    patient resamples for every interval (default `eval.n_boot`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, classes = _labelled_table(cfg, data)
    _, groups = group_keys(table)  # the patients a bootstrap resamples
    fold_splits = fold_indices(table, folds, cfg.seed, splits_file)
    n_boot = cfg.eval.n_boot if n_boot is None else n_boot
    metrics = SUMMARY_METRICS + tuple(
        f"{name}_accuracy" for name in head_layout(cfg.labels.task, len(classes)))
    save_config(cfg, out_dir / CONFIG_FILE)
    with RunTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment,
                    run_name=f"cv-{out_dir.name}") as parent:
        parent.log_params({**cfg.flat(), "cv.folds": len(fold_splits)})
        per_fold, oof = _run_folds(cfg, data, out_dir, fold_splits, metrics, progress)
        oof["group"] = _groups_of(oof, table, groups)
        atomic_write_text(out_dir / OOF_PREDICTIONS_FILE,
                          oof.drop(columns="group").to_csv(index=False))
        evaluation, frame = _pooled_evaluation(cfg, table, oof, fold_splits, n_boot)
        rows = _summary_rows(cfg, per_fold, oof, evaluation, metrics, n_boot)
        summary = pd.DataFrame(rows)
        _write_summary(out_dir, parent.run_id, per_fold, summary, evaluation)
        negative = next((c for c in classes if c != cfg.data.positive_class), "other")
        _log_summary(parent, rows, evaluation, frame, negative, out_dir)
        return CVResult(parent.run_id or "", out_dir, summary, oof.drop(columns="group"),
                        evaluation)


def _labelled_table(cfg: Config, data: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[str]]:
    """The data's table with the training labels under `label`, and the classes."""
    table = load_table(data)
    labelled = build_targets(table, cfg.labels, cfg.data.positive_class)
    return table.assign(label=labelled.labels), labelled.classes


def _run_folds(
    cfg: Config, data: str | os.PathLike[str], out_dir: Path,
    fold_splits: list[tuple[np.ndarray, np.ndarray]], metrics: tuple[str, ...], progress: bool,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """One nested `fit` per fold: each fold's figures (and its numeric `headline` metrics), and
    the validation predictions of all folds together (with a `fold` column)."""
    per_fold: list[dict[str, Any]] = []
    oof_parts = []
    for k, split in enumerate(fold_splits):
        if progress:
            print(f"fold {k + 1}/{len(fold_splits)}: {len(split[0])} train / "
                  f"{len(split[1])} validation images", flush=True)
        result = fit(cfg, data, fold_folder(out_dir, k), progress=progress, split=split,
                     nested=True)
        per_fold.append({"fold": k, "run_id": result.run_id,
                         **{m: result.metrics[f"val_{m}"] for m in metrics},
                         "headline": {k: v for k, v in result.metrics.items()
                                      if isinstance(v, int | float)}})
        part = pd.read_csv(fold_folder(out_dir, k) / VAL_PREDICTIONS_FILE)
        part.insert(0, "fold", k)
        oof_parts.append(part)
    return per_fold, pd.concat(oof_parts, ignore_index=True)


def _groups_of(oof: pd.DataFrame, table: pd.DataFrame, groups: np.ndarray) -> list[str]:
    """Each out-of-fold row's resampling group (its patient), from the table's `groups`."""
    group_of = dict(zip(table["path"], groups))
    return [group_of[p] for p in oof["path"]]


def _summary_rows(
    cfg: Config, per_fold: list[dict[str, Any]], oof: pd.DataFrame, evaluation: Evaluation,
    metrics: tuple[str, ...], n_boot: int,
) -> list[dict[str, Any]]:
    """The summary table's rows: per metric the mean and std over folds, the 95% interval
    (the pooled evaluation's, or a patient bootstrap of the out-of-fold rows) and each fold's
    value. Each `per_fold` entry's `headline` is replaced by its evaluation headline metrics."""
    headline = list(evaluation.headline())
    for entry in per_fold:
        numbers = entry.pop("headline")
        entry.update({m: numbers.get(f"val_{m}", math.nan) for m in headline})
    folds_table = pd.DataFrame(per_fold)
    rows = []
    for metric in (*SUMMARY_METRICS, *headline, *metrics[len(SUMMARY_METRICS):]):
        values = folds_table[metric].to_numpy(dtype=float)
        if metric in headline:
            low, high = _pooled_interval(evaluation, metric)
        else:
            low, high = bootstrap_ci(oof, cfg.data.positive_class, metric, n_boot, cfg.seed)
        finite = values[np.isfinite(values)]
        rows.append({"metric": metric,
                     "mean": float(finite.mean()) if len(finite) else math.nan,
                     "std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
                     "ci_low": low, "ci_high": high,
                     **{f"fold{k}": v for k, v in enumerate(values)}})
    return rows


def _write_summary(out_dir: Path, parent_run_id: str | None, per_fold: list[dict[str, Any]],
                   summary: pd.DataFrame, evaluation: Evaluation) -> None:
    """cv_summary.csv, cv_subgroups.csv and cv_summary.json."""
    atomic_write_text(out_dir / CV_SUMMARY_FILE, summary.to_csv(index=False))
    atomic_write_text(out_dir / CV_SUBGROUPS_FILE, evaluation.table().to_csv(index=False))
    atomic_write_text(out_dir / CV_SUMMARY_JSON_FILE, json.dumps(
        {"parent_run_id": parent_run_id, "folds": per_fold,
         "summary": summary.to_dict(orient="records"),
         "evaluation": evaluation.to_json()}, indent=2, default=float))


def _log_summary(parent: RunTracker, rows: list[dict[str, Any]], evaluation: Evaluation,
                 frame: pd.DataFrame, negative: str, out_dir: Path) -> None:
    """The summary's metrics, tags, figures and files to the parent MLflow run."""
    parent.log_metrics({f"cv_{r['metric']}_{stat}": r[stat] for r in rows
                        for stat in ("mean", "std", "ci_low", "ci_high")})
    parent.log_metrics({f"cv_eval.{k}": v for k, v in evaluation.flat_metrics().items()})
    if evaluation.warnings:
        parent.set_tags({"eval.shortcut_warning": ",".join(
            s.column for s in evaluation.shortcuts if s.warning)})
    for name, figure in evaluation_figures(frame, evaluation, negative).items():
        parent.log_figure(figure, f"plots/{name}")
    parent.log_figure(reliability_figure(frame["y"].to_numpy(), None,
                                         frame["score"].to_numpy()),
                      "plots/reliability_diagram.png")
    # oof_predictions.csv stays in the local folder: its paths can carry patient ids
    # (file names like P0001-E01), which must not reach MLflow (privacy rule).
    for name in (CV_SUMMARY_FILE, CV_SUMMARY_JSON_FILE, CV_SUBGROUPS_FILE):
        parent.log_artifact(out_dir / name)


def format_summary(summary: pd.DataFrame, evaluation: Evaluation | None = None) -> str:
    """The CV table as a person reads it: metric, mean +- std, 95% CI, per-fold values; then,
    given the pooled `evaluation`, its subgroup table, shortcut baselines and ranking metrics."""
    fold_columns = [c for c in summary.columns if c.startswith("fold")]
    lines = [f"{'metric':<26} {'mean':>6} {'std':>6}   {'95% CI (patients)':<17}  per fold"]
    for _, row in summary.iterrows():
        folds = " ".join(f"{row[c]:.3f}" for c in fold_columns)
        lines.append(f"{row['metric']:<26} {row['mean']:6.3f} {row['std']:6.3f}   "
                     f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]  {folds}")
    if evaluation is not None:
        lines += ["", "pooled out-of-fold predictions:", evaluation.format()]
    return "\n".join(lines)
