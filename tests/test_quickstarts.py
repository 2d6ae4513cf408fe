"""The README's quickstarts run as written, on synthetic data.

A quickstart is a `## Quickstart: ...` section of README.md; its commands are the fenced
```bash blocks in it. They run one by one, in README order, with `bash -c`, in one temporary
folder laid out as a checkout after `make demo`: `configs/` and `notebooks/` copied from the
repository, `demo_out/new_images` drawn as the demo draws them and `demo_out/bundle` a tiny
trained bundle. `embryo-ml` and `jupyter` resolve to the ones beside the running Python, MLflow
goes to a sqlite file in that folder. Each command must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
HEADING = re.compile(r"^## Quickstart: (?P<title>.+)$")
FENCE = re.compile(r"^```bash\s*$(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
COMMAND_TIMEOUT_S = 1200
# What `embryo-ml demo` writes to demo_out/new_images (embryo_ml/demo.py: 60 images, seed
# config seed + 1000, twice the demo's 64 px input size).
DEMO_NEW_IMAGES, DEMO_NEW_SEED, DEMO_NEW_SIZE = 60, 1000, 128


def quickstarts(text: str) -> dict[str, list[str]]:
    """Title -> the commands of its ```bash blocks (continuation lines joined), in order."""
    sections: dict[str, list[str]] = {}
    title, lines = None, []
    for line in [*text.splitlines(), "## end"]:
        if line.startswith("## "):
            if title is not None:
                sections[title] = _commands("\n".join(lines))
            match = HEADING.match(line)
            title, lines = (match["title"], []) if match else (None, [])
        elif title is not None:
            lines.append(line)
    return sections


def _commands(section: str) -> list[str]:
    commands = []
    for block in FENCE.finditer(section):
        joined = re.sub(r"\\\n\s*", " ", block["body"])
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip() and not line.strip().startswith("#")]
    return commands


QUICKSTARTS = quickstarts(README.read_text(encoding="utf-8"))


def test_readme_has_a_quickstart_for_each_user() -> None:
    titles = " ".join(QUICKSTARTS).lower()
    for user in ("embryologist", "ml engineer", "researcher"):
        assert user in titles, f"no '## Quickstart: {user}...' section in README.md"
    assert all(QUICKSTARTS.values()), "a quickstart without a ```bash block"


def test_quickstart_commands_parse() -> None:
    """Cheap: every `embryo-ml` command of the quickstarts is one the parser accepts."""
    from embryo_ml.cli import build_parser

    for title, commands in QUICKSTARTS.items():
        for command in commands:
            argv = shlex.split(command, comments=True)
            if argv[0] == "embryo-ml":
                try:
                    build_parser().parse_args(argv[1:])
                except SystemExit as stop:
                    pytest.fail(f"{title}: `{command}` does not parse ({stop})")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    """A folder laid out like the repository after `make demo`."""
    from embryo_ml.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("quickstart")
    for folder in ("configs", "notebooks"):  # copies: the notebooks write beside themselves
        shutil.copytree(REPO / folder, root / folder)
    shutil.copytree(bundle_dir, root / "demo_out" / "bundle")
    generate_dataset(root / "demo_out" / "new_images", n=DEMO_NEW_IMAGES, size=DEMO_NEW_SIZE,
                     seed=DEMO_NEW_SEED)
    return root


def _environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EMBRYO_ML_WORKDIR"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", MPLBACKEND="Agg",
               OMP_NUM_THREADS="1")  # one torch thread: 2-4x faster on a busy 2-core machine
    return env


@pytest.mark.slow
@pytest.mark.parametrize("title", list(QUICKSTARTS))
def test_quickstart_runs_as_written(title: str, checkout: Path) -> None:
    assert (BIN / "embryo-ml").is_file(), f"no embryo-ml beside {sys.executable}"
    env = _environment(checkout)
    for command in QUICKSTARTS[title]:
        done = subprocess.run(["bash", "-c", command], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        output = (done.stdout + done.stderr)[-3000:]
        assert done.returncode == 0, (
            f"Quickstart: {title}: `{command}` exited {done.returncode}:\n{output}")
