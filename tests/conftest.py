"""Shared fixtures: tiny synthetic data and one tiny trained run reused across tests.

MLflow always points at a sqlite file under tmp (never the working folder's mlflow.db).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Real public samples (never copied into the repo): ../shared/data beside the checkout, or
# wherever $EMBRYO_ML_SHARED_DATA points. Tests that need them skip when absent.
SHARED_DATA = Path(os.environ.get("EMBRYO_ML_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
TINY_MODEL = "test_resnet"  # a timm test model: ~0.4M parameters, trains in seconds at 64 px
GATE_UNDECIDED = 1000  # eval.gate_min_per_class for tiny runs: their verdict is inconclusive


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    store = tmp_path_factory.getbasetemp() / "mlflow-default.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 synthetic images (64 px) of ~30 patients; returns the manifest path."""
    from embryo_ml.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth"), n=120, size=64, seed=3)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> dict:
    """A 2-epoch run of the tiny model, tracked in its own sqlite store."""
    from embryo_ml.config import load_config
    from embryo_ml.train.fit import fit

    root = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(None, [
        f"model.name={TINY_MODEL}", "data.image_size=64", "train.epochs=2",
        "train.batch_size=16", "train.lr=0.003", f"tracking.tracking_uri={uri}",
        "tracking.experiment=tests",
        # ~24 validation images can judge no model: the gate says so ("inconclusive", exported
        # with a warning) rather than failing a run that exists to test the mechanics
        f"eval.gate_min_per_class={GATE_UNDECIDED}",
    ])
    result = fit(cfg, synth_data, root / "run", progress=False)
    return {"result": result, "run_dir": root / "run", "uri": uri}


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, trained_run: dict) -> Path:
    from embryo_ml.export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(trained_run["run_dir"], out)
    return out


def write_image(path: Path, array: np.ndarray, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path
