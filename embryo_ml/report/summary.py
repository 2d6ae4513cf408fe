"""The report's summary section: what was scored and flagged, the model that scored it, its
validation, intended use and model card, and notes about this report.

Counts in plain words (flags through `embryo_ml.report.texts`); the model facts come from the
bundle (architecture, folder, run id, model hash, embryo-ml version, creation date, validation
metrics) and a short summary of its model card (`MODEL_CARD.md` in the bundle).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from embryo_ml.export.bundle import Bundle, reason_text
from embryo_ml.export.model_card import MODEL_CARD_FILE, card_summary
from embryo_ml.report.markup import escape as _e
from embryo_ml.report.markup import facts
from embryo_ml.report.rows import ReportRow
from embryo_ml.report.texts import INTENDED_USE, JUDGEMENT_NOTE, flag_order, flag_text
from embryo_ml.score.shift import format_percent


def summary_html(rows: list[ReportRow], cohorts: list[tuple[str, list[ReportRow]]],
                 bundle: Bundle, scores: Path, root: Path, notes: list[str]) -> str:
    """The summary section; `notes` are the report's own lines for "About this report"."""
    notes_html = "".join(f"<li>{_e(note)}</li>" for note in notes)
    return f"""
<section id="summary">
<p class="judgement" id="judgement-note"><strong>{_e(JUDGEMENT_NOTE)}</strong></p>
<div class="summary-grid">
<div><h2>Summary</h2>{facts(_count_facts(rows, cohorts))}
<h3>Flags</h3>{_flags_html(rows)}{_not_scored_html(rows)}</div>
<div><h2>Model</h2>{facts(_model_facts(bundle))}
<h3>Validation metrics</h3>{_metrics_html(bundle)}</div>
</div>
<h3>Intended use</h3><p id="intended-use">{_e(INTENDED_USE.format(positive=bundle.positive_class))}
</p>
{_model_card_html(bundle)}
<h3>About this report</h3>
<ul id="report-notes">
<li>Scores: {_e(scores.name)}; images from: {_e(str(root))}.</li>
<li>Each patient's embryos are listed in rank order (1 = highest embryo score); images of one
embryo share its rank. Click a column title, or use the controls, to sort and filter.</li>
{notes_html}
</ul>
</section>"""


def _count_facts(rows: list[ReportRow], cohorts: list[tuple[str, list[ReportRow]]]
                 ) -> list[tuple[str, object]]:
    """Images, scored and not, patients, embryos, flagged images and predictions per class."""
    n = len(rows)
    scored = [r for r in rows if r.ok]
    flagged = [r for r in rows if r.flags]
    labels = Counter(r.label for r in scored if r.label)
    patients = [p for p, _ in cohorts if p]
    embryos = {r.embryo_key for r in rows}
    return [
        ("Images", n),
        ("Scored", len(scored)),
        ("Not scored", f"{n - len(scored)}" + (" (see the rows marked “not scored”)"
                                                if n - len(scored) else "")),
        ("Patients", len(patients)),
        ("Embryos", len(embryos)),
        ("Flagged images", f"{len(flagged)} of {n}"),
        *[(f"Predicted {label}", count) for label, count in sorted(labels.items())],
    ]


def _flags_html(rows: list[ReportRow]) -> str:
    """How many images carry each flag (an image counted once per flag), in plain words."""
    flag_counts = Counter(f for r in rows for f in dict.fromkeys(r.flags))
    flag_rows = "".join(
        f'<tr data-flag-count="{_e(f)}"><td>{count}</td><td>{_e(flag_text(f))}</td></tr>'
        for f, count in sorted(flag_counts.items(), key=lambda kv: flag_order(kv[0])))
    return (f'<table class="small" id="flag-counts"><tr><th>images</th><th>flag</th></tr>'
            f"{flag_rows}</table>" if flag_rows else "<p>No image is flagged.</p>")


def _not_scored_html(rows: list[ReportRow]) -> str:
    """Why images were not scored (the ten commonest reasons); "" when all were."""
    statuses = Counter(r.status for r in rows if not r.ok)
    if not statuses:
        return ""
    items = "".join(f"<li>{count} × {_e(status)}</li>"
                    for status, count in statuses.most_common(10))
    return f"<h3>Why images were not scored</h3><ul>{items}</ul>"


def _model_facts(bundle: Bundle) -> list[tuple[str, object]]:
    """The model that scored: what it is, where it came from, how its score reads."""
    versions = bundle.versions or {}
    model: list[tuple[str, object]] = [
        ("Model", bundle.architecture),
        ("Bundle", bundle.path.name if bundle.path else ""),
        ("Model version (SHA-256)", bundle.sha256[:12]),
        ("Training run", bundle.run_id or "unknown"),
        ("Created", bundle.created or "unknown"),
        ("embryo-ml", versions.get("embryo-ml", "unknown")),
        ("Classes", ", ".join(bundle.classes)),
        ("Score", f"calibrated probability of “{bundle.positive_class}” "
                  f"(temperature {bundle.temperature:.3g}), shown 1-10 as ceil(10 × p)"),
        *_prior_fact(bundle),
        ("Decision threshold", f"{bundle.threshold:.3f}"),
        ("Validation check", _validation_fact(bundle)),
    ]
    if bundle.heads:
        model.append(("Extra heads", ", ".join(bundle.heads)))
    return model


def _prior_fact(bundle: Bundle) -> list[tuple[str, object]]:
    """The day prior's row of the model facts; none without a prior."""
    if not bundle.prior:
        return []
    column = bundle.prior["column"]
    offsets = ", ".join(f"{column} {k}: {v:+.2f}" for k, v in bundle.prior["offsets"].items())
    check = bundle.day_check
    checked = (f"images that do not look like the {column} given are flagged “day does not "
               f"match” ({', '.join(check['classes'])})" if check else
               f"no check that the {column} given matches the image")
    return [("Day prior", f"where the manifest gives the {column}, the score adds its logit "
                          f"offset ({offsets}); without it, the image alone; {checked}")]


def _metrics_html(bundle: Bundle) -> str:
    """The bundle's validation metrics (plain values only), as a table."""
    metrics = {k: v for k, v in (bundle.val_metrics or {}).items()
               if isinstance(v, int | float | str | bool)}
    metric_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_format_metric(v))}</td></tr>"
                          for k, v in metrics.items())
    return (f'<table class="small" id="val-metrics">{metric_rows}</table>'
            if metric_rows else "<p>The bundle records no validation metrics.</p>")


def _format_metric(value: Any) -> str:
    """A validation metric as read: counts with thousands separators, rates to 3 decimals, and
    a metric the validation images could not give (no patient with both classes: NaN) as
    "not measured", not as "nan"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and not math.isfinite(value):
        return "not measured"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return str(value)


def _validation_fact(bundle: Bundle) -> str:
    """The validation check's verdict and reason, for the model facts."""
    if bundle.validation is None:
        return "not recorded (model exported before validation checks existed)"
    return f"{bundle.verdict}: {reason_text(bundle.validation)}"


def _model_card_html(bundle: Bundle) -> str:
    """A few lines of the bundle's model card and where the whole card is."""
    lines = card_summary(bundle.model_card)
    if not lines:
        return ('<h3>Model card</h3><p id="model-card">This bundle has no model card (exported '
                "before model cards existed).</p>")
    folder = str(bundle.path) if bundle.path else "the bundle folder"
    where = f"{MODEL_CARD_FILE} in the bundle folder ({folder})"
    return (f'<h3>Model card</h3><div id="model-card">{facts(lines)}<p class="small-text">'
            f"The full model card (training data, subgroups, limitations): {_e(where)}.</p>"
            "</div>")


def shift_note(shift: dict[str, Any]) -> str:
    """One line for "About this report": what the dataset-shift check found."""
    if shift.get("available") is not True:
        return f"Dataset shift check: not available ({shift.get('reason', 'no record')})."
    found = (f"Dataset shift check: {shift['n_flagged']} of {shift['n_scored']} scored images "
             f"flagged as unusual, about {format_percent(float(shift['expected_share']))} "
             f"expected on images like the validation ones (p = {float(shift['p_value']):.2g})")
    if shift.get("shifted") is True:
        return f"{found}: these images do not look like the training images (see the top)."
    return (f"{found}: no sign of dataset shift (a warning needs p < "
            f"{float(shift['p_limit']):g}, at least twice the expected share and at least 3 "
            "flagged images).")
