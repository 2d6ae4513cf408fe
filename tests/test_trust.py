"""The bundle's trust layer: the feature-space out-of-distribution score and the conformal
`uncertain` flag, from the numpy pieces to a trained model scoring foreign images."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.errors import BundleError
from embryo_ml.evaluation.conformal import conformal_flags, fit_conformal, prediction_sets
from embryo_ml.evaluation.ood import FeatureReference, conformal_limit, knn_distance, normalise
from embryo_ml.export.bundle import read_bundle, write_bundle_json
from tests.conftest import SHARED_DATA, tiny_config

REAL_SETS = {  # name -> (folder, glob): each an embryo image set unlike the synthetic ones
    "stage-grade": ("stage-grade/data", "*/*.png"),
    "stork": ("stork/images", "**/*.jpg"),
    "timelapse": ("timelapse/sample_data", "**/*.jpeg"),
}


# ---------------------------------------------------------------------------------------------
# numpy pieces


def test_knn_distance_is_the_cosine_distance_to_the_kth_neighbour() -> None:
    reference = normalise(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    query = np.array([[2.0, 0.0], [0.0, -3.0]])
    first = knn_distance(query, reference, 1)
    np.testing.assert_allclose(first, [0.0, 1.0], atol=1e-6)
    second = knn_distance(query, reference, 2)  # second nearest of (1, 0) is (1, 1)/sqrt(2)
    np.testing.assert_allclose(second[0], 1 - 1 / np.sqrt(2), atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        knn_distance(query, reference, 4)


def test_conformal_limit_rank_and_expected_rate() -> None:
    scores = np.arange(1, 200)  # n = 199: rank ceil(200 x 0.95) = 190
    limit, rate = conformal_limit(scores, 0.05)
    assert limit == 190 and rate == pytest.approx(1 - 190 / 200)
    limit, rate = conformal_limit(np.arange(10.0), 0.01)  # too few: the largest, 1 / (n + 1)
    assert limit == 9.0 and rate == pytest.approx(1 / 11)


def test_conformal_limit_false_alarm_rate_on_exchangeable_scores() -> None:
    """Over many calibration draws the share of new scores above the limit is at most alpha."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(300):
        limit, expected = conformal_limit(rng.normal(size=150), 0.05)
        rates.append(np.mean(rng.normal(size=400) > limit))
        assert expected <= 0.05
    assert abs(np.mean(rates) - 0.05) < 0.006


def test_conformal_sets_cover_each_class_at_one_minus_alpha() -> None:
    """Class-conditional coverage holds for the rare class too, on any (even poor) model."""
    rng = np.random.default_rng(1)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        targets = (rng.random(n) < 0.2).astype(int)  # class 1 rare
        p1 = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * (2 * targets - 1))))
        return np.column_stack([1 - p1, p1]), targets

    probs, targets = draw(5000)
    record = fit_conformal(probs, targets, ["poor", "good"], alpha=0.1)
    assert record["n_calibration"] == {"poor": int((targets == 0).sum()),
                                       "good": int((targets == 1).sum())}
    test_probs, test_targets = draw(20000)
    sets = prediction_sets(test_probs, record, ["poor", "good"])
    for c in (0, 1):
        coverage = sets[test_targets == c, c].mean()
        assert abs(coverage - 0.9) < 0.02, (c, coverage)
    flags = conformal_flags(test_probs, record, ["poor", "good"])
    sizes = sets.sum(axis=1)
    assert [f == ["uncertain"] for f in flags] == [s != 1 for s in sizes]
    assert conformal_flags(test_probs, None, ["poor", "good"]) == [[]] * len(test_probs)


def test_conformal_too_few_images_of_a_class_put_it_in_every_set() -> None:
    probs = np.array([[0.9, 0.1]] * 30 + [[0.2, 0.8]] * 3)
    targets = np.array([0] * 30 + [1] * 3)
    record = fit_conformal(probs, targets, ["poor", "good"], alpha=0.1)
    assert record["quantiles"]["good"] == 1.0
    assert prediction_sets(np.array([[0.99, 0.01]]), record, ["poor", "good"])[0, 1]


# ---------------------------------------------------------------------------------------------
# A trained model: its bundle, held-out images like its own, and foreign ones


@pytest.fixture(scope="module")
def trust_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model on 1200 synthetic images with half held out for validation (600
    calibration images: the limits and conformal quantiles are then well determined), its
    bundle, and 800 new synthetic images of other patients with labels."""
    from embryo_ml.data.synthetic import generate_dataset
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.train.fit import fit

    root = tmp_path_factory.mktemp("trust")
    manifest = generate_dataset(root / "synth", n=1200, size=64, seed=21)
    cfg = tiny_config(root / "mlflow.db", "data.image_size=64", "data.val_fraction=0.5",
                      "train.epochs=3", "train.batch_size=32", "train.lr=0.003",
                      "train.amp=off",  # the same model on every CPU (auto = bf16 with AMX)
                      gate_undecided=True)
    fit(cfg, manifest, root / "run", progress=False)
    export_bundle(root / "run", root / "bundle")
    held = generate_dataset(root / "held", n=800, size=64, seed=22)
    return {"root": root, "run_dir": root / "run", "bundle": root / "bundle", "held": held}


def _score(source: Path, bundle: Path, out: Path, capsys: pytest.CaptureFixture,
           *extra: str) -> tuple[pd.DataFrame, str, dict]:
    from embryo_ml.cli import main

    assert main(["-q", "score", str(source), "--bundle", str(bundle), "--out", str(out),
                 *extra]) == 0
    captured = capsys.readouterr()
    sidecar = json.loads(out.with_name(f"{out.stem}.scoring.json").read_text())
    table = pd.read_csv(out, keep_default_na=False)
    return table, captured.out + captured.err, sidecar


def _flagged(table: pd.DataFrame, flag: str) -> float:
    ok = table[table["status"] == "ok"]
    return float(ok["flags"].str.split(";").apply(lambda f: flag in f).mean())


def test_bundle_has_a_hash_checked_reference_per_model(trust_run: dict) -> None:
    import onnxruntime as ort

    bundle = read_bundle(trust_run["bundle"])
    ood = bundle.ood
    assert ood is not None and ood["method"] == "knn-cosine" and ood["k"] == 1
    assert ood["n_calibration"] >= 550 and ood["n_reference"] >= 550
    precisions = ["fp32"] + (["int8"] if bundle.int8 else [])
    assert sorted(ood["limits"]) == sorted(precisions)
    for precision in precisions:  # about alpha: 600 calibration images pin it down
        assert 0.005 <= ood["expected_rate"][precision] <= ood["alpha"]
        reference = FeatureReference.load(bundle.path, ood, precision)
        assert reference.vectors.shape == (ood["n_reference"], ood["feature_dim"])
        np.testing.assert_allclose(np.linalg.norm(reference.vectors, axis=1), 1, atol=1e-5)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "cam", "features"]
    assert bundle.val_metrics["parity_features_max_rel_diff"] <= 1e-3
    conformal = bundle.conformal
    assert conformal is not None and conformal["alpha"] == 0.1
    assert sum(conformal["n_calibration"].values()) == ood["n_calibration"]


def test_held_out_images_like_the_training_ones_are_rarely_flagged(
    trust_run: dict, capsys: pytest.CaptureFixture
) -> None:
    held = trust_run["held"]
    table, output, sidecar = _score(held, trust_run["bundle"], trust_run["root"] / "held.csv",
                                    capsys)
    assert _flagged(table, "out_of_distribution") <= 0.05
    assert "dataset shift" not in output
    assert sidecar["shift"]["shifted"] is False
    # Conformal: each class's true images are in their prediction sets ~90% of the time.
    labels = pd.read_csv(held)[["path", "label"]]
    bundle = read_bundle(trust_run["bundle"])
    merged = table.merge(labels, on="path", how="inner", suffixes=("", "_true"))
    assert len(merged) == 800
    probs = merged[[f"p_{c}" for c in bundle.classes]].to_numpy(float)
    sets = prediction_sets(probs, bundle.conformal, bundle.classes)
    for c, name in enumerate(bundle.classes):
        own = (merged["label"] == name).to_numpy()
        # ~300 calibration and 400 test images a class: one run's coverage varies by ~0.023
        # (binomial, both sets), so +-0.06 is ~2.6 SD (an AMD EPYC's model gave 0.868); a
        # broken quantile (coverage 0.5 or 1.0) still fails.
        assert abs(sets[own, c].mean() - 0.9) <= 0.06, (name, sets[own, c].mean())
    uncertain = (sets.sum(axis=1) != 1)
    np.testing.assert_array_equal(
        merged["flags"].str.split(";").apply(lambda f: "uncertain" in f).to_numpy(), uncertain)


@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_real_embryo_images_are_flagged_and_the_run_warns_of_shift(
    trust_run: dict, capsys: pytest.CaptureFixture, name: str
) -> None:
    folder, _ = REAL_SETS[name]
    source = SHARED_DATA / folder
    if not source.is_dir():
        pytest.skip(f"real samples not found at {source}")
    table, output, sidecar = _score(source, trust_run["bundle"],
                                    trust_run["root"] / f"{name}.csv", capsys)
    assert _flagged(table, "out_of_distribution") >= 0.9
    lines = [line for line in output.splitlines() if line.startswith("warning: dataset shift:")]
    assert len(lines) == 1, output
    assert sidecar["shift"]["shifted"] is True


def test_a_tampered_reference_is_refused(trust_run: dict, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(trust_run["bundle"], copy)
    reference = copy / "ood_reference.npz"
    with np.load(reference) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["fp32"] = arrays["fp32"][:5]  # a smaller reference flags far more: must not load
    with open(reference, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(BundleError, match="hash mismatch for ood_reference.npz"):
        read_bundle(copy)
    bundle = read_bundle(copy, verify=False)
    write_bundle_json(replace(bundle, ood={**bundle.ood, "file": "../elsewhere.npz"}), copy)
    with pytest.raises(BundleError, match="plain 'file' name"):
        read_bundle(copy)
