"""Reproducibility and a diverging loss: the run stops clearly and keeps its best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embryo_ml.config import load_config
from embryo_ml.train import fit as fit_module
from embryo_ml.train.loop import NonFiniteLossError
from tests.conftest import TINY_MODEL


def _cfg(tmp_path: Path, epochs: int = 1) -> object:
    return load_config(None, [f"model.name={TINY_MODEL}", "data.image_size=32",
                              f"train.epochs={epochs}", "train.batch_size=16",
                              f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                              "tracking.log_checkpoint=false"])


def test_same_config_and_seed_give_the_same_metrics(synth_data: Path, tmp_path: Path) -> None:
    first = fit_module.fit(_cfg(tmp_path), synth_data, tmp_path / "a", progress=False)
    second = fit_module.fit(_cfg(tmp_path), synth_data, tmp_path / "b", progress=False)
    for key in ("val_auc", "val_loss", "temperature", "threshold"):
        assert first.metrics[key] == second.metrics[key], key


def test_nan_loss_stops_with_message_and_keeps_checkpoint(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embryo_ml.train.tracking import run_summary

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        """Finite for the first epoch's batches, NaN after: a diverging run."""

        calls = 0

        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            loss = super().forward(logits, targets)
            if torch.is_grad_enabled():  # training batches only, not evaluation
                type(self).calls += 1
                if type(self).calls > 6:
                    return loss * float("nan")
            return loss

    monkeypatch.setattr(fit_module.nn, "CrossEntropyLoss", PoisonedLoss)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 1"):
        fit_module.fit(_cfg(tmp_path, epochs=3), synth_data, run_dir, progress=False)
    checkpoint = fit_module.load_checkpoint(run_dir / "best.pt")
    assert checkpoint["epoch"] == 0  # the last good state survives
    assert not (run_dir / "metrics.json").exists()
    run_id = (run_dir / "run_id.txt").read_text()
    assert run_summary(run_id, f"sqlite:///{tmp_path / 'm.db'}")["status"] == "FAILED"
    assert json.loads(json.dumps(checkpoint["val_metrics"]))  # plain values only
