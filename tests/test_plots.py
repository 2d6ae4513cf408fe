"""The evaluation plots draw on their own Agg canvases: importing `embryo_ml.evaluation.plots`
(training code imports it) and drawing leaves a notebook's matplotlib backend and pyplot's
figures as they were."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

HISTORY = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
            "val_auc": 0.5 + e / 20, "val_within_patient_id_auc": 0.5 + e / 30} for e in range(4)]


@pytest.fixture
def svg_backend():
    """The backend a user chose (svg here), restored after the test."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        yield
    finally:
        matplotlib.use(before)


def test_importing_and_drawing_keeps_the_backend_in_a_fresh_process() -> None:
    code = ("import matplotlib; matplotlib.use('svg'); "
            "import embryo_ml.evaluation.plots as plots; "
            f"fig = plots.training_curves_figure({HISTORY!r}); "
            "import io; fig.savefig(io.BytesIO(), format='png'); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "svg"


def test_figures_are_drawn_outside_pyplot(svg_backend: None, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from embryo_ml.evaluation import plots

    open_before = plt.get_fignums()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    figures = [plots.training_curves_figure(HISTORY),
               plots.confusion_matrix_figure(np.array([[5, 1], [2, 7]]), ["good", "poor"]),
               plots.roc_figure(y, p, "good"), plots.pr_figure(y, p, "good"),
               plots.reliability_figure(y, None, p),
               plots.score_distribution_figure(y, p, "good", "poor", 0.5),
               plots.subgroup_roc_figure(y, p, np.array(["a", "b"] * 30, dtype=object), "day",
                                         "good")]
    for i, figure in enumerate(figures):
        assert isinstance(figure, Figure)
        plots.save_figure(figure, str(tmp_path / f"{i}.png"))
        assert (tmp_path / f"{i}.png").read_bytes().startswith(b"\x89PNG")
    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == open_before
    own = plt.figure()  # a caller's pyplot figure is still closed once saved, as before
    plots.save_figure(own, str(tmp_path / "own.png"))
    assert not plt.fignum_exists(own.number)
