"""Grouped cross-validation: parent + child runs, out-of-fold predictions, patient bootstrap."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.train.cv import bootstrap_ci, cross_validate, format_summary
from tests.conftest import TINY_MODEL, tiny_config


def test_cross_validation_runs_and_tracks_folds(synth_data: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'cv.db'}"
    cfg = tiny_config(uri, "data.image_size=32", "train.epochs=1", "train.batch_size=16",
                      "tracking.log_checkpoint=false")
    result = cross_validate(cfg, synth_data, 3, tmp_path / "cv", progress=False, n_boot=200)
    manifest = pd.read_csv(synth_data)
    oof = result.oof
    assert len(oof) == len(manifest) and oof["path"].is_unique  # every image once, out of fold
    patient = dict(zip([str((synth_data.parent / p).resolve()) for p in manifest["path"]],
                       manifest["patient_id"]))
    folds_per_patient = oof.assign(patient=oof["path"].map(patient)).groupby("patient")["fold"]
    assert (folds_per_patient.nunique() == 1).all()
    summary = result.summary.set_index("metric")
    assert list(summary.index)[:5] == ["auc", "pr_auc", "balanced_accuracy", "sensitivity",
                                       "specificity"]
    # the pooled evaluation's headline numbers join the table (issue #7)
    assert {"ece", "within_day_auc", "within_patient_auc", "top1_accuracy"} <= set(summary.index)
    for metric, row in summary.iterrows():
        folds = np.array([row["fold0"], row["fold1"], row["fold2"]], dtype=float)
        if metric in ("ece", *list(summary.index)[:5]):
            assert 0.0 <= row["ci_low"] <= row["ci_high"] <= 1.0, metric
        if np.isfinite(folds).all():
            assert row["mean"] == pytest.approx(folds.mean())
    assert "95% CI" in format_summary(result.summary)
    text = format_summary(result.summary, result.evaluation)
    assert "day=3" in text and "shortcut baselines" in text and "within-patient ranking" in text
    subgroups = pd.read_csv(tmp_path / "cv" / "cv_subgroups.csv")
    assert subgroups["n"].iloc[0] == len(manifest)  # the pooled (all) row
    assert [s.fit_on for s in result.evaluation.shortcuts] == [
        "each fold's training rows (out of fold)"]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("embryo-ml").experiment_id
    children = client.search_runs([experiment],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 3
    parent = client.get_run(result.parent_run_id)
    assert "cv_auc_mean" in parent.data.metrics and "cv_auc_ci_low" in parent.data.metrics
    assert "cv_within_day_auc_mean" in parent.data.metrics
    assert "cv_eval.shortcut.day.baseline_auc" in parent.data.metrics
    top = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert "oof_predictions.csv" not in top  # its paths carry patient ids (privacy rule)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/roc_by_day.png", "plots/pr_curve.png", "plots/score_distribution.png",
            "plots/reliability_diagram.png"} <= artifacts


def test_bootstrap_ci_resamples_patients() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for g in range(40):
        good = g % 2 == 0
        for _ in range(3):
            p = float(np.clip(rng.normal(0.7 if good else 0.3, 0.15), 0, 1))
            rows.append({"group": f"G{g}", "label": "good" if good else "poor", "p_good": p,
                         "label_pred": "good" if p >= 0.5 else "poor"})
    oof = pd.DataFrame(rows)
    low, high = bootstrap_ci(oof, "good", "auc", n_boot=300)
    assert 0.8 < low < high < 1.0
    again = bootstrap_ci(oof, "good", "auc", n_boot=300)
    assert again == (low, high)  # deterministic by seed


def test_cv_cli_with_a_splits_file(synth_data: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    splits = tmp_path / "splits.csv"
    assert main(["data", "split", str(synth_data), "--folds", "2", "--test-fraction", "0.2",
                 "--out", str(splits)]) == 0
    uri = f"sqlite:///{tmp_path / 'cv.db'}"
    assert main(["-q", "cv", "--data", str(synth_data), "--splits", str(splits), "--out",
                 str(tmp_path / "cv"), "--set", f"model.name={TINY_MODEL}",
                 "--set", "data.image_size=32", "--set", "train.epochs=1",
                 "--set", f"tracking.tracking_uri={uri}",
                 "--set", "tracking.log_checkpoint=false"]) == 0
    out = capsys.readouterr().out
    assert "auc" in out and "MLflow parent run id" in out
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    test_rows = pd.read_csv(splits).query("split == 'test'")
    assert len(oof) == 120 - len(test_rows)  # the holdout never enters cross-validation
