"""Downstream of the model-quality gate (`validation` in a run's metrics.json): export refuses a
failed run unless asked, the bundle carries the verdict, a failed model is never registered,
`score` warns in one line, and the report puts a banner above everything.

The runs are copies of the session's tiny trained run with `validation` patched into their
metrics.json; the bundles are exported from them for real (ONNX, parity-checked) and score real
synthetic images.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.errors import BundleError, ValidationFailedError
from embryo_ml.export.bundle import read_bundle
from embryo_ml.report.html import VALIDATION_BANNER, write_report
from embryo_ml.score.scorer import score_images
from tests.fake_bundle import make_fake_bundle, rewrite_bundle_json
from tests.test_report import _browser, _Page

FAILED_REASON = "validation ROC AUC 0.52 (95% CI 0.41-0.63) does not beat chance by the margin"
INCONCLUSIVE_REASON = "too few validation patients (6) to tell the model from chance"
CHECK = {"name": "auc_vs_chance", "value": 0.52, "ci": [0.41, 0.63], "passed": False}


def _validation(verdict: str, reason: str) -> dict[str, Any]:
    passed = {"passed": True, "failed": False, "inconclusive": None}[verdict]
    return {"verdict": verdict, "passed": passed, "reason": reason + ".",
            "checks": [{**CHECK, "passed": passed}]}


FAILED = _validation("failed", FAILED_REASON)
INCONCLUSIVE = _validation("inconclusive", INCONCLUSIVE_REASON)
PASSED = _validation("passed", "validation ROC AUC 0.91 beats chance and the shortcut baselines")


def _run_copy(trained_run: dict, folder: Path, validation: dict[str, Any] | None) -> Path:
    """A copy of the session's run whose metrics.json says `validation` (None: no such key, as
    a run trained before the gate)."""
    run = shutil.copytree(trained_run["run_dir"], folder, ignore=shutil.ignore_patterns("bundle"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("validation", None)
    if validation is not None:
        metrics["validation"] = validation
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """`embryo-ml ARGV`: exit status, stdout, stderr (for module-scoped fixtures, which have no
    capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _lines(text: str) -> list[str]:
    return text.strip().splitlines()


def _set_validation(bundle: Path, validation: object, drop: bool = False) -> None:
    def change(meta: dict[str, Any]) -> None:
        if drop:
            meta.pop("validation", None)
        else:
            meta["validation"] = validation

    rewrite_bundle_json(bundle, change)  # a malformed record too, with a valid identity


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, trained_run: dict) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate-runs")
    return {"failed": _run_copy(trained_run, root / "failed", FAILED),
            "inconclusive": _run_copy(trained_run, root / "inconclusive", INCONCLUSIVE),
            "none": _run_copy(trained_run, root / "none", None)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, runs: dict[str, Path]) -> dict:
    """`embryo-ml export` of each run that exports: the failed one with the override."""
    root = tmp_path_factory.mktemp("gate-bundles")
    done = {}
    for name, extra in (("failed", ["--allow-failed-validation"]), ("inconclusive", []),
                        ("none", [])):
        out = root / name
        code, stdout, stderr = _cli(["-q", "export", str(runs[name]), "--out", str(out),
                                     "--no-int8", *extra])
        done[name] = SimpleNamespace(code=code, out=stdout, err=stderr, bundle=out)
    return done


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> Path:
    """Six real synthetic embryo images in a folder."""
    folder = tmp_path_factory.mktemp("gate-images")
    table = pd.read_csv(synth_data, dtype=str, keep_default_na=False)
    for item in table.head(6).itertuples():
        shutil.copy(synth_data.parent / item.path, folder / Path(item.path).name)
    return folder


# ------------------------------------------------------------------------ bundle format ----


def test_read_bundle_checks_the_validation_record(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path / "b", np.eye(3, 2, dtype=np.float32))
    assert read_bundle(bundle).validation is None  # written without a gate
    _set_validation(bundle, None, drop=True)  # as bundles from before the field existed
    assert read_bundle(bundle).validation is None and read_bundle(bundle).verdict is None
    _set_validation(bundle, FAILED)
    assert read_bundle(bundle).verdict == "failed"
    bad = [
        {**FAILED, "verdict": "maybe"},
        {**FAILED, "verdict": None},
        {**FAILED, "passed": True},  # contradicts the verdict
        {k: v for k, v in FAILED.items() if k != "reason"},
        {**FAILED, "checks": [{"value": 0.5}]},
        {**FAILED, "checks": [{**CHECK, "ci": [0.1]}]},
        {**FAILED, "exported_despite_failure": "yes"},
        "failed",
    ]
    for record in bad:
        _set_validation(bundle, record)
        with pytest.raises(BundleError, match="'validation'"):
            read_bundle(bundle)


# ------------------------------------------------------------------------------- export ----


def test_export_refuses_a_failed_run_before_touching_anything(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = make_fake_bundle(tmp_path / "bundle", np.eye(3, 2, dtype=np.float32))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    import embryo_ml.export.onnx_export as onnx_export

    def no_onnx_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for a refused export")

    monkeypatch.setattr(onnx_export, "load_run_model", no_onnx_work)
    assert main(["-q", "export", str(runs["failed"]), "--out", str(old)]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert FAILED_REASON in err[0] and "--allow-failed-validation" in err[0]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # old bundle untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left
    with pytest.raises(ValidationFailedError):  # the library refuses too
        onnx_export.export_bundle(runs["failed"], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_allow_failed_validation_exports_and_records_it(exported: dict) -> None:
    done = exported["failed"]
    assert done.code == 0, done.err
    err = _lines(done.err)
    assert len(err) == 1 and err[0].startswith("warning: EXPORTED A MODEL THAT FAILED"), err
    assert FAILED_REASON in err[0]
    meta = json.loads((done.bundle / "bundle.json").read_text())
    assert meta["validation"]["verdict"] == "failed"
    assert meta["validation"]["exported_despite_failure"] is True
    assert meta["validation"]["checks"] == [CHECK]
    assert read_bundle(done.bundle).verdict == "failed"  # verified like any bundle


def test_inconclusive_and_ungated_runs_export_with_one_warning(exported: dict) -> None:
    inconclusive, none = exported["inconclusive"], exported["none"]
    assert inconclusive.code == 0 and none.code == 0, (inconclusive.err, none.err)
    err = _lines(inconclusive.err)
    assert len(err) == 1 and err[0].startswith("warning: ") and "inconclusive" in err[0], err
    assert INCONCLUSIVE_REASON in err[0]
    validation = read_bundle(inconclusive.bundle).validation
    assert validation == INCONCLUSIVE  # as the run said it, nothing added
    err = _lines(none.err)
    assert len(err) == 1 and err[0].startswith("warning: ") and "no validation verdict" in err[0]
    assert read_bundle(none.bundle).validation is None
    assert json.loads((none.bundle / "bundle.json").read_text())["validation"] is None


# ----------------------------------------------------------------------------- register ----


def test_export_register_refuses_a_failed_run(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "mlflow.db"
    for extra in ([], ["--allow-failed-validation"]):
        code = main(["-q", "export", str(runs["failed"]), "--out", str(tmp_path / "b"),
                     "--register", "embryo-gate", "--tracking-uri", f"sqlite:///{store}",
                     *extra])
        err = _lines(capsys.readouterr().err)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert "never registered" in err[0] and FAILED_REASON in err[0]
    assert not (tmp_path / "b").exists() and not store.exists()  # nothing exported or logged


def test_train_register_refuses_a_failed_run_and_keeps_it(
    runs: dict[str, Path], trained_run: dict, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`train --register`: the training itself is the session's run (copied, patched failed)."""
    import embryo_ml.train.fit as fit_module

    run = shutil.copytree(runs["failed"], tmp_path / "run")
    files = sorted(p.name for p in run.iterdir())
    real = trained_run["result"]
    store = tmp_path / "mlflow.db"
    result = SimpleNamespace(metrics=real.metrics, run_dir=run, run_id=real.run_id,
                             tracking_uri=f"sqlite:///{store}")
    monkeypatch.setattr(fit_module, "fit", lambda *args, **kwargs: result)
    code = main(["-q", "train", "--out", str(run), "--register", "embryo-gate"])
    captured = capsys.readouterr()
    err = _lines(captured.err)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "never registered" in err[0] and "run folder is kept" in err[0]
    assert f"run folder: {run}" in captured.out  # training was reported before the refusal
    assert sorted(p.name for p in run.iterdir()) == files  # no bundle, nothing removed
    assert not store.exists()


def test_log_bundle_model_refuses_to_register_a_failed_bundle(
    exported: dict, tmp_path: Path
) -> None:
    from embryo_ml.serving.pyfunc import log_bundle_model

    store = tmp_path / "mlflow.db"
    with pytest.raises(ValidationFailedError, match="never registered"):
        log_bundle_model(exported["failed"].bundle, registered_name="embryo-gate",
                         tracking_uri=f"sqlite:///{store}")
    assert not store.exists()  # refused before the store was opened


# -------------------------------------------------------------------------------- score ----


def test_score_warns_in_one_line_and_still_scores(
    exported: dict, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(images), "--bundle", str(exported["failed"].bundle),
                 "--out", str(out)]) == 0
    err = _lines(capsys.readouterr().err)
    assert err == [f"warning: this model FAILED its validation check ({FAILED_REASON}); its "
                   "scores are not trustworthy"]
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(table) == 6 and (table["status"] == "ok").all()
    settings = json.loads((tmp_path / "scores.scoring.json").read_text())
    assert settings["validation"] == "failed"

    assert main(["-q", "score", str(images), "--bundle", str(exported["inconclusive"].bundle),
                 "--out", str(tmp_path / "s2.csv")]) == 0
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "inconclusive" in err[0] and INCONCLUSIVE_REASON in err[0], err
    assert "FAILED" not in err[0]

    assert main(["-q", "score", str(images), "--bundle", str(exported["none"].bundle),
                 "--out", str(tmp_path / "s3.csv")]) == 0
    assert capsys.readouterr().err == ""  # a bundle from before the gate: no warning


# ------------------------------------------------------------------------------- report ----


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, exported: dict, images: Path) -> dict:
    """A report of real scores for each verdict; `passed` is the inconclusive bundle with its
    record rewritten (and its identity recomputed: `rewrite_bundle_json`)."""
    root = tmp_path_factory.mktemp("gate-reports")
    passed = shutil.copytree(exported["inconclusive"].bundle, root / "passed-bundle")
    _set_validation(passed, PASSED)
    bundles = {"failed": exported["failed"].bundle,
               "inconclusive": exported["inconclusive"].bundle,
               "passed": passed, "none": exported["none"].bundle}
    out = {}
    for name, bundle in bundles.items():
        scores = score_images(images, bundle, root / f"{name}.csv", progress=False)
        out[name] = write_report(scores.out, bundle, root / f"{name}.html", images=images,
                                 heatmaps=False)
    return out


def test_report_banner_for_failed_and_inconclusive_only(reports: dict) -> None:
    failed = reports["failed"].read_text(encoding="utf-8")
    page = _Page(failed)
    body = [(tag, attrs) for tag, attrs in page.elements if tag not in ("html", "head", "meta",
                                                                       "title", "style")]
    assert body[0][0] == "body" and body[1][1].get("id") == "validation-banner"  # first thing
    assert body[1][1]["class"] == "validation-banner failed"
    banner = page.ids["validation-banner"]
    assert banner == (f"This model did not pass its validation check: {FAILED_REASON}. Do not "
                      "use these scores to choose embryos.")
    assert page.facts["Validation check"] == f"failed: {FAILED_REASON}"

    page = _Page(reports["inconclusive"].read_text(encoding="utf-8"))
    assert page.ids["validation-banner"] == VALIDATION_BANNER["inconclusive"].format(
        reason=INCONCLUSIVE_REASON)
    assert any(a.get("class") == "validation-banner inconclusive" for _, a in page.elements)

    for name in ("passed", "none"):
        text = reports[name].read_text(encoding="utf-8")
        assert 'id="validation-banner"' not in text, name
    assert _Page(reports["none"].read_text(encoding="utf-8")).facts[
        "Validation check"].startswith("not recorded")


def test_report_command_warns_like_score(
    reports: dict, exported: dict, images: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scores = reports["failed"].with_suffix(".csv")
    assert main(["-q", "report", str(scores), "--bundle", str(exported["failed"].bundle),
                 "--out", str(tmp_path / "r.html"), "--images", str(images),
                 "--no-heatmaps"]) == 0
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("warning: this model FAILED"), err


def test_explain_warns_like_score(
    exported: dict, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = sorted(images.iterdir())[0]
    out = tmp_path / "overlay.png"
    assert main(["-q", "explain", str(image), "--bundle", str(exported["failed"].bundle),
                 "--out", str(out)]) == 0
    assert out.is_file()  # the heatmap is still made, for inspection
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("warning: this model FAILED"), err


@pytest.fixture(scope="module")
def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("headless browser check: chromium is not installed (`make browser`)")
    return found


def test_failed_banner_is_visible_in_headless_chromium(
    browser: str, reports: dict, tmp_path: Path
) -> None:
    """The banner is painted red at the top of the first screen, not merely in the DOM."""
    from PIL import Image

    url = reports["failed"].resolve().as_uri()
    page = _Page(_browser(browser, tmp_path / "profile", url, "--dump-dom"))
    assert page.ids["validation-banner"].startswith("This model did not pass")
    shot = tmp_path / "top.png"
    _browser(browser, tmp_path / "profile", url, f"--screenshot={shot}",
             "--window-size=1000,700", "--hide-scrollbars")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)[:120]
    red = np.abs(pixels - np.array([0xb3, 0x26, 0x1e])).max(axis=2) <= 12
    assert red.mean() > 0.2, red.mean()  # the banner's red fills the top of the page
    passed = tmp_path / "passed.png"
    _browser(browser, tmp_path / "profile", reports["passed"].resolve().as_uri(),
             f"--screenshot={passed}", "--window-size=1000,700", "--hide-scrollbars")
    top = np.asarray(Image.open(passed).convert("RGB"), dtype=np.int16)[:120]
    assert (np.abs(top - np.array([0xb3, 0x26, 0x1e])).max(axis=2) <= 12).mean() < 0.05
