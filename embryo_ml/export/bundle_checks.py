"""The values bundle.json may hold: one check per group of fields, each naming the field it
refuses (`embryo_ml.export.bundle.bundle_problem` runs them in order, with the bundle's file
checks). A value no scorer can use is never read as one: temperature > 0, threshold in [0, 1],
three means and three positive stds, grade heads that do not overlap, ...

`validation_problem` judges the quality-gate record on both sides: the exporter checks the
run's `metrics.json` record with it and `read_bundle` the copy in `bundle.json`, so a record no
reader accepts is never written.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np

from embryo_ml.data.heads import layout_problem
from embryo_ml.evaluation.gate import PASSED_FOR_VERDICT, VERDICTS

if TYPE_CHECKING:
    from embryo_ml.export.bundle import Bundle

MAX_INPUT_SIZE = 8192  # pixels per side; a larger value is a typo, not a model
MODEL_PRECISIONS = ("fp32", "int8")  # the model files an `ood` record may describe


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_problem(check: object) -> str | None:
    if not isinstance(check, dict) or not isinstance(check.get("name"), str):
        return f"needs objects with a 'name', got {check!r}"
    name = check["name"]
    if "value" in check and check["value"] is not None and not _is_number(check["value"]):
        return f"check {name!r}: 'value' must be a number, got {check['value']!r}"
    ci = check.get("ci")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2
                               and all(v is None or _is_number(v) for v in ci)):
        return f"check {name!r}: 'ci' must be [low, high], got {ci!r}"
    if check.get("passed") not in (True, False, None):
        return f"check {name!r}: 'passed' must be true, false or null, got {check['passed']!r}"
    return None


def validation_problem(record: object) -> str | None:
    """What is wrong with a quality-gate record, or None when it is well-formed.

    One judge for both sides: the exporter checks the run's `metrics.json` record with it and
    `read_bundle` the copy in `bundle.json`, so a record no reader accepts is never written."""
    if not isinstance(record, dict):
        return f"must be an object, got {type(record).__name__}"
    verdict = record.get("verdict")
    if verdict not in VERDICTS:
        return f"verdict must be one of {', '.join(VERDICTS)}; got {verdict!r}"
    expected = PASSED_FOR_VERDICT[verdict]
    if "passed" not in record or record["passed"] is not expected:
        return (f"'passed' must be {json.dumps(expected)} for verdict {verdict!r}, "
                f"got {record.get('passed')!r}")
    if not isinstance(record.get("reason"), str):
        return f"needs a 'reason' (text), got {record.get('reason')!r}"
    checks = record.get("checks", [])
    if not isinstance(checks, list):
        return f"'checks' must be a list, got {type(checks).__name__}"
    for check in checks:
        problem = _check_problem(check)
        if problem:
            return f"'checks' {problem}"
    if record.get("exported_despite_failure", False) not in (True, False):
        return "'exported_despite_failure' must be true or false"
    return None


# ------------------------------------------------------------------------ field values ----


def _finite(value: object) -> bool:
    """A number a float holds: not NaN or infinite, and no integer beyond float's range."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:  # JSON integers have no size limit
        return False


def _in_unit(value: object, closed: bool = False) -> bool:
    """In (0, 1), or [0, 1] when `closed`."""
    if not _finite(value):
        return False
    return 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0  # type: ignore[operator]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _not_an_object(name: str, record: object) -> str | None:
    """None for an optional record left out (null); the problem for anything but an object."""
    return None if record is None else f"'{name}' must be an object or null, got {record!r}"


def model_problem(b: Bundle) -> str | None:
    """What a score means: the classes, the calibration and the threshold."""
    if not is_text(b.architecture):
        return f"'architecture' must be text, got {b.architecture!r}"
    classes = b.classes
    if not (isinstance(classes, list) and len(classes) >= 2
            and all(is_text(c) for c in classes)):
        return f"'classes' must be a list of at least two class names, got {classes!r}"
    if len(set(classes)) != len(classes):
        return f"'classes' must be unique, got {classes!r}"
    if not isinstance(b.positive_class, str) or b.positive_class not in classes:
        return f"'positive_class' {b.positive_class!r} not in classes {classes}"
    if not (_finite(b.temperature) and b.temperature > 0):
        return f"'temperature' must be a finite number > 0, got {b.temperature!r}"
    if not _in_unit(b.threshold, closed=True):
        return f"'threshold' must be a number in [0, 1], got {b.threshold!r}"
    return None


def input_problem(b: Bundle) -> str | None:
    """How an image becomes the model's input."""
    if not (_is_int(b.input_size) and 1 <= b.input_size <= MAX_INPUT_SIZE):
        return (f"'input_size' must be a whole number of pixels from 1 to {MAX_INPUT_SIZE}, "
                f"got {b.input_size!r}")
    for name, values in (("mean", b.mean), ("std", b.std)):
        if not (isinstance(values, list) and len(values) == 3 and all(map(_finite, values))):
            return f"'{name}' must be three numbers (R, G, B), got {values!r}"
    if not all(v > 0 for v in b.std):
        return f"'std' must be three numbers > 0, got {b.std!r}"
    if b.channel_order != "RGB":
        return (f"'channel_order' must be 'RGB' (the order images are read in), got "
                f"{b.channel_order!r}")
    if b.layout != "NCHW":
        return f"'layout' must be 'NCHW' (the layout images are prepared in), got {b.layout!r}"
    for name in ("resize_policy", "input_name", "output_name"):
        if not is_text(getattr(b, name)):
            return f"'{name}' must be text, got {getattr(b, name)!r}"
    if b.cam_output is not None and not is_text(b.cam_output):
        return f"'cam_output' must be an output name or null, got {b.cam_output!r}"
    return None


def heads_problem(b: Bundle) -> str | None:
    """Grade heads: blocks of logit columns after the main classes (`layout_problem`)."""
    return layout_problem(b.heads, len(b.classes))


def ood_problem(b: Bundle) -> str | None:
    """The out-of-distribution reference's settings (its file: `embryo_ml.export.bundle`)."""
    ood = b.ood
    if ood is None:
        return None
    if not (_is_int(ood.get("k")) and ood["k"] >= 1):
        return f"'ood' 'k' must be a whole number >= 1, got {ood.get('k')!r}"
    if not is_text(ood.get("feature_output")):
        return (f"'ood' 'feature_output' must be the model output it reads, got "
                f"{ood.get('feature_output')!r}")
    models = ["fp32"] + ["int8"] * (b.int8 is not None)
    for key, ok, what in (("limits", _finite, "a finite number"),
                          ("expected_rate", _in_unit, "a number in (0, 1)")):
        values = ood.get(key)
        if not (isinstance(values, dict) and set(models) <= set(values) <= set(MODEL_PRECISIONS)):
            return f"'ood' '{key}' needs {what} for each of {models}, got {values!r}"
        for precision, value in values.items():
            if not ok(value):
                return f"'ood' '{key}' of {precision} must be {what}, got {value!r}"
    for key in ("alpha", "shift_p"):
        if ood.get(key) is not None and not _in_unit(ood[key]):
            return f"'ood' '{key}' must be a number in (0, 1), got {ood[key]!r}"
    n = ood.get("n_calibration")
    if n is not None and not (_is_int(n) and n >= 1):
        return f"'ood' 'n_calibration' must be a whole number >= 1, got {n!r}"
    return None


def conformal_problem(b: Bundle) -> str | None:
    """The conformal prediction sets: a level and one quantile per class."""
    record = b.conformal
    if not isinstance(record, dict):
        return _not_an_object("conformal", record)
    if not _in_unit(record.get("alpha")):
        return f"'conformal' 'alpha' must be a number in (0, 1), got {record.get('alpha')!r}"
    quantiles = record.get("quantiles")
    if not (isinstance(quantiles, dict) and set(quantiles) == set(b.classes)):
        return (f"'conformal' 'quantiles' needs one number per class of {b.classes}, got "
                f"{quantiles!r}")
    for name in b.classes:
        if not _in_unit(quantiles[name], closed=True):
            return (f"'conformal' quantile of {name!r} must be a number in [0, 1], got "
                    f"{quantiles[name]!r}")
    return None


def prior_problem(b: Bundle) -> str | None:
    """The day prior: two classes, a column name, a temperature > 0 and one finite logit offset
    per value (`embryo_ml.evaluation.prior`)."""
    record = b.prior
    if not isinstance(record, dict):
        return _not_an_object("prior", record)
    if len(b.classes) != 2:
        return f"'prior' needs two classes, the bundle has {len(b.classes)}"
    if not is_text(record.get("column")):
        return f"'prior' 'column' must be a column name, got {record.get('column')!r}"
    temperature = record.get("temperature")
    if not (_finite(temperature) and temperature > 0):
        return f"'prior' 'temperature' must be a finite number > 0, got {temperature!r}"
    offsets = record.get("offsets")
    if not (isinstance(offsets, dict) and offsets
            and all(is_text(k) and _finite(v) for k, v in offsets.items())):
        return (f"'prior' 'offsets' must map each value of {record.get('column')!r} to a finite "
                f"number, got {offsets!r}")
    return None


def day_check_problem(b: Bundle) -> str | None:
    """The day check: a column, two or more days, and per precision a read-out whose arrays fit
    one another (`embryo_ml.evaluation.day_check`) and a finite limit."""
    record = b.day_check
    if not isinstance(record, dict):
        return _not_an_object("day_check", record)
    if not is_text(record.get("column")):
        return f"'day_check' 'column' must be a column name, got {record.get('column')!r}"
    classes = record.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(map(is_text, classes))):
        return f"'day_check' 'classes' must be two or more values, got {classes!r}"
    prior_column = b.prior.get("column") if isinstance(b.prior, dict) else None
    if record.get("column") != prior_column:
        return (f"'day_check' 'column' must be the column of the day prior ({prior_column!r}), "
                f"got {record.get('column')!r}")
    if not isinstance(b.ood, dict):
        return "'day_check' reads the model's features, which only a bundle with 'ood' fetches"
    models = record.get("models")
    if not (isinstance(models, dict) and "fp32" in models):
        return "'day_check' 'models' must hold at least the 'fp32' read-out"
    for precision, model in models.items():
        problem = _read_out_problem(model, len(classes), b.ood.get("feature_dim"))
        if problem:
            return f"'day_check' '{precision}' {problem}"
    return None


def _read_out_problem(model: object, n_days: int, width: object) -> str | None:
    if not isinstance(model, dict):
        return f"must be an object, got {model!r}"
    try:
        mean, scale = (np.asarray(model[k], dtype=np.float64) for k in ("mean", "scale"))
        coef = np.asarray(model["coef"], dtype=np.float64)
        intercept = np.asarray(model["intercept"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        return f"needs numeric 'mean', 'scale', 'coef' and 'intercept' ({error})"
    if not (mean.shape == (width,) and scale.shape == (width,) and coef.shape == (n_days, width)
            and intercept.shape == (n_days,)):
        return (f"arrays do not fit: mean {mean.shape}, scale {scale.shape}, coef "
                f"{coef.shape}, intercept {intercept.shape} for {n_days} days and {width} "
                "features")
    if not all(np.isfinite(a).all() for a in (mean, scale, coef, intercept)) or (
            scale <= 0).any():
        return "arrays must be finite, with every scale > 0"
    if not _finite(model.get("limit")):
        return f"'limit' must be a finite number, got {model.get('limit')!r}"
    return None


def quality_problem(b: Bundle) -> str | None:
    """The pixel-quality and energy thresholds, judged by `QualityThresholds` itself."""
    if not isinstance(b.quality, dict):
        return _not_an_object("quality", b.quality)
    for key, value in b.quality.items():
        if value is not None and not _finite(value):
            return f"'quality' '{key}' must be a finite number or null, got {value!r}"
    # the flags' own judge, imported only for a bundle with thresholds (it loads OpenCV)
    from embryo_ml.data.quality import QualityThresholds

    try:
        QualityThresholds.from_dict(b.quality)
    except (TypeError, ValueError) as error:
        return f"'quality' {error}"
    return None


def provenance_problem(b: Bundle) -> str | None:
    """Where the model came from: run id, figures, versions, the quality gate's record."""
    if b.run_id is not None and not isinstance(b.run_id, str):
        return f"'run_id' must be text or null, got {b.run_id!r}"
    if not isinstance(b.created, str):
        return f"'created' must be text, got {b.created!r}"
    for name in ("val_metrics", "versions"):
        if not isinstance(getattr(b, name), dict):
            return f"'{name}' must be an object, got {getattr(b, name)!r}"
    if b.validation is not None:
        problem = validation_problem(b.validation)
        if problem:
            return f"'validation' {problem}"
    return None

