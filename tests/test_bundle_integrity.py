"""Bundles that cannot be silently edited (embryo_ml.export.bundle, embryo_ml.export.signing).

- the bundle identity (`bundle_sha256`) covers bundle.json and every file it names: a hand edit
  of any value that decides a score or a flag, or a swapped file, is refused in one line saying
  the bundle was modified, by the library and by `embryo-ml score` (exit 2);
- every value is checked when read, naming the field, even in a bundle whose identity is right
  (written through `write_bundle_json`);
- `score --resume` and `report` know the bundle that scored (the sidecar records its identity);
- Ed25519 signatures: `keygen`, `export --sign`, `sign`, `score/report --trusted-key`.

The session bundle (`bundle_dir`) is always copied before it is changed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.data.scores_file import settings_path
from embryo_ml.errors import BundleError
from embryo_ml.export.bundle import (
    BUNDLE_FILE,
    MODEL_CARD_FILE,
    SIGNATURE_FILE,
    Bundle,
    bundle_identity,
    read_bundle,
    write_bundle_json,
)

MODIFIED = "was modified"


def _copy(bundle_dir: Path, folder: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, folder))


def _edit_by_hand(folder: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Edit bundle.json as a person with a text editor would: the identity is left as it was."""
    path = folder / BUNDLE_FILE
    meta = json.loads(path.read_text(encoding="utf-8"))
    change(meta)
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> Path:
    """Six real synthetic embryo images in a folder."""
    folder = tmp_path_factory.mktemp("integrity-images")
    table = pd.read_csv(synth_data, dtype=str, keep_default_na=False)
    for item in table.head(6).itertuples():
        shutil.copy(synth_data.parent / item.path, folder / Path(item.path).name)
    return folder


@pytest.fixture()
def bundle(bundle_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session bundle, which has every optional part this file tampers with."""
    meta = json.loads((bundle_dir / BUNDLE_FILE).read_text(encoding="utf-8"))
    for part in ("quality", "ood", "conformal", "int8", "model_card"):
        assert meta[part] is not None, f"the session bundle has no {part!r}"
    return _copy(bundle_dir, tmp_path / "bundle")


# ----------------------------------------------------------------------------- identity ----


def _other_class(meta: dict[str, Any]) -> None:
    meta["positive_class"] = next(c for c in meta["classes"] if c != meta["positive_class"])


HAND_EDITS: dict[str, Callable[[dict[str, Any]], object]] = {
    "positive_class": _other_class,
    "threshold": lambda m: m.update(threshold=0.99),
    "temperature": lambda m: m.update(temperature=m["temperature"] * 3),
    "mean": lambda m: m.update(mean=[0.0, 0.0, 0.0]),
    "std": lambda m: m.update(std=[1.0, 1.0, 1.0]),
    "quality deleted": lambda m: m.pop("quality"),
    "quality threshold": lambda m: m["quality"].update(blur_min=0.0),
    "ood deleted": lambda m: m.pop("ood"),
    "ood limit": lambda m: m["ood"]["limits"].update(fp32=1e9),
    "conformal deleted": lambda m: m.pop("conformal"),
    "validation": lambda m: m.update(validation=None),
    "model_file outside": lambda m: m.update(model_file="../model.onnx"),
    "unknown field added": lambda m: m.update(note="hello"),
    "identity deleted": lambda m: m.pop("bundle_sha256"),
}


@pytest.mark.parametrize("edit", list(HAND_EDITS))
def test_a_hand_edit_is_refused_as_modified(
    edit: str, bundle: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the model one folder up: a bundle pointing there would score with a file nobody checks
    shutil.copy(bundle / "model.onnx", tmp_path / "model.onnx")
    _edit_by_hand(bundle, HAND_EDITS[edit])
    with pytest.raises(BundleError) as refused:
        read_bundle(bundle)
    message = str(refused.value)
    assert MODIFIED in message and "\n" not in message, message
    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(images), "--bundle", str(bundle), "--out", str(out)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and MODIFIED in err[0], err
    assert not out.exists()


def test_a_swapped_model_card_is_refused(bundle: Path) -> None:
    """MODEL_CARD.md, what people read about the model, is covered like the model files."""
    card = bundle / MODEL_CARD_FILE
    card.write_text(card.read_text(encoding="utf-8").replace("Intended use", "Use"),
                    encoding="utf-8")
    with pytest.raises(BundleError, match=f"{MODIFIED}.*hash mismatch for {MODEL_CARD_FILE}"):
        read_bundle(bundle)


def test_identity_is_recorded_and_ignores_only_layout(bundle: Path) -> None:
    """bundle_sha256 is the canonical form's digest: re-indenting or reordering keys (no value
    changed) is the same bundle; what `write_bundle_json` writes reads back verified."""
    read = read_bundle(bundle)
    meta = json.loads((bundle / BUNDLE_FILE).read_text(encoding="utf-8"))
    assert read.bundle_sha256 == meta["bundle_sha256"] == bundle_identity(meta)
    reordered = dict(reversed(list(meta.items())))
    (bundle / BUNDLE_FILE).write_text(json.dumps(reordered, separators=(",", ":")),
                                      encoding="utf-8")
    assert read_bundle(bundle).bundle_sha256 == read.bundle_sha256
    write_bundle_json(replace(read, threshold=0.25), bundle)  # a new bundle, a new identity
    changed = read_bundle(bundle)
    assert changed.threshold == 0.25 and changed.bundle_sha256 != read.bundle_sha256


# ------------------------------------------------------------------------------- values ----


def _ood(**changes: Any) -> Callable[[Bundle], dict[str, Any]]:
    return lambda b: {"ood": {**b.ood, **changes}}


def _conformal(**changes: Any) -> Callable[[Bundle], dict[str, Any]]:
    return lambda b: {"conformal": {**b.conformal, **changes}}


def _fields(**changes: Any) -> Callable[[Bundle], dict[str, Any]]:
    return lambda b: changes


# (name, the fields to replace, the field the message must name)
INVALID: list[tuple[str, Callable[[Bundle], dict[str, Any]], str]] = [
    ("temperature 0", _fields(temperature=0.0), "'temperature'"),
    ("temperature < 0", _fields(temperature=-1.0), "'temperature'"),
    ("temperature NaN", _fields(temperature=math.nan), "'temperature'"),
    ("temperature text", _fields(temperature="1.0"), "'temperature'"),
    ("threshold > 1", _fields(threshold=1.5), "'threshold'"),
    ("threshold < 0", _fields(threshold=-0.1), "'threshold'"),
    ("mean of one", _fields(mean=[0.5]), "'mean'"),
    ("mean text", _fields(mean=["0.5", 0.5, 0.5]), "'mean'"),
    ("std of two", _fields(std=[0.5, 0.5]), "'std'"),
    ("std 0", _fields(std=[0.5, 0.0, 0.5]), "'std'"),
    ("input_size 0", _fields(input_size=0), "'input_size'"),
    ("input_size float", _fields(input_size=64.5), "'input_size'"),
    ("classes empty", _fields(classes=[]), "'classes'"),
    ("classes repeated", lambda b: {"classes": [b.classes[0]] * 2,
                                    "positive_class": b.classes[0]}, "'classes'"),
    ("channel_order", _fields(channel_order="BGR"), "'channel_order'"),
    ("model_file outside", _fields(model_file="../model.onnx"), "'model_file'"),
    ("model_file absolute", _fields(model_file="/tmp/model.onnx"), "'model_file'"),
    ("model_file backslash", _fields(model_file="..\\model.onnx"), "'model_file'"),
    ("int8 file outside", lambda b: {"int8": {**b.int8, "file": "../x.onnx"}}, "'int8'"),
    ("ood file in a folder", _ood(file="sub/ref.npz"), "'ood'"),
    ("sha256 not a hash", _fields(sha256="abc"), "'sha256'"),
    ("heads inside the classes", _fields(heads={"icm": {"offset": 0, "classes": ["A"]}}),
     "'heads'"),
    ("heads overlapping", lambda b: {"heads": {
        "icm": {"offset": len(b.classes), "classes": ["A", "B"]},
        "te": {"offset": len(b.classes) + 1, "classes": ["A"]}}}, "'heads'"),
    ("quality without blur_min", _fields(quality={"dark_max_mean": 20.0}), "'quality'"),
    ("quality unknown key", lambda b: {"quality": {**b.quality, "blur_mn": 1.0}}, "'quality'"),
    ("quality NaN", lambda b: {"quality": {**b.quality, "ood_energy_max": math.nan}},
     "'quality'"),
    ("ood k 0", _ood(k=0), "'ood'"),
    ("ood limit infinite", lambda b: {"ood": {**b.ood, "limits": {
        **b.ood["limits"], "fp32": math.inf}}}, "'ood'"),
    ("ood limit missing for int8", lambda b: {"ood": {**b.ood, "limits": {
        "fp32": b.ood["limits"]["fp32"]}}}, "'ood'"),
    ("ood expected_rate 1", lambda b: {"ood": {**b.ood, "expected_rate": {
        k: 1.0 for k in b.ood["expected_rate"]}}}, "'ood'"),
    ("conformal alpha 0", _conformal(alpha=0.0), "'conformal'"),
    ("conformal quantile > 1", lambda b: {"conformal": {**b.conformal, "quantiles": {
        **b.conformal["quantiles"], b.classes[0]: 1.5}}}, "'conformal'"),
    ("conformal quantile missing", lambda b: {"conformal": {**b.conformal, "quantiles": {
        b.classes[0]: 0.5}}}, "'conformal'"),
    ("model card without its hash", _fields(model_card_sha256=None), "'model_card_sha256'"),
]


@pytest.mark.parametrize("name, fields, named", INVALID, ids=[i[0] for i in INVALID])
def test_an_invalid_value_is_refused_naming_the_field(
    name: str, fields: Callable[[Bundle], dict[str, Any]], named: str, bundle: Path
) -> None:
    """Written through `write_bundle_json`, so the identity is right: the value check speaks,
    with or without `verify`."""
    valid = read_bundle(bundle)
    write_bundle_json(replace(valid, **fields(valid)), bundle)
    for verify in (True, False):
        with pytest.raises(BundleError) as refused:
            read_bundle(bundle, verify=verify)
        message = str(refused.value)
        assert named in message and MODIFIED not in message and "\n" not in message, message


def test_score_refuses_an_invalid_value_in_one_line(
    bundle: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`temperature: 0` used to give NaN scores labelled with a class, and exit 0."""
    write_bundle_json(replace(read_bundle(bundle), temperature=0.0), bundle)
    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(images), "--bundle", str(bundle), "--out", str(out)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "'temperature'" in err[0], err
    assert not out.exists()


# ------------------------------------------------------------------ resume and report ----


def test_resume_refuses_a_changed_bundle_json(
    bundle: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.csv"
    argv = ["-q", "score", str(images), "--bundle", str(bundle), "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    first = read_bundle(bundle)
    sidecar = json.loads(settings_path(out).read_text(encoding="utf-8"))
    assert sidecar["bundle_sha256"] == first.bundle_sha256  # the identity, not the model hash
    before = out.read_bytes()
    # the same model file, another meaning: every label and flag could change
    write_bundle_json(replace(first, threshold=0.01), bundle)
    assert main([*argv, "--resume"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "other settings" in err[0] and "bundle" in err[0], err
    assert out.read_bytes() == before
    write_bundle_json(first, bundle)  # back as it was: the same identity, resumes
    assert main([*argv, "--resume"]) == 0


def test_report_refuses_another_bundle(
    bundle: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out, html = tmp_path / "scores.csv", tmp_path / "report.html"
    assert main(["-q", "score", str(images), "--bundle", str(bundle), "--out", str(out)]) == 0
    other = _copy(bundle, tmp_path / "other")  # same model and classes, another threshold
    write_bundle_json(replace(read_bundle(other), threshold=0.01), other)
    capsys.readouterr()
    report = ["-q", "report", str(out), "--out", str(html), "--images", str(images),
              "--no-heatmaps"]
    assert main([*report, "--bundle", str(other)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "was not scored with bundle" in err[0], err
    assert not html.exists()
    assert main([*report, "--bundle", str(bundle)]) == 0  # the bundle that scored
    # scores without a sidecar (older outputs) cannot be checked: a warning, and the report
    settings_path(out).unlink()
    with caplog.at_level(logging.WARNING, logger="embryo_ml.report.html"):
        assert main([*report, "--bundle", str(other)]) == 0
    assert any("cannot check" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- signing ----


@pytest.fixture()
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    folder = tmp_path / "keys"
    folder.mkdir()
    for name in ("team", "other"):
        assert main(["keygen", "--out", str(folder / name)]) == 0
    capsys.readouterr()
    return {"team": folder / "team.key", "team.pub": folder / "team.pub",
            "other": folder / "other.key", "other.pub": folder / "other.pub"}


def test_keygen_writes_an_owner_only_private_key_and_never_overwrites(
    keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert stat.S_IMODE(keys["team"].stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in keys["team.pub"].read_bytes()
    before = keys["team"].read_bytes()
    assert main(["keygen", "--out", str(keys["team"].with_suffix(""))]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "never overwrites" in err[0], err
    assert keys["team"].read_bytes() == before


def test_a_signed_bundle_scores_only_with_its_key(
    bundle: Path, images: Path, keys: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "scores.csv"

    def score(*trusted: Path) -> int:
        extra = [a for key in trusted for a in ("--trusted-key", str(key))]
        return main(["-q", "score", str(images), "--bundle", str(bundle), "--out", str(out),
                     *extra])

    assert score(keys["team.pub"]) == 2  # unsigned, and a key is required
    err = _err_lines(capsys)
    assert len(err) == 1 and "is not signed" in err[0], err
    assert score() == 0  # no key required: an unsigned bundle scores as before
    capsys.readouterr()

    assert main(["sign", str(bundle), "--key", str(keys["team"])]) == 0
    assert (bundle / SIGNATURE_FILE).is_file()
    assert score(keys["team.pub"]) == 0
    assert "signed by trusted key" in capsys.readouterr().out
    assert score(keys["team.pub"].parent) == 0  # a folder of trusted keys (rotation)
    capsys.readouterr()
    assert score(keys["other.pub"]) == 2  # signed, but by a key that is not trusted
    err = _err_lines(capsys)
    assert len(err) == 1 and "not a trusted key" in err[0], err
    assert score(keys["team"]) == 2  # a private key is never a trusted key
    err = _err_lines(capsys)
    assert len(err) == 1 and "private key" in err[0], err

    # any edit after signing: through write_bundle_json (a valid identity) or by hand
    signed = read_bundle(bundle)
    write_bundle_json(replace(signed, threshold=0.01), bundle)
    assert score(keys["team.pub"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "modified after it was signed" in err[0], err
    write_bundle_json(signed, bundle)
    assert score(keys["team.pub"]) == 0
    capsys.readouterr()
    _edit_by_hand(bundle, lambda m: m.update(threshold=0.01))
    assert score(keys["team.pub"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and MODIFIED in err[0], err


def test_a_tampered_signature_is_refused(
    bundle: Path, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from embryo_ml.export.signing import sign_bundle, verify_bundle

    sign_bundle(bundle, keys["team"])
    record = json.loads((bundle / SIGNATURE_FILE).read_text(encoding="utf-8"))
    other = _copy(bundle, tmp_path / "other")
    write_bundle_json(replace(read_bundle(other), threshold=0.01), other)
    sign_bundle(other, keys["team"])
    # the other bundle's signature (same key) copied over this one's: not this bundle's
    (bundle / SIGNATURE_FILE).write_text((other / SIGNATURE_FILE).read_text(encoding="utf-8"))
    with pytest.raises(BundleError, match="modified after it was signed"):
        verify_bundle(bundle, [keys["team.pub"]])
    (bundle / SIGNATURE_FILE).write_text(json.dumps({**record, "signature": "AAAA"}))
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(bundle, [keys["team.pub"]])


def test_report_checks_the_signature(
    bundle: Path, images: Path, keys: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, html = tmp_path / "scores.csv", tmp_path / "report.html"
    assert main(["-q", "score", str(images), "--bundle", str(bundle), "--out", str(out)]) == 0
    report = ["-q", "report", str(out), "--bundle", str(bundle), "--out", str(html),
              "--images", str(images), "--no-heatmaps"]
    capsys.readouterr()
    assert main([*report, "--trusted-key", str(keys["team.pub"])]) == 2  # unsigned
    err = _err_lines(capsys)
    assert len(err) == 1 and "is not signed" in err[0], err
    assert not html.exists()
    assert main(["sign", str(bundle), "--key", str(keys["other"])]) == 0
    assert main([*report, "--trusted-key", str(keys["team.pub"])]) == 2  # another key
    assert "not a trusted key" in capsys.readouterr().err
    assert main([*report, "--trusted-key", str(keys["other.pub"])]) == 0
    assert html.is_file()


def test_explain_checks_the_signature(
    bundle: Path, images: Path, keys: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image, out = sorted(images.iterdir())[0], tmp_path / "overlay.png"
    explain = ["-q", "explain", str(image), "--bundle", str(bundle), "--out", str(out)]
    assert main([*explain, "--trusted-key", str(keys["team.pub"])]) == 2  # unsigned
    err = _err_lines(capsys)
    assert len(err) == 1 and "is not signed" in err[0], err
    assert not out.exists()  # refused before any work
    assert main(["sign", str(bundle), "--key", str(keys["team"])]) == 0
    assert main([*explain, "--trusted-key", str(keys["other.pub"])]) == 2
    assert "not a trusted key" in capsys.readouterr().err
    assert main([*explain, "--trusted-key", str(keys["team.pub"])]) == 0
    assert out.is_file()


def test_export_sign_writes_a_signature_the_scorer_accepts(
    trained_run: dict, keys: dict[str, Path], images: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "bundle"
    assert main(["-q", "export", str(trained_run["run_dir"]), "--out", str(out), "--no-int8",
                 "--sign", str(keys["team"])]) == 0
    assert f"-> {out / SIGNATURE_FILE}" in capsys.readouterr().out
    signature = json.loads((out / SIGNATURE_FILE).read_text(encoding="utf-8"))
    assert signature["bundle_sha256"] == read_bundle(out).bundle_sha256
    assert main(["-q", "score", str(images), "--bundle", str(out), "--out",
                 str(tmp_path / "s.csv"), "--trusted-key", str(keys["team.pub"])]) == 0
    # a key that cannot sign fails before any export work
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    assert main(["-q", "export", str(trained_run["run_dir"]), "--out", str(tmp_path / "b2"),
                 "--sign", str(bad)]) == 2
    assert not (tmp_path / "b2").exists()
