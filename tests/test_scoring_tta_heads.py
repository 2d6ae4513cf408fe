"""Test-time augmentation, the display column and Gardner head columns of the scorer."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embryo_ml.cli import main
from embryo_ml.data.images import read_image
from embryo_ml.errors import BundleError
from embryo_ml.export.bundle import read_bundle
from embryo_ml.numeric import softmax
from embryo_ml.score.scorer import OnnxScorer, score_images
from tests.fake_bundle import features, make_fake_bundle, uniform_image


def _hand_dihedral(batch: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square, written out independently of the scorer."""
    views = []
    for image in (batch, np.flip(batch, axis=3)):
        for k in range(4):
            views.append(np.ascontiguousarray(np.rot90(image, k=k, axes=(2, 3))))
    return views


def test_tta_is_the_mean_of_logits_over_eight_views(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    files = sorted((synth_data.parent / "images").rglob("*.png"))[:6]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    bundle = read_bundle(bundle_dir)
    scorer = OnnxScorer(bundle, threads=1, tta=True)
    batch = np.stack([scorer.prepare(read_image(folder / f.name)) for f in files])
    session, name = scorer.session, bundle.input_name
    by_hand = np.mean([session.run(None, {name: view})[0].astype(np.float64)
                       for view in _hand_dihedral(batch)], axis=0)
    mean, plain = scorer.tta_logits(batch)
    np.testing.assert_allclose(mean, by_hand, rtol=0, atol=1e-6)
    np.testing.assert_allclose(plain, session.run(None, {name: batch})[0], rtol=0, atol=1e-6)
    assert not np.allclose(mean, plain, atol=1e-4)  # the views do differ for this model

    expected = softmax(by_hand, bundle.temperature)[:, bundle.positive_index]  # T after the mean
    out = tmp_path / "tta.csv"
    score_images(folder, bundle_dir, out, progress=False, tta=True)
    got = pd.read_csv(out).set_index("path").loc[[f.name for f in files], "score"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    score_images(folder, bundle_dir, tmp_path / "plain.csv", progress=False)
    plain_scores = pd.read_csv(tmp_path / "plain.csv").set_index("path")
    plain_scores = plain_scores.loc[[f.name for f in files], "score"].to_numpy()
    assert np.abs(plain_scores - got).max() > 1e-4  # --tta changed something


def test_tta_score_is_invariant_to_rotation_and_mirroring(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(sorted((synth_data.parent / "images").rglob("*.png"))[:4]):
        image = read_image(f)  # 64 px, the bundle's input size: no resampling in between
        assert image.shape[:2] == (64, 64)
        Image.fromarray(image).save(folder / f"{i}_orig.png")
        Image.fromarray(np.ascontiguousarray(np.rot90(image))).save(folder / f"{i}_rot90.png")
        Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(folder / f"{i}_mirror.png")
    out = tmp_path / "s.csv"
    assert main(["-q", "score", str(folder), "--bundle", str(bundle_dir), "--out", str(out),
                 "--tta", "--batch-size", "5"]) == 0
    scores = pd.read_csv(out).set_index("path")["score"]
    for i in range(4):
        assert abs(scores[f"{i}_rot90.png"] - scores[f"{i}_orig.png"]) <= 1e-5
        assert abs(scores[f"{i}_mirror.png"] - scores[f"{i}_orig.png"]) <= 1e-5


def test_display_score_column_follows_the_formula(
    bundle_dir: Path, synth_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.jsonl"
    score_images(synth_data, bundle_dir, out, progress=False)
    rows = pd.read_json(out, lines=True)
    assert list(rows.columns[:5]) == ["path", "status", "score", "display_score", "label_pred"]
    expected = np.clip(np.ceil(10 * rows["score"].to_numpy()), 1, 10).astype(int)
    assert rows["display_score"].tolist() == expected.tolist()
    assert rows["display_score"].between(1, 10).all()


# Gardner heads: logits = [good, poor | expansion 1..6 | icm A B C | te A B C], 14 columns.
HEADS = {"expansion": {"offset": 2, "classes": ["1", "2", "3", "4", "5", "6"]},
         "icm": {"offset": 8, "classes": ["A", "B", "C"]},
         "te": {"offset": 11, "classes": ["A", "B", "C"]}}


def _gardner_weights() -> tuple[np.ndarray, np.ndarray]:
    """Red drives the main score and expansion (red > 0: expansion 2, < 0: 4), green the ICM
    (> 0: A, < 0: C), the TE is B by its bias. Large head weights make heads outvote the main."""
    weights, bias = np.zeros((3, 14)), np.zeros(14)
    weights[0, 0:2] = [2.0, -2.0]
    weights[0, 2 + 1], weights[0, 2 + 3] = 5.0, -5.0
    weights[1, 8 + 0], weights[1, 8 + 2] = 5.0, -5.0
    bias[11 + 1] = 3.0
    return weights, bias


def test_gardner_head_columns(tmp_path: Path) -> None:
    weights, bias = _gardner_weights()
    bundle = make_fake_bundle(tmp_path / "bundle", weights, bias, heads=HEADS, temperature=2.0)
    colours = {"bright.png": (255, 255, 0), "dark.png": (0, 0, 0), "mid.png": (40, 230, 0)}
    for name, rgb in colours.items():
        uniform_image(tmp_path / "imgs" / name, rgb)
    out = tmp_path / "s.csv"
    assert main(["-q", "score", str(tmp_path / "imgs"), "--bundle", str(bundle),
                 "--out", str(out)]) == 0
    rows = pd.read_csv(out, keep_default_na=False, dtype=str).set_index("path")
    assert list(rows.columns) == ["status", "score", "display_score", "label_pred", "p_good",
                                  "p_poor", "expansion_pred", "icm_pred", "te_pred",
                                  "grade_pred", "flags", "embryo_id", "patient_id",
                                  "rank_in_cohort"]
    for name, rgb in colours.items():
        x = features(rgb)
        logits = x @ weights + bias
        main_p = np.exp(logits[:2] / 2.0) / np.exp(logits[:2] / 2.0).sum()  # only 2 columns, T=2
        assert float(rows.loc[name, "p_good"]) == pytest.approx(main_p[0], abs=2e-6)
        assert float(rows.loc[name, "p_poor"]) == pytest.approx(main_p[1], abs=2e-6)
    assert float(rows.loc["bright.png", "p_good"]) == pytest.approx(
        1 / (1 + math.exp(-2.0)), abs=2e-6)  # logits (2, -2) / T=2
    assert rows.loc["bright.png", ["expansion_pred", "icm_pred", "te_pred", "grade_pred"]
                    ].tolist() == ["2", "A", "B", "2"]  # expansion < 3: ICM/TE not graded
    assert rows.loc["dark.png", ["expansion_pred", "icm_pred", "te_pred", "grade_pred"]
                    ].tolist() == ["4", "C", "B", "4CB"]
    assert rows.loc["mid.png", ["expansion_pred", "icm_pred", "grade_pred"]
                    ].tolist() == ["4", "A", "4AB"]


def test_heads_other_than_gardner_get_no_grade(tmp_path: Path) -> None:
    weights = np.zeros((3, 5))
    weights[0] = [1.0, -1.0, 0.0, 1.0, -1.0]
    heads = {"fragmentation": {"offset": 2, "classes": ["low", "mid", "high"]}}
    bundle = make_fake_bundle(tmp_path / "bundle", weights, heads=heads)
    uniform_image(tmp_path / "imgs" / "a.png", (255, 0, 0))
    out = tmp_path / "s.csv"
    score_images(tmp_path / "imgs", bundle, out, progress=False)
    rows = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert "grade_pred" not in rows.columns
    assert rows.loc[0, "fragmentation_pred"] == "mid"


@pytest.mark.parametrize(("width", "heads", "declared"), [
    (14, {**HEADS, "te": {"offset": 12, "classes": ["A", "B", "C"]}}, None),  # 15 > 14
    (3, None, None),  # a third logit the bundle does not describe
    (14, HEADS, "W"),  # width only known at run time: checked per batch
])
def test_logit_width_must_match_the_bundle(
    tmp_path: Path, width: int, heads: dict | None, declared: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    weights = np.zeros((3, width))
    if declared:  # declare a symbolic width, and describe more heads than there are columns
        heads = {**HEADS, "extra": {"offset": 14, "classes": ["x"]}}
    bundle = make_fake_bundle(tmp_path / "bundle", weights, heads=heads,
                              declared_width=declared)
    uniform_image(tmp_path / "imgs" / "a.png", (1, 2, 3))
    with pytest.raises(BundleError, match="logits per image"):
        score_images(tmp_path / "imgs", bundle, tmp_path / "s.csv", progress=False)
    assert main(["-q", "score", str(tmp_path / "imgs"), "--bundle", str(bundle),
                 "--out", str(tmp_path / "s2.csv")]) == 2
    assert "logits per image" in capsys.readouterr().err
