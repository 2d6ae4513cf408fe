"""Outputs that are never lost: scores written through a partial file, `--out` that would
overwrite an input refused, one atomic-and-durable write helper, a gapless bundle swap, and
decoded-cache entries that are checked and rebuilt when damaged.

Scoring tests use the hand-built linear ONNX model (tests/fake_bundle.py); the export tests the
session's tiny trained run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import embryo_ml.score.scorer as scorer_module
from embryo_ml.cli import main
from embryo_ml.errors import BundleError
from embryo_ml.score.scorer import ScoringInterrupted, score_images
from tests.conftest import write_image
from tests.fake_bundle import make_fake_bundle, uniform_image

N_IMAGES = 12


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = np.zeros((3, 2))
    weights[0] = [2.0, -2.0]
    return make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle", weights)


def _manifest(root: Path, name: str = "manifest.csv") -> Path:
    rows = []
    for i in range(N_IMAGES):
        path = f"images/{i:03d}.png"
        uniform_image(root / path, ((i * 37) % 256, (i * 91) % 256, 7))
        rows.append({"path": path, "patient_id": f"P{i // 4}", "embryo_id": f"E{i // 2}"})
    pd.DataFrame(rows).to_csv(root / name, index=False)
    return root / name


def _fail_in_batch(monkeypatch: pytest.MonkeyPatch, calls: int, error: BaseException | None
                   = None) -> None:
    """Batch number `calls` raises `error` (a model that cannot score), or receives SIGTERM."""
    real = scorer_module.score_batch
    seen: list[int] = []

    def score_batch(scorer, batch):  # noqa: ANN001, ANN202 - same signature as the real one
        seen.append(len(batch))
        if len(seen) == calls:
            if error is not None:
                raise error
            os.kill(os.getpid(), signal.SIGTERM)
        return real(scorer, batch)

    monkeypatch.setattr(scorer_module, "score_batch", score_batch)


def _outputs(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def _table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_csv(path)


# ------------------------------------------------------------- score --out never loses data ----


@pytest.mark.parametrize("kind", ["out", "embryos table"])
def test_out_over_the_manifest_is_refused_and_the_manifest_kept(
    fake_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """`score m.csv --out m.csv` (and `score m.embryos.csv --out m.csv`, whose embryos table is
    the manifest) stop with one line and exit 2 before anything is written."""
    manifest = _manifest(tmp_path, "m.csv" if kind == "out" else "m.embryos.csv")
    before = manifest.read_bytes()
    out = tmp_path / "m.csv"
    code = main(["-q", "score", str(manifest), "--bundle", str(fake_bundle), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "manifest being scored" in err[0] and "choose another --out" in err[0]
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["images", manifest.name])


def test_out_over_a_listed_image_is_refused(
    fake_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest may list an image under any name; --out must not be one of them."""
    manifest = _manifest(tmp_path)
    image = tmp_path / "images" / "odd.csv"
    write_image(image, np.full((20, 20, 3), 90, np.uint8), format="PNG")
    table = pd.read_csv(manifest)
    pd.concat([table, pd.DataFrame([{"path": "images/odd.csv"}])]).to_csv(manifest, index=False)
    before = image.read_bytes()
    code = main(["-q", "score", str(manifest), "--bundle", str(fake_bundle), "--out", str(image)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "an image being scored" in err[0], err
    assert image.read_bytes() == before


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_a_failed_rerun_keeps_the_earlier_complete_output(
    fake_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str
) -> None:
    """A re-run whose model fails in its second batch leaves the finished run's scores, embryos
    table and settings byte for byte; `--resume` then completes from the partial file."""
    manifest = _manifest(tmp_path)
    out = tmp_path / f"scores{ext}"
    score_images(manifest, fake_bundle, out, batch_size=4, progress=False)
    names = [out.name, f"scores.embryos{ext}", "scores.scoring.json"]
    before, first = _outputs(tmp_path, names), _table(out)
    _fail_in_batch(monkeypatch, 2, BundleError("the model gives 3 logits per image"))
    with pytest.raises(BundleError):
        score_images(manifest, fake_bundle, out, batch_size=4, workers=1, progress=False)
    assert _outputs(tmp_path, names) == before
    log = scorer_module.partial_path(out)
    assert log.is_file()  # the first batch of the failed run, whole
    assert len(log.read_bytes().splitlines()) == 4 + (ext == ".csv")
    monkeypatch.undo()
    summary = score_images(manifest, fake_bundle, out, batch_size=4, progress=False, resume=True)
    assert (summary.n_resumed, summary.n_images) == (4, N_IMAGES - 4)
    assert not log.exists()
    pd.testing.assert_frame_equal(_table(out), first)  # the same scores and ranks again


def test_an_interrupted_rerun_keeps_the_earlier_output_and_names_the_partial_file(
    fake_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = _manifest(tmp_path)
    out = tmp_path / "scores.csv"
    score_images(manifest, fake_bundle, out, progress=False)
    before = out.read_bytes()
    _fail_in_batch(monkeypatch, 2)  # SIGTERM while scoring the second batch
    code = main(["-q", "score", str(manifest), "--bundle", str(fake_bundle), "--out", str(out),
                 "--batch-size", "4", "--workers", "1"])
    assert code == 130
    assert out.read_bytes() == before
    log = tmp_path / "scores.csv.partial.csv"
    assert f"8 row(s) kept in {log}" in capsys.readouterr().err
    assert len(pd.read_csv(log)) == 8  # a valid CSV of the finished batches


def test_a_run_interrupted_at_once_leaves_no_half_output(
    fake_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path)
    out = tmp_path / "scores.jsonl"
    _fail_in_batch(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(ScoringInterrupted) as stopped:
        score_images(manifest, fake_bundle, out, batch_size=4, workers=1, progress=False)
    assert not out.exists() and stopped.value.summary.out == tmp_path / "scores.jsonl.partial.jsonl"


def test_out_in_a_missing_folder_is_created(fake_bundle: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    out = tmp_path / "new" / "deeper" / "s.csv"
    assert main(["-q", "score", str(manifest), "--bundle", str(fake_bundle), "--out",
                 str(out)]) == 0
    assert len(pd.read_csv(out)) == N_IMAGES
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.csv", "s.embryos.csv",
                                                            "s.scoring.json"]


# ------------------------------------------------------------------ the durable helper ----


def test_the_helper_fsyncs_the_file_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embryo_ml.fileio import atomic_write_bytes, atomic_write_text

    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    atomic_write_text(tmp_path / "a.json", '{"a": 1}\n')
    assert len(calls) == 2  # the file's data, then the folder's entry for it
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert len(calls) == 4
    assert (tmp_path / "a.json").read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_the_helper_leaves_no_temp_file_on_error(tmp_path: Path) -> None:
    from embryo_ml.fileio import atomic_open, atomic_path

    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write("half a ta")
        raise RuntimeError("disk full")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_the_package_writers_go_through_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest writer, the synthetic generator's manifest and a figure are all durable."""
    import matplotlib.pyplot as plt

    from embryo_ml.data.manifest import write_manifest
    from embryo_ml.data.synthetic import generate_dataset
    from embryo_ml.evaluation.plots import save_figure

    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    for write in (lambda: write_manifest(pd.DataFrame({"path": ["a.png"]}), tmp_path / "m.csv"),
                  lambda: generate_dataset(tmp_path / "synth", n=2, size=32, seed=0),
                  lambda: save_figure(plt.figure(), str(tmp_path / "f.png"))):
        before = len(calls)
        write()
        assert len(calls) >= before + 2  # the file and its folder
    assert (tmp_path / "synth" / "manifest.csv").is_file()
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left anywhere


# ------------------------------------------------------------------ decoded-image cache ----


def _damage(entry: Path, how: str, n_pixels: int) -> None:
    data = entry.read_bytes()
    header = data[: len(data) - n_pixels]
    entry.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                       "zero-filled": header + bytes(n_pixels),
                       "garbage": os.urandom(len(data))}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "zero-filled", "garbage"])
def test_a_damaged_cache_entry_is_rebuilt_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    from embryo_ml.data.cache import DecodedCache
    from embryo_ml.data.preprocess import load_square

    rng = np.random.default_rng(1)
    image = write_image(tmp_path / "a.png", rng.integers(30, 220, (50, 40, 3), dtype=np.uint8))
    size = 32
    DecodedCache(tmp_path / "cache", size).load(image)
    entry = DecodedCache(tmp_path / "cache", size).entry(image)
    _damage(entry, how, size * size * 3)
    cache = DecodedCache(tmp_path / "cache", size)  # a new process after the crash
    with caplog.at_level(logging.WARNING, logger="embryo_ml.data.cache"):
        pixels = cache.load(image)
    assert np.array_equal(np.asarray(pixels), load_square(str(image), size))
    assert (cache.hits, cache.misses) == (0, 1)
    [record] = caplog.records
    assert str(entry) in record.getMessage() and "rebuilding" in record.getMessage()
    again = DecodedCache(tmp_path / "cache", size)
    assert np.array_equal(np.asarray(again.load(image)), np.asarray(pixels))
    assert (again.hits, again.misses) == (1, 0)  # the rebuilt entry is whole


# ---------------------------------------------------------------------- bundle swap ----


def _sha(bundle: Path) -> str:
    return json.loads((bundle / "bundle.json").read_text())["sha256"]


@pytest.fixture(scope="module")
def exported(trained_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from embryo_ml.export.onnx_export import export_bundle

    root = tmp_path_factory.mktemp("exports")
    export_bundle(trained_run["run_dir"], root / "bundle", int8=False)
    return {"run": trained_run["run_dir"], "root": root}


def test_export_over_a_bundle_keeps_one_in_place_at_every_step(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rename of the swap is watched: the bundle folder reads as a valid bundle before
    and after each; a failure between the renames (no atomic exchange) leaves the old one."""
    import shutil

    import embryo_ml.fileio as fileio
    from embryo_ml.export.bundle import read_bundle
    from embryo_ml.export.onnx_export import export_bundle

    out = tmp_path / "bundle"
    shutil.copytree(exported["root"] / "bundle", out)
    real_rename, real_exchange = os.rename, fileio._exchange
    seen: list[str] = []

    def watched(step, *args):  # noqa: ANN001, ANN202
        read_bundle(out)
        result = step(*args)
        read_bundle(out)
        seen.append(step.__name__)
        return result

    monkeypatch.setattr(fileio, "_exchange", lambda a, b: watched(real_exchange, a, b))
    monkeypatch.setattr(os, "rename", lambda a, b: watched(real_rename, a, b))
    export_bundle(exported["run"], out, int8=False)
    assert seen[-2:] == ["_exchange", "rename"]  # swapped in one step, then the old one aside
    assert read_bundle(out).sha256 == _sha(out)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging, no old bundle left

    # without an atomic exchange, the second rename (staging -> bundle) fails: the old one is
    # put back
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)

    def rename(src, dst):  # noqa: ANN001, ANN202
        if Path(dst) == out and Path(src) != fileio.aside_path(out):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    before = _sha(out)
    with pytest.raises(OSError, match="No space"):
        export_bundle(exported["run"], out, int8=False)
    assert read_bundle(out).sha256 == before  # the old bundle, still readable
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_crash_between_the_renames_is_repaired_by_the_next_export(
    exported: dict, tmp_path: Path
) -> None:
    import shutil

    from embryo_ml.export.bundle import read_bundle
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.fileio import aside_path, recover_folder

    out = tmp_path / "bundle"
    shutil.copytree(exported["root"] / "bundle", out)
    old = _sha(out)
    os.rename(out, aside_path(out))  # the old bundle renamed aside, then the power went
    recover_folder(out)  # what the next export does first
    assert read_bundle(out).sha256 == old and not aside_path(out).exists()
    shutil.copytree(out, aside_path(out))  # renamed in, the old one not yet deleted
    export_bundle(exported["run"], out, int8=False)
    assert read_bundle(out) and [p.name for p in tmp_path.iterdir()] == ["bundle"]
