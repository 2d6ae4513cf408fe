"""MLflow for training: everything training logs goes through `RunTracker`; the model registry
goes through `register_model`.

Two modules import mlflow: this one, and `embryo_ml.serving.pyfunc`, which must subclass
`mlflow.pyfunc.PythonModel` and call `mlflow.pyfunc.log_model` to make the scoring bundle an MLflow
model (that cannot be done without mlflow). Runs, experiments, reachability and the registry stay
here; the scoring path (`embryo_ml.score`, `embryo_ml.export.bundle`) imports neither.

Default store: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working folder, which
`mlflow ui --backend-store-uri sqlite:///mlflow.db` opens. A remote server is checked before any
training starts, so an unreachable server costs seconds, not an hour of lost training.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from matplotlib.figure import Figure

from embryo_ml.errors import TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an http(s) tracking server that does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status >= 400:
                raise TrackingError(f"MLflow server {uri} answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason})") from None


def git_commit() -> str | None:
    """The commit of the embryo_ml source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def salted_hash(value: str, salt: str = "embryo-ml") -> str:
    """Pseudonymise an identifier before it leaves the machine (patient privacy rule)."""
    return hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:16]


# What reaches MLflow of a file or folder path: clinic folders and file names often carry a
# patient's name or hospital number, and a param, tag or artifact leaves the machine (a shared
# tracking server) where the run folder does not. So a value under a path-like key (config
# `data.manifest`, `data.cache_dir`, `model.pretrained_file`, and any future `*_file`, `*_dir`,
# `*_path`, `*_folder`, `*manifest` key) is logged as `hash:<16 hex>` plus its extension when it
# is a known one (`hash:3f2a9c0b1d4e5f60.csv`): runs that read the same path text share the
# hash, and the extension still says what kind of file it was; the text itself is not
# recoverable, short of guessing it (the salt is fixed, so a guessed path can be confirmed).
# What data a run saw is identified by content instead (`data.sha256`, see
# `embryo_ml.train.fit.dataset_fingerprint`). A URI's password (`https://user:pw@host`) is
# replaced by `***`. Everything else is logged as it is.
_PATH_KEY_ENDINGS = ("manifest", "_file", "_dir", "_path", "_folder")
_KNOWN_EXTENSIONS = frozenset({".csv", ".json", ".jsonl", ".parquet", ".yaml", ".yml",
                               ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".onnx"})


def is_path_key(key: str) -> bool:
    """True for a param/tag/config key whose value is a file system path."""
    return key.rsplit(".", 1)[-1].lower().endswith(_PATH_KEY_ENDINGS)


def hashed_path(value: str) -> str:
    """`hash:<salted hash of the text><extension if a known one>`, e.g. `hash:3f2a...60.csv`."""
    suffix = Path(value).suffix.lower()
    return f"hash:{salted_hash(value)}{suffix if suffix in _KNOWN_EXTENSIONS else ''}"


def _without_password(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def loggable(key: str, value: Any) -> Any:
    """`value` as it may go to MLflow under `key`: a path hashed (`hashed_path`), a password in
    a URI masked, anything else unchanged. None and "" stay as they are (nothing to hide)."""
    if value is None or value == "":
        return value
    if is_path_key(key):
        return hashed_path(str(value))
    if isinstance(value, str) and "@" in value and "://" in value:
        return _without_password(value)
    return value


def redact_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict with every value `loggable` under its dotted key."""
    return {key: redact_tree(value, f"{prefix}{key}.") if isinstance(value, Mapping)
            else loggable(f"{prefix}{key}", value) for key, value in tree.items()}


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database (`<db folder>/mlartifacts`),
    not in MLflow's default `./mlruns` of whatever folder the command ran in."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides (and serves) its own artifact store
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlartifacts").as_uri()


def _create_experiment(uri: str, name: str) -> None:
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name, artifact_location=artifact_root(uri))
        except mlflow.exceptions.MlflowException:
            if client.get_experiment_by_name(name) is None:  # not a concurrent creation
                raise


class RunTracker:
    """An MLflow run as a context manager; marks the run FAILED if the block raises."""

    def __init__(
        self, tracking_uri: str | None, experiment: str, run_name: str | None = None,
        run_id: str | None = None, nested: bool = False,
    ):
        """`run_id` continues an existing run (resume) instead of starting a new one;
        `nested` makes the run a child of the active one (cross-validation folds)."""
        self.nested = nested
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = run_id
        self.experiment_id: str | None = None

    def __enter__(self) -> RunTracker:
        check_reachable(self.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            _create_experiment(self.tracking_uri, self.experiment)
            experiment = mlflow.set_experiment(self.experiment)
            if self.run_id:
                run = mlflow.start_run(run_id=self.run_id, nested=self.nested)
            else:
                run = mlflow.start_run(run_name=self.run_name, nested=self.nested)
        except Exception as error:  # mlflow raises many types for a bad store
            raise TrackingError(f"cannot use MLflow store {self.tracking_uri}: {error}") from None
        self.experiment_id = experiment.experiment_id
        self.run_id = run.info.run_id
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        status = "FINISHED" if exc_type is None else (
            "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        )
        mlflow.end_run(status=status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logged as text; paths and credentials as `loggable` makes them (privacy)."""
        clean = {k: str(loggable(k, v))[:_MAX_PARAM_LENGTH] for k, v in params.items()}
        mlflow.log_params(clean)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: str(loggable(k, v)) for k, v in tags.items() if v is not None})

    def log_config(self, tree: Mapping[str, Any], name: str = "config.yaml") -> None:
        """The resolved config as an artifact, with its paths hashed as in the params (the
        run folder keeps the config itself, paths and all, for `--resume`)."""
        mlflow.log_dict(redact_tree(tree), name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v == v}  # MLflow rejects NaN
        mlflow.log_metrics(finite, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)

    def log_figure(self, figure: Figure, name: str) -> None:
        import matplotlib.pyplot as plt

        mlflow.log_figure(figure, name)
        plt.close(figure)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        mlflow.log_dict(dict(data), name)


def run_summary(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Params, latest metrics, tags and top-level artifact paths of a run (for tests and CLI)."""
    client = mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))
    run = client.get_run(run_id)

    def walk(path: str | None) -> list[str]:
        found = []
        for item in client.list_artifacts(run_id, path):
            found.extend(walk(item.path) if item.is_dir else [item.path])
        return found

    return {
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "status": run.info.status,
        "artifacts": walk(None),
        "history": {
            key: [m.value for m in client.get_metric_history(run_id, key)]
            for key in run.data.metrics
        },
    }


class NullTracker:
    """Stands in for `RunTracker` on DDP ranks other than 0: same calls, nothing logged."""

    run_id: str | None = None

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("log_", "set_")):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def run_experiment_name(run_id: str, tracking_uri: str | None = None) -> str | None:
    """The experiment of `run_id`, or None when the store has no such run."""
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise TrackingError(f"cannot use MLflow store {uri}: {error.message}") from None
    experiment = client.get_experiment(run.info.experiment_id)
    return experiment.name if experiment is not None else None


def register_model(
    model_uri: str, name: str, alias: str | None = "candidate", tracking_uri: str | None = None,
) -> str:
    """Register `model_uri` (e.g. `models:/<model id>`) as a new version of `name` and point
    `alias` at it (aliases, not stages: MLflow 3). Returns the new version number as text."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    try:
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # MLflow 3 logged models are `models:/m-<hex>`; other URIs (runs:/, a path) have no id.
        rest = model_uri.removeprefix("models:/")
        model_id = rest if rest != model_uri and re.fullmatch(r"m-[0-9a-f]+", rest) else None
        run_id = client.get_logged_model(model_id).source_run_id if model_id else None
        version = client.create_model_version(name, source=model_uri, run_id=run_id,
                                              model_id=model_id)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except mlflow.exceptions.MlflowException as error:
        raise TrackingError(f"cannot register {model_uri} as {name!r} in {uri}: "
                            f"{error.message}") from None
    return str(version.version)
