"""The epoch loop: warm-up epochs are trained but not validated (they are never chosen), and the
checkpoints written on the background thread are complete when `fit` returns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from embryo_ml.train.run_folder import BEST_FILE, LAST_FILE, load_checkpoint
from tests.conftest import tiny_config


def _fit_counting_validations(synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              *overrides: str) -> tuple[pd.DataFrame, list[int]]:
    """Train a tiny model; the history and the epochs at which a validation pass ran."""
    from embryo_ml.train import epochs as epochs_module
    from embryo_ml.train import fit as fit_module

    validated: list[int] = []
    real_evaluate = epochs_module.evaluate_all

    def counting(*args: object, **kwargs: object) -> object:
        validated.append(len(pd.read_csv(history)) if history.is_file() else 0)
        return real_evaluate(*args, **kwargs)

    history = tmp_path / "run" / "history.csv"
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(epochs_module, "evaluate_all", counting)
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32", "train.epochs=4",
                      "train.warmup_epochs=2", "tracking.log_checkpoint=false",
                      "model.drop_rate=0.5", *overrides)  # dropout draws from torch's stream
    fit_module.fit(cfg, synth_data, tmp_path / "run", progress=True)
    return pd.read_csv(history), validated


def test_warmup_epochs_are_trained_not_validated(synth_data: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    history, validated = _fit_counting_validations(synth_data, tmp_path, monkeypatch)
    assert validated == [2, 3], "a validation pass for epochs 2 and 3 only"
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["train_loss"].notna().all()
    assert history["val_loss"].isna().tolist() == [True, True, False, False]
    assert history["val_auc"].iloc[2:].between(0, 1).all()
    printed = capsys.readouterr().out
    assert printed.count("warm-up epoch, not validated") == 2
    metrics_epoch = load_checkpoint(tmp_path / "run" / BEST_FILE)["epoch"]
    assert metrics_epoch in (2, 3), "the best epoch is a validated one"
    last = load_checkpoint(tmp_path / "run" / LAST_FILE)
    assert last["epoch"] == 3 and len(last["history"]) == 4, "last.pt on disk when fit returns"


def test_validate_warmup_validates_every_epoch_and_trains_the_same(
        synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation draws no number from the training run's random stream: the same seed trains
    the same model whether or not the warm-up epochs are validated."""
    skipped, _ = _fit_counting_validations(synth_data, tmp_path / "skip", monkeypatch)
    history, validated = _fit_counting_validations(synth_data, tmp_path / "all", monkeypatch,
                                                   "train.validate_warmup=true")
    assert validated == [0, 1, 2, 3]
    assert history["val_loss"].notna().all()
    assert history["train_loss"].tolist() == skipped["train_loss"].tolist()
    assert history["val_auc"].iloc[2:].tolist() == skipped["val_auc"].iloc[2:].tolist()
