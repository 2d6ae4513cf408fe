"""Every user mistake ends as exactly one `error:` line on stderr and exit status 2 (docs/cli.md,
house rule 6), checked before the work where it can be; `--debug` / EMBRYO_ML_DEBUG=1 show the
traceback; a bug (anything but a user's problem) still shows its traceback.

Most cases run `embryo_ml.cli.main` in-process; two run the real command in a subprocess, for
the exit status and stderr a user sees. None trains a model (each fails before training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embryo_ml.cli import EXIT_USER_ERROR, main, train_commands
from embryo_ml.train import models
from tests.conftest import TINY_MODEL, write_image


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line, asserted to be an `error:` line with no traceback anywhere."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`embryo-ml ARGS` as a user runs it: a fresh process, its real exit status and stderr."""
    return subprocess.run([sys.executable, "-c", "import sys; from embryo_ml.cli import main; "
                           "sys.exit(main())", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(folder / f"e{i}.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return folder


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A plain file, used where a folder is expected (`a_file/out.csv` can never be written)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


# ------------------------------------------------------------------------ output files ----

def test_score_into_a_new_folder_works_or_is_one_line(
    bundle_dir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "newdir" / "s.csv"
    code = main(["-q", "score", str(images), "--bundle", str(bundle_dir), "--out", str(out)])
    if code == 0:
        assert out.is_file()
    else:
        assert code == EXIT_USER_ERROR and "newdir" in one_error_line(capsys)


def test_data_manifest_creates_its_folder_or_refuses_before_the_work(
    images: Path, tmp_path: Path, a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nodir" / "m.csv"  # was: FileNotFoundError of m.csv.tmp, a traceback
    assert main(["data", "manifest", str(images), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(["data", "manifest", str(images), "--out", str(a_file / "m.csv")]) == 2
    assert "--out" in one_error_line(capsys)


def test_data_check_json_folder_is_checked_before_the_check(
    synth_data: Path, a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was: the whole check ran and printed, then a traceback writing the JSON.
    code = main(["-q", "data", "check", str(synth_data), "--json", str(a_file / "c.json")])
    assert code == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""  # no report: refused before the work
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --json"), captured.err
    assert "Traceback" not in captured.err


def test_a_file_system_error_is_one_line_naming_the_file(
    a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Any OSError from the file system (here: a folder inside a plain file) is one line.
    assert main(["-q", "synth", str(a_file / "data"), "--n", "4", "--size", "64"]) == 2
    line = one_error_line(capsys)
    assert str(a_file) in line


# ------------------------------------------------------------------------- input files ----

@pytest.mark.parametrize("content,expected", [
    ('{"path": "a.png", "status": "ok"\n', "line 1 is not JSON"),
    ("[1, 2]\n", "line 1 is not a JSON object"),
])
def test_report_on_a_broken_jsonl_is_one_line(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
    expected: str,
) -> None:
    scores = tmp_path / "scores.jsonl"  # was: JSONDecodeError, a traceback
    scores.write_text(content)
    code = main(["-q", "report", str(scores), "--bundle", str(bundle_dir),
                 "--out", str(tmp_path / "r.html")])
    assert code == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert "scores.jsonl" in line and expected in line


def test_config_that_is_not_utf8_is_one_line(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "latin1.yaml"  # was: UnicodeDecodeError, a traceback
    config.write_bytes("train:\n  epochs: 1  # r\u00e9sum\u00e9\n".encode("latin-1"))
    code = main(["train", "--config", str(config), "--data", str(synth_data),
                 "--out", str(tmp_path / "run")])
    assert code == EXIT_USER_ERROR
    assert "latin1.yaml: not UTF-8" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("run_json", ['{"data": ', "[1]", "{}", b"\xff\xfe"])
def test_resume_with_a_damaged_run_json_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_json: str | bytes
) -> None:
    run_dir = tmp_path / "run"  # was: JSONDecodeError / TypeError / KeyError
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"")
    (run_dir / "config.yaml").write_text(f"model:\n  name: {TINY_MODEL}\n")
    path = run_dir / "run.json"
    path.write_bytes(run_json) if isinstance(run_json, bytes) else path.write_text(run_json)
    assert main(["train", "--resume", str(run_dir)]) == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert line.startswith(f"error: --resume {run_dir}: run.json") and "--data" in line


def test_corrupt_safetensors_is_one_line_before_training(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "weights.safetensors"  # was: SafetensorError, a traceback
    weights.write_bytes(np.random.default_rng(0).bytes(3000))
    code = main(["train", "--data", str(synth_data), "--out", str(tmp_path / "run"),
                 "--set", f"model.name={TINY_MODEL}", "--set", "data.image_size=32",
                 "--set", "train.epochs=1", "--set", f"model.pretrained_file={weights}"])
    assert code == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert "weights.safetensors" in line and "safetensors" in line.split(":", 2)[2]
    assert not (tmp_path / "run" / "best.pt").exists()


def test_pth_that_needs_pickle_is_one_line_without_unsafe_advice(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "weights.pth"  # torch's own message is a page advising to unpickle
    weights.write_bytes(b"not tensors at all\n")
    code = main(["train", "--data", str(synth_data), "--out", str(tmp_path / "run"),
                 "--set", f"model.name={TINY_MODEL}", "--set", "data.image_size=32",
                 "--set", f"model.pretrained_file={weights}"])
    assert code == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert "weights.pth" in line and "weights_only" not in line


def test_offline_pretrained_is_one_line(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Already handled before this file (tests/test_offline_weights.py); held here to the
    # stricter "the only stderr line" too.
    monkeypatch.setattr(models, "cached_weights", lambda pretrained_cfg: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", "--data", str(synth_data), "--out", str(tmp_path / "run"),
                 "--set", "model.name=resnet10t", "--set", "model.pretrained=true",
                 "--set", "data.image_size=32", "--set", "train.epochs=1"])
    assert code == EXIT_USER_ERROR
    assert one_error_line(capsys).startswith("error: model.pretrained:")


# ------------------------------------------------------------------- argument values ----

@pytest.mark.parametrize("option,value", [
    ("--workers", "-1"), ("--workers", "0"), ("--batch-size", "0"), ("--threads", "-2"),
    ("--max-pixels", "0"), ("--workers", "two"),
])
def test_score_argument_values_are_refused_by_the_parser(
    bundle_dir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    option: str, value: str,
) -> None:
    # Was: --workers -1 a ValueError traceback from the thread pool after the bundle loaded;
    # --threads -2 accepted silently.
    out = tmp_path / "s.csv"
    with pytest.raises(SystemExit) as stop:
        main(["score", str(images), "--bundle", str(bundle_dir), "--out", str(out),
              option, value])
    assert stop.value.code == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert f"argument {option}" in line and value in line
    assert not out.exists()


def test_parser_mistakes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["score"], ["no-such-command"], ["data", "check"], ["synth", "x", "--n", "0"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == EXIT_USER_ERROR
        assert one_error_line(capsys).startswith("error: embryo-ml")


def test_real_exit_status_and_stderr(bundle_dir: Path, images: Path, tmp_path: Path) -> None:
    done = run_cli("score", str(images), "--bundle", str(bundle_dir), "--workers", "-1")
    assert done.returncode == EXIT_USER_ERROR
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    scores = tmp_path / "scores.jsonl"
    scores.write_text("{not json}\n")
    done = run_cli("-q", "report", str(scores), "--bundle", str(bundle_dir),
                   "--out", str(tmp_path / "r.html"))
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr
    # ... and with EMBRYO_ML_DEBUG=1 the same mistake shows its traceback, then the line
    done = run_cli("-q", "report", str(scores), "--bundle", str(bundle_dir),
                   "--out", str(tmp_path / "r.html"), env={"EMBRYO_ML_DEBUG": "1"})
    assert done.returncode == EXIT_USER_ERROR
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


# -------------------------------------------------------------------- debug and bugs ----

def test_debug_flag_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBRYO_ML_DEBUG", raising=False)
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"\xff\xfe")
    assert main(["--debug", "evaluate", "s.csv", "--labels", "m.csv", "--out", "o",
                 "--config", str(config)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> int:
        raise KeyError("an internal bug, not a user's mistake")

    monkeypatch.setattr(train_commands, "run_synth", broken)
    with pytest.raises(KeyError):
        main(["synth", "anywhere"])


def test_run_json_of_a_real_run_still_resumes_its_data(trained_run: dict) -> None:
    # The reader of run.json that replaced json.loads(...)["data"] reads what fit writes.
    run_dir = trained_run["run_dir"]
    recorded = json.loads((run_dir / "run.json").read_text())["data"]
    assert train_commands._resumed_data(run_dir) == recorded


def test_version_prints_the_installed_version_and_exits_0() -> None:
    from importlib.metadata import version

    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"embryo-ml {version('embryo-ml')}"
