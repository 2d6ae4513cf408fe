"""The one place that knows the scoring-bundle format. Torch-free: the scorer reads bundles.

A bundle is a folder with `model.onnx` and `bundle.json`, which describes the model's inputs
(size, channel order, mean/std, resize policy), its classes, calibration and threshold, where it
came from (run id, validation metrics, package versions) and the SHA-256 of `model.onnx`.
It may also hold `model.int8.onnx`, the same model quantized to 8-bit integers for faster CPU
scoring, kept only when it agreed with `model.onnx` on the run's validation images (see
`embryo_ml.export.quantize`); its hash and that measured agreement are under `int8`.
Every bundle exported since model cards exist also holds `MODEL_CARD.md`, whose facts are in
`bundle.json` as `model_card` (`embryo_ml.export.model_card`; None in older bundles).
`read_bundle` refuses a bundle whose hash or schema version does not match: a scoring model that
was swapped or corrupted must never score patients silently.

`validation` is the training run's model-quality gate (`metrics.json` `validation`: a verdict
`passed`, `failed` or `inconclusive`, a reason a person reads, and the checks behind it), copied
at export so the verdict travels with the model to every place that scores with it. None = a
bundle exported from a run trained before the gate. A failed model is exported only on request
and then carries `"exported_despite_failure": true`; scoring and the report warn about it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embryo_ml.errors import BundleError
from embryo_ml.evaluation.gate import FAILED, PASSED, PASSED_FOR_VERDICT, VERDICTS
from embryo_ml.fileio import atomic_write_text

SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class Bundle:
    """`bundle.json` as an object; `path` is the bundle folder (not stored in the file)."""

    architecture: str
    classes: list[str]
    positive_class: str
    input_size: int
    mean: list[float]
    std: list[float]
    sha256: str
    channel_order: str = "RGB"
    layout: str = "NCHW"
    resize_policy: str = "squash-inter-area"
    input_name: str = "image"
    output_name: str = "logits"
    temperature: float = 1.0
    threshold: float = 0.5
    run_id: str | None = None
    val_metrics: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] | None = None  # QualityThresholds.to_dict(); None = no pixel flags
    # Extra output heads after the main classes in the same `logits` row (Gardner multi-task):
    # name -> {"offset": first column, "classes": [...]}; e.g. expansion at columns 2..7.
    # The main score always comes from logits[:, :len(classes)].
    heads: dict[str, dict[str, Any]] | None = None
    # Name of the model's class activation map output, (N, len(classes), h, w), the classifier
    # applied at each feature-map location (see embryo_ml.score.explain); None = no heatmaps.
    # Bundles exported before it existed have no such field and read as None.
    cam_output: str | None = None
    # The int8 model, when export built one that passed its parity check: {"file", "sha256",
    # "calibration_images", "parity_images", "max_abs_diff", "mean_abs_diff",
    # "label_agreement", "tolerance"}. None = fp32 only.
    int8: dict[str, Any] | None = None
    # The run's quality gate: {"verdict", "passed", "reason", "checks": [{"name", "value", "ci",
    # "passed"}, ...]} and, for a failed model exported on request, "exported_despite_failure".
    # None = exported from a run trained before the gate (older bundles have no such field).
    validation: dict[str, Any] | None = None
    # Feature-space out-of-distribution reference (embryo_ml.score.trust): {"file", "sha256",
    # "method", "k", "alpha", "feature_output", "n_reference", "n_calibration",
    # "limits": {"fp32": x, "int8": y}, "expected_rate": {"fp32": r, "int8": r}}. None = none
    # (the energy of the logits is the only out-of-distribution signal then).
    ood: dict[str, Any] | None = None
    # Class-conditional split-conformal prediction sets (embryo_ml.score.conformal): {"alpha",
    # "score", "quantiles": {class: q}, "n_calibration": {class: n}}. None = no `uncertain` flag.
    conformal: dict[str, Any] | None = None
    # The facts of MODEL_CARD.md (embryo_ml.export.model_card); None = no model card.
    model_card: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    model_file: str = MODEL_FILE
    schema_version: int = SCHEMA_VERSION
    path: Path | None = None

    @property
    def model_path(self) -> Path:
        if self.path is None:
            raise BundleError("bundle has no folder")
        return self.path / self.model_file

    @property
    def int8_path(self) -> Path | None:
        if self.int8 is None:
            return None
        if self.path is None:
            raise BundleError("bundle has no folder")
        return self.path / str(self.int8.get("file", ""))

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    @property
    def verdict(self) -> str | None:
        """The quality gate's verdict, or None for a bundle from before the gate."""
        return None if self.validation is None else str(self.validation["verdict"])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return {"schema_version": data.pop("schema_version"), **data}


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle_json(bundle: Bundle, folder: str | os.PathLike[str]) -> Path:
    return atomic_write_text(Path(folder) / BUNDLE_FILE,
                             json.dumps(bundle.to_json(), indent=2) + "\n")


def read_bundle(folder: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Load and (by default) verify a bundle: schema version, required fields, model hash."""
    folder = Path(folder)
    meta_path = folder / BUNDLE_FILE
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder}")
    if not meta_path.is_file():
        raise BundleError(f"{folder} is not a scoring bundle: {BUNDLE_FILE} is missing")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{meta_path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{meta_path}: schema_version {version!r} is not supported (this embryo-ml reads "
            f"version {SCHEMA_VERSION}); re-export the bundle with this version"
        )
    known = {f for f in Bundle.__dataclass_fields__ if f != "path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BundleError(f"{meta_path}: unknown field(s) {unknown}")
    try:
        bundle = Bundle(**data, path=folder)
    except TypeError as error:
        raise BundleError(f"{meta_path}: incomplete bundle ({error})") from None
    if bundle.positive_class not in bundle.classes:
        raise BundleError(f"{meta_path}: positive_class {bundle.positive_class!r} not in classes")
    if bundle.validation is not None:
        problem = validation_problem(bundle.validation)
        if problem:
            raise BundleError(f"{meta_path}: 'validation' {problem}")
    if verify:
        verify_model_hash(bundle)
    return bundle


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


def reason_text(record: dict[str, Any]) -> str:
    """The record's reason as a clause to embed in a sentence (no final full stop)."""
    return str(record.get("reason") or "").strip().rstrip(".") or "no reason recorded"


def validation_warning(bundle: Bundle) -> str | None:
    """The one warning (without the `warning: ` prefix) for scoring with a model that did not
    pass its quality gate; None when it passed or the bundle predates the gate."""
    if bundle.validation is None or bundle.verdict == PASSED:
        return None
    reason = reason_text(bundle.validation)
    if bundle.verdict == FAILED:
        return (f"this model FAILED its validation check ({reason}); its scores are not "
                "trustworthy")
    return (f"this model's validation check was inconclusive ({reason}); treat its scores "
            "with caution")


def _plain_name(file: object) -> bool:
    """A file name inside the bundle folder: no folder part, no way out of it."""
    return (isinstance(file, str) and bool(file) and "/" not in file and "\\" not in file
            and file not in (".", ".."))


def verify_model_hash(bundle: Bundle) -> None:
    """Every model file in the bundle (fp32, int8 when listed) and the out-of-distribution
    reference (when listed) against its recorded hash."""
    models = [(bundle.model_file, bundle.sha256)]
    if bundle.int8 is not None:
        file, sha = bundle.int8.get("file"), bundle.int8.get("sha256")
        if not _plain_name(file) or not isinstance(sha, str):
            raise BundleError(f"bundle {bundle.path}: 'int8' needs a plain 'file' name and a "
                              f"'sha256', got {bundle.int8}")
        models.append((file, sha))
    if bundle.ood is not None:  # the reference decides the out_of_distribution flag
        file, sha = bundle.ood.get("file"), bundle.ood.get("sha256")
        if not _plain_name(file) or not isinstance(sha, str):
            raise BundleError(f"bundle {bundle.path}: 'ood' needs a plain 'file' name and a "
                              f"'sha256', got file={file!r}")
        models.append((file, sha))
    for name, expected in models:
        model = bundle.path / name if bundle.path is not None else Path(name)
        if not model.is_file():
            raise BundleError(f"bundle {bundle.path}: {name} is missing")
        actual = file_sha256(model)
        if actual != expected:
            raise BundleError(
                f"bundle {bundle.path}: hash mismatch for {name} (expected "
                f"{expected[:12]}..., found {actual[:12]}...): the file was modified or "
                "corrupted; refusing to score"
            )
