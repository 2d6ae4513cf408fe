"""The notebooks are committed clean; `tests/test_quickstarts.py` executes them top to bottom
on synthetic data exactly as the README's researcher quickstart says (`jupyter execute`, a real
kernel), so they are not run a second time here."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tests.test_quickstarts import QUICKSTARTS

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_explore_data", "02_train_and_inspect", "03_score_a_folder"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), \
        "notebooks are committed without outputs"


def test_every_notebook_runs_in_the_researcher_quickstart() -> None:
    commands = " ".join(c for title, cs in QUICKSTARTS.items() if "researcher" in title
                        for c in cs)
    assert "jupyter execute" in commands
    for name in NAMES:
        assert f"notebooks/{name}.ipynb" in commands
