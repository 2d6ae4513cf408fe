"""What export and registration do with a training run's model-quality verdict. Torch-free.

Training writes the verdict to the run's `metrics.json` as `validation` (see
`embryo_ml.export.bundle_checks.validation_problem` for the record's shape); runs trained before
the gate have none. The policy, in one place so `export`, `train --register` and the MLflow
registration cannot drift apart:

- `passed`: exported and registrable, no warning.
- `inconclusive`: exported and registrable, with a one-line warning.
- `failed`: export refused unless `--allow-failed-validation` (`allow_failed=True`); a bundle
  exported that way records `"exported_despite_failure": true`. Never registered.
- no record: exported with a one-line warning that the run has no verdict.

Every refusal happens before any ONNX work and before an existing bundle is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from embryo_ml.errors import DataError, ValidationFailedError
from embryo_ml.evaluation.gate import FAILED, INCONCLUSIVE
from embryo_ml.export.bundle import reason_text
from embryo_ml.export.bundle_checks import validation_problem
from embryo_ml.train.run_folder import METRICS_FILE

ALLOW_FAILED_FLAG = "--allow-failed-validation"


def run_validation(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's quality-gate record, checked; None for a run trained before the gate (or a
    folder without `metrics.json`, which the exporter reports on its own terms)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(metrics, dict) or metrics.get("validation") is None:
        return None
    problem = validation_problem(metrics["validation"])
    if problem:
        raise DataError(f"{path}: 'validation' {problem}")
    return dict(metrics["validation"])


def _failed(validation: dict[str, Any] | None) -> bool:
    return validation is not None and validation.get("verdict") == FAILED


def check_exportable(validation: dict[str, Any] | None, run_dir: str | os.PathLike[str],
                     allow_failed: bool = False) -> None:
    """Refuse (one line) to export a failed run unless the caller asked for it explicitly."""
    if _failed(validation) and not allow_failed:
        raise ValidationFailedError(
            f"{run_dir} FAILED its validation check ({reason_text(validation or {})}); not "
            f"exported. To export it anyway for inspection, pass {ALLOW_FAILED_FLAG} (score and "
            "the report will then warn on every use)")


def check_registrable(validation: dict[str, Any] | None, what: str | os.PathLike[str]) -> None:
    """Refuse (one line) to register a failed model: a registry version is what gets deployed."""
    if _failed(validation):
        raise ValidationFailedError(
            f"{what} FAILED its validation check ({reason_text(validation or {})}); a failed "
            f"model is never registered, not even with {ALLOW_FAILED_FLAG}; nothing was "
            "registered and the run folder is kept")


def bundle_validation(validation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record as the bundle keeps it: a failed one says it was exported on request."""
    if validation is None:
        return None
    record = dict(validation)
    if _failed(record):
        record["exported_despite_failure"] = True
    return record


def export_warning(validation: dict[str, Any] | None,
                   run_dir: str | os.PathLike[str]) -> str | None:
    """The one warning (without `warning: `) after exporting a run that did not plainly pass."""
    if validation is None:
        return (f"{run_dir} has no validation verdict (trained before the model-quality "
                "check); exported without one")
    reason = reason_text(validation)
    if _failed(validation):
        return (f"EXPORTED A MODEL THAT FAILED ITS VALIDATION CHECK ({reason}) because "
                f"{ALLOW_FAILED_FLAG} was given: for inspection only, never for choosing "
                "embryos; bundle.json records it and score and the report warn on every use")
    if validation.get("verdict") == INCONCLUSIVE:
        return (f"the validation check of {run_dir} was inconclusive ({reason}); exported, and "
                "score and the report will say so")
    return None
