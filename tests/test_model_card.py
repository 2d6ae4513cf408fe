"""The model card every bundle carries (embryo_ml.export.model_card): MODEL_CARD.md and the same
facts in bundle.json, counts only (no identifier or path), figures equal to metrics.json's, and
its summary in the scoring report.

The session's `trained_run` / `bundle_dir` (a tiny synthetic run and its export) hold a real
card; the hand-made run folders below cover what a tiny run does not have (refit, NaN, no
train_images.csv, OOD and conformal settings).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from embryo_ml.export.bundle import BUNDLE_FILE, Bundle, read_bundle
from embryo_ml.export.model_card import MODEL_CARD_FILE, model_card_facts, render_model_card
from embryo_ml.export.model_card_facts import TRAIN_IMAGES_FILE
from embryo_ml.report.html import write_report
from embryo_ml.score.scorer import score_columns
from tests.fake_bundle import make_fake_bundle, rewrite_bundle_json


def _nan_to_none(value: Any) -> Any:
    """metrics.json as the card's JSON facts hold it (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metrics(trained_run: dict) -> dict:
    return json.loads((trained_run["run_dir"] / "metrics.json").read_text())


def _card(bundle_dir: Path) -> tuple[dict, str]:
    facts = json.loads((bundle_dir / BUNDLE_FILE).read_text())["model_card"]
    return facts, (bundle_dir / MODEL_CARD_FILE).read_text(encoding="utf-8")


def _ci_text(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [95% CI {low:.3f}, {high:.3f}]"


# ---------------------------------------------------------------- the session's bundle ----


def test_every_bundle_carries_its_model_card(bundle_dir: Path) -> None:
    assert (bundle_dir / MODEL_CARD_FILE).is_file()
    raw = (bundle_dir / BUNDLE_FILE).read_text()
    data = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in bundle.json"))
    facts, markdown = _card(bundle_dir)
    assert isinstance(data["model_card"], dict) and facts["card_version"] == 1
    assert read_bundle(bundle_dir).model_card == facts
    assert markdown == render_model_card(facts)  # the card is the rendering of the facts
    for heading in ("## Intended use", "## Out of scope", "## Training and validation data",
                    "## Validation", "## Warnings", "## Trust settings",
                    "## Known limitations"):
        assert heading in markdown


def test_the_card_holds_no_patient_embryo_id_or_image_path(
    trained_run: dict, bundle_dir: Path, synth_data: Path
) -> None:
    run_dir = trained_run["run_dir"]
    train = pd.read_csv(run_dir / TRAIN_IMAGES_FILE, dtype=str)
    manifest = pd.read_csv(synth_data, dtype=str)  # validation images' ids too
    val = pd.read_csv(run_dir / "val_predictions.csv", dtype=str)
    ids = {*train["patient_id"], *train["embryo_id"], *manifest["patient_id"],
           *manifest["embryo_id"]}
    paths = {*train["path"], *val["path"], *manifest["path"]}
    names = {Path(p).name for p in paths} | {Path(p).stem for p in paths}
    secrets = ids | paths | names | {str(synth_data.parent)}
    assert len(ids) > 30 and all(len(s) >= 5 for s in secrets)  # distinctive: P0001, P0001-E01
    facts, markdown = _card(bundle_dir)
    facts_text = json.dumps(facts)
    found = sorted(s for s in secrets if s in markdown or s in facts_text)
    assert not found, f"identifiers or paths in the model card: {found[:5]}"


def test_the_card_counts_equal_train_images_and_val_predictions(
    trained_run: dict, bundle_dir: Path
) -> None:
    run_dir = trained_run["run_dir"]
    metrics = _metrics(trained_run)
    train = pd.read_csv(run_dir / TRAIN_IMAGES_FILE, dtype=str)
    val = pd.read_csv(run_dir / "val_predictions.csv", dtype=str)
    facts, markdown = _card(bundle_dir)
    data, held_out = facts["training_data"], facts["validation_data"]

    assert data["n_images"] == len(train) == metrics["n_train"]
    assert data["per_class"] == train["label"].value_counts().to_dict()
    assert data["n_patients"] == train["patient_id"].nunique()
    assert data["n_embryos"] == train[["patient_id", "embryo_id"]].drop_duplicates().shape[0]
    for day, group in train.groupby("day"):
        assert data["by"]["day"][day]["n"] == len(group)
        assert data["by"]["day"][day]["per_class"] == {
            c: int((group["label"] == c).sum()) for c in metrics["classes"]}
    assert held_out["n_images"] == len(val) == metrics["n_val"]
    assert held_out["per_class"] == val["label"].value_counts().to_dict()
    cohort = metrics["evaluation"]["within_patient"]
    assert held_out["n_patients"] == cohort["n_patients"]
    days = {r["value"]: r["n"] for r in metrics["evaluation"]["subgroups"]
            if r["column"] == "day"}
    assert {d: v["n"] for d, v in held_out["by"]["day"].items()} == days

    for name in metrics["classes"]:
        row = f"| {name} | {data['per_class'][name]} | {held_out['per_class'][name]} |"
        assert row in markdown
    assert f"{len(train)} training images of {data['n_patients']} patients" in markdown


def test_the_card_figures_equal_metrics_json(trained_run: dict, bundle_dir: Path) -> None:
    metrics = _nan_to_none(_metrics(trained_run))
    evaluation = metrics["evaluation"]
    facts, markdown = _card(bundle_dir)
    performance = facts["performance"]

    assert performance["metrics"] == {k: v for k, v in metrics.items() if k.startswith("val_")
                                      and isinstance(v, int | float | None)
                                      and not isinstance(v, bool)}
    assert performance["overall"] == evaluation["subgroups"][0]
    assert performance["subgroups"] == evaluation["subgroups"][1:]
    for key in ("bootstrap", "within_group_auc", "within_patient", "shortcut_baselines",
                "missing_columns"):
        assert performance[key] == evaluation[key], key
    assert performance["confusion_matrix"] == metrics["val_confusion_matrix"]
    assert performance["calibration"] == {"temperature": metrics["temperature"],
                                          "threshold": metrics["threshold"],
                                          "prior": metrics["prior"]}
    assert facts["validation_check"] == metrics["validation"]
    assert facts["warnings"] == {"shortcut": metrics["shortcut_warnings"],
                                 "learning": metrics["learning_warnings"]}
    assert facts["ood"] == read_bundle(bundle_dir).ood
    assert facts["conformal"] == read_bundle(bundle_dir).conformal

    # the Markdown shows the same numbers, rounded to 3 decimals
    overall = performance["overall"]
    assert (f"ROC AUC {_ci_text(overall['auc'], overall['auc_ci_low'], overall['auc_ci_high'])}"
            f" on {overall['n']} validation images") in markdown
    for key, value in performance["metrics"].items():
        assert f"| {key} | {'n/a' if value is None else f'{value:.3f}'} |" in markdown
    for column, summary in evaluation["within_group_auc"].items():
        assert f"Within-{column} AUC" in markdown
        if None not in summary["ci"]:
            assert _ci_text(summary["auc"], *summary["ci"]) in markdown
    assert f"Validation check: {metrics['validation']['verdict']}" in markdown
    assert f"decision threshold {metrics['threshold']:.3f}" in markdown


def test_the_report_shows_the_card_summary(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = read_bundle(bundle_dir)
    scores = _scores(tmp_path, bundle.classes)
    page = write_report(scores, bundle_dir, tmp_path / "report.html",
                        heatmaps=False).read_text(encoding="utf-8")
    facts = bundle.model_card
    assert 'id="model-card"' in page
    section = page[page.index('id="model-card"'):]
    section = section[:section.index("</div>")]
    train, overall = facts["training_data"], facts["performance"]["overall"]
    assert f"{train['n_images']} training images of {train['n_patients']} patients" in section
    assert _ci_text(overall["auc"], overall["auc_ci_low"], overall["auc_ci_high"]) in section
    assert bundle.verdict in section
    assert "not a diagnosis" in section
    assert MODEL_CARD_FILE in section and str(bundle_dir) in section
    for name in bundle.classes:
        assert name in section


# ---------------------------------------------------------------- hand-made run folders ----


def _scores(folder: Path, classes: list[str]) -> Path:
    path = folder / "scores.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, score_columns(classes))
        writer.writeheader()
        writer.writerow({"path": "a.png", "status": "ok", "score": "0.7", "display_score": "7",
                         "label_pred": classes[0], f"p_{classes[0]}": "0.7",
                         f"p_{classes[1]}": "0.3", "flags": "", "embryo_id": "E1",
                         "patient_id": "Q1", "rank_in_cohort": "1"})
    return path


def _bundle(**fields: Any) -> Bundle:
    return Bundle(architecture="tiny", classes=["good", "poor"], positive_class="good",
                  input_size=64, mean=[0.5] * 3, std=[0.5] * 3, sha256="0" * 64, **fields)


def _hand_run(folder: Path, metrics: dict[str, Any], train_images: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))  # NaN written as NaN, as fit does
    pd.DataFrame({"path": ["x/a.png", "x/b.png"], "label": ["good", "poor"]}).to_csv(
        folder / "val_predictions.csv", index=False)
    if train_images:
        pd.DataFrame({"path": [f"x/t{i}.png" for i in range(4)],
                      "label": ["good", "poor", "good", "good"], "day": [5, 5, 3, np.nan],
                      "clinic": ["north"] * 4, "patient_id": ["SECRET1", "SECRET1", "SECRET2", ""],
                      "embryo_id": ["E1", "E2", "E1", "E9"]}).to_csv(
            folder / TRAIN_IMAGES_FILE, index=False)
    return folder


HAND_METRICS = {
    "val_auc": math.nan, "val_f1": 0.5, "n_val": 2, "temperature": 1.5, "threshold": 0.4,
    "classes": ["good", "poor"], "learning_warnings": ["the loss did not fall"],
    "shortcut_warnings": ["WARNING: day alone ranks as well"],
    "refit": {"epochs": 3, "n_images": 6, "train_loss": [0.7, 0.6, 0.5],
              "calibration": "fit on the validation run", "validation": "the validation run's"},
}


def test_hand_run_refit_nan_counts_and_trust_settings(tmp_path: Path) -> None:
    run = _hand_run(tmp_path / "run", HAND_METRICS)
    ood = {"method": "knn", "k": 5, "alpha": 0.01, "limits": {"fp32": 1.25, "int8": 1.5},
           "expected_rate": {"fp32": 0.01, "int8": 0.02}, "n_reference": 4, "n_calibration": 2}
    conformal = {"alpha": 0.1, "quantiles": {"good": 0.8, "poor": 0.7},
                 "n_calibration": {"good": 1, "poor": 1}}
    facts = model_card_facts(run, _bundle(ood=ood, conformal=conformal))
    json.dumps(facts, allow_nan=False)  # strict JSON
    assert facts["performance"]["metrics"] == {"val_auc": None, "val_f1": 0.5}
    data = facts["training_data"]
    assert data["per_class"] == {"good": 3, "poor": 1}
    # known ids only; an embryo counts within its patient (E1 twice), one without a patient too
    assert data["n_patients"] == 2 and data["n_embryos"] == 4
    assert data["by"]["day"]["(missing)"]["n"] == 1 and data["by"]["clinic"]["north"]["n"] == 4
    assert facts["refit"] == {k: HAND_METRICS["refit"][k]
                              for k in ("epochs", "n_images", "calibration", "validation")}
    assert facts["ood"] == ood and facts["conformal"] == conformal
    markdown = render_model_card(facts)
    assert "SECRET" not in markdown + json.dumps(facts) and "t0.png" not in markdown
    assert "no held-out images of its own" in markdown
    assert "All training images come from one clinic" in markdown
    assert "| val_auc | n/a |" in markdown and "| val_f1 | 0.500 |" in markdown
    assert "- limits: fp32 1.25, int8 1.5" in markdown
    assert "- quantiles: good 0.8, poor 0.7" in markdown
    assert "the loss did not fall" in markdown and "day alone ranks as well" in markdown
    assert "Embryos at other stages than those trained on (days 3 and 5)" in markdown


def test_a_run_without_train_images_or_trust_settings_still_gets_a_card(tmp_path: Path) -> None:
    run = _hand_run(tmp_path / "run", {"n_val": 2}, train_images=False)
    facts = model_card_facts(run, _bundle())
    assert facts["training_data"]["available"] is False
    assert facts["ood"] is None and facts["conformal"] is None
    markdown = render_model_card(facts)
    assert markdown.count("Not available in this bundle.") == 2
    assert "not summarised" in markdown and "Validation check: not recorded" in markdown


def test_a_bundle_without_a_card_reads_and_reports(tmp_path: Path) -> None:
    folder = make_fake_bundle(tmp_path / "bundle", np.array([[2.0, 0.0], [0.0, 1.0],
                                                             [0.0, 0.0]]))
    # as bundles exported before model cards were written
    rewrite_bundle_json(folder, lambda data: data.pop("model_card", None))
    bundle = read_bundle(folder)
    assert bundle.model_card is None
    page = write_report(_scores(tmp_path, bundle.classes), bundle, tmp_path / "r.html",
                        heatmaps=False).read_text(encoding="utf-8")
    assert "This bundle has no model card" in page
    with_card = dataclasses.replace(
        bundle, model_card=model_card_facts(_hand_run(tmp_path / "run", HAND_METRICS), bundle))
    page = write_report(_scores(tmp_path, bundle.classes), with_card, tmp_path / "r2.html",
                        heatmaps=False).read_text(encoding="utf-8")
    assert "4 training images of 2 patients" in page and "SECRET" not in page


def test_the_card_knows_the_training_folder_file_name() -> None:
    from embryo_ml.train.run_folder import TRAIN_IMAGES_FILE as TRAIN_IMAGES_NAME

    assert TRAIN_IMAGES_FILE == TRAIN_IMAGES_NAME
