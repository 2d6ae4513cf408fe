"""Shared fixtures: tiny synthetic data and one tiny trained run reused across tests.

MLflow always points at a sqlite file under tmp (never the working folder's mlflow.db).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from tests.mlflow_server import ServerDidNotStart, tracking_server

if TYPE_CHECKING:
    from embryo_ml.config import Config
    from embryo_ml.serving.pyfunc import LoggedBundleModel

# Real public samples (never copied into the repo): ../shared/data beside the checkout, or
# wherever $EMBRYO_ML_SHARED_DATA points. Tests that need them skip when absent.
SHARED_DATA = Path(os.environ.get("EMBRYO_ML_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
TINY_MODEL = "test_resnet"  # a timm test model: ~0.4M parameters, trains in seconds at 64 px
GATE_UNDECIDED = 1000  # eval.gate_min_per_class for tiny runs: their verdict is inconclusive


def tiny_config(store: Path | str, *overrides: str, gate_undecided: bool = False) -> Config:
    """The tiny model's config with `overrides` (`section.key=value`), tracked in `store`: a
    sqlite file (a Path) or a tracking URI (a str), so no test writes to a shared store.
    `gate_undecided`: a tiny run's validation set (~24 images in `trained_run`) can judge no
    model; the gate then says so ("inconclusive", exported with a warning) rather than failing
    a run that exists to test the mechanics."""
    from embryo_ml.config import load_config

    uri = store if isinstance(store, str) else f"sqlite:///{store}"
    gate = [f"eval.gate_min_per_class={GATE_UNDECIDED}"] if gate_undecided else []
    return load_config(None, [f"model.name={TINY_MODEL}", *overrides,
                              f"tracking.tracking_uri={uri}", *gate])


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    store = tmp_path_factory.getbasetemp() / "mlflow-default.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")


@pytest.fixture()
def forget_tracking_uri() -> Iterator[None]:
    """`RunTracker` sets mlflow's process-wide URI: reset it after the test, so no module's
    store (or dead server) leaks into the next."""
    yield
    import mlflow  # only modules that use mlflow ask for this

    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 synthetic images (64 px) of ~30 patients; returns the manifest path."""
    from embryo_ml.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth"), n=120, size=64, seed=3)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> dict:
    """A 2-epoch run of the tiny model, tracked in its own sqlite store."""
    from embryo_ml.train.fit import fit

    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(root / "mlflow.db", "data.image_size=64", "train.epochs=2",
                      "train.batch_size=16", "train.lr=0.003", "tracking.experiment=tests",
                      gate_undecided=True)
    result = fit(cfg, synth_data, root / "run", progress=False)
    return {"result": result, "run_dir": root / "run", "uri": cfg.tracking.tracking_uri}


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, trained_run: dict) -> Path:
    from embryo_ml.export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(trained_run["run_dir"], out)
    return out


@pytest.fixture(scope="module")
def logged_model(bundle_dir: Path, trained_run: dict) -> LoggedBundleModel:
    """`bundle_dir` logged as an MLflow pyfunc model into the trained run (once per module)."""
    from embryo_ml.serving.pyfunc import log_bundle_model

    return log_bundle_model(bundle_dir, tracking_uri=trained_run["uri"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real MLflow tracking server on 127.0.0.1 for the module; yields its URL and folders
    (`tests.mlflow_server.tracking_server`). Skips the module's tests if it cannot start."""
    try:
        with tracking_server(tmp_path_factory.mktemp("mlflow-server")) as server:
            yield server
    except ServerDidNotStart as error:
        print(f"mlflow server log (tail):\n{error.log_tail}", file=sys.stderr)
        pytest.skip(f"mlflow server could not start ({error.state}); stderr tail:\n"
                    f"{error.log_tail}")
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)  # RunTracker set the global URI to this dead server


def write_image(path: Path, array: np.ndarray, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path
