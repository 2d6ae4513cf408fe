"""Grouped k-fold cross-validation: one MLflow parent run, a child run per fold.

Each fold trains with `fit` on the other folds and validates (calibrates, picks its threshold)
on its own patients. The out-of-fold predictions of all folds together give one prediction per
image from a model that never saw that patient; the summary reports, per metric, the mean and
standard deviation over folds and a 95% bootstrap confidence interval that resamples *patients*
(images of one patient are not independent evidence).

A Gardner run (`labels.task=gardner`) adds the grade heads' accuracies (`expansion_accuracy`,
`icm_accuracy`, `te_accuracy`, over the rows where that grade is assessable) to the summary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.config import Config, save_config
from embryo_ml.data.labels import build_targets
from embryo_ml.data.manifest import load_table, read_manifest
from embryo_ml.data.splits import group_keys, make_splits
from embryo_ml.errors import DataError
from embryo_ml.fileio import atomic_write_text
from embryo_ml.train.fit import fit
from embryo_ml.train.heads import GRADE_HEADS, head_layout
from embryo_ml.train.metrics import binary_metrics
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
    """95% percentile interval of `metric` over bootstrap resamples of groups (patients)."""
    rng = np.random.default_rng(seed)
    groups = oof["group"].to_numpy()
    unique = np.unique(groups)
    rows_of = {g: np.flatnonzero(groups == g) for g in unique}
    if metric in HEAD_METRICS:
        return _head_ci(oof, HEAD_METRICS[metric], unique, rows_of, rng, n_boot)
    y = (oof["label"] == positive_class).to_numpy()
    p = oof[f"p_{positive_class}"].to_numpy()
    predicted = (oof["label_pred"] == positive_class).to_numpy()
    values = []
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[g] for g in rng.choice(unique, len(unique))])
        values.append(_pooled_metric(y[rows], p[rows], predicted[rows], metric))
    values = np.array([v for v in values if not math.isnan(v)])
    if len(values) == 0:
        return math.nan, math.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _head_ci(
    oof: pd.DataFrame, head: str, unique: np.ndarray, rows_of: dict[Any, np.ndarray],
    rng: np.random.Generator, n_boot: int,
) -> tuple[float, float]:
    """Bootstrap interval of a grade head's accuracy over its assessable out-of-fold rows."""
    truth = oof[head].fillna("").astype(str).to_numpy()
    right = (truth == oof[f"{head}_pred"].astype(str).to_numpy()).astype(float)
    assessable = truth != ""
    values = []
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[g] for g in rng.choice(unique, len(unique))])
        rows = rows[assessable[rows]]
        if len(rows):
            values.append(right[rows].mean())
    if not values:
        return math.nan, math.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _pooled_metric(y: np.ndarray, p: np.ndarray, predicted: np.ndarray, metric: str) -> float:
    """A metric on pooled out-of-fold rows; thresholded metrics use each fold's own decision."""
    if metric in ("auc", "pr_auc"):
        return binary_metrics(y, p)[metric]
    return binary_metrics(y, predicted.astype(float), threshold=0.5)[metric]


def cross_validate(
    cfg: Config, data: str | os.PathLike[str], folds: int, out_dir: str | os.PathLike[str],
    splits_file: str | os.PathLike[str] | None = None, progress: bool = True,
    n_boot: int = 1000,
) -> CVResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = load_table(data)
    labelled = build_targets(table, cfg.labels, cfg.data.positive_class)
    table = table.assign(label=labelled.labels)
    _, groups = group_keys(table)
    fold_splits = fold_indices(table, folds, cfg.seed, splits_file)
    metrics = SUMMARY_METRICS + tuple(
        f"{name}_accuracy" for name in head_layout(cfg.labels.task, len(labelled.classes)))
    save_config(cfg, out_dir / "config.yaml")
    per_fold: list[dict[str, Any]] = []
    oof_parts = []
    with RunTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment,
                    run_name=f"cv-{out_dir.name}") as parent:
        parent.log_params({**cfg.flat(), "cv.folds": len(fold_splits)})
        for k, split in enumerate(fold_splits):
            if progress:
                print(f"fold {k + 1}/{len(fold_splits)}: {len(split[0])} train / "
                      f"{len(split[1])} validation images", flush=True)
            result = fit(cfg, data, out_dir / f"fold{k}", progress=progress, split=split,
                         nested=True)
            per_fold.append({"fold": k, "run_id": result.run_id,
                             **{m: result.metrics[f"val_{m}"] for m in metrics}})
            part = pd.read_csv(out_dir / f"fold{k}" / "val_predictions.csv")
            part.insert(0, "fold", k)
            oof_parts.append(part)
        oof = pd.concat(oof_parts, ignore_index=True)
        group_of = dict(zip(table["path"], groups))
        oof["group"] = [group_of[p] for p in oof["path"]]
        atomic_write_text(out_dir / "oof_predictions.csv",
                          oof.drop(columns="group").to_csv(index=False))
        folds_table = pd.DataFrame(per_fold)
        rows = []
        for metric in metrics:
            values = folds_table[metric].to_numpy(dtype=float)
            low, high = bootstrap_ci(oof, cfg.data.positive_class, metric, n_boot, cfg.seed)
            rows.append({"metric": metric, "mean": float(np.nanmean(values)),
                         "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan,
                         "ci_low": low, "ci_high": high,
                         **{f"fold{k}": v for k, v in enumerate(values)}})
        summary = pd.DataFrame(rows)
        atomic_write_text(out_dir / "cv_summary.csv", summary.to_csv(index=False))
        atomic_write_text(out_dir / "cv_summary.json", json.dumps(
            {"parent_run_id": parent.run_id, "folds": per_fold,
             "summary": summary.to_dict(orient="records")}, indent=2, default=float))
        parent.log_metrics({f"cv_{r['metric']}_{stat}": r[stat] for r in rows
                            for stat in ("mean", "std", "ci_low", "ci_high")})
        for name in ("cv_summary.csv", "cv_summary.json", "oof_predictions.csv"):
            parent.log_artifact(out_dir / name)
        return CVResult(parent.run_id or "", out_dir, summary, oof.drop(columns="group"))


def format_summary(summary: pd.DataFrame) -> str:
    """The CV table as a person reads it: metric, mean +- std, 95% CI, per-fold values."""
    fold_columns = [c for c in summary.columns if c.startswith("fold")]
    lines = [f"{'metric':<18} {'mean':>6} {'std':>6}   {'95% CI (patients)':<17}  per fold"]
    for _, row in summary.iterrows():
        folds = " ".join(f"{row[c]:.3f}" for c in fold_columns)
        lines.append(f"{row['metric']:<18} {row['mean']:6.3f} {row['std']:6.3f}   "
                     f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]  {folds}")
    return "\n".join(lines)
