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

Identity. `bundle_sha256` in bundle.json is the SHA-256 of bundle.json itself in canonical form
(`bundle_identity`: the JSON object without that field, keys sorted, no whitespace, ASCII), and
bundle.json lists the SHA-256 of every file it names (`model_file`, `int8`, `ood`, `MODEL_CARD.md`
as `model_card_sha256`), so the one digest identifies the whole bundle: every value that decides
a score or a flag and every file's bytes. `write_bundle_json` is the one way to write it (from a
`Bundle`, e.g. one made with `dataclasses.replace`); `read_bundle` recomputes it and checks every
file, and refuses a bundle edited by hand or with a file swapped in one line saying the bundle was
modified. It detects accidents and hand edits, not a deliberate forger (anyone can call
`write_bundle_json`): for that a bundle is signed (`embryo_ml.export.signing`, `bundle.sig` over
the identity). The scoring sidecar records the identity too, so `score --resume` and `report`
know whether a bundle is the one that scored.

Values. `read_bundle` also checks every field's type and range (`bundle_problem`: temperature
> 0, threshold in [0, 1], three means and three positive stds, file names inside the folder, ...)
with a `BundleError` naming the field: a value no scorer can use is never read as one. The
checks of the files are here, those of every other field in `embryo_ml.export.bundle_checks`.

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
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embryo_ml.errors import BundleError
from embryo_ml.evaluation.gate import FAILED, PASSED
from embryo_ml.export.bundle_checks import (
    conformal_problem,
    day_check_problem,
    heads_problem,
    input_problem,
    is_text,
    model_problem,
    ood_problem,
    prior_problem,
    provenance_problem,
    quality_problem,
)
from embryo_ml.fileio import atomic_write_text

SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.onnx"
MODEL_CARD_FILE = "MODEL_CARD.md"  # written by embryo_ml.export.model_card
SIGNATURE_FILE = "bundle.sig"  # written and checked by embryo_ml.export.signing
IDENTITY_FIELD = "bundle_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    # Feature-space out-of-distribution reference (embryo_ml.evaluation.ood): {"file", "sha256",
    # "method", "k", "alpha", "feature_output", "n_reference", "n_calibration",
    # "limits": {"fp32": x, "int8": y}, "expected_rate": {"fp32": r, "int8": r}}. None = none
    # (the energy of the logits is the only out-of-distribution signal then).
    ood: dict[str, Any] | None = None
    # Class-conditional split-conformal prediction sets (embryo_ml.evaluation.conformal): {"alpha",
    # "score", "quantiles": {class: q}, "n_calibration": {class: n}}. None = no `uncertain` flag.
    conformal: dict[str, Any] | None = None
    # The day prior (embryo_ml.evaluation.prior): {"column", "temperature", "offsets": {value:
    # logit offset}, "rates", "n_calibration", ...}, applied where the scored manifest has the
    # column; `temperature` and `threshold` serve both. None = the
    # image alone (more than two classes, no such column, or a bundle from before it).
    prior: dict[str, Any] | None = None
    # The day check (embryo_ml.evaluation.day_check): {"column", "classes", "alpha", "models":
    # {precision: {"mean", "scale", "coef", "intercept", "limit", ...}}, ...}: the `day_mismatch`
    # flag. None = no check (no day prior, or features that do not tell the days apart).
    day_check: dict[str, Any] | None = None
    # The facts of MODEL_CARD.md (embryo_ml.export.model_card); None = no model card.
    model_card: dict[str, Any] | None = None
    model_card_sha256: str | None = None  # of MODEL_CARD.md; set with `model_card`
    # The bundle's identity (`bundle_identity`): set by `read_bundle`; `write_bundle_json`
    # computes it afresh and ignores this value.
    bundle_sha256: str | None = None
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


def bundle_identity(data: Mapping[str, Any]) -> str:
    """The identity of a bundle.json object: SHA-256 of its canonical form (without the
    `bundle_sha256` field itself; keys sorted, no whitespace, ASCII). Covers every file too,
    through the SHA-256 bundle.json lists for each."""
    body = {key: value for key, value in data.items() if key != IDENTITY_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def identity(bundle: Bundle) -> str:
    """The bundle's identity: as read from its bundle.json, else (a bundle built in memory)
    what `write_bundle_json` would record for it. A bundle changed in memory with
    `dataclasses.replace` keeps the identity it was read with until it is written."""
    if bundle.bundle_sha256 is not None:
        return bundle.bundle_sha256
    return bundle_identity(json.loads(json.dumps(bundle.to_json())))


def write_bundle_json(bundle: Bundle, folder: str | os.PathLike[str]) -> Path:
    """Write `folder/bundle.json` for `bundle` with its identity (`bundle_identity`), the one
    way to write a bundle that `read_bundle` accepts. Values are checked when read (the
    exporter reads back what it wrote); `bundle.bundle_sha256` is ignored and computed afresh."""
    data = json.loads(json.dumps(bundle.to_json()))  # exactly the object a reader will load
    data.pop(IDENTITY_FIELD, None)
    digest = bundle_identity(data)
    data = {"schema_version": data.pop("schema_version"), IDENTITY_FIELD: digest, **data}
    return atomic_write_text(Path(folder) / BUNDLE_FILE, json.dumps(data, indent=2) + "\n")


def _load_bundle_json(folder: Path) -> dict[str, Any]:
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
    return data


def _check_identity(folder: Path, data: dict[str, Any]) -> None:
    recorded = data.get(IDENTITY_FIELD)
    if recorded is None:
        raise BundleError(f"bundle {folder} has no {IDENTITY_FIELD}: it was modified by hand or "
                          "written by an embryo-ml from before bundle identities; refusing to use "
                          "it: export it again")
    if recorded != bundle_identity(data):
        raise BundleError(f"bundle {folder} was modified after export: {BUNDLE_FILE} does not "
                          f"match its {IDENTITY_FIELD} (a value was edited); refusing to use "
                          "it: restore the original or export it again")


def read_bundle(folder: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Load a bundle: schema version, every field's value (`bundle_problem`) and, by default
    (`verify`), its identity and every file's hash. `verify=False` checks values only, for
    tools that read a bundle to write a changed one (`dataclasses.replace`, then
    `write_bundle_json`)."""
    folder = Path(folder)
    meta_path = folder / BUNDLE_FILE
    data = _load_bundle_json(folder)
    if verify:
        _check_identity(folder, data)
    known = {f for f in Bundle.__dataclass_fields__ if f != "path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BundleError(f"{meta_path}: unknown field(s) {unknown}")
    try:
        bundle = Bundle(**data, path=folder)
    except TypeError as error:
        raise BundleError(f"{meta_path}: incomplete bundle ({error})") from None
    problem = bundle_problem(bundle)
    if problem:
        raise BundleError(f"{meta_path}: {problem}")
    if verify:
        verify_model_hash(bundle)
    return bundle


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


# ------------------------------------------------------------ the files, and every value ----


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _plain_name(file: object) -> bool:
    """A file name inside the bundle folder: no folder part, no drive, no way out of it."""
    return (is_text(file) and not any(c in file for c in "/\\:\0")  # type: ignore[union-attr]
            and file not in (".", ".."))


def _files_problem(b: Bundle) -> str | None:
    """Every file the bundle names: a plain name inside its folder and a SHA-256."""
    if not _plain_name(b.model_file):
        return (f"'model_file' must be a plain file name inside the bundle (no folder, no "
                f"'..'), got {b.model_file!r}")
    if not _is_sha256(b.sha256):
        return f"'sha256' must be a SHA-256 (64 hex digits), got {b.sha256!r}"
    for name, record in (("int8", b.int8), ("ood", b.ood)):
        if record is None:
            continue
        if not isinstance(record, dict):
            return f"'{name}' must be an object or null, got {record!r}"
        if not _plain_name(record.get("file")):
            return (f"'{name}' needs a plain 'file' name inside the bundle (no folder, no "
                    f"'..'), got {record.get('file')!r}")
        if not _is_sha256(record.get("sha256")):
            return f"'{name}' needs a 'sha256' (64 hex digits), got {record.get('sha256')!r}"
    if b.model_card is not None and not isinstance(b.model_card, dict):
        return f"'model_card' must be an object or null, got {b.model_card!r}"
    if b.model_card_sha256 is not None and not _is_sha256(b.model_card_sha256):
        return (f"'model_card_sha256' must be a SHA-256 (64 hex digits), got "
                f"{b.model_card_sha256!r}")
    if b.model_card is not None and b.model_card_sha256 is None:
        return (f"'model_card_sha256' is missing: the bundle has a model card but no hash of "
                f"{MODEL_CARD_FILE}")
    if b.bundle_sha256 is not None and not _is_sha256(b.bundle_sha256):
        return f"'{IDENTITY_FIELD}' must be a SHA-256 (64 hex digits), got {b.bundle_sha256!r}"
    return None


_PROBLEMS = (model_problem, input_problem, heads_problem, _files_problem, ood_problem,
             conformal_problem, prior_problem, day_check_problem, quality_problem,
             provenance_problem)


def bundle_problem(bundle: Bundle) -> str | None:
    """What is wrong with a bundle's values, naming the field, or None when every value is one
    the scorer can use: the one judge of bundle.json's values (`read_bundle`)."""
    for check in _PROBLEMS:
        problem = check(bundle)
        if problem:
            return problem
    return None


def verify_model_hash(bundle: Bundle) -> None:
    """Every file the bundle names (the fp32 model, the int8 model, the out-of-distribution
    reference, MODEL_CARD.md) against the SHA-256 that bundle.json records for it."""
    problem = _files_problem(bundle)
    if problem:
        raise BundleError(f"bundle {bundle.path}: {problem}")
    files = [(bundle.model_file, bundle.sha256)]
    files += [(str(r["file"]), str(r["sha256"])) for r in (bundle.int8, bundle.ood) if r]
    if bundle.model_card_sha256 is not None:
        files.append((MODEL_CARD_FILE, bundle.model_card_sha256))
    for name, expected in files:
        path = bundle.path / name if bundle.path is not None else Path(name)
        if not path.is_file():
            raise BundleError(f"bundle {bundle.path}: {name} is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(
                f"bundle {bundle.path} was modified after export: hash mismatch for {name} "
                f"(expected {expected[:12]}..., found {actual[:12]}...): the file was replaced "
                "or corrupted; refusing to use it"
            )
