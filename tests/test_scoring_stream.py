"""Streaming score files: formats, --resume, torn records, Ctrl-C / SIGTERM / SIGKILL, memory.

Most tests use a hand-built linear ONNX model (tests/fake_bundle.py) so they run in a blink;
the subprocess interrupt tests and the memory benchmark use the session's trained bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import embryo_ml.score.scorer as scorer_module
from embryo_ml.cli import main
from embryo_ml.data.scores_file import partial_path
from embryo_ml.score.scorer import ScoringInterrupted, score_images
from tests.fake_bundle import make_fake_bundle, uniform_image

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 40


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = np.zeros((3, 2))
    weights[0] = [2.0, -2.0]
    weights[1] = [0.5, -0.5]
    return make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle", weights)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 uniform images of 10 patients x 2 embryos x 2 planes, and one corrupt file."""
    root = tmp_path_factory.mktemp("imgs")
    rows = []
    for i in range(N_IMAGES):
        path = f"images/{i:03d}.png"
        uniform_image(root / path, ((i * 37) % 256, (i * 91) % 256, 7))
        rows.append({"path": path, "patient_id": f"P{i // 4}", "embryo_id": f"E{i // 2}"})
    (root / "images" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    rows.append({"path": "images/zz_corrupt.png", "patient_id": "P0", "embryo_id": "E99"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _as_text(column: str, values: pd.Series) -> list[str]:
    """Typed JSON/Parquet values as the CSV writes them."""
    if column == "score":
        return ["" if pd.isna(v) else f"{v:.6f}" for v in values]
    return ["" if pd.isna(v) else str(int(v)) for v in values]


def read_any(path: Path) -> pd.DataFrame:
    """A score file as text columns, checking it is whole (ends with a complete record)."""
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    else:
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path} ends in a torn record"
        if path.suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        table = pd.DataFrame([json.loads(line) for line in data.decode().splitlines()])
    for column in ("score", "display_score", "rank_in_cohort"):
        table[column] = _as_text(column, table[column])
    return table.astype(str)


def _compare(got: pd.DataFrame, want: pd.DataFrame) -> None:
    columns = ["path", "status", "score", "display_score", "label_pred", "embryo_id",
               "patient_id", "rank_in_cohort"]
    got = got[columns].sort_values("path").reset_index(drop=True)
    want = want[columns].sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)


@pytest.fixture(scope="module")
def reference(fake_bundle: Path, manifest: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("ref") / "scores.csv"
    score_images(manifest, fake_bundle, out, progress=False)
    return read_any(out)


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_output_formats_hold_the_same_rows(
    fake_bundle: Path, manifest: Path, reference: pd.DataFrame, tmp_path: Path, ext: str
) -> None:
    out = tmp_path / f"scores{ext}"
    summary = score_images(manifest, fake_bundle, out, progress=False)
    assert summary.embryos_out == tmp_path / f"scores.embryos{ext}"
    assert summary.n_images == N_IMAGES + 1 and summary.n_failed == 1
    got = read_any(out)
    assert len(got) == N_IMAGES + 1 and got["path"].is_unique
    _compare(got, reference)
    # every image of a ranked embryo carries its rank; E99's only image could not be scored
    assert (got["rank_in_cohort"] != "").sum() == N_IMAGES
    assert got.set_index("path").loc["images/zz_corrupt.png", "rank_in_cohort"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, f"scores.embryos{ext}", "scores.scoring.json"])
    if ext == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(out)
        assert str(schema.field("score").type) == "double"
        assert str(schema.field("display_score").type) == "int64"
        assert str(schema.field("rank_in_cohort").type) == "int64"
        embryos = pd.read_parquet(summary.embryos_out)
    elif ext == ".jsonl":
        embryos = pd.read_json(summary.embryos_out, lines=True)
    else:
        embryos = pd.read_csv(summary.embryos_out)
    assert len(embryos) == N_IMAGES // 2 + 1 and embryos["n_images"].sum() == N_IMAGES + 1


def _cut(path: Path, keep_rows: int, torn: bytes) -> None:
    """Keep the header (CSV) and `keep_rows` rows, then append a torn record."""
    lines = path.read_bytes().splitlines(keepends=True)
    header = 1 if path.suffix == ".csv" else 0
    path.write_bytes(b"".join(lines[:header + keep_rows]) + torn)


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_resume_drops_a_torn_last_record(
    fake_bundle: Path, manifest: Path, reference: pd.DataFrame, tmp_path: Path, ext: str
) -> None:
    out = tmp_path / f"scores{ext}"
    score_images(manifest, fake_bundle, out, progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    next_row = lines[9 if ext == ".csv" else 8]
    _cut(out, 8, next_row[: len(next_row) // 2])  # killed in the middle of the 9th row
    summary = score_images(manifest, fake_bundle, out, progress=False, resume=True)
    assert summary.n_resumed == 8 and summary.n_images == N_IMAGES + 1 - 8
    got = read_any(out)
    assert len(got) == N_IMAGES + 1 and got["path"].is_unique
    _compare(got, reference)  # ranks recomputed over old and new rows alike


def test_resume_drops_a_torn_multiline_csv_record(
    fake_bundle: Path, manifest: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    score_images(manifest, fake_bundle, out, progress=False)
    _cut(out, 5, b'images/030.png,"unreadable: first line\nsecond li')  # inside open quotes
    summary = score_images(manifest, fake_bundle, out, progress=False, resume=True)
    assert summary.n_resumed == 5
    _compare(read_any(out), reference)


def test_resume_keeps_an_intact_file_and_scores_only_new_images(
    fake_bundle: Path, manifest: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(manifest.parent / "images", folder)
    out = tmp_path / "scores.jsonl"
    score_images(folder, fake_bundle, out, progress=False)
    before = out.read_bytes()
    again = score_images(folder, fake_bundle, out, progress=False, resume=True)
    assert (again.n_resumed, again.n_images) == (N_IMAGES + 1, 0)
    assert out.read_bytes() == before
    uniform_image(folder / "new.png", (1, 2, 3))
    more = score_images(folder, fake_bundle, out, progress=False, resume=True)
    assert (more.n_resumed, more.n_images) == (N_IMAGES + 1, 1)
    got = read_any(out)
    assert len(got) == N_IMAGES + 2 and got["path"].is_unique and got["path"].iloc[-1] == "new.png"


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_resume_refuses_a_file_damaged_before_its_end(
    fake_bundle: Path, manifest: Path, tmp_path: Path, ext: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / f"scores{ext}"
    score_images(manifest, fake_bundle, out, progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4][:10] + b"\n"  # a short record in the middle, whole records after it
    out.write_bytes(b"".join(lines))
    assert main(["-q", "score", str(manifest), "--bundle", str(fake_bundle), "--out", str(out),
                 "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume safely" in err[0]
    assert out.read_bytes() == b"".join(lines)  # nothing touched
    assert (tmp_path / f"scores.embryos{ext}").is_file()  # the last finished run's, kept


def test_resume_refuses_a_file_of_other_columns(
    fake_bundle: Path, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.csv"
    out.write_text("path,score\na.png,0.5\n")
    assert main(["-q", "score", str(manifest), "--bundle", str(fake_bundle), "--out", str(out),
                 "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert out.read_text() == "path,score\na.png,0.5\n"


def test_without_resume_an_existing_output_is_replaced(
    fake_bundle: Path, manifest: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    out.write_text("old,junk\n1,2\n")
    (tmp_path / "scores.embryos.csv").write_text("stale\n")
    score_images(manifest, fake_bundle, out, progress=False)
    _compare(read_any(out), reference)
    assert "stale" not in (tmp_path / "scores.embryos.csv").read_text()


def test_parquet_resumes_from_its_sidecar(
    fake_bundle: Path, manifest: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    jsonl = tmp_path / "full.jsonl"
    score_images(manifest, fake_bundle, jsonl, progress=False)
    lines = jsonl.read_bytes().splitlines(keepends=True)
    out = tmp_path / "scores.parquet"
    sidecar = tmp_path / "scores.parquet.partial.jsonl"
    sidecar.write_bytes(b"".join(lines[:12]) + lines[12][:30])  # killed: no parquet yet
    summary = score_images(manifest, fake_bundle, out, progress=False, resume=True)
    assert summary.n_resumed == 12 and not sidecar.exists()
    got = read_any(out)
    assert len(got) == N_IMAGES + 1 and got["path"].is_unique
    _compare(got, reference)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int, signals: int = 1) -> None:
    """Make the scorer receive SIGTERM (`signals` times) while scoring batch number `calls`."""
    real = scorer_module.score_batch
    seen = []

    def score_batch(scorer, batch):  # noqa: ANN001, ANN202 - same signature as the real one
        seen.append(len(batch))
        if len(seen) == calls:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)
        return real(scorer, batch)

    monkeypatch.setattr(scorer_module, "score_batch", score_batch)


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_sigterm_in_process_stops_cleanly_and_resumes(
    fake_bundle: Path, manifest: Path, reference: pd.DataFrame, tmp_path: Path, ext: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / f"scores{ext}"
    _interrupt_after(monkeypatch, calls=3)
    with pytest.raises(ScoringInterrupted) as stopped:
        score_images(manifest, fake_bundle, out, batch_size=4, workers=1, progress=False)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert stopped.value.summary.n_images == 12  # the batch in hand was finished
    # every finished row in a valid partial file (JSON Lines for Parquet), named by the summary;
    # `out` appears only when a run has finished
    log = tmp_path / f"scores{ext}.partial{'.jsonl' if ext == '.parquet' else ext}"
    assert stopped.value.summary.out == log == partial_path(out)
    partial = read_any(log)
    assert len(partial) == 12 and partial["path"].is_unique
    assert set(partial["path"]) <= set(reference["path"])
    assert (partial["rank_in_cohort"] == "").all()  # no ranks from a partial cohort
    assert not out.exists() and not (tmp_path / f"scores.embryos{ext}").exists()
    monkeypatch.undo()
    summary = score_images(manifest, fake_bundle, out, batch_size=4, progress=False, resume=True)
    assert summary.n_resumed == 12
    got = read_any(out)
    assert len(got) == N_IMAGES + 1 and got["path"].is_unique
    _compare(got, reference)


def test_second_signal_stops_at_once_and_keeps_whole_batches(
    fake_bundle: Path, manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "scores.csv"
    _interrupt_after(monkeypatch, calls=3, signals=2)  # the second raises inside batch 3
    with pytest.raises(ScoringInterrupted):
        score_images(manifest, fake_bundle, out, batch_size=4, workers=1, progress=False)
    assert len(read_any(partial_path(out))) == 8  # batches 1 and 2; batch 3 was never written


def _copies(synth_data: Path, folder: Path, times: int) -> int:
    images = sorted((synth_data.parent / "images").rglob("*.png"))
    for t in range(times):
        for image in images:
            target = folder / f"copy{t}" / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    return times * len(images)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embryo_ml.cli", "-q", "score", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(out: Path, process: subprocess.Popen, rows: int = 2) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = partial_path(out)  # rows are appended there until the run has finished
        if log.exists() and log.read_bytes().count(b"\n") >= rows + 1:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    process.kill()
    pytest.fail("no rows appeared within 120 s")


def _score_args(folder: Path, bundle_dir: Path, out: Path) -> list[str]:
    return [str(folder), "--bundle", str(bundle_dir), "--out", str(out), "--batch-size", "2",
            "--workers", "1", "--threads", "1"]


@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_sigterm_subprocess_keeps_a_valid_file_then_resume_completes(
    bundle_dir: Path, synth_data: Path, tmp_path: Path, ext: str
) -> None:
    folder = tmp_path / "imgs"
    n = _copies(synth_data, folder, 4)
    out = tmp_path / f"scores{ext}"
    process = _start(_score_args(folder, bundle_dir, out))
    _wait_for_rows(out, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err and "interrupted" in err
    assert str(partial_path(out)) in err  # where the finished rows are
    partial = read_any(partial_path(out))
    assert 0 < len(partial) < n, "the run ended before SIGTERM arrived: give it more images"
    assert partial["path"].is_unique and (partial["status"] == "ok").all()
    expected = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    assert set(partial["path"]) <= expected

    process = _start([*_score_args(folder, bundle_dir, out), "--resume"])
    stdout, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert f"{len(partial)} already there" in stdout
    final = read_any(out)
    assert sorted(final["path"]) == sorted(expected)  # exactly one row per image


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_sigkill_then_resume_gives_one_row_per_image(
    bundle_dir: Path, synth_data: Path, tmp_path: Path, ext: str
) -> None:
    folder = tmp_path / "imgs"
    n = _copies(synth_data, folder, 4)
    out = tmp_path / f"scores{ext}"
    process = _start(_score_args(folder, bundle_dir, out))
    _wait_for_rows(out, process, rows=20)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    process = _start([*_score_args(folder, bundle_dir, out), "--resume"])
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    final = read_any(out)
    expected = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    assert len(final) == n and sorted(final["path"]) == sorted(expected)


@pytest.mark.slow
def test_peak_memory_is_flat_in_the_number_of_images(bundle_dir: Path, tmp_path: Path) -> None:
    """benchmarks/score_memory.py: 10,000 images may take at most 1.2x the memory of 1,000."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "score_memory.py"), "--bundle",
         str(bundle_dir), "--sizes", "1000", "10000", "--work", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(done.stdout)
    assert result["ratio"] <= 1.2, done.stdout


def test_resume_refuses_another_model_or_options(
    fake_bundle: Path, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.csv"
    score_images(manifest, fake_bundle, out, progress=False)
    settings = json.loads((tmp_path / "scores.scoring.json").read_text())
    assert settings["model"] == "fp32" and settings["tta"] is False
    before = out.read_bytes()
    other = make_fake_bundle(tmp_path / "other", np.ones((3, 2)))
    for extra in (["--bundle", str(other)], ["--bundle", str(fake_bundle), "--tta"],
                  ["--bundle", str(fake_bundle), "--embryo-pattern", "(?P<embryo_id>\\d+)"]):
        assert main(["-q", "score", str(manifest), "--out", str(out), "--resume", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other settings" in err[0], err
        assert out.read_bytes() == before  # nothing touched
        assert (tmp_path / "scores.embryos.csv").is_file()
    # the same bundle and options resume (nothing left to score)
    again = score_images(manifest, fake_bundle, out, progress=False, resume=True)
    assert again.n_images == 0 and again.n_resumed == N_IMAGES + 1


def test_a_bundle_validated_on_other_pixels_is_warned(
    tmp_path: Path, manifest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older bundle (validated on images prepared another way) still scores, with one warning
    that its validation figures were measured on slightly different pixels."""
    weights = np.ones((3, 2))
    old = make_fake_bundle(tmp_path / "old", weights, resize_policy="squash-inter-area")
    current = make_fake_bundle(tmp_path / "current", weights)
    with caplog.at_level("WARNING", logger="embryo_ml.score.session"):
        score_images(manifest, current, tmp_path / "a.csv", progress=False)
        assert not caplog.records
        summary = score_images(manifest, old, tmp_path / "b.csv", progress=False)
    assert summary.n_scored == N_IMAGES
    [record] = caplog.records
    assert "'squash-inter-area'" in record.getMessage()
    assert "export the run again" in record.getMessage()
