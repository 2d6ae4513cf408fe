"""`embryo-ml train --register NAME`: the trained run's bundle becomes a registered MLflow model
version with alias `candidate`, logged inside the training run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from embryo_ml.cli import main
from tests.conftest import GATE_UNDECIDED, TINY_MODEL


@pytest.mark.slow
def test_train_register_sets_candidate(synth_data: Path, tmp_path: Path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "embryo-train-register"
    code = main(["-q", "train", "--data", str(synth_data), "--out", str(tmp_path / "run"),
                 "--register", name, "--set", f"model.name={TINY_MODEL}",
                 "--set", "data.image_size=48", "--set", "train.epochs=1",
                 "--set", f"tracking.tracking_uri={uri}",
                 "--set", f"eval.gate_min_per_class={GATE_UNDECIDED}"])  # not a failed run
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"registered model '{name}' version 1, alias 'candidate'" in out
    assert (tmp_path / "run" / "bundle" / "bundle.json").is_file()
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias(name, "candidate")
    run_id = (tmp_path / "run" / "run_id.txt").read_text().strip()
    assert int(version.version) == 1
    assert version.run_id == run_id  # logged into the training run, not a new one
