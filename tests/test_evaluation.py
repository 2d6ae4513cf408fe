"""Honest evaluation (issue #7): subgroup metrics, shortcut baselines, within-cohort ranking,
checkpoint selection, `embryo-ml evaluate`, and the plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

from embryo_ml.cli import main
from embryo_ml.config import EvalConfig, load_config
from embryo_ml.errors import ConfigError
from embryo_ml.evaluation import metrics as weighted
from embryo_ml.evaluation.bootstrap import GroupBootstrap
from embryo_ml.evaluation.calibration import expected_calibration_error
from embryo_ml.evaluation.cohort_metrics import grade_points, within_patient_metrics
from embryo_ml.evaluation.report import evaluate_predictions
from embryo_ml.evaluation.selection import resolve_selection
from tests.conftest import tiny_config

# --- the numerical core ----------------------------------------------------------------------


def test_weighted_metrics_equal_scikit_learn_and_resampling() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(4, 60))
        y = rng.random(n) < 0.4
        y[:2] = [True, False]
        p = np.round(rng.random(n), int(rng.integers(1, 3)))  # coarse: many ties
        assert weighted.roc_auc(y, p)[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert weighted.average_precision(y, p)[0] == pytest.approx(
            average_precision_score(y, p), abs=1e-12)
        assert weighted.balanced_accuracy(y, p >= 0.5)[0] == pytest.approx(
            balanced_accuracy_score(y, p >= 0.5), abs=1e-12)
        assert weighted.calibration_error(y, p)[0] == pytest.approx(
            expected_calibration_error(y, p), abs=1e-12)
    # integer weights are bootstrap multiplicities: the metric of the resampled rows
    y, p = rng.random(80) < 0.5, rng.random(80)
    resampler = GroupBootstrap(rng.integers(0, 20, 80), n_boot=5, seed=1)
    weights = next(resampler.weights())
    for w in weights:
        rows = np.repeat(np.arange(80), w.astype(int))
        if len(set(y[rows])) == 2:
            assert weighted.roc_auc(y, p, w)[0] == pytest.approx(roc_auc_score(y[rows], p[rows]))
            assert weighted.average_precision(y, p, w)[0] == pytest.approx(
                average_precision_score(y[rows], p[rows]))
    assert math.isnan(weighted.roc_auc(np.ones(5, bool), p[:5])[0])  # one class: no AUC


# --- within-cohort ranking against hand-computed values --------------------------------------


def _hand_table() -> pd.DataFrame:
    rows = [
        # patient, embryo, day, good, score, grade
        ("alpha", "a1", 5, True, 0.8, "4AA"), ("alpha", "a1", 5, True, 1.0, "4AA"),  # mean 0.9
        ("alpha", "a2", 5, False, 0.6, "3BC"), ("alpha", "a3", 5, True, 0.4, "4AB"),
        ("alpha", "a4", 5, False, 0.2, "2"),
        ("bravo", "b1", 5, False, 0.8, "3CC"), ("bravo", "b2", 5, True, 0.5, "5AA"),
        ("bravo", "b3", 5, False, 0.3, None),
        ("charlie", "c1", 5, False, 0.7, "4AD"), ("charlie", "c2", 5, False, 0.1, None),
        ("delta", "d1", 3, True, 0.5, None), ("delta", "d2", 3, False, 0.5, None),
        ("delta", "d3", 5, True, 0.2, None),
        (None, "x1", 5, True, 0.9, None),
    ]
    table = pd.DataFrame(rows, columns=["patient_id", "embryo_id", "day", "y", "score", "grade"])
    return table.assign(predicted=table["score"] >= 0.5)


def test_within_patient_metrics_match_hand_computed_values() -> None:
    result = within_patient_metrics(_hand_table(), cohort_by=["day"])
    # cohorts (patient + day) with both classes: alpha|5, bravo|5, delta|3
    #   alpha|5: goods 0.9, 0.4 vs poors 0.6, 0.2 -> 3 of 4 pairs right = 0.75; top 0.9 good
    #   bravo|5: good 0.5 vs poors 0.8, 0.3 -> 1 of 2 = 0.5; top 0.8 poor
    #   delta|3: good 0.5 vs poor 0.5 tie -> 0.5; tied top, half good -> 0.5
    assert result["n_patients"] == 4 and result["n_cohorts"] == 5
    assert result["n_cohorts_both_classes"] == 3 and result["n_rows_without_patient"] == 1
    assert result["n_embryos"] == 12  # a1's two images are one embryo
    assert result["within_patient_auc"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert result["top1_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert result["top1_chance"] == pytest.approx((2 / 4 + 1 / 3 + 1 / 2) / 3)
    # grades as points: 4AA 10, 3BC 6, 4AB 9, 2 2, 3CC 5, 5AA 11; 4AD does not parse
    assert [grade_points(g) for g in ("4AA", "3BC", "4AB", "2", "3CC", "5AA")] == [
        10, 6, 9, 2, 5, 11]
    assert result["n_graded_embryos"] == 6 and result["n_grades_invalid"] == 1
    # pooled over (0.9,10) (0.6,6) (0.4,9) (0.2,2) (0.8,5) (0.5,11): 9 concordant, 6 discordant
    assert result["kendall_tau"] == pytest.approx((9 - 6) / 15)
    # alpha: 5 concordant 1 discordant of 6 -> 2/3; bravo: (0.8,5) (0.5,11) discordant -> -1
    assert result["within_patient_kendall_tau"] == pytest.approx((2 / 3 - 1) / 2)
    # without the day split, delta is one cohort: good 0.5, 0.2 vs poor 0.5 -> (0.5 + 0) / 2
    merged = within_patient_metrics(_hand_table(), cohort_by=[])
    assert merged["within_patient_auc"] == pytest.approx((0.75 + 0.5 + 0.25) / 3)


def test_subgroups_one_class_and_too_few_are_reported_not_dropped() -> None:
    rng = np.random.default_rng(1)
    n = 60
    y = np.r_[rng.random(40) < 0.5, np.zeros(15, bool), rng.random(5) < 0.5]
    y[:2] = [True, False]
    table = pd.DataFrame({"y": y, "clinic": ["A"] * 40 + ["B"] * 15 + ["C"] * 5,
                          "patient_id": [f"pt{i // 3}" for i in range(n)]})
    table = table.assign(score=np.clip(table["y"] * 0.3 + rng.random(n) * 0.7, 0, 1))
    table = table.assign(predicted=table["score"] >= 0.5)
    cfg = EvalConfig(subgroups=["clinic", "day"], min_group_size=10, n_boot=200)
    result = evaluate_predictions(table, cfg)
    rows = {(r["column"], r["value"]): r for r in result.rows}
    assert rows[("clinic", "A")]["status"] == "ok" and rows[("clinic", "A")]["n"] == 40
    low, high = rows[("clinic", "A")]["auc_ci_low"], rows[("clinic", "A")]["auc_ci_high"]
    assert low <= rows[("clinic", "A")]["auc"] <= high
    assert rows[("clinic", "B")]["status"] == "one class"
    assert math.isnan(rows[("clinic", "B")]["auc"]) and rows[("clinic", "B")]["ece"] >= 0
    assert rows[("clinic", "C")]["status"] == "too few (n < 10)" and rows[("clinic", "C")]["n"] == 5
    assert result.missing_columns == ["day"]
    text = result.format()
    assert "clinic=B" in text and "one class" in text and "too few" in text
    assert "not in the data: day" in text
    assert result.within["clinic"]["n_groups_used"] == 1  # only A counts in the mean


# --- shortcut baselines ----------------------------------------------------------------------


def _day_cohorts(n_patients: int = 100, seed: int = 0) -> pd.DataFrame:
    """Embryos of day 3 (15% good) and day 5 (85% good); 4 embryos per patient."""
    rng = np.random.default_rng(seed)
    day = rng.choice([3, 5], size=n_patients * 4)
    good = rng.random(len(day)) < np.where(day == 5, 0.85, 0.15)
    return pd.DataFrame({"patient_id": np.repeat([f"pt{i:03d}" for i in range(n_patients)], 4),
                         "embryo_id": [f"e{i}" for i in range(len(day))], "day": day, "y": good})


def _with_scores(table: pd.DataFrame, logit: np.ndarray) -> pd.DataFrame:
    score = 1 / (1 + np.exp(-logit))
    return table.assign(score=score, predicted=score >= 0.5)


def test_shortcut_warning_fires_for_a_model_that_only_knows_the_day() -> None:
    table = _day_cohorts()
    rng = np.random.default_rng(1)
    day_only = _with_scores(table, 2.0 * (table["day"] == 5) - 1 + rng.normal(0, 0.3, len(table)))
    result = evaluate_predictions(day_only, EvalConfig(subgroups=["day"], n_boot=300))
    overall, shortcut = result.overall["auc"], result.shortcuts[0]
    assert overall > 0.8  # looks good overall ...
    assert shortcut.column == "day" and shortcut.baseline_auc > 0.8
    assert shortcut.warning and "WARNING" in result.format()  # ... and is called out
    assert abs(result.within["day"]["auc"] - 0.5) < 0.1  # nothing within a day
    low, high = result.within["day"]["ci"]
    assert low < 0.5 < high
    assert abs(result.cohort["within_patient_auc"] - 0.5) < 0.15
    flat = result.flat_metrics()
    assert flat["shortcut.day.warning"] == 1.0 and "subgroup.day.5.auc" in flat


def test_no_warning_for_a_model_that_is_good_within_days() -> None:
    table = _day_cohorts()
    rng = np.random.default_rng(2)
    good = _with_scores(table, 2.5 * table["y"] + 1.0 * (table["day"] == 5) - 1.8
                        + rng.normal(0, 0.8, len(table)))
    result = evaluate_predictions(good, EvalConfig(subgroups=["day"], n_boot=300))
    assert not result.shortcuts[0].warning and not result.warnings
    assert result.overall["auc"] > result.shortcuts[0].baseline_auc + 0.05
    assert result.within["day"]["auc"] > 0.8
    assert result.within["day"]["ci"][0] > 0.7
    assert result.cohort["within_patient_auc"] > 0.75
    assert result.cohort["top1_accuracy"] > result.cohort["top1_chance"]
    assert "WARNING" not in result.format()


def test_baselines_are_fit_on_the_training_rows() -> None:
    evaluated = _with_scores(_day_cohorts(30, seed=3), np.zeros(120))
    train = pd.DataFrame({"day": [3, 3, 5, 5, 7], "y": [False, False, True, False, True]})
    result = evaluate_predictions(evaluated, EvalConfig(subgroups=["day"], n_boot=0),
                                  train=train)
    # rates from `train`: day 3 -> 0, day 5 -> 0.5 (so day 5 ranks above day 3, as in truth)
    assert result.shortcuts[0].fit_on == "the training rows"
    assert result.shortcuts[0].baseline_auc == pytest.approx(evaluate_predictions(
        evaluated, EvalConfig(subgroups=["day"], n_boot=0)).shortcuts[0].baseline_auc)


def test_patient_ids_stay_out_of_everything_logged() -> None:
    table = _day_cohorts(40).assign(patient_id=lambda t: "SECRET-" + t["patient_id"])
    result = evaluate_predictions(_with_scores(table, table["y"] * 1.0),
                                  EvalConfig(subgroups=["day"], n_boot=50))
    logged = json.dumps([result.to_json(), sorted(result.flat_metrics())], default=float)
    assert "SECRET" not in logged
    with pytest.raises(ConfigError, match="patient_id cannot be a subgroup"):
        load_config(None, ["eval.subgroups=[day, patient_id]"])


# --- checkpoint selection --------------------------------------------------------------------


def test_select_metric_resolution() -> None:
    cfg = load_config(None, ["eval.min_group_size=2"])
    meta = pd.DataFrame({"day": [3, 3, 5, 5], "patient_id": ["a", "a", "b", "b"]})
    y = np.array([True, False, True, False])
    selection = resolve_selection(cfg, meta, y)
    assert selection.metric == "pooled_within_day_auc"
    assert selection.score(y, np.array([0.2, 0.1, 0.9, 0.8])) == 1.0  # overall AUC is 0.75
    assert resolve_selection(cfg, meta.drop(columns="day"), y).metric == "auc"
    cfg.train.select_metric = "within_patient_auc"
    assert resolve_selection(cfg, meta, y).metric == "within_patient_auc"
    cfg.train.select_metric = "mean_subgroup_auc"
    cfg.train.select_subgroup = "clinic"
    with pytest.raises(ConfigError, match="select_subgroup=clinic: the data has no column"):
        resolve_selection(cfg, meta, y)


def test_training_selects_by_within_day_auc_and_reports_evaluation(trained_run: dict) -> None:
    from embryo_ml.train.tracking import run_summary

    run_dir = trained_run["run_dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    # synthetic data has a day column: within-day AUC pooled over same-day pairs
    assert metrics["select_metric"] == "pooled_within_day_auc"
    assert metrics["best_score"] == pytest.approx(history["val_pooled_within_day_auc"].max())
    assert "weighted by its positive x negative pairs" in metrics["selection_rule"]
    evaluation = metrics["evaluation"]
    assert evaluation["subgroups"][0]["column"] == "(all)"
    assert {r["column"] for r in evaluation["subgroups"][1:]} == {"day", "focal_plane"}
    assert evaluation["missing_columns"] == ["clinic"]
    assert [s["column"] for s in evaluation["shortcut_baselines"]] == ["day"]
    assert "within_patient_auc" in evaluation["within_patient"]
    assert (run_dir / "subgroup_metrics.csv").is_file()
    summary = run_summary(trained_run["result"].run_id, trained_run["uri"])
    for artifact in ("plots/pr_curve.png", "plots/score_distribution.png",
                     "plots/roc_by_day.png", "subgroup_metrics.csv"):
        assert artifact in summary["artifacts"], artifact
    assert "val_eval.shortcut.day.baseline_auc" in summary["metrics"]
    assert "best_val_within_day_auc" in summary["metrics"]
    assert len(summary["history"]["val_pooled_within_day_auc"]) == 2  # per epoch
    logged = json.dumps([summary["params"], summary["tags"], sorted(summary["metrics"])])
    assert "P00" not in logged and "P00" not in json.dumps(evaluation)


# --- a real model on data whose label only follows the (visible) day -------------------------


def test_tiny_cnn_on_day_shortcut_data_looks_good_overall_and_is_called_out(
    tmp_path: Path,
) -> None:
    """Labels follow the day only (day 3: 15% good, day 5: 85%, drawn independently of how the
    embryo looks); the day is plain to see. Measured here: overall AUC 0.887, day-only
    baseline 0.881, mean within-day AUC 0.567 (interval 0.34-0.84)."""
    from embryo_ml.data.synthetic import generate_dataset
    from embryo_ml.train.fit import fit
    from embryo_ml.train.tracking import run_summary

    manifest = generate_dataset(tmp_path / "data", n=300, size=64, seed=5, label_rule="day",
                                day_good_rates=(0.15, 0.85))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(
        uri, "data.image_size=64", "train.epochs=8", "train.batch_size=16",
        "train.lr=0.003", "train.threads=1", "train.augment=false", "data.val_fraction=0.3",
        "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "train.select_metric=auc",
        "tracking.log_checkpoint=false")
    result = fit(cfg, manifest, tmp_path / "run", progress=False)
    metrics = result.metrics
    assert metrics["select_metric"] == "auc"
    assert metrics["val_auc"] > 0.8  # the model looks good overall
    shortcut = metrics["evaluation"]["shortcut_baselines"][0]
    assert shortcut["column"] == "day" and shortcut["warning"]
    assert shortcut["baseline_auc"] > 0.8
    assert any("'day' alone" in w for w in metrics["shortcut_warnings"])
    within = metrics["evaluation"]["within_group_auc"]["day"]
    assert abs(within["auc"] - 0.5) < 0.15 and within["ci"][0] < 0.5 < within["ci"][1]
    tracked = run_summary(result.run_id, uri)
    assert tracked["metrics"]["val_eval.shortcut.day.warning"] == 1.0
    assert tracked["tags"]["eval.shortcut_warning"] == "day"


# --- embryo-ml evaluate ----------------------------------------------------------------------


def test_evaluate_command_joins_scores_and_labels(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = pd.read_csv(synth_data)
    rng = np.random.default_rng(0)
    good = (manifest["label"] == "good").to_numpy()
    score = np.clip(0.35 * good + 0.65 * rng.random(len(manifest)), 0, 1)
    scores = pd.DataFrame({"path": manifest["path"], "status": "ok", "score": score,
                           "label_pred": np.where(score >= 0.5, "good", "poor")})
    scores.loc[0, ["status", "score"]] = ["unreadable: truncated", np.nan]
    extra = pd.DataFrame([{"path": "images/good/unknown.png", "status": "ok", "score": 0.5,
                           "label_pred": "good"}])
    folder = tmp_path / "scored"
    folder.mkdir()
    # paths are relative to the manifest's folder (what was scored): --images says so
    scores_file = folder / "scores.jsonl"
    pd.concat([scores, extra]).to_json(scores_file, orient="records", lines=True)
    out = tmp_path / "eval"
    assert main(["evaluate", str(scores_file), "--labels", str(synth_data), "--out", str(out),
                 "--images", str(synth_data), "--set", "eval.n_boot=100",
                 "--set", "eval.min_group_size=5"]) == 0
    printed = capsys.readouterr().out
    assert f"evaluated {len(manifest) - 1} scored image(s)" in printed
    assert "1 score row(s) match no labelled manifest row" in printed
    assert "1 labelled image(s) have no ok score" in printed
    assert "day=3" in printed and "shortcut baselines" in printed
    assert "within-patient ranking" in printed
    for name in ("metrics.json", "subgroup_metrics.csv", "roc_curve.png", "pr_curve.png",
                 "score_distribution.png", "roc_by_day.png", "reliability_diagram.png",
                 "confusion_matrix.png"):
        assert (out / name).is_file(), name
    written = json.loads((out / "metrics.json").read_text())
    assert written["counts"]["evaluated"] == len(manifest) - 1
    expected = roc_auc_score(good[1:], score[1:])
    assert written["subgroups"][0]["auc"] == pytest.approx(expected)
    assert "P00" not in json.dumps(written)
    table = pd.read_csv(out / "subgroup_metrics.csv")
    assert {"column", "value", "n", "status", "auc", "auc_ci_low", "ece"} <= set(table.columns)
    # without --images the paths are read against the scores file's folder: nothing matches
    assert main(["evaluate", str(scores_file), "--labels", str(synth_data), "--out",
                 str(out)]) == 2
    assert "pass --images" in capsys.readouterr().err


def test_evaluation_modules_import_neither_torch_nor_mlflow() -> None:
    code = ("import sys, embryo_ml.evaluation.scores, embryo_ml.evaluation.selection; "
            "print(','.join(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
