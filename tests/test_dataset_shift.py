"""The dataset-shift warning (`embryo_ml.score.shift`): the exact binomial test and its rule,
the expected rate a bundle implies, the record in the scoring sidecar, the one `warning:` line
of `embryo-ml score`, and the report's red banner and list of mostly flagged patients.

End to end, the session's tiny trained bundle is copied and its `out_of_distribution` limit in
bundle.json is moved below (or above) every image's energy (its identity recomputed, as
`tests.fake_bundle.rewrite_bundle_json` does), so that every image is flagged (or none is), on
real synthetic images.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.data.scores_file import settings_path
from embryo_ml.export.bundle import Bundle, read_bundle
from embryo_ml.report.html import SHIFT_BANNER, SHIFT_COHORT, write_report
from embryo_ml.score.scorer import score_images
from embryo_ml.score.shift import (
    binomial_tail,
    calibration_null,
    count_flagged,
    dataset_shift,
    expected_ood_rate,
    format_percent,
    mostly_flagged_cohorts,
    shift_p_limit,
    shift_record,
    shift_warning,
)
from tests.fake_bundle import make_fake_bundle, rewrite_bundle_json
from tests.test_report import _browser, _Page, _row, _write_scores

SHIFT_PREFIX = "warning: dataset shift:"
RED = np.array([0xB3, 0x26, 0x1E])


def _brute_tail(k: int, n: int, p: Fraction) -> float:
    """P(X >= k), X ~ Binomial(n, p), in exact rational arithmetic."""
    return float(sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1)))


# ------------------------------------------------------------------- the binomial test ----


@pytest.mark.parametrize("n", [1, 2, 6, 37, 450, 2000])
@pytest.mark.parametrize("p", ["1/1000", "1/100", "1/5", "1/2", "9/10"])
def test_binomial_tail_is_exact(n: int, p: str) -> None:
    rate = Fraction(p)
    for k in sorted({0, 1, 2, 3, n // 4, n // 2, n - 1, n, n + 1}):
        expected = _brute_tail(k, n, rate)
        assert binomial_tail(k, n, float(rate)) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_binomial_tail_edges_and_a_large_run() -> None:
    assert binomial_tail(0, 10, 0.01) == 1.0
    assert binomial_tail(11, 10, 0.01) == 0.0
    assert binomial_tail(1, 10, 0.0) == 0.0 and binomial_tail(10, 10, 1.0) == 1.0
    assert binomial_tail(3, 6, 0.01) == pytest.approx(_brute_tail(3, 6, Fraction(1, 100)))
    tail = binomial_tail(10_500, 1_000_000, 0.01)  # 5 standard deviations above the mean
    assert 1e-7 < tail < 1e-6


def test_not_shifted_at_the_expected_rate() -> None:
    record = dataset_shift(10, 1000, 0.01, 0.001)
    assert record == {"shifted": False, "n_scored": 1000, "n_flagged": 10, "share_flagged": 0.01,
                      "expected_share": 0.01, "p_value": pytest.approx(0.5427, abs=1e-4),
                      "p_limit": 0.001, "null": "binomial"}
    assert json.loads(json.dumps(record)) == record  # JSON-safe
    assert not dataset_shift(0, 0, 0.01, 0.001)["shifted"]  # nothing scored
    assert dataset_shift(0, 0, 0.01, 0.001)["p_value"] == 1.0


def test_shifted_at_ninety_percent() -> None:
    record = dataset_shift(412, 450, 0.01, 0.001)
    assert record["shifted"] and record["p_value"] < 1e-100
    assert record["share_flagged"] == pytest.approx(412 / 450)
    assert shift_warning(record) == (
        "dataset shift: 412 of 450 images (91.6%) look unlike the images this model was trained "
        "and validated on (expected about 1.0%); its validation figures do not apply to them: "
        "validate the model on this clinic's images before using its scores")
    assert shift_warning(dataset_shift(10, 1000, 0.01, 0.001)) is None
    assert shift_warning(None) is None


def test_the_excess_must_be_at_least_twice_the_expected_share() -> None:
    significant_but_small = dataset_shift(1500, 100_000, 0.01, 0.001)  # 1.5% for 1%: z ~ 16
    assert significant_but_small["p_value"] < 1e-20
    assert not significant_but_small["shifted"]
    assert dataset_shift(2000, 100_000, 0.01, 0.001)["shifted"]  # exactly twice


def test_at_least_three_images_must_be_flagged() -> None:
    two = dataset_shift(2, 2, 0.01, 0.001)
    assert two["p_value"] == pytest.approx(1e-4) and not two["shifted"]
    assert dataset_shift(3, 3, 0.01, 0.001)["shifted"]


def test_the_p_value_must_be_below_its_limit() -> None:
    record = dataset_shift(5, 40, 0.01, 0.001)  # 12.5% for 1%, but p ~ 6e-5
    assert record["shifted"]
    assert not dataset_shift(5, 40, 0.01, 1e-5)["shifted"]
    with pytest.raises(ValueError):
        dataset_shift(5, 4, 0.01, 0.001)
    with pytest.raises(ValueError):
        dataset_shift(1, 4, 0.0, 0.001)


def test_format_percent() -> None:
    assert [format_percent(x) for x in (0.0, 0.01, 412 / 450, 1.0, 0.0005)] == [
        "0.0%", "1.0%", "91.6%", "100.0%", "0.05%"]


# --------------------------------------------------------------- what a bundle expects ----


def _bundle(**fields: object) -> Bundle:
    return Bundle(architecture="x", classes=["good", "poor"], positive_class="good",
                  input_size=16, mean=[0.5] * 3, std=[0.5] * 3, sha256="0" * 64,
                  **fields)  # type: ignore[arg-type]


def test_expected_rate_and_p_limit_from_the_bundle() -> None:
    energy = {"blur_min": 1.0, "ood_energy_max": -2.5}
    ood = {"alpha": 0.01, "shift_p": 0.0001,
           "expected_rate": {"fp32": 0.012, "int8": 0.015}}
    assert expected_ood_rate(_bundle(ood=ood, quality=energy), "fp32") == 0.012
    assert expected_ood_rate(_bundle(ood=ood, quality=energy), "int8") == 0.015
    assert expected_ood_rate(_bundle(ood={"alpha": 0.02}), "int8") == 0.02  # nominal rate
    assert shift_p_limit(_bundle(ood=ood)) == 0.0001
    assert shift_p_limit(_bundle(ood={"alpha": 0.02})) == 0.001
    # older bundles: the energy limit is the 0.99 quantile of validation energies
    assert expected_ood_rate(_bundle(quality=energy), "fp32") == 0.01
    assert shift_p_limit(_bundle(quality=energy)) == 0.001
    # no out_of_distribution flag at all: no test
    assert expected_ood_rate(_bundle(), "fp32") is None
    assert expected_ood_rate(_bundle(quality={"blur_min": 1.0}), "fp32") is None
    assert expected_ood_rate(_bundle(quality={"blur_min": 1.0, "ood_energy_max": None}),
                             "fp32") is None
    record = shift_record(_bundle(), "fp32", [{"status": "ok", "flags": "out_of_distribution"}])
    assert record["available"] is False and record["shifted"] is False and record["reason"]


def test_counts_skip_rows_that_were_not_scored() -> None:
    rows = [{"status": "ok", "flags": "blurry;out_of_distribution", "patient_id": "P1"},
            {"status": "ok", "flags": ["out_of_distribution"], "patient_id": "P1"},
            {"status": "ok", "flags": "", "patient_id": "P1"},
            {"status": "unreadable: truncated", "flags": "out_of_distribution",
             "patient_id": "P2"},
            {"status": "ok", "flags": "out_of_distribution", "patient_id": "P2"},
            {"status": "ok", "flags": "out_of_distribution", "patient_id": ""},
            {"status": "ok", "flags": "out_of_distribution", "patient_id": ""},
            {"status": "ok", "flags": "out_of_distribution", "patient_id": "P3"},
            {"status": "ok", "flags": "blurry", "patient_id": "P3"},
            {"status": "ok", "flags": "blurry", "patient_id": "P3"},
            {"status": "ok", "flags": "out_of_distribution", "patient_id": "P4"},
            {"status": "ok", "flags": "out_of_distribution", "patient_id": "P4"}]
    assert count_flagged(rows) == (8, 11)
    # P1: 2 of 3 (listed); P2: 1 of 1 scored (too few); no patient id: no cohort;
    # P3: 1 of 3; P4: 2 of 2
    assert mostly_flagged_cohorts(rows) == [
        {"patient_id": "P1", "n_scored": 3, "n_flagged": 2, "share_flagged": 2 / 3},
        {"patient_id": "P4", "n_scored": 2, "n_flagged": 2, "share_flagged": 1.0}]


# ------------------------------------------------------------------------ end to end ----


def _bundle_copy(bundle_dir: Path, folder: Path, limit: float | None,
                 keep_ood: bool = True) -> Path:
    """The session bundle with its out_of_distribution limits (energy, and feature distance
    when it has a reference) set to `limit` (None: no energy limit) and no validation record
    (so no other warning or banner); `keep_ood=False`: as a bundle from before the feature
    reference, whose only signal is the energy."""
    copy = shutil.copytree(bundle_dir, folder)

    def change(meta: dict) -> None:
        assert meta["quality"] is not None, "the session bundle has quality thresholds"
        meta["quality"]["ood_energy_max"] = limit
        if not keep_ood:
            meta.pop("ood", None)
        elif meta.get("ood") and limit is not None:
            meta["ood"]["limits"] = {k: limit for k in meta["ood"].get("limits", {})}
        meta.pop("validation", None)

    return rewrite_bundle_json(copy, change)  # a hand edit, with its identity recomputed


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> dict:
    """Real synthetic images of three patients with at least 2 images each, and a manifest."""
    folder = tmp_path_factory.mktemp("shift-clinic")
    table = pd.read_csv(synth_data, dtype=str, keep_default_na=False)
    sizes = table.groupby("patient_id").size()
    patients = sorted(sizes[sizes >= 2].index)[:3]
    chosen = table[table["patient_id"].isin(patients)]
    rows = []
    for item in chosen.itertuples():
        name = Path(item.path).name
        shutil.copy(synth_data.parent / item.path, folder / name)
        rows.append({"path": name, "patient_id": item.patient_id, "embryo_id": item.embryo_id})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame(rows[:3]).to_csv(folder / "first.csv", index=False)
    return {"manifest": folder / "manifest.csv", "first": folder / "first.csv",
            "n": len(rows), "patients": patients}


@pytest.fixture(scope="module")
def flag_all(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    return _bundle_copy(bundle_dir, tmp_path_factory.mktemp("shift") / "all", -1e30)


def _shift_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(SHIFT_PREFIX)]


def _sidecar(out: Path) -> dict:
    return json.loads(settings_path(out).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory: pytest.TempPathFactory, flag_all: Path, clinic: dict) -> dict:
    """`embryo-ml score --report` of the clinic with every image flagged (stdout, stderr)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("shifted-run")
    out, report = root / "scores.csv", root / "report.html"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["-q", "score", str(clinic["manifest"]), "--bundle", str(flag_all),
                     "--out", str(out), "--report", str(report), "--no-heatmaps"])
    return {"code": code, "out": out, "report": report, "stdout": stdout.getvalue(),
            "stderr": stderr.getvalue()}


def test_score_warns_once_and_records_the_shift(shifted_run: dict, flag_all: Path,
                                                clinic: dict) -> None:
    n = clinic["n"]
    assert shifted_run["code"] == 0
    table = pd.read_csv(shifted_run["out"], dtype=str, keep_default_na=False)
    assert len(table) == n and (table["status"] == "ok").all()
    assert all("out_of_distribution" in f.split(";") for f in table["flags"])
    settings = _sidecar(shifted_run["out"])
    bundle = read_bundle(flag_all)
    expected = dataset_shift(n, n, expected_ood_rate(bundle, settings["model"]),
                             shift_p_limit(bundle), calibration_null(bundle, settings["model"]))
    assert settings["shift"] == {"available": True, **expected}
    assert settings["shift"]["null"].startswith("beta-binomial")
    assert settings["shift"]["shifted"] is True
    assert _shift_lines(shifted_run["stdout"]) == []
    lines = _shift_lines(shifted_run["stderr"])
    assert lines == [f"warning: {shift_warning(settings['shift'])}"]
    assert lines[0] == (
        f"warning: dataset shift: {n} of {n} images (100.0%) look unlike the images this model "
        f"was trained and validated on (expected about "
        f"{format_percent(expected['expected_share'])}); its validation figures do not apply "
        "to them: validate the model on this clinic's images before using its scores")
    assert shifted_run["stderr"].count("warning:") == 1


def test_report_opens_with_the_shift_banner_and_lists_the_patients(
    shifted_run: dict, clinic: dict
) -> None:
    page = _Page(shifted_run["report"].read_text(encoding="utf-8"))
    body = [(tag, attrs) for tag, attrs in page.elements if tag not in ("html", "head", "meta",
                                                                       "title", "style")]
    assert body[0][0] == "body" and body[1][1].get("id") == "shift-banner"  # first thing
    record = _sidecar(shifted_run["out"])["shift"]
    n = clinic["n"]
    assert page.ids["shift-banner"] == SHIFT_BANNER.format(
        n_flagged=n, n_scored=n, expected=format_percent(record["expected_share"]))
    assert page.ids["shift-banner"].startswith(
        f"These images do not look like the images the model was trained and validated on "
        f"({n} of {n} flagged, expected about")
    listed = [a["data-patient"] for tag, a in page.elements
              if tag == "li" and "data-patient" in a]
    assert listed == clinic["patients"]
    assert "shift-cohorts" in page.ids


def test_report_recomputes_the_record_without_a_current_sidecar(
    shifted_run: dict, flag_all: Path, clinic: dict, tmp_path: Path
) -> None:
    scores = tmp_path / "scores.csv"
    shutil.copy(shifted_run["out"], scores)  # no sidecar beside it
    page = _Page(write_report(scores, flag_all, tmp_path / "a.html", images=clinic["manifest"],
                              heatmaps=False).read_text(encoding="utf-8"))
    assert page.ids["shift-banner"].startswith("These images do not look like")
    # a sidecar that does not describe these rows (edited since) is not believed
    table = pd.read_csv(shifted_run["out"], dtype=str, keep_default_na=False)
    table.iloc[3:].to_csv(scores, index=False)
    stale = {**_sidecar(shifted_run["out"])}
    stale["shift"] = {**stale["shift"], "shifted": False}
    settings_path(scores).write_text(json.dumps(stale))
    text = write_report(scores, flag_all, tmp_path / "b.html", images=clinic["manifest"],
                        heatmaps=False).read_text(encoding="utf-8")
    m = clinic["n"] - 3
    assert f"({m} of {m} flagged, expected about" in _Page(text).ids["shift-banner"]


def test_resumed_rows_count_and_resume_still_checks_the_sidecar(
    flag_all: Path, clinic: dict, tmp_path: Path
) -> None:
    out = tmp_path / "scores.jsonl"
    first = score_images(clinic["first"], flag_all, out, progress=False)
    assert first.shift is not None and first.shift["n_scored"] == 3
    assert _sidecar(out)["shift"]["n_scored"] == 3
    summary = score_images(clinic["manifest"], flag_all, out, progress=False, resume=True)
    assert summary.n_resumed == 3 and summary.n_images == clinic["n"] - 3
    assert summary.shift == _sidecar(out)["shift"]
    assert summary.shift["n_scored"] == summary.shift["n_flagged"] == clinic["n"]
    from embryo_ml.errors import ConfigError

    with pytest.raises(ConfigError, match="--tta"):  # the sidecar's settings are still checked
        score_images(clinic["manifest"], flag_all, out, progress=False, resume=True, tta=True)


def test_nothing_flagged_no_warning(bundle_dir: Path, clinic: dict, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle_copy(bundle_dir, tmp_path / "none", 1e30)
    out, report = tmp_path / "scores.csv", tmp_path / "report.html"
    assert main(["-q", "score", str(clinic["manifest"]), "--bundle", str(bundle),
                 "--out", str(out), "--report", str(report), "--no-heatmaps"]) == 0
    captured = capsys.readouterr()
    assert _shift_lines(captured.out + captured.err) == []
    assert "warning:" not in captured.err
    record = _sidecar(out)["shift"]
    assert record["shifted"] is False and record["available"] is True
    assert record["n_flagged"] == 0 and record["n_scored"] == clinic["n"]
    text = report.read_text(encoding="utf-8")
    assert 'id="shift-banner"' not in text and 'id="shift-cohorts"' not in text
    assert "no sign of dataset shift" in text


def test_no_ood_flag_no_test(bundle_dir: Path, clinic: dict, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle_copy(bundle_dir, tmp_path / "no-ood", None, keep_ood=False)
    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(clinic["manifest"]), "--bundle", str(bundle),
                 "--out", str(out)]) == 0
    assert "warning:" not in capsys.readouterr().err
    record = _sidecar(out)["shift"]
    assert record["available"] is False and record["shifted"] is False


def test_an_older_bundle_tests_against_the_energy_rate(
    bundle_dir: Path, clinic: dict, tmp_path: Path
) -> None:
    bundle = _bundle_copy(bundle_dir, tmp_path / "energy", -1e30, keep_ood=False)
    summary = score_images(clinic["manifest"], bundle, tmp_path / "s.csv", progress=False)
    n = clinic["n"]
    assert summary.shift == {"available": True,
                             **dataset_shift(n, n, 0.01, 0.001)}  # 0.99 quantile, default p
    assert summary.shift["shifted"] is True


def test_report_lists_a_mostly_flagged_patient_of_a_run_that_is_not_shifted(
    tmp_path: Path
) -> None:
    bundle = make_fake_bundle(tmp_path / "bundle", np.array([[2.0, 0.0], [0.0, 1.0],
                                                             [0.0, 0.0]]))
    rewrite_bundle_json(bundle, lambda meta: meta.update(
        quality={"blur_min": 0.0, "ood_energy_max": 0.0}))
    rows = [_row(f"p{i}/a.png", f"P{i}", "E1", 0.5, 1) for i in range(2, 40)]
    rows += [_row("p1/a.png", "P1", "E1", 0.6, 1, "out_of_distribution"),
             _row("p1/b.png", "P1", "E2", 0.4, 2, "blurry;out_of_distribution"),
             _row("p1/c.png", "P1", "E3", 0.3, 3)]
    scores = _write_scores(tmp_path / "scores.csv", rows)
    page = _Page(write_report(scores, bundle, tmp_path / "r.html", heatmaps=False)
                 .read_text(encoding="utf-8"))
    assert "shift-banner" not in page.ids  # 2 of 41: too few to call the run shifted
    items = [a for tag, a in page.elements if tag == "li" and "data-patient" in a]
    assert [a["data-patient"] for a in items] == ["P1"]
    assert SHIFT_COHORT.format(patient="P1", n_flagged=2, n_scored=3, share="66.7%") in (
        page.ids["shift-cohorts"])


def test_shift_banner_is_red_in_headless_chromium(shifted_run: dict, tmp_path: Path) -> None:
    """The banner is painted red at the top of the first screen, not merely in the DOM."""
    from PIL import Image

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        pytest.skip("headless browser check: chromium is not installed (`make browser`)")
    url = shifted_run["report"].resolve().as_uri()
    page = _Page(_browser(binary, tmp_path / "profile", url, "--dump-dom"))
    assert page.ids["shift-banner"].startswith("These images do not look like")
    assert page.ids["shown-count"].startswith("Showing")  # the page's script ran
    shot = tmp_path / "top.png"
    _browser(binary, tmp_path / "profile", url, f"--screenshot={shot}",
             "--window-size=1000,700", "--hide-scrollbars")
    top = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)[:120]
    red = np.abs(top - RED).max(axis=2) <= 12
    assert red.mean() > 0.2, red.mean()


def test_beta_binomial_tail_matches_a_brute_force_sum_and_its_large_run_limit() -> None:
    from math import factorial

    from embryo_ml.score.shift import beta_binomial_tail

    def beta(x: int, y: int) -> Fraction:  # B(x, y) for integers, exactly
        return Fraction(factorial(x - 1) * factorial(y - 1), factorial(x + y - 1))

    a, b, m = 2, 99, 60
    exact = sum(comb(m, i) * beta(i + a, m - i + b) / beta(a, b) for i in range(5, m + 1))
    assert beta_binomial_tail(5, m, a, b) == pytest.approx(float(exact), rel=1e-9)
    assert beta_binomial_tail(0, m, a, b) == 1.0 and beta_binomial_tail(m + 1, m, a, b) == 0.0
    # Beyond the exact range: P(rate >= k / m) for a rate ~ Beta(1, 100) is (1 - k / m)^100.
    assert beta_binomial_tail(300_000, 10_000_000, 1, 100) == pytest.approx(0.97 ** 100,
                                                                            rel=1e-6)
    # Just below and above the switch the two forms agree to about 1 / sqrt(m).
    near = [beta_binomial_tail(600, m, 1, 100) for m in (20_000, 20_001)]
    assert near[0] == pytest.approx(near[1], rel=0.05)


def test_a_tight_limit_from_few_calibration_images_does_not_call_its_own_clinic_shifted() -> None:
    """100 calibration images give limit = their largest score: the false-alarm rate is
    Beta(1, 100), 3% or more one time in twenty. 30 of 1000 flagged is then no evidence of
    shift, though a binomial at the mean rate 1/101 would call it (p ~ 1e-7)."""
    assert dataset_shift(30, 1000, 1 / 101, 0.001)["shifted"] is True
    record = dataset_shift(30, 1000, 1 / 101, 0.001, calibration=(1, 100))
    assert record["shifted"] is False and record["p_value"] == pytest.approx(0.055, abs=0.005)
    assert record["null"] == "beta-binomial (a=1, b=100)"
    assert dataset_shift(300, 1000, 1 / 101, 0.001, calibration=(1, 100))["shifted"] is True
