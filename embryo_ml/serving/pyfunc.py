"""The scoring bundle as an MLflow model: log it, register it, serve it with `mlflow models serve`.

The model is logged *from code* (`pyfunc_model.py`, which only calls `mlflow.models.set_model`):
no pickled Python object goes into the model, only the bundle folder as an artifact. Loading the
model reads that bundle with `read_bundle` (SHA-256 verified) and builds the same `OnnxScorer`
that `embryo-ml score` uses; rows are decoded under the served-input rules and scored by the
scorer's own `score_batch`, so the MLflow model and the command line give the same numbers.

Input: a DataFrame with a `path` column (image files readable where the model runs) and/or an
`image_base64` column (an encoded image file, base64; a `data:image/...;base64,` prefix is
accepted), and optionally `id` to name the rows. A row uses `image_base64` when it has one,
else `path`. A bundle with a day prior also reads its column (`day`): a row with a day the
model knows gets the day-aware score, as `embryo-ml score` gives from a manifest; a row without
one is scored from the image alone. Output: one row per input row, in order: `id` (the input's
id, else its index), `path`, `status` (`ok` or why the row was not scored), `score`,
`label_pred`, `p_<class>...`, `flags`, and any further column the scorer adds. A bad row gets
a status, never an exception. Scores of unscored rows are None (JSON null), not NaN.

What a request may make the server read, and its limits, are `embryo_ml.serving.served_input`'s
rules: `image_base64` always; a `path` only under the allowed roots (`allowed_roots` in the model
config or `EMBRYO_ML_ALLOWED_ROOTS`; none by default: every path is `unreadable: path not
allowed`). A request of more than `max_rows` rows is refused as a whole with an
`MlflowException` (INVALID_PARAMETER_VALUE, HTTP 400 from `mlflow models serve`).

Which bundle a server may load: with trusted public keys (`trusted_keys` in the model config, a
path or a list of paths, else `EMBRYO_ML_TRUSTED_KEYS`, paths separated by `os.pathsep`; each a
`.pub` file or a folder of them, as `score --trusted-key`), loading refuses a bundle that is
unsigned, signed by another key or changed after signing, so `mlflow models serve` does not
start with it. Without keys the bundle's own hashes are checked, as `score` does.

This module and `embryo_ml.train.tracking` are the two that import mlflow (see there).
"""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from embryo_ml.errors import ConfigError, DataError, TrackingError
from embryo_ml.evaluation.prior import prior_value
from embryo_ml.export.bundle import Bundle, read_bundle, validation_warning
from embryo_ml.export.gate import check_registrable
from embryo_ml.numeric import finite_float
from embryo_ml.score.batch import LoadedImage, score_batch
from embryo_ml.score.session import OnnxScorer
from embryo_ml.serving.served_input import ALLOWED_ROOTS_KEY, LIMITS, ServedInput, ServedRequest
from embryo_ml.serving.served_input import decode_base64 as decode_base64  # (was defined here)

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME = "scoring_model"  # the logged model's name inside its run
BUNDLE_ARTIFACT = "bundle"
DEFAULT_EXPERIMENT = "embryo-ml"
INPUT_COLUMNS = ("id", "path", "image_base64")
# Cohort columns of the scores CSV: per-image requests carry no patient/embryo grouping.
_COHORT_COLUMNS = ("embryo_id", "patient_id", "rank_in_cohort")
_REQUIREMENTS = ("numpy", "pandas", "pillow", "opencv-python-headless", "onnxruntime")
# The model config logged with the model: MLflow lets `load_model(..., model_config=...)` (and
# `MLFLOW_PYFUNC_INFERENCE_CONFIG` where the model is served) set only keys logged with it.
# None: not set here (the served-input settings then come from the environment, else default).
TRUSTED_KEYS_KEY = "trusted_keys"
TRUSTED_KEYS_ENV = "EMBRYO_ML_TRUSTED_KEYS"
MODEL_CONFIG: dict[str, Any] = {"threads": None, "batch_size": 32, "workers": 4,
                                "precision": "auto", ALLOWED_ROOTS_KEY: None,
                                TRUSTED_KEYS_KEY: None, **{key: None for key in LIMITS}}


def trusted_keys(config: Mapping[str, Any], environ: Mapping[str, str] | None = None
                 ) -> list[str]:
    """The public-key paths a served bundle must be signed by: the model config's
    `trusted_keys` (a path or a list of paths), else `EMBRYO_ML_TRUSTED_KEYS`; [] = none."""
    value = config.get(TRUSTED_KEYS_KEY)
    if value is None:
        text = (os.environ if environ is None else environ).get(TRUSTED_KEYS_ENV, "")
        return [part for part in text.split(os.pathsep) if part.strip()]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"model config {TRUSTED_KEYS_KEY!r}: a path or a list of paths of "
                          f"public keys, got {value!r}")
    return list(value)


def _is_numeric_column(name: str) -> bool:
    return name == "score" or name.endswith("_score") or name.startswith("p_")


def _number(value: object) -> int | float | None:
    """A scorer cell ("0.513914", "5", "") as a JSON-safe number: whole-number text stays an
    int; None when empty or not finite."""
    text = _cell(value)
    try:
        return int(text)
    except ValueError:
        return finite_float(text)


def _cell(value: Any) -> str:
    """A DataFrame cell as text; missing (None/NaN/NA) is ""."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip()
    return str(value).strip()


def predict_frame(scorer: OnnxScorer, frame: pd.DataFrame, batch_size: int = 32,
                  workers: int = 4, served: ServedInput | None = None) -> pd.DataFrame:
    """Score every row of `frame` (see the module docstring for the columns) under `served`'s
    rules (default: `ServedInput.from_settings()`, from the environment). Rows are read and
    decoded one batch at a time. Raises `DataError` for a frame without an input column or
    with more rows than `served.max_rows`."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if not set(INPUT_COLUMNS[1:]) & set(frame.columns):
        raise DataError(f"model input needs a 'path' or 'image_base64' column; got "
                          f"{list(frame.columns)}")
    served = served or ServedInput.from_settings()
    served.check_rows(len(frame))
    missing = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    ids = [_cell(v) or str(i) for i, v in zip(frame.index, frame.get("id", missing))]
    prior = scorer.bundle.prior
    days = frame.get(prior["column"], missing) if prior else missing
    todo = list(zip(frame.get("path", missing), frame.get("image_base64", missing), days))
    request = ServedRequest(scorer, served)

    def load(row: tuple[Any, Any, Any]) -> LoadedImage:
        return request.load(_cell(row[0]), _cell(row[1]), prior_value(row[2]))

    rows: list[dict] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(todo), batch_size):
            rows.extend(score_batch(scorer, list(pool.map(load, todo[start:start + batch_size]))))
    return _output_frame(rows, ids, frame.index, scorer.bundle)


def _output_frame(rows: list[dict], ids: list[str], index: pd.Index, bundle: Bundle
                  ) -> pd.DataFrame:
    base = ["path", "status", "score", "label_pred", *[f"p_{c}" for c in bundle.classes], "flags"]
    columns = base + [c for row in rows for c in row if c not in base]
    columns = list(dict.fromkeys(c for c in columns if c not in _COHORT_COLUMNS))
    out = pd.DataFrame(rows, columns=columns, index=index)
    for column in out.columns:
        if _is_numeric_column(column):
            out[column] = pd.Series([_number(v) for v in out[column]], index=index, dtype=object)
        else:
            out[column] = out[column].astype(object).fillna("").astype(str)  # (all-NaN too)
    out.insert(0, "id", ids)
    return out


class BundleModel(PythonModel):
    """The pyfunc model. `model_config` may set `threads` (ONNX Runtime), `batch_size`,
    `workers` (decoding threads), `precision` ("auto", "fp32", "int8"), and what a request may
    read (`embryo_ml.serving.served_input`): `allowed_roots` (a list of folders), `max_rows`,
    `max_image_bytes`, `max_pixels` and `max_request_pixels`, and which keys must have signed
    the bundle (`trusted_keys`). A setting the config leaves out comes from its environment
    variable (`EMBRYO_ML_ALLOWED_ROOTS`, `EMBRYO_ML_TRUSTED_KEYS`, `EMBRYO_ML_MAX_ROWS`, ...)
    as it is when a request arrives, else its default. The config is given to
    `mlflow.pyfunc.load_model(uri, model_config={...})`, or as JSON in
    `MLFLOW_PYFUNC_INFERENCE_CONFIG` to `mlflow models serve`; MLflow passes on only the keys of
    `MODEL_CONFIG`, logged with the model (a model logged before these existed takes none)."""

    def load_context(self, context: Any) -> None:
        config = dict(getattr(context, "model_config", None) or {})
        self.config = config
        served = ServedInput.from_settings(config)  # a bad setting fails the load, not a request
        folder, keys = context.artifacts[BUNDLE_ARTIFACT], trusted_keys(config)
        if keys:  # refuse to serve a bundle the team did not sign (BundleError names why)
            from embryo_ml.export.signing import verify_bundle

            self.bundle, signer = verify_bundle(folder, keys)
            log.info("bundle signed by trusted key %s (%s)", signer.key_id, signer.source.name)
        else:
            self.bundle = read_bundle(folder)  # verifies the hash
        warning = validation_warning(self.bundle)
        if warning:  # a failed model can be logged (never registered) for inspection
            log.warning("%s", warning)
        self.batch_size = int(config.get("batch_size") or MODEL_CONFIG["batch_size"])
        self.workers = int(config.get("workers") or MODEL_CONFIG["workers"])
        self.scorer = OnnxScorer(self.bundle, config.get("threads"), served.max_pixels,
                                 precision=str(config.get("precision") or "auto"))

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        served = ServedInput.from_settings(self.config)
        try:
            return predict_frame(self.scorer, model_input, self.batch_size, self.workers, served)
        except DataError as error:  # the request's fault: HTTP 400 with this one line
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(error)) from None


def example_image_base64(size: int = 64) -> str:
    """A small PNG (a grey ring on a dark field), base64: the logged input example."""
    from PIL import Image

    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(x, y)
    image = np.where(np.abs(radius - size * 0.35) < size * 0.05, 180, 60).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(image[:, :, None], 3, axis=2)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"id": ["example"], "image_base64": [example_image_base64()]})


def model_signature(bundle: Bundle) -> ModelSignature:
    day = [bundle.prior["column"]] if bundle.prior else []  # the day prior's column
    inputs = Schema([ColSpec("string", name, required=False) for name in (*INPUT_COLUMNS, *day)])
    outputs = Schema(
        [ColSpec("string", name) for name in ("id", "path", "status")]
        + [ColSpec("double", "score", required=False), ColSpec("string", "label_pred")]
        + [ColSpec("double", f"p_{c}", required=False) for c in bundle.classes]
        + [ColSpec("string", "flags")]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """What the model needs where it runs; embryo-ml itself must be installed there
    (serve with `--env-manager local` from an environment that has it)."""
    pins = [f"mlflow=={mlflow.__version__}"]
    for name in ("embryo-ml", *_REQUIREMENTS):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


@dataclass(frozen=True)
class LoggedBundleModel:
    model_uri: str  # models:/<model id>
    run_id: str
    experiment_id: str
    registered_name: str | None = None
    version: str | None = None
    alias: str | None = None


def log_bundle_model(
    bundle_dir: str | Path, *, run_id: str | None = None, registered_name: str | None = None,
    tracking_uri: str | None = None, alias: str = "candidate",
) -> LoggedBundleModel:
    """Log the bundle as a pyfunc model; register it (and point `alias` at it) if asked.

    The model goes into `run_id`, else the bundle's training run when that run is in the store,
    else a new run in experiment `embryo-ml`. Raises `BundleError` for a bad bundle,
    `ValidationFailedError` before anything is logged when asked to register a bundle whose
    model failed its validation check, and `TrackingError` when the store cannot be used.
    """
    from embryo_ml.train import tracking  # not needed where the model is served

    bundle = read_bundle(bundle_dir)  # verified before anything is logged
    if registered_name is not None:  # also refused by the CLI; here for every other caller
        check_registrable(bundle.validation, f"bundle {bundle.path}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    target = run_id or bundle.run_id
    experiment = tracking.run_experiment_name(target, uri) if target else None
    if run_id and experiment is None:
        raise TrackingError(f"run {run_id} not found in MLflow store {uri}")
    if experiment is None:
        target, experiment = None, DEFAULT_EXPERIMENT
    tags = {"embryo_ml.bundle_sha256": bundle.sha256, "embryo_ml.architecture":
            bundle.architecture, "embryo_ml.training_run_id": bundle.run_id or ""}
    with tracking.RunTracker(uri, experiment, run_name=None if target else "export",
                             run_id=target) as tracker:
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(MODEL_CODE),
                artifacts={BUNDLE_ARTIFACT: str(Path(bundle_dir).resolve())},
                signature=model_signature(bundle), input_example=input_example(),
                model_config=MODEL_CONFIG,
                pip_requirements=pip_requirements(), tags=tags,
                metadata={"classes": bundle.classes, "positive_class": bundle.positive_class,
                          "bundle_sha256": bundle.sha256},
            )
        except mlflow.exceptions.MlflowException as error:
            raise TrackingError(f"cannot log the model to {uri}: {error.message}") from None
    result = LoggedBundleModel(info.model_uri, tracker.run_id or "", tracker.experiment_id or "")
    if registered_name is None:
        return result
    version = tracking.register_model(info.model_uri, registered_name, alias, uri)
    return LoggedBundleModel(result.model_uri, result.run_id, result.experiment_id,
                             registered_name, version, alias)
