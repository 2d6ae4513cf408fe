"""The int8 model: built at export when it agrees with fp32, hash-checked, chosen by the scorer."""

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.errors import BundleError, ConfigError
from embryo_ml.export.bundle import read_bundle, write_bundle_json
from embryo_ml.export.quantize import INT8_FILE, INT8_TOLERANCE, build_int8
from embryo_ml.score.scorer import OnnxScorer, choose_model, score_images


def _scores(bundle: Path, images: Path, out: Path, precision: str) -> pd.DataFrame:
    summary = score_images(images, bundle, out, progress=False, precision=precision)
    assert summary.precision == ("int8" if precision == "auto" else precision)
    return pd.read_csv(out).set_index("path")


def test_export_keeps_an_int8_model_that_agrees_with_fp32(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    bundle = read_bundle(bundle_dir)
    assert bundle.int8 is not None and (bundle_dir / INT8_FILE).is_file()
    entry = bundle.int8
    assert entry["max_abs_diff"] <= entry["tolerance"] == INT8_TOLERANCE
    assert entry["parity_images"] >= 8 and 0.0 <= entry["label_agreement"] <= 1.0
    # the int8 file is a different, smaller model
    assert (bundle_dir / INT8_FILE).stat().st_size < bundle.model_path.stat().st_size
    assert choose_model(bundle) == (bundle_dir / INT8_FILE, "int8")
    assert choose_model(bundle, "fp32") == (bundle.model_path, "fp32")

    images = synth_data.parent / "images"
    fast = _scores(bundle_dir, images, tmp_path / "int8.csv", "auto")
    exact = _scores(bundle_dir, images, tmp_path / "fp32.csv", "fp32")
    assert len(fast) == len(exact) == 120
    difference = (fast["score"] - exact.loc[fast.index, "score"]).abs()
    assert difference.max() <= INT8_TOLERANCE
    assert difference.max() > 0.0  # really another model, not the fp32 one twice
    # a decision can only flip where the fp32 score lies within the tolerance of the threshold
    flipped = fast["label_pred"] != exact.loc[fast.index, "label_pred"]
    near = (exact.loc[fast.index, "score"] - bundle.threshold).abs() <= INT8_TOLERANCE
    assert (near | ~flipped).all()
    assert flipped.mean() <= near.mean()


def test_tampered_or_missing_int8_model_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    model = copy / INT8_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"hash mismatch for {INT8_FILE}"):
        read_bundle(copy)
    model.unlink()
    with pytest.raises(BundleError, match=f"{INT8_FILE} is missing"):
        read_bundle(copy)
    bundle = read_bundle(copy, verify=False)  # a bundle may not point outside itself
    write_bundle_json(replace(bundle, int8={**bundle.int8, "file": "../model.onnx"}), copy)
    with pytest.raises(BundleError, match="plain 'file' name"):
        read_bundle(copy)


def test_no_validation_images_means_fp32_only(
    trained_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, synth_data: Path
) -> None:
    from embryo_ml.export.onnx_export import export_bundle

    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    (run / "val_predictions.csv").unlink()  # e.g. exported on a machine without the images
    with caplog.at_level(logging.WARNING):
        bundle = export_bundle(run, tmp_path / "bundle")
    assert bundle.int8 is None and not (tmp_path / "bundle" / INT8_FILE).exists()
    assert "no int8 model" in caplog.text
    assert choose_model(bundle) == (bundle.model_path, "fp32")
    with pytest.raises(BundleError, match="has no int8 model"):
        OnnxScorer(bundle, precision="int8")
    with pytest.raises(ConfigError, match="--precision"):
        score_images(synth_data.parent / "images", tmp_path / "bundle", tmp_path / "s.csv",
                     progress=False, precision="int4")


def test_disagreeing_int8_model_is_dropped(
    bundle_dir: Path, trained_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = read_bundle(bundle_dir)
    staging = tmp_path / "staging"
    staging.mkdir()
    shutil.copy(bundle.model_path, staging / bundle.model_file)
    kwargs = dict(size=bundle.input_size, mean=bundle.mean, std=bundle.std, input_name="image",
                  output_name="logits", classes=bundle.classes,
                  positive_index=bundle.positive_index, threshold=bundle.threshold,
                  temperature=bundle.temperature, heads=bundle.heads)
    kept = build_int8(staging, bundle.model_file, trained_run["run_dir"], **kwargs)
    assert kept is not None and (staging / INT8_FILE).is_file()
    assert np.isclose(kept["max_abs_diff"], bundle.int8["max_abs_diff"], atol=1e-6)
    with caplog.at_level(logging.WARNING):
        dropped = build_int8(staging, bundle.model_file, trained_run["run_dir"],
                             tolerance=0.0, **kwargs)
    assert dropped is None and not (staging / INT8_FILE).exists()
    assert "moved a probability by" in caplog.text
