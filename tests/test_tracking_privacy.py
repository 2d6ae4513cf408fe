"""Paths and patient identifiers never reach MLflow in clear (house rule 8): file and folder
paths in params, tags and the config artifact are hashed (`embryo_ml.train.tracking.loggable`),
a URI's password is masked."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import yaml

from embryo_ml.config import load_config
from embryo_ml.data.manifest import read_manifest
from embryo_ml.train.tracking import RunTracker, hashed_path, run_summary


def _artifact_text(run_id: str, uri: str, name: str, folder: Path) -> str:
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name,
                                                dst_path=str(folder), tracking_uri=uri)
    return Path(local).read_text(encoding="utf-8")


def test_training_run_logs_no_data_path_file_name_or_patient_id(
    trained_run: dict, synth_data: Path, tmp_path: Path
) -> None:
    run_id, uri = trained_run["result"].run_id, trained_run["uri"]
    summary = run_summary(run_id, uri)
    manifest = read_manifest(synth_data)
    folder = str(synth_data.resolve().parent)
    forbidden = {folder, *(Path(p).name for p in manifest["path"]),
                 *(Path(p).stem for p in manifest["path"]),
                 *manifest["patient_id"].dropna(), *manifest["embryo_id"].dropna()}
    logged = {**summary["params"], **summary["tags"]}
    leaks = {key: value for key, value in logged.items()
             if any(secret in value for secret in forbidden)}
    assert not leaks
    assert not any(Path(a).name in forbidden for a in summary["artifacts"])
    config = _artifact_text(run_id, uri, "config.yaml", tmp_path)
    assert not any(secret in config for secret in forbidden)
    assert yaml.safe_load(config)["model"]["name"]  # the config artifact is still the config


def test_paths_in_the_config_reach_mlflow_hashed(tmp_path: Path, synth_data: Path) -> None:
    # Before: data.manifest, data.cache_dir and model.pretrained_file went to the params and
    # the config.yaml artifact as they were written, folder names and all.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    patient_folder = tmp_path / "Smith_Jane_1970-01-01"
    cfg = load_config(None, [
        f"data.manifest={synth_data}", f"data.cache_dir={patient_folder / 'cache'}",
        f"model.pretrained_file={patient_folder / 'weights.safetensors'}",
        "tracking.tracking_uri=https://bob:s3cret@mlflow.example:5000",
    ])
    with RunTracker(uri, "privacy") as tracker:
        tracker.log_params(cfg.flat())
        tracker.set_tags({"source_folder": str(patient_folder), "plain": "kept"})
        tracker.log_config(cfg.model_dump(mode="json"))
    summary = run_summary(tracker.run_id or "", uri)
    params, tags = summary["params"], summary["tags"]
    assert params["data.manifest"] == hashed_path(str(synth_data))
    assert params["data.manifest"].startswith("hash:") and params["data.manifest"].endswith(".csv")
    assert params["model.pretrained_file"].endswith(".safetensors")
    assert params["data.cache_dir"].startswith("hash:")
    assert params["tracking.tracking_uri"] == "https://bob:***@mlflow.example:5000"
    assert tags["source_folder"].startswith("hash:") and tags["plain"] == "kept"
    logged = json.dumps(params) + json.dumps(tags)
    config = _artifact_text(tracker.run_id or "", uri, "config.yaml", tmp_path / "dl")
    for text in (logged, config):
        assert "Smith_Jane" not in text and str(synth_data.parent) not in text
        assert "s3cret" not in text
    assert yaml.safe_load(config)["data"]["manifest"] == params["data.manifest"]


def test_the_logged_checkpoint_holds_hashed_paths(tmp_path: Path, synth_data: Path) -> None:
    """best.pt goes to MLflow with its config's paths hashed; the run folder's copy keeps them
    (resume and export read them)."""
    import torch

    from embryo_ml.train.finish import _log_checkpoint

    patient_folder = tmp_path / "Smith_Jane_1970-01-01"
    cfg = load_config(None, [f"data.manifest={synth_data}",
                             f"data.cache_dir={patient_folder / 'cache'}"])
    local = tmp_path / "best.pt"
    torch.save({"config": cfg.model_dump(mode="json"), "epoch": 0}, local)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with RunTracker(uri, "privacy") as tracker:
        _log_checkpoint(tracker, local)
    mlflow.set_tracking_uri(uri)
    logged = mlflow.artifacts.download_artifacts(run_id=tracker.run_id or "",
                                                 artifact_path="checkpoint/best.pt",
                                                 dst_path=str(tmp_path / "dl"))
    config = torch.load(logged, weights_only=True)["config"]
    assert config["data"]["manifest"] == hashed_path(str(synth_data))
    assert "Smith_Jane" not in json.dumps(config)
    assert torch.load(local, weights_only=True)["config"]["data"]["manifest"] == str(synth_data)
