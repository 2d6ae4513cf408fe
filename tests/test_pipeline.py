"""synth -> train -> export -> score on real tiny runs, and what each stage refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embryo_ml.cli import main
from embryo_ml.errors import BundleError
from embryo_ml.export.bundle import read_bundle
from embryo_ml.score.scorer import score_images
from tests.conftest import GATE_UNDECIDED, TINY_MODEL, tiny_config


def test_training_run_is_tracked_in_mlflow(trained_run: dict) -> None:
    from embryo_ml.train.tracking import run_summary

    result, run_dir = trained_run["result"], trained_run["run_dir"]
    for name in ("best.pt", "config.yaml", "metrics.json", "history.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["val_auc"] <= 1.0 and metrics["epochs_run"] == 2
    for key in ("temperature", "threshold", "val_ece_before", "val_ece_after",
                "val_brier_before", "val_brier_after"):
        assert np.isfinite(metrics[key]), key
    summary = run_summary(result.run_id, trained_run["uri"])
    assert summary["status"] == "FINISHED"
    assert summary["params"]["model.name"] == TINY_MODEL
    assert summary["params"]["train.epochs"] == "2"
    assert len(summary["history"]["val_auc"]) == 2  # one value per epoch
    assert len(summary["history"]["train_loss"]) == 2
    for artifact in ("plots/confusion_matrix.png", "plots/roc_curve.png",
                     "plots/training_curves.png", "plots/reliability_diagram.png",
                     "checkpoint/best.pt", "config.yaml"):
        assert artifact in summary["artifacts"], artifact
    # patient privacy: no patient id reaches MLflow
    logged = json.dumps([summary["params"], summary["tags"]])
    assert "P00" not in logged
    assert summary["tags"]["data.n_images"] == "120"
    from importlib import metadata

    for package in ("torch", "timm", "albumentations", "numpy"):  # reproducible from MLflow
        assert summary["tags"][f"version.{package}"] == metadata.version(package)


def test_bundle_describes_itself_and_matches_pytorch(bundle_dir: Path, trained_run: dict) -> None:
    bundle = read_bundle(bundle_dir)
    assert bundle.architecture == TINY_MODEL and bundle.input_size == 64
    assert bundle.classes == ["good", "poor"] and bundle.positive_class == "good"
    assert bundle.run_id == trained_run["result"].run_id
    assert bundle.val_metrics["parity_max_abs_diff"] <= 1e-4
    metrics = json.loads((trained_run["run_dir"] / "metrics.json").read_text())
    assert bundle.temperature == metrics["temperature"] and 0.05 <= bundle.temperature <= 20
    assert bundle.threshold == metrics["threshold"] and 0.0 < bundle.threshold < 1.0
    assert bundle.versions["onnxruntime"]


def test_onnx_scores_equal_pytorch_on_real_images(
    bundle_dir: Path, trained_run: dict, synth_data: Path, tmp_path: Path
) -> None:
    """End-to-end parity: the scorer's probability for a file equals the checkpoint's."""
    import torch

    from embryo_ml.config import ModelConfig
    from embryo_ml.data.images import read_image
    from embryo_ml.data.preprocess import preprocess
    from embryo_ml.train.fit import load_checkpoint
    from embryo_ml.train.models import build_model

    checkpoint = load_checkpoint(trained_run["run_dir"] / "best.pt")
    model = build_model(ModelConfig(name=TINY_MODEL), 2)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    table = pd.read_csv(synth_data).head(8)
    files = [str(synth_data.parent / p) for p in table["path"]]
    batch = np.stack([preprocess(read_image(f), 64, checkpoint["mean"], checkpoint["std"])
                      for f in files])
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch))
    temperature = read_bundle(bundle_dir).temperature  # calibrated probabilities are scored
    expected = torch.softmax(logits / temperature, 1)[:, 0].numpy()
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    score_images(manifest, bundle_dir, tmp_path / "s.csv", progress=False, precision="fp32")
    got = pd.read_csv(tmp_path / "s.csv")["score"].to_numpy()
    assert np.abs(got - expected).max() < 1e-4
    # the default is the bundle's int8 model: close to, not equal to, PyTorch
    score_images(manifest, bundle_dir, tmp_path / "q.csv", progress=False)
    fast = pd.read_csv(tmp_path / "q.csv")["score"].to_numpy()
    assert 0 < np.abs(fast - expected).max() <= read_bundle(bundle_dir).int8["tolerance"]


def test_score_folder_with_bad_files(bundle_dir: Path, synth_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clinic"
    images = sorted((synth_data.parent / "images").rglob("*.png"))[:10]
    for i, image in enumerate(images):
        target = folder / ("day5" if i % 2 else "day3") / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    Image.open(images[0]).convert("RGB").save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("embryologist's notes, not a picture")
    (folder / "readme.txt").write_text("ignored: not an image extension")

    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(folder), "--bundle", str(bundle_dir), "--out", str(out)]) == 0
    scores = pd.read_csv(out, keep_default_na=False)
    assert list(scores.columns) == ["path", "status", "score", "display_score", "label_pred",
                                    "p_good", "p_poor", "flags", "embryo_id", "patient_id",
                                    "rank_in_cohort"]
    assert len(scores) == 14 and scores["path"].is_unique
    status = dict(zip(scores["path"], scores["status"]))
    assert status["corrupt.jpg"].startswith("unreadable:")
    assert "empty file" in status["zero.jpg"]
    assert "not a readable image" in status["notes.jpg"]
    ok = scores[scores["status"] == "ok"]
    assert len(ok) == 11  # the 10 PNGs and the intact JPEG
    probs = ok[["p_good", "p_poor"]].astype(float).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(ok["label_pred"]) <= {"good", "poor"}


def test_manifest_scoring_ranks_within_patient(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    score_images(synth_data, bundle_dir, out, progress=False)
    scores = pd.read_csv(out, dtype={"patient_id": str})
    manifest = pd.read_csv(synth_data)
    assert len(scores) == len(manifest)
    for _, cohort in scores.groupby("patient_id"):
        ranked = cohort.sort_values("rank_in_cohort")
        assert ranked["rank_in_cohort"].min() == 1
        assert ranked["score"].is_monotonic_decreasing


def test_tampered_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="hash mismatch"):
        read_bundle(copy)
    code = main(["-q", "score", str(tmp_path), "--bundle", str(copy), "--out",
                 str(tmp_path / "s.csv")])
    assert code == 2 and not (tmp_path / "s.csv").exists()


def test_bundle_schema_and_missing_parts(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99"):
        read_bundle(copy)
    (copy / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(copy)
    (copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        read_bundle(copy)


def test_score_cli_errors_are_one_line(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["score", str(tmp_path / "missing"), "--bundle", str(bundle_dir)]) == 2
    assert main(["score", str(empty), "--bundle", str(bundle_dir)]) == 2
    assert main(["score", str(empty), "--bundle", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "not found" in lines[0] and "no images" in lines[1] and "bundle" in lines[2]


def test_config_typo_fails_before_training(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", "--data", str(synth_data), "--out", str(run_dir),
                 "--set", "train.epohcs=1"])
    assert code == 2
    assert "train.epohcs" in capsys.readouterr().err
    assert not run_dir.exists()  # no work started


def test_export_refuses_folder_without_checkpoint(tmp_path: Path) -> None:
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_cli_train_export_score_round_trip(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(synth_data), "--out", str(run),
                 "--set", f"model.name={TINY_MODEL}", "--set", "data.image_size=32",
                 "--set", "train.epochs=1", "--set", f"tracking.tracking_uri={uri}",
                 "--set", f"eval.gate_min_per_class={GATE_UNDECIDED}"]) == 0
    printed = capsys.readouterr().out
    run_id = (run / "run_id.txt").read_text()
    assert f"MLflow run id: {run_id}" in printed
    assert main(["export", str(run), "--out", str(tmp_path / "bundle")]) == 0
    assert read_bundle(tmp_path / "bundle").input_size == 32
    out = tmp_path / "s.csv"
    assert main(["-q", "score", str(synth_data.parent / "images"), "--bundle",
                 str(tmp_path / "bundle"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 120


def test_score_refuses_oversized_image_per_row(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (300, 300), 128).save(folder / "huge.png")
    Image.new("L", (64, 64), 128).save(folder / "small.png")
    out = tmp_path / "s.csv"
    assert main(["-q", "score", str(folder), "--bundle", str(bundle_dir), "--out", str(out),
                 "--max-pixels", "10000"]) == 0
    status = dict(pd.read_csv(out)[["path", "status"]].values)
    assert status["small.png"] == "ok" and "too large" in status["huge.png"]


def test_binary_labels_derived_from_gardner_grades(synth_data: Path, tmp_path: Path) -> None:
    """STORK-style data: the label comes from the grade by the configured rule."""
    from embryo_ml.train.fit import fit

    table = pd.read_csv(synth_data, keep_default_na=False)
    table["path"] = [str(synth_data.parent / p) for p in table["path"]]
    table["grade"] = ["4AA" if i % 2 else "2BB" for i in range(len(table))]
    table = table.drop(columns="label")
    table.to_csv(tmp_path / "graded.csv", index=False)
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32", "train.epochs=1",
                      "labels.from_grade=true", "tracking.log_checkpoint=false")
    result = fit(cfg, tmp_path / "graded.csv", tmp_path / "run", progress=False)
    assert result.metrics["classes"] == ["good", "poor"]
    predictions = pd.read_csv(tmp_path / "run" / "val_predictions.csv")
    truth = dict(zip(table["path"], table["grade"]))
    assert all((truth[p] == "4AA") == (lbl == "good")
               for p, lbl in zip(predictions["path"], predictions["label"]))
    table.loc[3, "grade"] = "4AD"
    table.to_csv(tmp_path / "graded.csv", index=False)
    from embryo_ml.errors import DataError

    with pytest.raises(DataError, match="row 5 .*4AD"):
        fit(cfg, tmp_path / "graded.csv", tmp_path / "run2", progress=False)


def test_sqlite_store_keeps_artifacts_beside_the_database(trained_run: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(trained_run["uri"])
    run = client.get_run(trained_run["result"].run_id)
    database = Path(trained_run["uri"].removeprefix("sqlite:///"))
    assert run.info.artifact_uri.startswith((database.parent / "mlartifacts").as_uri())
    assert (database.parent / "mlartifacts").is_dir()
    assert not (Path.cwd() / "mlruns").exists()


def test_scores_carry_quality_flags_from_the_bundle(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    import cv2

    from embryo_ml.data.images import read_image

    bundle = read_bundle(bundle_dir)
    assert bundle.quality and bundle.quality["blur_min"] > 0
    assert bundle.quality["ood_energy_max"] is not None
    folder = tmp_path / "imgs"
    folder.mkdir()
    clean = sorted((synth_data.parent / "images").rglob("*.png"))[:12]
    for image in clean:
        shutil.copy(image, folder / image.name)
    embryo = read_image(clean[0])
    Image.fromarray(cv2.GaussianBlur(embryo, (0, 0), 6)).save(folder / "x_blurred.png")
    Image.fromarray((embryo * 0.12).astype(np.uint8)).save(folder / "x_dark.png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "x_blank.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "x_noise.png")
    board = ((np.indices((64, 64)).sum(axis=0) // 8) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(folder / "x_checkerboard.png")
    out = tmp_path / "s.csv"
    score_images(folder, bundle_dir, out, progress=False)
    scores = pd.read_csv(out, keep_default_na=False).set_index("path")
    flags = {p: set(f.split(";")) - {""} for p, f in scores["flags"].items()}
    assert (scores["status"] == "ok").all()  # flagged images keep their score
    assert "blurry" in flags["x_blurred.png"]
    assert "under_exposed" in flags["x_dark.png"]
    for name in ("x_blank.png", "x_noise.png", "x_checkerboard.png"):
        assert "no_embryo" in flags[name], name
    pixel_flags = {"blurry", "under_exposed", "over_exposed", "no_embryo"}
    assert all(not (flags[image.name] & pixel_flags) for image in clean)
