"""What the scoring sidecar (`<stem>.scoring.json`, `embryo_ml.data.scores_file.settings_path`)
tells the report about its scores: which bundle scored them, and the run's dataset-shift record.

`check_scored_by` refuses a report with another bundle than the one that scored (or with that
bundle changed since); scores without a sidecar cannot be checked and get a logged warning.
`run_shift` takes the sidecar's shift record when it belongs to these scores, else recomputes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from embryo_ml.data.scores_file import settings_path
from embryo_ml.errors import BundleError
from embryo_ml.export.bundle import Bundle, identity
from embryo_ml.report.rows import ReportRow, shift_rows
from embryo_ml.score.shift import count_flagged, shift_record

# The report's warnings keep one logger name, whichever module raises them: the CLI prints it.
log = logging.getLogger("embryo_ml.report.html")


def _scoring_settings(scores: Path) -> dict[str, Any]:
    """The scoring sidecar beside the scores file (`settings_path`); {} when absent or bad."""
    try:
        data = json.loads(settings_path(scores).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_scored_by(scores: Path, bundle: Bundle) -> None:
    """BundleError (one line) unless `bundle` is the bundle whose identity the scoring sidecar
    records; a logged warning when there is no sidecar to tell (or an older one, which records
    only the model's hash, and that hash matches)."""
    sidecar = settings_path(scores)
    recorded = _scoring_settings(scores).get("bundle_sha256")
    expected = identity(bundle)
    if recorded == expected:
        return
    if not sidecar.is_file() or not isinstance(recorded, str) or recorded == bundle.sha256:
        log.warning("report: %s has no scoring sidecar that records its bundle (%s: scores from "
                    "an older embryo-ml, or copied without it); cannot check that %s is the "
                    "bundle that scored them", scores.name, sidecar.name, bundle.path)
        return
    raise BundleError(f"{scores} was not scored with bundle {bundle.path}: {sidecar.name} "
                      f"records bundle {recorded[:12]}..., this one is {expected[:12]}... "
                      "(another bundle, or this one changed since); give the bundle that "
                      "scored it")


def run_shift(scores: Path, bundle: Bundle, rows: list[ReportRow]) -> dict[str, Any]:
    """The run's dataset-shift record: the scoring sidecar's when it belongs to these scores
    (this bundle, the same counts), else recomputed from the rows and the bundle for the model
    the sidecar names (else the one `score` picks by default, as `choose_model` does)."""
    counted = shift_rows(rows)
    settings = _scoring_settings(scores)
    record = settings.get("shift")
    if (isinstance(record, dict) and record.get("available") is True
            and settings.get("bundle_sha256") == identity(bundle)
            and (record.get("n_flagged"), record.get("n_scored")) == count_flagged(counted)):
        return record
    precision = settings.get("model")
    if precision not in ("fp32", "int8"):
        precision = "int8" if bundle.int8 is not None else "fp32"
    return shift_record(bundle, str(precision), counted)


def run_prior_warning(scores: Path) -> str | None:
    """The scoring run's day-prior warning (images scored without a day the model knows), from
    the sidecar; None when there was none."""
    text = _scoring_settings(scores).get("prior_warning")
    return text if isinstance(text, str) and text else None
