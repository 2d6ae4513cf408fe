"""The model card every bundle carries: `MODEL_CARD.md`, and the same facts in `bundle.json`.

`model_card_facts(run_dir, bundle)` gathers, at export, what a person deciding whether to use the
model needs: the training and validation data (counts only), the intended and out-of-scope uses,
the validation figures with their 95% intervals and subgroups, the quality-gate verdict and the
warnings of training, the out-of-distribution and conformal settings, and the known limitations.
`render_model_card(facts)` writes them as Markdown for people.

Sources, all in the training-run folder: `metrics.json` (figures, verdict, warnings, refit),
`train_images.csv` (the training images: label and, where the manifest has them, day, clinic,
source, focal plane, patient and embryo ids) and `val_predictions.csv` (validation images and
labels); the bundle itself for the `ood` and `conformal` settings and the gate record.

Exact: the facts hold `metrics.json`'s numbers as they are (NaN, which JSON cannot hold, as
null); the Markdown rounds them for display only. Private: patient ids, embryo ids and image
paths are only ever counted, never copied, and subgroup rows of an identifier column are left
out. Torch-free (numpy/pandas/json), like the rest of the bundle's readers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.evaluation.gate import PASSED
from embryo_ml.evaluation.shortcut import MISSING, column_values, natural_key
from embryo_ml.export.bundle import MODEL_CARD_FILE, Bundle, file_sha256, reason_text
from embryo_ml.export.trust import TRAIN_IMAGES_FILE
from embryo_ml.fileio import atomic_write_text

CARD_VERSION = 1
METRICS_FILE = "metrics.json"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
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
OOD_TEXT = {
    "method": "how the distance to the training images is measured",
    "k": "neighbours in the distance",
    "alpha": "target false-alarm rate on images like the validation ones",
    "limits": "distance above which an image is flagged, per model precision",
    "expected_rate": "flag rate expected on images like the validation ones",
    "n_reference": "training images kept as the reference",
    "n_calibration": "validation images the limit was set on",
    "shift_p": "a scoring run warns of dataset shift when so many flags would be this unlikely "
               "on images like the validation ones",
    "file": "the reference features, in the bundle folder",
}
CONFORMAL_TEXT = {
    "alpha": "each class's prediction sets miss its true images at most this often",
    "score": "the nonconformity score",
    "quantiles": "per-class cut-offs of that score",
    "n_calibration": "validation images per class the cut-offs were set on",
}


# ------------------------------------------------------------------------------ facts --


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
            "calibration": {k: metrics.get(k) for k in ("temperature", "threshold")},
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
    return out


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
    }
    facts["limitations"] = limitations(facts, metrics)
    return json_safe(facts)


# ---------------------------------------------------------------------------- Markdown --


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(value: Any, ci: Any) -> str:
    """`0.812 [95% CI 0.700, 0.901]`, or the value alone without an interval."""
    text = _num(value)
    if isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci and text != "n/a":
        text += f" [95% CI {_num(ci[0])}, {_num(ci[1])}]"
    return text


def _row_ci(row: dict[str, Any], metric: str) -> str:
    """A subgroup row's metric with its interval (`<metric>_ci_low`, `<metric>_ci_high`)."""
    return _ci(row.get(metric), [row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")])


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else _num(value)
    for char in "\\|<>":  # Markdown backslash escapes: plain to read, inert when rendered
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _counts_line(what: str, data: dict[str, Any]) -> str:
    parts = [f"{_num(data.get('n_images'))} {what} images"]
    for key, name in (("n_patients", "patients"), ("n_embryos", "embryos")):
        if data.get(key) is not None:
            parts.append(f"{data[key]} {name}")
    return parts[0] + (f" of {' and '.join(parts[1:])}" if parts[1:] else "")


def _data_section(facts: dict[str, Any]) -> list[str]:
    train = facts.get("training_data") or {}
    val = facts.get("validation_data") or {}
    model = facts.get("model") or {}
    positive = str(model.get("positive_class", "positive"))
    classes = [str(c) for c in model.get("classes") or []]
    negative = classes[1 - classes.index(positive)] if len(classes) == 2 \
        and positive in classes else "other"
    lines = ["## Training and validation data", "",
             "Counts only: no patient id, embryo id or image path is kept in this card.", ""]
    if not train.get("available"):
        lines += [f"- Training images: not summarised ({train.get('reason', 'unknown')})."]
    else:
        lines += [f"- Training: {_counts_line('training', train)} ({train['source']})."]
    lines += [f"- Validation: {_counts_line('validation', val)}.", ""]
    train_classes, val_classes = train.get("per_class") or {}, val.get("per_class") or {}
    names = list(dict.fromkeys([*train_classes, *val_classes]))
    if names:
        lines += _table(["class", "training images", "validation images"],
                        [[c, train_classes.get(c), val_classes.get(c)] for c in names])
    for column, values in (train.get("by") or {}).items():
        lines += [f"Training images per {column}:", ""]
        lines += _table([column, "images", *train_classes],
                        [[v, d.get("n"), *[(d.get("per_class") or {}).get(c) for c in
                                          train_classes]] for v, d in values.items()])
    for column, values in (val.get("by") or {}).items():
        lines += [f"Validation images per {column}:", ""]
        lines += _table([column, "images", positive, negative],
                        [[v, d.get("n"), d.get("n_positive"), d.get("n_negative")]
                         for v, d in values.items()])
    return lines


def _gate_lines(gate: dict[str, Any] | None) -> list[str]:
    if gate is None:
        return ["**Validation check: not recorded** (trained before the quality check).", ""]
    lines = [f"**Validation check: {gate.get('verdict')}**: {reason_text(gate)}.", ""]
    if gate.get("exported_despite_failure"):
        lines += ["**Exported despite failing its validation check, for inspection only.**", ""]
    checks = gate.get("checks") or []
    if checks:
        lines += _table(["check", "value", "passed"],
                        [[c.get("label") or c.get("name"), _ci(c.get("value"), c.get("ci")),
                          c.get("passed")] for c in checks])
    return lines


def _subgroup_rows(perf: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    from embryo_ml.evaluation.report import METRIC_NAMES

    rows = [r for r in [perf.get("overall"), *(perf.get("subgroups") or [])] if r]
    metrics = [m for m in METRIC_NAMES if any(m in r for r in rows)]
    header = ["group", "n", "positive", "status", *[METRIC_NAMES[m] for m in metrics]]
    body = [["all" if r.get("column") == ALL else f"{r.get('column')}={r.get('value')}",
             r.get("n"), r.get("n_positive"), r.get("status"),
             *[_row_ci(r, m) for m in metrics]]
            for r in rows]
    return header, body


def _cohort_lines(cohort: dict[str, Any] | None) -> list[str]:
    if not cohort:
        return []
    if not cohort.get("available"):
        return [f"- Within-patient ranking: not available ({cohort.get('reason', '')}).", ""]
    return [f"- Within-patient ranking ({cohort.get('n_cohorts_both_classes')} of "
            f"{cohort.get('n_cohorts')} cohorts have both classes): within-patient AUC "
            f"{_ci(cohort.get('within_patient_auc'), cohort.get('within_patient_auc_ci'))}, "
            f"top-1 accuracy {_ci(cohort.get('top1_accuracy'), cohort.get('top1_accuracy_ci'))}"
            f" (random order: {_num(cohort.get('top1_chance'))}).", ""]


def _performance_section(facts: dict[str, Any]) -> list[str]:
    lines = ["## Validation", ""] + _gate_lines(facts.get("validation_check"))
    perf = facts.get("performance")
    if not perf:
        return [*lines, "No validation figures recorded (the run has no metrics.json).", ""]
    overall = perf.get("overall") or {}
    boot = perf.get("bootstrap") or {}
    if overall:
        lines += [f"ROC AUC {_row_ci(overall, 'auc')} on {overall.get('n')} validation images; "
                  "95% intervals resample "
                  f"{boot.get('unit', 'images')} ({boot.get('n_boot', 0)} times).", ""]
        lines += _table(*_subgroup_rows(perf))
    for column, summary in (perf.get("within_group_auc") or {}).items():
        lines += [f"- Within-{column} AUC (mean over {summary.get('n_groups_used')} of "
                  f"{summary.get('n_groups')} groups): "
                  f"{_ci(summary.get('auc'), summary.get('ci'))}."]
    lines += ["", *_cohort_lines(perf.get("within_patient"))]
    shortcuts = perf.get("shortcut_baselines") or []
    if shortcuts:
        lines += ["Shortcut baselines (the label predicted from one column alone):", ""]
        lines += _table(["column", "baseline AUC", "model AUC", "gap", "warning"],
                        [[s.get("column"), s.get("baseline_auc"), s.get("model_auc"),
                          _ci(s.get("gap"), s.get("gap_ci")), s.get("warning")]
                         for s in shortcuts])
    lines += ["All validation figures (metrics.json):", ""]
    lines += _table(["metric", "value"], [[k, v] for k, v in (perf.get("metrics") or {}).items()])
    calibration, selection = perf.get("calibration") or {}, perf.get("selection") or {}
    lines += [f"- Calibration temperature {_num(calibration.get('temperature'))}, decision "
              f"threshold {_num(calibration.get('threshold'))}.",
              f"- Checkpoint chosen by {selection.get('select_metric')} (epoch "
              f"{selection.get('best_epoch')} of {selection.get('epochs_run')}): "
              f"{selection.get('selection_rule')}.", ""]
    return lines


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(_setting(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "n/a"
    return _num(value)


def _settings_lines(title: str, settings: Any, notes: dict[str, str]) -> list[str]:
    lines = [f"### {title}", ""]
    if settings is None:
        return [*lines, "Not available in this bundle.", ""]
    if not isinstance(settings, dict):
        return [*lines, _cell(_setting(settings)), ""]
    for key, value in settings.items():
        note = f" ({notes[key]})" if key in notes else ""
        lines.append(f"- {_cell(key)}: {_cell(_setting(value))}{note}")
    return [*lines, ""]


def render_model_card(facts: dict[str, Any]) -> str:
    """MODEL_CARD.md from `model_card_facts` (figures rounded for display)."""
    model = facts.get("model") or {}
    use = facts.get("intended_use") or {}
    warnings = facts.get("warnings") or {}
    lines = [f"# Model card: {model.get('architecture', 'model')}", "",
             f"Written at export by embryo-ml from training run {model.get('run_id')}. The same "
             "facts, unrounded, are in bundle.json under `model_card`.", "",
             "## Model", "",
             f"- Classes: {', '.join(map(str, model.get('classes') or []))}; the score is the "
             f"calibrated probability of \u201c{model.get('positive_class')}\u201d.",
             f"- Input: {model.get('input_size')} px images."
             + (f" Exported {model['created']}." if model.get("created") else ""),
             "", "## Intended use", "", str(use.get("summary", "")), ""]
    lines += [f"- {t}" for t in use.get("details") or []]
    lines += ["", "## Out of scope", ""] + [f"- {t}" for t in use.get("out_of_scope") or []]
    lines += ["", *_data_section(facts), *_performance_section(facts), "## Warnings", ""]
    raised = [*(warnings.get("shortcut") or []), *(warnings.get("learning") or [])]
    lines += [f"- {_cell(w)}" for w in raised] or ["None raised in training."]
    lines += ["", "## Trust settings", "",
              *_settings_lines("Out-of-distribution flag", facts.get("ood"), OOD_TEXT),
              *_settings_lines("Conformal 'uncertain' flag", facts.get("conformal"),
                               CONFORMAL_TEXT),
              "## Known limitations", ""]
    lines += [f"- {t}" for t in facts.get("limitations") or []] or ["None recorded."]
    return "\n".join(lines).rstrip() + "\n"


def card_summary(facts: dict[str, Any] | None) -> list[tuple[str, str]]:
    """A few (label, text) lines of the card for the scoring report; [] without a card."""
    if not facts:
        return []
    model = facts.get("model") or {}
    train = facts.get("training_data") or {}
    val = facts.get("validation_data") or {}
    overall = (facts.get("performance") or {}).get("overall") or {}
    gate = facts.get("validation_check")
    per_class = ", ".join(f"{c} {n}" for c, n in (train.get("per_class") or {}).items())
    trained = (_counts_line("training", train) + (f" ({per_class})" if per_class else "")
               if train.get("available") else f"not summarised ({train.get('reason', '')})")
    auc = _row_ci(overall, "auc")
    return [("Trained on", trained),
            ("Classes", ", ".join(map(str, model.get("classes") or []))),
            ("Validation", f"ROC AUC {auc} on {_counts_line('validation', val)}"),
            ("Validation check", "not recorded" if gate is None
             else f"{gate.get('verdict')}: {reason_text(gate)}"),
            ("Intended use", str((facts.get("intended_use") or {}).get("summary", "")))]


def write_model_card(run_dir: str | Path, bundle: Bundle, folder: str | Path) -> Bundle:
    """Write `folder/MODEL_CARD.md` (the bundle being assembled) and return `bundle` with the
    same facts as `model_card` and the card's SHA-256 as `model_card_sha256`, for `bundle.json`
    (so the card people read is covered by the bundle's identity like every other file)."""
    facts = model_card_facts(run_dir, bundle)
    path = atomic_write_text(Path(folder) / MODEL_CARD_FILE, render_model_card(facts))
    return dataclasses.replace(bundle, model_card=facts, model_card_sha256=file_sha256(path))
