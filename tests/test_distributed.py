"""Data-parallel training under torchrun (2 CPU processes, gloo) and mixed precision settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from embryo_ml.config import load_config
from embryo_ml.data.images import read_image
from embryo_ml.data.preprocess import preprocess
from embryo_ml.errors import ConfigError
from embryo_ml.numeric import softmax
from embryo_ml.train.fit import fit, resolve_precision
from embryo_ml.train.models import build_model
from embryo_ml.train.run_folder import load_checkpoint
from tests.conftest import TINY_MODEL, tiny_config

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_make_one_run(synth_data: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "embryo_ml.train",
         "--data", str(synth_data), "--out", str(run_dir),
         "--set", f"model.name={TINY_MODEL}", "--set", "data.image_size=48",
         "--set", "train.epochs=2", "--set", "train.batch_size=8", "--set", "train.lr=0.003",
         "--set", "train.amp=off"],  # float32 on a bf16 CPU too: compared with float32 below
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("MLflow run id:") == 1  # rank 0 reports, rank 1 stays quiet

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert runs[0].data.params["train.world_size"] == "2"
    assert runs[0].info.status == "FINISHED"

    # The validation predictions were gathered from both ranks' slices; each must equal what
    # the rank-0 checkpoint computes, so both ranks held the same weights.
    checkpoint = load_checkpoint(run_dir / "best.pt")
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg.model, num_classes=len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    predictions = pd.read_csv(run_dir / "val_predictions.csv")
    batch = np.stack([preprocess(read_image(p), 48, checkpoint["mean"], checkpoint["std"])
                      for p in predictions["path"]])
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch)).numpy()
    temperature = json.loads((run_dir / "metrics.json").read_text())["temperature"]
    expected = softmax(logits, temperature)[:, checkpoint["classes"].index("good")]
    np.testing.assert_allclose(predictions["p_good"], expected, atol=1e-5)
    assert len(predictions) == int(runs[0].data.params["data.n_val"])


def test_precision_settings() -> None:
    cpu = torch.device("cpu")
    auto = resolve_precision("auto", "auto", cpu)  # bf16 only where the CPU multiplies it
    from embryo_ml.train.precision import cpu_has_native_bf16

    native = torch.bfloat16 if cpu_has_native_bf16() else None
    assert auto.amp_dtype is native and not auto.channels_last and auto.scaler is None
    assert resolve_precision("bf16", True, cpu).amp_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_precision("fp16", "auto", cpu)


def test_bf16_autocast_and_channels_last_train_on_cpu(synth_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=48", "train.epochs=1",
                      "train.batch_size=16", "train.amp=bf16", "train.channels_last=true")
    result = fit(cfg, synth_data, tmp_path / "run", progress=False)
    assert np.isfinite(result.metrics["val_loss"])
    params = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    assert params["train.precision"] == "torch.bfloat16"
    assert params["train.channels_last_used"] == "True"
