"""Per-embryo aggregation, ranks within a patient, --embryo-pattern and the 1-10 display scale.

Scores come from a hand-built linear ONNX model (tests/fake_bundle.py), so every expected
number and rank here is computed by hand, not by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.score.cohort import Cohorts, display_score
from tests.fake_bundle import features, make_fake_bundle, uniform_image


def _row(patient: str, embryo: str, score: float | None, path: str = "", flags: str = "",
         **extra: str) -> dict[str, str]:
    return {"path": path or f"{patient}/{embryo}/{score}", "patient_id": patient,
            "embryo_id": embryo, "status": "ok" if score is not None else "unreadable: x",
            "score": "" if score is None else f"{score:.6f}", "flags": flags, **extra}


ROWS = [
    _row("P1", "E1", 0.9, flags="blurry"),
    _row("P1", "E1", 0.1, flags="out_of_distribution;blurry"),
    _row("P1", "E2", 0.6, path="a"), _row("P1", "E2", 0.6, path="b"),
    _row("P1", "E3", 0.6),
    _row("P1", "E4", None),
    _row("P1", "", 0.55, path="loose.png"),
    _row("P2", "E1", 0.3), _row("P2", "E2", 0.3), _row("P2", "E3", 0.2),
    _row("P2", "E4", 0.1), _row("P2", "E4", 0.2),  # mean 0.15000000000000002 in floating point
    _row("P2", "E5", 0.15),
    _row("", "E9", 0.99),
]
# (patient, embryo) -> rank, worked out by hand. Ties share the best rank of their group.
RANKS_MEAN = {("P1", "E2"): 1, ("P1", "E3"): 1, ("P1", "loose.png"): 3, ("P1", "E1"): 4,
              ("P1", "E4"): None,
              ("P2", "E1"): 1, ("P2", "E2"): 1, ("P2", "E3"): 3, ("P2", "E4"): 4, ("P2", "E5"): 4,
              ("", "E9"): None}
RANKS_MAX = {("P1", "E1"): 1, ("P1", "E2"): 2, ("P1", "E3"): 2, ("P1", "loose.png"): 4,
             ("P1", "E4"): None,
             ("P2", "E1"): 1, ("P2", "E2"): 1, ("P2", "E3"): 3, ("P2", "E4"): 3, ("P2", "E5"): 5,
             ("", "E9"): None}


@pytest.mark.parametrize(("aggregate", "expected"), [("mean", RANKS_MEAN), ("max", RANKS_MAX)])
def test_cohort_ranks_by_hand(aggregate: str, expected: dict) -> None:
    cohorts = Cohorts(["good", "poor"], "good", threshold=0.5, aggregate=aggregate)
    for row in ROWS:
        cohorts.add(row)
    table = {(r["patient_id"], r["embryo_id"]): r for r in cohorts.rows()}
    assert set(table) == set(expected)
    got = {k: (int(r["rank_in_cohort"]) if r["rank_in_cohort"] else None)
           for k, r in table.items()}
    assert got == expected
    for row in ROWS:  # every image row carries its embryo's rank (a failed image too)
        key = (row["patient_id"], row["embryo_id"] or row["path"])
        assert cohorts.rank_of(row) == expected[key]
    e1 = table[("P1", "E1")]
    assert e1["embryo_score"] == ("0.500000" if aggregate == "mean" else "0.900000")
    assert e1["label_pred"] == "good"  # 0.5 >= threshold 0.5
    assert e1["flags"] == "blurry;out_of_distribution"  # union, in the usual flag order
    assert (e1["n_images"], e1["n_scored"]) == ("2", "2")
    e4 = table[("P1", "E4")]
    assert (e4["embryo_score"], e4["display_score"], e4["label_pred"]) == ("", "", "")
    assert (e4["n_images"], e4["n_scored"]) == ("1", "0")
    # patients in order, each patient's embryos best first, unranked after
    order = [(r["patient_id"], r["embryo_id"]) for r in cohorts.rows()]
    assert order[0] == ("P1", "E2" if aggregate == "mean" else "E1")
    assert order.index(("P1", "E4")) == 4 and order[-1] == ("", "E9")


def test_multiclass_embryo_label_is_the_argmax_of_aggregated_probabilities() -> None:
    cohorts = Cohorts(["a", "b", "c"], "a", aggregate="mean")
    cohorts.add(_row("P", "E", 0.2, path="1", p_a="0.2", p_b="0.7", p_c="0.1"))
    cohorts.add(_row("P", "E", 0.3, path="2", p_a="0.3", p_b="0.1", p_c="0.6"))
    assert cohorts.rows()[0]["label_pred"] == "b"  # means 0.25, 0.40, 0.35
    cohorts = Cohorts(["a", "b", "c"], "a", aggregate="max")
    cohorts.add(_row("P", "E", 0.2, path="1", p_a="0.2", p_b="0.7", p_c="0.1"))
    cohorts.add(_row("P", "E", 0.3, path="2", p_a="0.3", p_b="0.1", p_c="0.9"))
    assert cohorts.rows()[0]["label_pred"] == "c"  # maxima 0.3, 0.7, 0.9


@pytest.mark.parametrize(("p", "shown"), [
    (0.0, 1), (0.05, 1), (0.1, 1), (0.1000001, 2), (0.3, 3), (0.3000001, 4), (0.6, 6),
    (0.65, 7), (0.7, 7), (0.9999, 10), (1.0, 10),
])
def test_display_score_boundaries(p: float, shown: int) -> None:
    assert display_score(p) == shown


def test_display_score_rejects_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        display_score(math.nan)


def _p_good(rgb: tuple[int, int, int]) -> float:
    """The fake model's calibrated probability by hand: logits (2r, -2r), T = 1."""
    r = features(rgb)[0]
    return 1.0 / (1.0 + math.exp(-4.0 * r))


@pytest.fixture(scope="module")
def red_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = np.zeros((3, 2))
    weights[0] = [2.0, -2.0]  # score rises with the red channel
    return make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle", weights)


COLOURS = {  # path -> (patient, embryo, red level)
    "p1/e1_a.png": ("P1", "E1", 230), "p1/e1_b.png": ("P1", "E1", 20),
    "p1/e2_a.png": ("P1", "E2", 150), "p1/e2_b.png": ("P1", "E2", 150),
    "p1/e3.png": ("P1", "E3", 150),
    "p1/e4.png": ("P1", "E4", None),  # corrupt: no scorable image, no rank
    "p2/e1.png": ("P2", "E1", 60),
    "p2/loose.png": ("P2", "", 200),  # no embryo id: an embryo of its own
    "x.png": ("", "X", 255),  # no patient: no cohort, no rank
}
# By hand: p = sigmoid(4 r); E1 = (0.961, 0.033), E2 = E3 = 0.670; P2: loose 0.906 > E1 0.107.
EXPECTED = {
    "mean": {("P1", "E2"): 1, ("P1", "E3"): 1, ("P1", "E1"): 3, ("P1", "E4"): None,
             ("P2", "p2/loose.png"): 1, ("P2", "E1"): 2, ("", "X"): None},
    "max": {("P1", "E1"): 1, ("P1", "E2"): 2, ("P1", "E3"): 2, ("P1", "E4"): None,
            ("P2", "p2/loose.png"): 1, ("P2", "E1"): 2, ("", "X"): None},
}


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_score_cli_ranks_a_hand_made_manifest(
    red_bundle: Path, tmp_path: Path, aggregate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for path, (_, _, red) in COLOURS.items():
        if red is None:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            uniform_image(tmp_path / path, (red, 40, 90))
    pd.DataFrame([{"path": p, "patient_id": pt, "embryo_id": e} for p, (pt, e, _) in
                  COLOURS.items()]).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(tmp_path / "manifest.csv"), "--bundle", str(red_bundle),
                 "--out", str(out), "--aggregate", aggregate]) == 0
    assert f"7 embryo(s) -> {tmp_path / 'scores.embryos.csv'}" in capsys.readouterr().out
    images = pd.read_csv(out, keep_default_na=False, dtype=str).set_index("path")
    embryos = pd.read_csv(tmp_path / "scores.embryos.csv", keep_default_na=False, dtype=str)
    assert list(embryos.columns) == ["patient_id", "embryo_id", "embryo_score", "display_score",
                                     "label_pred", "n_images", "n_scored", "flags",
                                     "rank_in_cohort"]
    ranks = {(r.patient_id, r.embryo_id): int(r.rank_in_cohort) if r.rank_in_cohort else None
             for r in embryos.itertuples()}
    assert ranks == EXPECTED[aggregate]
    for path, (patient, embryo, red) in COLOURS.items():
        row = images.loc[path]
        expected_rank = EXPECTED[aggregate][(patient, embryo or path)]
        assert row["rank_in_cohort"] == ("" if expected_rank is None else str(expected_rank))
        if red is not None:
            p = _p_good((red, 40, 90))
            assert float(row["score"]) == pytest.approx(p, abs=2e-6)
            assert int(row["display_score"]) == min(10, max(1, math.ceil(10 * p)))
    e1 = embryos.set_index(["patient_id", "embryo_id"]).loc[("P1", "E1")]
    scores = [_p_good((230, 40, 90)), _p_good((20, 40, 90))]
    want = np.mean(scores) if aggregate == "mean" else max(scores)
    assert float(e1["embryo_score"]) == pytest.approx(want, abs=2e-6)
    assert e1["display_score"] == str(math.ceil(10 * want))
    assert (e1["n_images"], e1["n_scored"]) == ("2", "2")
    e4 = embryos.set_index(["patient_id", "embryo_id"]).loc[("P1", "E4")]
    assert (e4["n_images"], e4["n_scored"], e4["embryo_score"]) == ("1", "0", "")


def test_embryo_pattern_groups_a_folder(red_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "stork"
    for name, red in [("P7/33996213_-15.png", 200), ("P7/33996213_0.png", 100),
                      ("P7/44000001_0.png", 150), ("P8/55000002_15.png", 10),
                      ("notes/overview.png", 250)]:
        uniform_image(folder / name, (red, 0, 0))
    out = tmp_path / "s.csv"
    pattern = r"(?P<patient_id>P\d+)/(?P<embryo_id>\d+)_(?P<focal_plane>-?\d+)"
    assert main(["-q", "score", str(folder), "--bundle", str(red_bundle), "--out", str(out),
                 "--embryo-pattern", pattern, "--aggregate", "max"]) == 0
    images = pd.read_csv(out, keep_default_na=False, dtype=str).set_index("path")
    assert images.loc["P7/33996213_-15.png", "embryo_id"] == "33996213"
    assert images.loc["P7/33996213_-15.png", "patient_id"] == "P7"
    assert images.loc["notes/overview.png", ["embryo_id", "patient_id"]].tolist() == ["", ""]
    embryos = pd.read_csv(tmp_path / "s.embryos.csv", keep_default_na=False, dtype=str)
    table = embryos.set_index(["patient_id", "embryo_id"])
    assert len(embryos) == 4  # two focal planes of 33996213 make one embryo
    assert table.loc[("P7", "33996213"), "n_images"] == "2"
    # max of red 200 and 100 beats 150; the unmatched file stands alone, keyed by its path
    assert table.loc[("P7", "33996213"), "rank_in_cohort"] == "1"
    assert table.loc[("P7", "44000001"), "rank_in_cohort"] == "2"
    assert table.loc[("P8", "55000002"), "rank_in_cohort"] == "1"
    assert table.loc[("", "notes/overview.png"), "rank_in_cohort"] == ""
    assert images.loc["P7/33996213_0.png", "rank_in_cohort"] == "1"


@pytest.mark.parametrize(("pattern", "message"), [
    ("(?P<embryo_id>\\d+", "not a valid regular expression"),
    ("(?P<embryo>\\d+)_", "needs a named group embryo_id"),
])
def test_bad_embryo_pattern_is_one_line(
    red_bundle: Path, tmp_path: Path, pattern: str, message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uniform_image(tmp_path / "imgs" / "1_0.png", (10, 10, 10))
    out = tmp_path / "s.csv"
    assert main(["-q", "score", str(tmp_path / "imgs"), "--bundle", str(red_bundle),
                 "--out", str(out), "--embryo-pattern", pattern]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --embryo-pattern") and message in err[0]
    assert not out.exists()
