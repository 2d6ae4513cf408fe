"""The base install (no extras) is the scoring stack: a fresh venv with only the local wheel and
its base dependencies from the package registry scores a bundle, writes a report and an explain
overlay, and `train`/`export` say in one line which extra to install.

The venv is built once per session (about a minute: ~650 MB of wheels, mostly pyarrow, OpenCV,
onnxruntime, pandas); its size is printed for the README's install figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base-install")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (wheel,) = wheels.glob("embryo_ml-*.whl")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              str(wheel)], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.fail(f"base install failed:\n{install.stderr[-3000:]}")
    site = next((venv / "lib").glob("python3*/site-packages"))
    print(f"\nbase install: {_size_mb(site):.0f} MB in {site}")
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("PYTHONPATH", None)  # the venv's own installed package, not this checkout
    return subprocess.run([str(venv / "bin" / "embryo-ml"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_base_install_has_no_training_stack(base_venv: Path) -> None:
    for module in ("torch", "timm", "mlflow", "sklearn", "matplotlib", "albumentations"):
        found = subprocess.run([str(base_venv / "bin" / "python"), "-c", f"import {module}"],
                               capture_output=True, timeout=120)
        assert found.returncode != 0, f"{module} is in the base install"


def test_base_install_scores_reports_and_explains(base_venv: Path, bundle_dir: Path,
                                                 synth_data: Path, tmp_path: Path) -> None:
    scored = _run(base_venv, "score", str(synth_data), "--bundle", str(bundle_dir),
                  "--out", str(tmp_path / "scores.csv"), "-q", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 120 and rows[0].startswith("path,status,score")
    report = _run(base_venv, "report", str(tmp_path / "scores.csv"), "--bundle",
                  str(bundle_dir), "--out", str(tmp_path / "report.html"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "<html" in (tmp_path / "report.html").read_text(encoding="utf-8")[:2000].lower()
    image = synth_data.parent / rows[1].split(",")[0]  # scores keep the manifest's paths
    explained = _run(base_venv, "explain", str(image), "--bundle", str(bundle_dir),
                     "--out", str(tmp_path / "overlay.png"), cwd=tmp_path)
    assert explained.returncode == 0, explained.stderr
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checked = _run(base_venv, "data", "check", str(synth_data), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("command", [
    ["train", "--config", str(ROOT / "configs" / "demo.yaml")],
    ["export", "RUN", "--out", "bundle"],
])
def test_training_commands_name_the_extra_in_one_line(base_venv: Path, synth_data: Path,
                                                      trained_run: dict, tmp_path: Path,
                                                      command: list[str]) -> None:
    args = [str(trained_run["run_dir"]) if a == "RUN" else a for a in command]
    if command[0] == "train":
        args += ["--data", str(synth_data)]
    result = _run(base_venv, *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "pip install 'embryo-ml[train]'" in lines[0]
