"""The facts of a bundle's model card, gathered at export from the training-run folder.

`model_card_facts(run_dir, bundle)` gathers what a person deciding whether to use the model
needs: the training and validation data (counts only), the intended and out-of-scope uses, the
validation figures with their 95% intervals and subgroups, the quality-gate verdict and the
warnings of training, the out-of-distribution and conformal settings, and the known limitations.
`embryo_ml.export.model_card` renders them as MODEL_CARD.md and puts them in `bundle.json`.

Sources, all in the training-run folder (`embryo_ml.train.run_folder`): `metrics.json` (figures,
verdict, warnings, refit), `train_images.csv` (the training images: label and, where the manifest
has them, day, clinic, source, focal plane, patient and embryo ids) and `val_predictions.csv`
(validation images and labels); the bundle itself for the `ood` and `conformal` settings and the
gate record.

Exact: the facts hold `metrics.json`'s numbers as they are (NaN, which JSON cannot hold, as
null). Private: patient ids, embryo ids and image paths are only ever counted, never copied, and
subgroup rows of an identifier column are left out. Torch-free (numpy/pandas/json), like the rest
of the bundle's readers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.evaluation.gate import PASSED
from embryo_ml.evaluation.shortcut import MISSING, column_values, natural_key
from embryo_ml.export.bundle import Bundle, reason_text
from embryo_ml.train.run_folder import METRICS_FILE, TRAIN_IMAGES_FILE, VAL_PREDICTIONS_FILE

CARD_VERSION = 1
SUMMARY_COLUMNS = ("day", "clinic", "source", "focal_plane")  # counted per value
IDENTIFIER_COLUMNS = ("patient_id", "embryo_id", "path")  # counted at most, never copied
SMALL_VALIDATION_PER_CLASS = 50
ALL = "(all)"

INTENDED_USE = ("Decision support: ranks the embryos of one patient's cohort by the calibrated "
                "probability of \u201c{positive}\u201d, for an embryologist to review; not a "
                "diagnosis.")
USE_DETAILS = (
    "Users: embryologists, who review every embryo themselves and make every decision.",
    "Input: still images of embryos like the training images{days}, from the clinic and "
    "microscope the model was validated on.",
    "Output: for each image a calibrated probability of \u201c{positive}\u201d as the training "
    "images were labelled, the embryo's rank within its patient's cohort, and flags for images "
    "that cannot be trusted (blurry, exposure, no embryo, out of distribution, uncertain).",
)
OUT_OF_SCOPE = (
    "Images from another clinic, microscope, camera, culture system or imaging type (for "
    "example time-lapse frames instead of still images, other contrast or magnification) "
    "before the model has been validated locally on such images.",
    "Embryos at other stages than those trained on{days}.",
    "Reading the score as a probability of implantation, pregnancy or live birth: it is the "
    "probability of the label \u201c{positive}\u201d as the training images were labelled.",
    "Comparing scores across patients or clinics, or allocating treatment by them: the ranking "
    "is meant within one patient's cohort.",
    "Deciding without an embryologist, or relying on the score of a flagged image before "
    "checking the image by eye.",
)


def json_safe(value: Any) -> Any:
    """`value` as strict JSON: NaN and infinities as None, numpy scalars as Python numbers,
    tuples as lists, keys as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _class_counts(labels: pd.Series, classes: list[str]) -> dict[str, int]:
    counts = labels.astype(str).value_counts()
    others = sorted(set(counts.index) - set(classes), key=natural_key)
    return {c: int(counts.get(c, 0)) for c in [*classes, *others]}


def _known(frame: pd.DataFrame, column: str) -> pd.Series:
    values = frame[column].fillna("").astype(str).str.strip()
    return values[values != ""]


def _distinct(frame: pd.DataFrame, column: str) -> int | None:
    """How many distinct known values `column` has (embryos within their patient), or None."""
    if column not in frame.columns:
        return None
    known = _known(frame, column)
    if column == "embryo_id" and "patient_id" in frame.columns:
        patients = frame["patient_id"].fillna("").astype(str).loc[known.index]
        return int(pd.Series(list(zip(patients, known))).nunique())
    return int(known.nunique())


def training_data(run_dir: Path, classes: list[str]) -> dict[str, Any]:
    """Counts of `train_images.csv`: per class, per value of each summary column (with its
    classes), patients and embryos."""
    path = run_dir / TRAIN_IMAGES_FILE
    if not path.is_file():
        return {"available": False, "source": TRAIN_IMAGES_FILE,
                "reason": f"the run folder has no {TRAIN_IMAGES_FILE} (trained before it existed)"}
    frame = pd.read_csv(path, dtype={c: str for c in IDENTIFIER_COLUMNS})
    by: dict[str, Any] = {}
    for column in SUMMARY_COLUMNS:
        if column not in frame.columns:
            continue
        values = pd.Series(column_values(frame[column]), index=frame.index)
        by[column] = {v: {"n": int((values == v).sum()),
                          "per_class": _class_counts(frame.loc[values == v, "label"], classes)}
                      for v in sorted(set(values), key=natural_key)}
    return {"available": True, "source": TRAIN_IMAGES_FILE, "n_images": len(frame),
            "per_class": _class_counts(frame["label"], classes), "by": by,
            "n_patients": _distinct(frame, "patient_id"),
            "n_embryos": _distinct(frame, "embryo_id")}


def validation_data(run_dir: Path, classes: list[str], metrics: dict[str, Any]) -> dict[str, Any]:
    """Counts of the validation images: per class from `val_predictions.csv`; per subgroup value,
    patients and embryos from the evaluation in `metrics.json` (no identifiers needed)."""
    path = run_dir / VAL_PREDICTIONS_FILE
    out: dict[str, Any] = {"available": path.is_file(), "source": VAL_PREDICTIONS_FILE,
                           "n_images": metrics.get("n_val")}
    if path.is_file():
        frame = pd.read_csv(path, usecols=["label"], dtype={"label": str})
        out |= {"n_images": len(frame), "per_class": _class_counts(frame["label"], classes)}
    evaluation = metrics.get("evaluation") or {}
    by: dict[str, Any] = {}
    for row in evaluation.get("subgroups") or []:
        if row.get("column") not in (ALL, *IDENTIFIER_COLUMNS):
            by.setdefault(str(row["column"]), {})[str(row["value"])] = {
                k: row.get(k) for k in ("n", "n_positive", "n_negative")}
    cohort = evaluation.get("within_patient") or {}
    out |= {"by": by, "n_patients": cohort.get("n_patients"),
            "n_embryos": cohort.get("n_embryos") if cohort.get("level") == "embryo" else None}
    return out


def performance(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """`metrics.json`'s validation figures, exactly: the `val_*` numbers, the evaluation's
    overall row and subgroups with intervals, within-group and within-patient results."""
    if not metrics:
        return None
    evaluation = metrics.get("evaluation") or {}
    rows = [r for r in evaluation.get("subgroups") or []
            if r.get("column") not in IDENTIFIER_COLUMNS]
    overall = next((r for r in rows if r.get("column") == ALL), None)
    numbers = {k: v for k, v in metrics.items() if k.startswith("val_")
               and isinstance(v, int | float) and not isinstance(v, bool)}
    keys = ("bootstrap", "n_images", "within_group_auc", "within_patient", "shortcut_baselines",
            "missing_columns", "min_group_size")
    return {"metrics": numbers, "confusion_matrix": metrics.get("val_confusion_matrix"),
            "overall": overall, "subgroups": [r for r in rows if r is not overall],
            **{k: evaluation.get(k) for k in keys},
            "calibration": {k: metrics.get(k) for k in ("temperature", "threshold", "prior")},
            "selection": {k: metrics.get(k) for k in
                          ("select_metric", "selection_rule", "best_epoch", "epochs_run")}}


def _days(train: dict[str, Any]) -> list[str]:
    return [d for d in (train.get("by") or {}).get("day", {}) if d != MISSING]


def _use_text(text: str, positive: str, days: list[str]) -> str:
    day_text = ""
    if days:
        listed = days[0] if len(days) == 1 else f"{', '.join(days[:-1])} and {days[-1]}"
        day_text = f" (day{'s' if len(days) > 1 else ''} {listed})"
    return text.format(positive=positive, days=day_text)


def limitations(facts: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """What the figures do not show, in plain sentences, from what the run recorded."""
    out = []
    refit = facts.get("refit")
    if refit:
        out.append(f"This model was refit on all {refit.get('n_images')} images (training and "
                   "validation) for the chosen number of epochs: it has no held-out images of its "
                   "own. Its validation figures, calibration and verdict are those of the "
                   "validation run (selection.pt), and the training-data counts here are that "
                   "run's training images.")
    per_class = (facts.get("validation_data") or {}).get("per_class") or {}
    if per_class and min(per_class.values()) < SMALL_VALIDATION_PER_CLASS:
        counts = ", ".join(f"{n} {c}" for c, n in per_class.items())
        out.append(f"The validation set is small ({counts}): the 95% intervals are wide and a "
                   "subgroup's figures rest on fewer images still.")
    if "temperature" in metrics:
        out.append("The calibration (temperature) and the decision threshold were fit on the "
                   "same validation images the figures are measured on, so the calibration "
                   "error and the threshold's sensitivity and specificity are optimistic.")
    gate = facts.get("validation_check")
    if gate is None:
        out.append("The run has no validation verdict (trained before the quality check).")
    elif gate.get("verdict") != PASSED:
        out.append(f"The validation check was {gate.get('verdict')}: {reason_text(gate)}.")
    if gate and gate.get("exported_despite_failure"):
        out.append("This model failed its validation check and was exported on request, for "
                   "inspection only: never use it to choose embryos.")
    for column in (facts.get("performance") or {}).get("missing_columns") or []:
        out.append(f"The images have no '{column}' column: performance per {column} is unknown.")
    train = facts.get("training_data") or {}
    sites = [c for c in ("clinic", "source") if c in (train.get("by") or {})]
    if train.get("available") and not sites:
        out.append("The training images' clinic or source is not recorded: how far the model "
                   "carries to other clinics is unknown.")
    for column in sites:
        if len(train["by"][column]) == 1:
            out.append(f"All training images come from one {column}: other sites need local "
                       "validation first.")
    warnings = facts.get("warnings") or {}
    if warnings.get("shortcut"):
        out.append("A shortcut warning was raised: a subgroup column alone ranks the validation "
                   "images nearly as well as the model (see Warnings).")
    if warnings.get("learning"):
        out.append("Training raised a learning warning (see Warnings).")
    if facts.get("ood") is None:
        out.append("No feature-space out-of-distribution reference: only the energy of the "
                   "model's outputs flags unusual images.")
    if facts.get("conformal") is None:
        out.append("No conformal prediction sets: images are not flagged as uncertain.")
    prior = metrics.get("prior")
    if isinstance(prior, dict) and facts.get("day_check") is None:
        out.append(f"No day check: a wrong {prior.get('column')} in a manifest moves the score "
                   "without a day_mismatch flag (the model's features do not tell the days "
                   "apart well enough).")
    elif facts.get("day_check"):
        out.append("The day check catches only some wrong days (see Trust settings): a missing "
                   "day_mismatch flag does not prove the day right.")
    return out


def _day_check_facts(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a reader needs of the day check (not its weights)."""
    if record is None:
        return None
    models = record.get("models") or {}
    return {"column": record.get("column"), "classes": record.get("classes"),
            "caught_on_validation": {k: m.get("caught_on_validation") for k, m in models.items()},
            "expected_rate": {k: m.get("expected_rate") for k, m in models.items()}}


def model_card_facts(run_dir: str | Path, bundle: Bundle) -> dict[str, Any]:
    """The model card's facts for `bundle`, exported from `run_dir` (JSON-safe)."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / METRICS_FILE)
    classes = list(bundle.classes)
    train = training_data(run_dir, classes)
    days = _days(train)
    refit = metrics.get("refit")
    facts: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "model": {"architecture": bundle.architecture, "classes": classes,
                  "positive_class": bundle.positive_class, "input_size": bundle.input_size,
                  "run_id": bundle.run_id, "created": bundle.created},
        "intended_use": {
            "summary": _use_text(INTENDED_USE, bundle.positive_class, days),
            "details": [_use_text(t, bundle.positive_class, days) for t in USE_DETAILS],
            "out_of_scope": [_use_text(t, bundle.positive_class, days) for t in OUT_OF_SCOPE]},
        "training_data": train,
        "validation_data": validation_data(run_dir, classes, metrics),
        "performance": performance(metrics),
        "validation_check": bundle.validation,
        "warnings": {"shortcut": list(metrics.get("shortcut_warnings") or []),
                     "learning": list(metrics.get("learning_warnings") or [])},
        "refit": ({k: refit.get(k) for k in ("epochs", "n_images", "calibration", "validation")}
                  if isinstance(refit, dict) else None),
        "ood": bundle.ood,
        "conformal": bundle.conformal,
        "day_check": _day_check_facts(bundle.day_check),
    }
    facts["limitations"] = limitations(facts, metrics)
    return json_safe(facts)
