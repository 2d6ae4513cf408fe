"""The day prior (`embryo_ml.evaluation.prior`): per-day logit offsets beside the temperature,
fit when the day predicts the label, stored in the bundle and applied by `score` when the
manifest gives the day; images without a known day are scored from the image alone, and the run
says how many."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.errors import BundleError
from embryo_ml.evaluation.metrics import roc_auc
from embryo_ml.evaluation.prior import (
    MIN_PER_VALUE,
    apply_prior,
    fit_prior,
    independence_p,
    prior_value,
)
from embryo_ml.export.bundle import read_bundle, write_bundle_json
from embryo_ml.score.scorer import score_images
from tests.conftest import tiny_config
from tests.fake_bundle import features, make_fake_bundle, rewrite_bundle_json, uniform_image

OFFSETS = {"3": -1.5, "5": 1.0}


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


@pytest.mark.parametrize(("raw", "key"), [
    (5, "5"), (5.0, "5"), ("5", "5"), (" 5 ", "5"), ("5.0", "5"), (np.int64(3), "3"),
    (float("nan"), ""), (None, ""), ("", ""), ("NA", ""), ("D5", "D5"), (4.5, "4.5")])
def test_prior_value_normalises_what_a_manifest_holds(raw: object, key: str) -> None:
    assert prior_value(raw) == key


def test_offsets_match_each_days_rate_and_credit_what_the_model_already_knows() -> None:
    rng = np.random.default_rng(0)
    days = np.repeat(["3", "5"], 200)
    labelled_positive = np.where(days == "3", rng.random(400) < 0.1, rng.random(400) < 0.5)
    # validation: 40 images a day; a model that ignores the day, and one that leans to day 5
    val_days = np.repeat(["3", "5"], 40)
    blind = rng.normal(0.0, 1.0, 80)
    leaning = blind + np.where(val_days == "5", 1.5, -1.5)
    fits = {}
    for name, margin in (("blind", blind), ("leaning", leaning)):
        record, note = fit_prior(margin, val_days, days, labelled_positive, "day", 1.0)
        assert record is not None, note
        fits[name] = record
        for day in ("3", "5"):  # calibration in the large, per day
            mean_p = _sigmoid(margin[val_days == day] + record["offsets"][day]).mean()
            assert mean_p == pytest.approx(record["rates"][day], abs=1e-5)
            members = days == day
            assert record["rates"][day] == pytest.approx(
                (labelled_positive[members].sum() + 1) / (members.sum() + 2))
        assert "day prior on 'day'" in note
    assert fits["blind"]["offsets"]["3"] < 0 < fits["blind"]["offsets"]["5"]
    gap = {n: r["offsets"]["5"] - r["offsets"]["3"] for n, r in fits.items()}
    assert gap["leaning"] < gap["blind"] - 2.0  # the day the model already uses is not re-added


def test_no_prior_where_the_day_tells_nothing_or_cannot_be_fit() -> None:
    rng = np.random.default_rng(1)
    days = np.repeat(["3", "5"], 150)
    balanced = np.tile([True, False], 150)  # half good on each day
    margin, val_days = rng.normal(size=40), np.repeat(["3", "5"], 20)
    record, note = fit_prior(margin, val_days, days, balanced, "day", 1.0)
    assert record is None and "does not differ" in note
    assert independence_p(days, balanced, ["3", "5"]) == pytest.approx(1.0)
    skewed = np.where(days == "3", rng.random(300) < 0.1, rng.random(300) < 0.6)
    from scipy.stats import chi2_contingency

    table = [[(skewed & (days == d)).sum(), (~skewed & (days == d)).sum()] for d in ("3", "5")]
    g_test = chi2_contingency(table, correction=False, lambda_="log-likelihood")
    assert independence_p(days, skewed, ["3", "5"]) == pytest.approx(g_test.pvalue)
    assert g_test.pvalue < 1e-6
    one_day = np.array(["5"] * 40)
    record, note = fit_prior(margin, one_day, days, skewed, "day", 1.0)
    assert record is None and "need 2" in note
    # a day with too few validation images gets no offset; the others keep theirs
    thin = np.array(["3"] * 20 + ["5"] * 17 + ["4"] * (MIN_PER_VALUE - 2))
    record, _ = fit_prior(margin, thin, days, skewed, "day", 1.0)
    assert record is not None and set(record["offsets"]) == {"3", "5"}


def test_apply_prior_shifts_known_days_only_and_keeps_the_order_within_a_day() -> None:
    margin = np.array([2.0, -1.0, 0.5, 0.5, 3.0])
    values = ["3", "3", "5", "", "6"]
    prior = {"temperature": 2.0, "offsets": OFFSETS}
    free = np.stack([_sigmoid(margin / 2), 1 - _sigmoid(margin / 2)], axis=1)
    probs, used = apply_prior(free, margin, values, prior, positive_index=0)
    assert used.tolist() == [True, True, True, False, False]
    expected = _sigmoid(margin[:3] / 2 + np.array([-1.5, -1.5, 1.0]))
    np.testing.assert_allclose(probs[:3, 0], expected)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(probs[3:], free[3:])  # no known day: the day-free score
    assert probs[0, 0] > probs[1, 0]  # same day, same order as the margins


def test_the_day_prior_beats_the_day_and_the_image_alone_where_both_carry_signal() -> None:
    """A simulated clinic: the day sets the base rate (10% vs 50% good), the image ranks within
    a day (a noisy margin that knows nothing of the day)."""
    rng = np.random.default_rng(2)

    def clinic(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        day = rng.choice(["3", "5"], n)
        good = np.where(day == "3", rng.random(n) < 0.1, rng.random(n) < 0.5)
        margin = 1.2 * good + rng.normal(0.0, 1.0, n) - 0.6
        return day, good, margin

    labelled_days, labelled_good, _ = clinic(600)
    val_days, val_good, val_margin = clinic(150)
    record, note = fit_prior(val_margin, val_days, labelled_days, labelled_good, "day", 1.0)
    assert record is not None, note
    days, good, margin = clinic(4000)
    free = np.stack([1 - _sigmoid(margin), _sigmoid(margin)], axis=1)  # positive is index 1
    with_day = apply_prior(free, margin, list(days), record, positive_index=1)[0][:, 1]
    rate = {d: labelled_good[labelled_days == d].mean() for d in ("3", "5")}
    auc = {"image": roc_auc(good, margin)[0], "day": roc_auc(good, np.vectorize(rate.get)(days))[0],
           "both": roc_auc(good, with_day)[0]}
    assert auc["both"] > max(auc["image"], auc["day"]) + 0.02, auc


# ----------------------------------------------------------------- bundle and scoring ----


@pytest.fixture()
def prior_bundle(tmp_path: Path) -> Path:
    """The hand-computable fake model (logits from the mean colour) with a day prior."""
    folder = make_fake_bundle(tmp_path / "bundle", np.array([[1.0, 0.0], [0.0, 1.0],
                                                             [0.0, 0.0]]), temperature=2.0)
    bundle = read_bundle(folder)
    write_bundle_json(dataclasses.replace(bundle, prior={
        "column": "day", "temperature": 2.0, "offsets": OFFSETS, "rates": {"3": 0.1, "5": 0.5},
        "n_calibration": {"3": 20, "5": 20}}), folder)
    return folder


def _images(folder: Path) -> list[tuple[str, tuple[int, int, int]]]:
    colours = [(200, 40, 0), (60, 180, 0), (128, 128, 0), (250, 10, 0), (90, 90, 0)]
    return [(uniform_image(folder / f"e{i}.png", rgb).name, rgb) for i, rgb in enumerate(colours)]


def test_score_applies_the_prior_from_the_manifest_and_says_what_it_could_not(
    prior_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "images")
    days = ["3", "5", "", "6", "5.0"]
    manifest = tmp_path / "images" / "manifest.csv"
    pd.DataFrame({"path": [n for n, _ in images], "day": days}).to_csv(manifest, index=False)
    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(manifest), "--bundle", str(prior_bundle), "--out",
                 str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == ["warning: 2 of 5 images have no 'day' this model is calibrated for ('6', "
                   "blank; it knows 3, 5): their scores come from the image alone; check the "
                   "days in the manifest or the file names"]
    scores = pd.read_csv(out)
    for (name, rgb), day, score in zip(images, days, scores["score"], strict=True):
        r, g, _ = features(rgb)
        key = prior_value(day)
        expected = _sigmoid((r - g) / 2.0 + OFFSETS.get(key, 0.0))
        assert score == pytest.approx(float(expected), abs=2e-6), (name, day)

    # a folder gives no day: every image from the image alone, said once
    folder_out = tmp_path / "folder.csv"
    score_images(tmp_path / "images", prior_bundle, folder_out, progress=False)
    assert main(["-q", "score", str(tmp_path / "images"), "--bundle", str(prior_bundle),
                 "--out", str(tmp_path / "again.csv")]) == 0
    err = capsys.readouterr().err
    assert "no 'day' for any of the 5 images (a folder, or a manifest without the column)" in err
    alone = pd.read_csv(folder_out).set_index("path")["score"]
    for name, rgb in images:
        r, g, _ = features(rgb)
        assert alone[name] == pytest.approx(float(_sigmoid((r - g) / 2.0)), abs=2e-6)

    from embryo_ml.report.html import write_report

    html = write_report(out, prior_bundle, tmp_path / "report.html", images=tmp_path / "images",
                        heatmaps=False).read_text()
    assert "Day prior" in html and "day 3: -1.50, day 5: +1.00" in html
    assert 'id="prior-banner"' in html  # the embryologist reads it too, not only the terminal
    assert "Scored without the day: 2 of 5 images have no &#x27;day&#x27;" in html
    settings = json.loads((tmp_path / "scores.scoring.json").read_text())
    assert settings["prior_warning"].startswith("2 of 5 images")
    complete = tmp_path / "complete.csv"
    pd.DataFrame({"path": [n for n, _ in images], "day": ["3", "5", "3", "5", "5"]}).to_csv(
        complete, index=False)
    shutil.copy(complete, tmp_path / "images" / "complete.csv")
    summary = score_images(tmp_path / "images" / "complete.csv", prior_bundle,
                           tmp_path / "complete-scores.csv", progress=False)
    assert summary.prior_warning is None
    html = write_report(summary.out, prior_bundle, tmp_path / "complete.html",
                        images=tmp_path / "images", heatmaps=False).read_text()
    assert 'id="prior-banner"' not in html


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p["offsets"].update({"5": "high"}), "'prior' 'offsets' must map"),
    (lambda p: p.update(temperature=0), "'prior' 'temperature' must be a finite number > 0"),
    (lambda p: p.update(column=""), "'prior' 'column' must be a column name"),
    (lambda p: p.update(offsets={}), "'prior' 'offsets' must map"),
])
def test_a_malformed_prior_is_refused_in_one_line(prior_bundle: Path, change, message: str
                                                  ) -> None:
    rewrite_bundle_json(prior_bundle, lambda data: change(data["prior"]))
    with pytest.raises(BundleError, match=message) as error:
        read_bundle(prior_bundle)
    assert "\n" not in str(error.value)


def test_a_prior_on_three_classes_is_refused(tmp_path: Path) -> None:
    folder = make_fake_bundle(tmp_path / "b3", np.eye(3), classes=["good", "fair", "poor"])
    rewrite_bundle_json(folder, lambda data: data.update(prior={
        "column": "day", "temperature": 1.0, "offsets": OFFSETS}))
    with pytest.raises(BundleError, match="'prior' needs two classes"):
        read_bundle(folder)


# ------------------------------------------------------------------ a real tiny run ----


def _skewed_manifest(synth_data: Path, out: Path) -> Path:
    """The synthetic set less most good day-3 images: the day now predicts the label."""
    table = pd.read_csv(synth_data)
    table["path"] = [str((synth_data.parent / p).resolve()) for p in table["path"]]
    good3 = table.index[(table["label"] == "good") & (table["day"] == 3)]
    table = table.drop(good3[len(good3) // 6:]).reset_index(drop=True)
    table.to_csv(out, index=False)
    return out


def test_a_run_where_the_day_predicts_the_label_carries_its_prior_to_the_scores(
    synth_data: Path, tmp_path: Path, trained_run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.train.fit import fit, print_verdict

    # the shared synthetic run: the good share is the same on both days, so no prior
    balanced = json.loads((trained_run["run_dir"] / "metrics.json").read_text())
    assert balanced["prior"] is None

    manifest = _skewed_manifest(synth_data, tmp_path / "skewed.csv")
    settings = ["data.image_size=64", "train.epochs=2", "train.batch_size=16", "train.lr=0.003"]
    cfg = tiny_config(tmp_path / "mlflow.db", *settings, gate_undecided=True)
    result = fit(cfg, manifest, tmp_path / "run", progress=False)
    prior = result.metrics["prior"]
    assert prior is not None and prior["column"] == "day"
    assert prior["rates"]["3"] < 0.2 < prior["rates"]["5"]
    assert prior["offsets"]["3"] < prior["offsets"]["5"]
    assert math.isfinite(prior["val_auc_with_prior"])
    print_verdict(result.metrics)
    assert "day prior: scores of images whose manifest gives the 'day' use it" in (
        capsys.readouterr().out)

    bundle_dir = export_bundle(tmp_path / "run", tmp_path / "bundle").path
    bundle = read_bundle(bundle_dir)
    assert bundle.prior is not None and bundle.prior["offsets"] == prior["offsets"]
    assert "Day prior on `day`: logit offsets" in (bundle_dir / "MODEL_CARD.md").read_text()
    # the run folder lists each validation image's day: export fits the day check on it
    # (tests/test_day_check.py); the card says which way it went
    assert "day" in pd.read_csv(tmp_path / "run" / "val_predictions.csv").columns
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    if bundle.day_check is None:
        assert "No day check: a wrong day in a manifest moves the score" in card
    else:
        assert "Day check ('day_mismatch' flag)" in card and bundle.day_check["column"] == "day"
    with_day = score_images(manifest, bundle_dir, tmp_path / "with.csv", progress=False)
    assert with_day.prior_warning is None
    without = pd.read_csv(manifest).drop(columns="day")
    without.to_csv(tmp_path / "no-day.csv", index=False)
    alone = score_images(tmp_path / "no-day.csv", bundle_dir, tmp_path / "alone.csv",
                         progress=False)
    assert alone.prior_warning is not None and "no 'day' for any of" in alone.prior_warning
    a = pd.read_csv(tmp_path / "with.csv")["score"].to_numpy()
    b = pd.read_csv(tmp_path / "alone.csv")["score"].to_numpy()
    day = pd.read_csv(manifest)["day"].astype(str).to_numpy()
    logit = np.log(a / (1 - a)) - np.log(b / (1 - b))  # the offset, image by image
    for value, offset in prior["offsets"].items():
        np.testing.assert_allclose(logit[day == value], offset, atol=1e-3)

    # switched off in the config: the run has no prior
    off = tiny_config(tmp_path / "mlflow.db", *settings, "calibration.prior_column=null",
                      gate_undecided=True)
    assert fit(off, manifest, tmp_path / "run-off", progress=False).metrics["prior"] is None


def test_the_served_model_reads_the_day_column_too(prior_bundle: Path, tmp_path: Path) -> None:
    import base64

    from embryo_ml.score.session import OnnxScorer
    from embryo_ml.serving.pyfunc import model_signature, predict_frame

    bundle = read_bundle(prior_bundle)
    assert "day" in model_signature(bundle).inputs.input_names()
    rgb = (200, 40, 0)
    encoded = base64.b64encode(uniform_image(tmp_path / "one.png", rgb).read_bytes()).decode()
    frame = pd.DataFrame({"image_base64": [encoded] * 3, "day": ["3", "5", None]})
    scores = predict_frame(OnnxScorer(bundle), frame)["score"].tolist()
    r, g, _ = features(rgb)
    expected = [_sigmoid((r - g) / 2.0 + b) for b in (OFFSETS["3"], OFFSETS["5"], 0.0)]
    assert scores == pytest.approx([float(e) for e in expected], abs=2e-6)


def test_extreme_margins_still_get_a_finite_offset() -> None:
    """A model that is sure of everything (margins of +-1000) must not break the fit."""
    days = np.repeat(["3", "5"], 100)
    positive = np.where(days == "3", np.arange(200) % 10 == 0, np.arange(200) % 2 == 0)
    margin = np.tile([1000.0, -1000.0, 50.0, -50.0, 0.0], 8)
    record, note = fit_prior(margin, np.repeat(["3", "5"], 20), days, positive, "day", 1.0)
    assert record is not None, note
    assert all(math.isfinite(b) for b in record["offsets"].values())
    probs, used = apply_prior(np.full((40, 2), 0.5), margin, list(np.repeat(["3", "5"], 20)),
                              record, positive_index=1)
    assert used.all() and np.isfinite(probs).all()


def test_the_embryo_pattern_can_give_the_day_from_the_file_name(
    prior_bundle: Path, tmp_path: Path
) -> None:
    rgb = (200, 40, 0)
    for name in ("P1_E1_D3.png", "P1_E2_D5.png", "P1_E3_D6.png", "notes.png"):
        uniform_image(tmp_path / "images" / name, rgb)
    summary = score_images(tmp_path / "images", prior_bundle, tmp_path / "s.csv", progress=False,
                           embryo_pattern=r"(?P<embryo_id>P\d+_E\d+)_D(?P<day>\d)")
    scores = pd.read_csv(tmp_path / "s.csv").set_index("path")["score"]
    r, g, _ = features(rgb)
    for name, offset in (("P1_E1_D3.png", OFFSETS["3"]), ("P1_E2_D5.png", OFFSETS["5"]),
                         ("P1_E3_D6.png", 0.0), ("notes.png", 0.0)):
        assert scores[name] == pytest.approx(float(_sigmoid((r - g) / 2.0 + offset)), abs=2e-6)
    assert summary.prior_warning == (
        "2 of 4 images have no 'day' this model is calibrated for ('6', blank; it knows 3, 5): "
        "their scores come from the image alone; check the days in the manifest or the file "
        "names")
