"""The banners above everything else in the report: what a reader must know before any score.

Red for a model that failed its validation check, amber for an inconclusive one; red for a run
whose images as a whole do not look like the validation images (dataset shift,
`embryo_ml.score.shift`), and a list of the patients whose images are mostly flagged as unusual
(shown even when the run as a whole is not shifted).
"""

from __future__ import annotations

from typing import Any

from embryo_ml.export.bundle import Bundle, reason_text
from embryo_ml.report.markup import escape as _e
from embryo_ml.report.rows import ReportRow, shift_rows
from embryo_ml.report.texts import (
    SHIFT_BANNER,
    SHIFT_COHORT,
    SHIFT_COHORTS_TITLE,
    VALIDATION_BANNER,
)
from embryo_ml.score.shift import format_percent, mostly_flagged_cohorts


def validation_banner(bundle: Bundle) -> str:
    """The banner above everything for a model that failed (red) or whose check was
    inconclusive (amber); "" otherwise."""
    text = VALIDATION_BANNER.get(bundle.verdict or "")
    if text is None or bundle.validation is None:
        return ""
    verdict = _e(bundle.verdict)
    return (f'<div class="validation-banner {verdict}" id="validation-banner" role="alert" '
            f'data-verdict="{verdict}"><strong>'
            f"{_e(text.format(reason=reason_text(bundle.validation)))}</strong></div>")


def prior_banner(warning: str | None) -> str:
    """The amber banner of a run that scored some images without the day its model's scores
    use (`embryo_ml.score.items.PriorCoverage`); "" otherwise."""
    if not warning:
        return ""
    return ('<div class="validation-banner inconclusive" id="prior-banner" role="note"><strong>'
            f"Scored without the day: {_e(warning[0].upper() + warning[1:])}.</strong></div>")


def shift_banners(shift: dict[str, Any], rows: list[ReportRow]) -> str:
    """The red banner of a shifted run, then the patients whose images are mostly flagged
    (whether or not the run is shifted); "" when neither applies."""
    parts = []
    if shift.get("shifted") is True:
        text = SHIFT_BANNER.format(n_flagged=shift["n_flagged"], n_scored=shift["n_scored"],
                                   expected=format_percent(float(shift["expected_share"])))
        parts.append(f'<div class="shift-banner" id="shift-banner" role="alert" '
                     f'data-shifted="true"><strong>{_e(text)}</strong></div>')
    cohorts = mostly_flagged_cohorts(shift_rows(rows))
    if cohorts:
        items = "".join(
            f'<li data-patient="{_e(c["patient_id"])}">' + _e(SHIFT_COHORT.format(
                patient=c["patient_id"], n_flagged=c["n_flagged"], n_scored=c["n_scored"],
                share=format_percent(c["share_flagged"]))) + "</li>" for c in cohorts)
        parts.append(f'<div class="shift-cohorts" id="shift-cohorts" role="note"><strong>'
                     f"{_e(SHIFT_COHORTS_TITLE)}</strong><ul>{items}</ul></div>")
    return "\n".join(parts)
