"""The day check (`embryo_ml.evaluation.day_check`): a wrong day in the manifest is flagged
`day_mismatch`, a right one almost never; no check where the features do not tell the days
apart; a tampered record is refused; the flag reaches the scores file and the report."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.errors import BundleError
from embryo_ml.evaluation.day_check import FLAG, day_flags, day_scores, fit_day_check
from embryo_ml.export.bundle import read_bundle, write_bundle_json
from embryo_ml.report.html import write_report
from embryo_ml.report.texts import FLAG_TEXT
from embryo_ml.score.scorer import score_images
from tests.conftest import write_image

DAYS = ["3", "4", "5"]


def _features(n_per_day: int, separation: float, seed: int, dim: int = 24
              ) -> tuple[np.ndarray, list[str]]:
    """Gaussian features whose first coordinates move with the day (`separation` apart)."""
    rng = np.random.default_rng(seed)
    rows, days = [], []
    for i, day in enumerate(DAYS):
        centre = np.zeros(dim)
        centre[i] = separation
        rows.append(rng.normal(size=(n_per_day, dim)) + centre)
        days += [day] * n_per_day
    return np.vstack(rows), days


def _fit(separation: float, alpha: float = 0.05) -> tuple[dict | None, str]:
    train, train_days = _features(60, separation, seed=0)
    cal, cal_days = _features(30, separation, seed=1)
    return fit_day_check({"fp32": train}, train_days, {"fp32": cal}, cal_days, "day", alpha)


def test_a_wrong_day_is_flagged_and_a_right_one_rarely() -> None:
    record, note = _fit(separation=10.0)
    assert record is not None and "day check on 'day' (3, 4, 5)" in note
    assert record["classes"] == DAYS and record["models"]["fp32"]["caught_on_validation"] > 0.8
    test, days = _features(100, 10.0, seed=2)
    right = day_flags(record, "fp32", test, days)
    assert np.mean([FLAG in f for f in right]) <= 0.1  # about alpha = 0.05 on new images
    shifted = [DAYS[(DAYS.index(d) + 1) % 3] for d in days]
    wrong = day_flags(record, "fp32", test, shifted)
    assert np.mean([FLAG in f for f in wrong]) > 0.8
    # no day, or a day the check never saw: never flagged, no score
    assert day_flags(record, "fp32", test[:3], ["", "7", "day 5"]) == [[], [], []]
    assert np.isnan(day_scores(record, "fp32", test[:2], ["", "6"])).all()
    # a precision the record has no read-out for, or no features: no flags rather than a guess
    assert day_flags(record, "int8", test[:2], ["3", "5"]) == [[], []]
    assert day_flags(None, "fp32", test[:2], ["3", "5"]) == [[], []]
    assert day_flags(record, "fp32", None, ["3", "5"]) == [[], []]


def test_two_days_use_the_same_softmax_form() -> None:
    rng = np.random.default_rng(0)
    train = np.vstack([rng.normal(size=(40, 8)) + [10, 0, 0, 0, 0, 0, 0, 0],
                       rng.normal(size=(40, 8))])
    days = ["5"] * 40 + ["3"] * 40
    record, _ = fit_day_check({"fp32": train}, days, {"fp32": train}, days, "day", 0.05)
    assert record is not None and record["classes"] == ["3", "5"]
    assert np.asarray(record["models"]["fp32"]["coef"]).shape == (2, 8)
    flags = day_flags(record, "fp32", train, ["3"] * 40 + ["5"] * 40)  # every day swapped
    assert np.mean([FLAG in f for f in flags]) > 0.8
    assert not any(day_flags(record, "fp32", train, days))


def test_no_check_where_the_features_do_not_tell_the_days_apart() -> None:
    record, note = _fit(separation=0.0)
    assert record is None and "tell the values of 'day' apart too poorly" in note
    train, days = _features(60, 6.0, seed=0)
    one_day = ["5"] * len(days)
    record, note = fit_day_check({"fp32": train}, one_day, {"fp32": train}, one_day, "day", 0.05)
    assert record is None and "1 value(s) of 'day'" in note
    record, note = fit_day_check({"fp32": train}, days, {"fp32": train[:5]}, days[:5], "day",
                                 0.05)
    assert record is None and "5 validation images with a known 'day'" in note


def _with_day_check(bundle_dir: Path, folder: Path, change=None) -> Path:  # noqa: ANN001
    """A copy of the trained test bundle with a hand-made check: every image reads as day 5
    (p(day 3) = e^-10), so a day-3 entry is flagged and a day-5 one is not."""
    shutil.copytree(bundle_dir, folder)
    bundle = read_bundle(folder)
    width = int(bundle.ood["feature_dim"])
    model = {"mean": [0.0] * width, "scale": [1.0] * width, "coef": [[0.0] * width] * 2,
             "intercept": [0.0, 10.0], "limit": 5.0, "expected_rate": 0.01}
    record = {"column": "day", "classes": ["3", "5"], "alpha": 0.01,
              "models": {"fp32": model, "int8": dict(model)}}
    if change:
        change(record)
    prior = {"column": "day", "temperature": bundle.temperature,
             "offsets": {"3": -1.0, "5": 1.0}, "rates": {"3": 0.2, "5": 0.7},
             "n_calibration": {"3": 20, "5": 20}}  # the day the check reads is the prior's
    write_bundle_json(dataclasses.replace(bundle, prior=prior, day_check=record), folder)
    return folder


def test_score_flags_the_day_the_image_does_not_match_and_the_report_says_it(
    bundle_dir: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _with_day_check(bundle_dir, tmp_path / "bundle")
    images = pd.read_csv(synth_data)["path"].head(4)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, path in enumerate(images):
        shutil.copy(synth_data.parent / path, folder / f"e{i}.png")
    manifest = folder / "manifest.csv"
    pd.DataFrame({"path": [f"e{i}.png" for i in range(4)],
                  "day": ["3", "5", "", "4"]}).to_csv(manifest, index=False)
    out = tmp_path / "scores.csv"
    summary = score_images(manifest, bundle, out, progress=False)
    flags = pd.read_csv(out, keep_default_na=False).set_index("path")["flags"]
    assert [FLAG in flags[f"e{i}.png"] for i in range(4)] == [True, False, False, False]
    assert summary.day_warning is not None
    assert summary.day_warning.startswith("1 of 4 images do not look like the 'day'")
    # the command line says it in one warning line beside the results
    assert main(["-q", "score", str(manifest), "--bundle", str(bundle), "--out",
                 str(tmp_path / "cli.csv")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if FLAG in line]
    assert len(lines) == 1 and lines[0].startswith("warning: 1 of 4 images do not look like")
    page = write_report(out, bundle, tmp_path / "r.html").read_text(encoding="utf-8")
    assert FLAG_TEXT[FLAG].split(" — ")[0] in page


@pytest.mark.parametrize("change, message", [
    (lambda r: r["models"]["fp32"].update(coef=[[0.0] * 3] * 2), "arrays do not fit"),
    (lambda r: r["models"]["fp32"].update(limit=float("nan")), "'limit' must be a finite"),
    (lambda r: r["models"]["fp32"].update(scale=[0.0] * len(r["models"]["fp32"]["scale"])),
     "every scale > 0"),
    (lambda r: r.update(classes=["3"]), "two or more values"),
    (lambda r: r.pop("models"), "at least the 'fp32' read-out"),
    (lambda r: r.update(column="stage"), "the column of the day prior ('day')"),
])
def test_a_damaged_day_check_is_one_line(bundle_dir: Path, tmp_path: Path, change,  # noqa: ANN001
                                         message: str) -> None:
    folder = _with_day_check(bundle_dir, tmp_path / "bundle", change)
    with pytest.raises(BundleError, match="day_check") as error:
        read_bundle(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_export_fits_the_check_from_the_run_folder(tmp_path: Path) -> None:
    """`build_day_check` reads the day of each training and validation image from the run
    folder; images that cannot be read are left out with their day, not shifted onto
    another image's day."""
    from embryo_ml.export import trust

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        day = "3" if i % 2 else "5"
        colour = (200, 40, 40) if day == "5" else (40, 40, 200)
        noisy = np.clip(np.asarray(colour) + rng.normal(0, 20, (16, 16, 3)), 0, 255)
        rows.append((str(write_image(tmp_path / f"i{i}.png", noisy.astype(np.uint8))), day))
    rows.append((str(tmp_path / "missing.png"), "3"))
    train, val = rows[:40] + rows[-1:], rows[40:60]
    pd.DataFrame(train, columns=["path", "day"]).assign(label="good").to_csv(
        run / "train_images.csv", index=False)
    pd.DataFrame(val, columns=["path", "day"]).assign(label="good").to_csv(
        run / "val_predictions.csv", index=False)
    session = _MeanColour()
    shared = trust.ImageFeatures({"fp32": session}, 16, [0.5] * 3, [0.5] * 3, "image")
    paths, days = trust._column_values(run, "train_images.csv", "day")
    features, kept = shared.of(paths)
    assert kept == list(range(40)) and len(features["fp32"]) == 40  # the missing one left out
    red = features["fp32"][:, 0] > features["fp32"][:, 2]
    assert [days[i] == "5" for i in kept] == red.tolist()  # each day stayed with its image
    cal_paths, cal_days = trust._column_values(run, "val_predictions.csv", "day")
    cal, cal_kept = shared.of(cal_paths)
    record, _ = fit_day_check(features, [days[i] for i in kept], cal,
                              [cal_days[i] for i in cal_kept], "day", 0.05)
    assert record is not None and record["classes"] == ["3", "5"]
    runs = session.images
    again, _ = shared.of(paths[:10] + cal_paths[:5])  # already run: no new model runs
    assert session.images == runs == 60
    np.testing.assert_array_equal(again["fp32"][:10], features["fp32"][:10])


class _MeanColour:
    """An ONNX session stand-in whose `features` are the image's mean colour; counts the images
    it ran."""

    images = 0

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.images += len(feeds["image"])
        return [feeds["image"].mean(axis=(2, 3))]


def test_the_served_model_flags_a_wrong_day_too(bundle_dir: Path, synth_data: Path,
                                                tmp_path: Path) -> None:
    import base64

    from embryo_ml.score.session import OnnxScorer
    from embryo_ml.serving.pyfunc import predict_frame

    bundle = read_bundle(_with_day_check(bundle_dir, tmp_path / "bundle"))
    first = synth_data.parent / pd.read_csv(synth_data)["path"].iloc[0]
    encoded = base64.b64encode(first.read_bytes()).decode()
    frame = pd.DataFrame({"image_base64": [encoded] * 3, "day": ["3", "5", None]})
    flags = predict_frame(OnnxScorer(bundle), frame)["flags"].fillna("").tolist()
    assert [FLAG in f for f in flags] == [True, False, False]
