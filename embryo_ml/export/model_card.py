"""The model card every bundle carries: `MODEL_CARD.md`, and the same facts in `bundle.json`.

`embryo_ml.export.model_card_facts` gathers the facts at export (counts only, figures exact);
`render_model_card(facts)` writes them as Markdown for people, rounding numbers for display
only; `card_summary(facts)` gives the scoring report its few lines of the card; and
`write_model_card` puts the card into the bundle being assembled, its hash into `bundle.json`.
Torch-free, like the rest of the bundle's readers.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from embryo_ml.export.bundle import MODEL_CARD_FILE, Bundle, file_sha256, reason_text
from embryo_ml.export.model_card_facts import ALL, model_card_facts
from embryo_ml.fileio import atomic_write_text

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
DAY_CHECK_TEXT = {
    "column": "the manifest column the check reads (the day prior's)",
    "classes": "the days it knows; an image of another day, or without one, is never flagged",
    "caught_on_validation": "share of wrong days it flagged on the validation images, per "
                            "model precision (a little optimistic: the limit was set on them)",
    "expected_rate": "at most this share of right days is flagged, per model precision",
}
CONFORMAL_TEXT = {
    "alpha": "each class's prediction sets miss its true images at most this often",
    "score": "the nonconformity score",
    "quantiles": "per-class cut-offs of that score",
    "n_calibration": "validation images per class the cut-offs were set on",
}


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
    prior = calibration.get("prior")
    if prior:
        offsets = ", ".join(f"{k}: {_num(v)}" for k, v in prior["offsets"].items())
        lines += [f"- Day prior on `{prior['column']}`: logit offsets {offsets}, applied where the "
                  f"scored manifest gives the {prior['column']}; validation AUC "
                  f"{_num(prior.get('val_auc_with_prior'))} with it (optimistic), "
                  f"{_num(prior.get('val_auc_without_prior'))} from the image alone."]
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
              *(_settings_lines("Day check ('day_mismatch' flag)", facts["day_check"],
                                DAY_CHECK_TEXT) if facts.get("day_check") else []),
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
