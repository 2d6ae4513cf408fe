"""The demo recipe learns: the number `make demo` prints is checked here on the same recipe."""

from pathlib import Path

import pandas as pd
import pytest

from embryo_ml.cli import main


@pytest.mark.slow
def test_demo_learns_and_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the demo keeps its own store in its folder
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    auc = float(printed.split("validation ROC AUC:")[1].split()[0])
    assert auc >= 0.90, printed
    assert (out / "mlflow.db").is_file() and "mlflow ui --backend-store-uri" in printed
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 60 and (scores["status"] == "ok").all()
    assert (out / "bundle" / "model.onnx").is_file()
