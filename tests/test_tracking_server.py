"""Tracking over HTTP: a real `mlflow server` on localhost, and an unreachable one.

The server runs for this module only (sqlite backend, artifacts proxied by the server into a tmp
folder), so these tests exercise the REST client and artifact upload/download over HTTP, not the
local sqlite path the rest of the suite uses.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.config import Config
from embryo_ml.errors import TrackingError
from embryo_ml.train.fit import fit
from embryo_ml.train.tracking import run_summary
from tests.conftest import TINY_MODEL, tiny_config
from tests.mlflow_server import unreachable_url

EXPERIMENT = "server-test"


def _server_config(url: str) -> Config:
    """A 2-epoch run of the tiny model at 32 px, tracked at `url`."""
    return tiny_config(url, "data.image_size=32", "train.epochs=2", "train.batch_size=16",
                       f"tracking.experiment={EXPERIMENT}")


@pytest.fixture(scope="module")
def server_run(mlflow_server: dict, synth_data: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-epoch run of the tiny model, tracked on the server over HTTP."""
    url = mlflow_server["url"]
    run_dir = tmp_path_factory.mktemp("server-run") / "run"
    result = fit(_server_config(url), synth_data, run_dir, progress=False)
    return {"result": result, "run_dir": run_dir, "url": url}


def test_run_is_tracked_on_the_server_over_http(
    server_run: dict, mlflow_server: dict, tmp_path: Path
) -> None:
    url, run_id, run_dir = server_run["url"], server_run["result"].run_id, server_run["run_dir"]
    assert server_run["result"].tracking_uri == url
    client = mlflow.MlflowClient(url)

    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # exactly one run, and it is ours
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # Artifacts went through the server's proxy, not straight to a local path.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri

    summary = run_summary(run_id, url)
    assert summary["status"] == "FINISHED"
    assert summary["params"]["model.name"] == TINY_MODEL
    assert summary["params"]["train.epochs"] == "2"
    history = client.get_metric_history(run_id, "val_auc")
    assert sorted(m.step for m in history) == [0, 1]
    assert all(0.0 <= m.value <= 1.0 for m in history)
    assert summary["history"]["val_auc"] == pytest.approx([m.value for m in history])
    for artifact in ("plots/roc_curve.png", "checkpoint/best.pt", "metrics.json",
                     "config.yaml", "history.csv"):
        assert artifact in summary["artifacts"], artifact

    # The bytes the client downloads over HTTP are the run folder's file, byte for byte ...
    local = (run_dir / "metrics.json").read_bytes()
    downloaded = Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path)))
    assert downloaded.read_bytes() == local
    # ... also through the server's plain HTTP artifact route ...
    query = urllib.parse.urlencode({"path": "metrics.json", "run_uuid": run_id})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=10) as response:
        assert response.read() == local
    assert json.loads(local)["run_id"] == run_id
    # ... and the server stored the upload in its own artifacts destination and database.
    assert (mlflow_server["root"] / "srv.db").is_file()
    stored = list(mlflow_server["artifacts"].rglob("best.pt"))
    assert len(stored) == 1
    # The stored checkpoint is best.pt with its config's paths hashed: the same weights.
    import torch

    from embryo_ml.train.tracking import redact_tree

    uploaded = torch.load(stored[0], weights_only=True)
    original = torch.load(run_dir / "best.pt", weights_only=True)
    assert uploaded["config"] == redact_tree(original["config"])
    assert uploaded["state_dict"].keys() == original["state_dict"].keys()
    assert all(torch.equal(uploaded["state_dict"][k], original["state_dict"][k])
               for k in original["state_dict"])


def test_no_patient_id_reaches_the_server(server_run: dict, synth_data: Path,
                                          tmp_path: Path) -> None:
    manifest = pd.read_csv(synth_data, dtype={"patient_id": str})
    patient_ids = set(manifest["patient_id"])
    assert len(patient_ids) >= 10
    assert all(re.fullmatch(r"P\d{4}", pid) for pid in patient_ids)

    url, run_id = server_run["url"], server_run["result"].run_id
    summary = run_summary(run_id, url)
    assert summary["params"] and summary["tags"] and summary["artifacts"]
    logged = {
        "param": [f"{k}={v}" for k, v in summary["params"].items()],
        "tag": [f"{k}={v}" for k, v in summary["tags"].items()],
        "artifact name": summary["artifacts"],
    }
    # The text artifacts' contents too (the image file names carry the patient id).
    client = mlflow.MlflowClient(url)
    texts = [a for a in summary["artifacts"] if a.endswith((".json", ".yaml", ".csv", ".txt"))]
    assert "metrics.json" in texts
    logged["artifact content"] = [
        Path(client.download_artifacts(run_id, name, str(tmp_path))).read_text(encoding="utf-8")
        for name in texts
    ]
    leaks = [(kind, pid) for kind, values in logged.items() for value in values
             for pid in patient_ids if pid in value]
    assert not leaks, leaks
    assert summary["tags"]["data.n_images"] == str(len(manifest))


def test_unreachable_server_fails_fast_before_training(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url = unreachable_url()
    cfg = _server_config(url)
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable") as caught:
        fit(cfg, synth_data, run_dir, progress=False)
    elapsed = time.perf_counter() - started
    assert elapsed < 10.0, f"took {elapsed:.1f} s to notice the server is down"
    assert url in str(caught.value)
    assert not (run_dir / "best.pt").exists()  # no training happened
    assert not (run_dir / "run_id.txt").exists()  # and no run was started


def test_cli_unreachable_server_is_one_error_line(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url = unreachable_url()
    out = tmp_path / "run"
    started = time.perf_counter()
    status = main(["-q", "train", "--data", str(synth_data), "--out", str(out),
                   "--set", f"model.name={TINY_MODEL}", "--set", "data.image_size=32",
                   "--set", "train.epochs=1", "--set", f"tracking.tracking_uri={url}"])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert status == 2
    assert elapsed < 10.0, f"took {elapsed:.1f} s"
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    assert "unreachable" in errors[0] and url in errors[0]
    assert "Traceback" not in captured.err
    assert "MLflow run id" not in captured.out
    assert not (out / "best.pt").exists()

