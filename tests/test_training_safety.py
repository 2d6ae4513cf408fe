"""Reproducibility and a diverging loss: the run stops clearly and keeps its best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embryo_ml.config import load_config
from embryo_ml.train import fit as fit_module
from embryo_ml.train import trainer as trainer_module
from embryo_ml.train.loop import NonFiniteLossError
from tests.conftest import TINY_MODEL, tiny_config


def _cfg(tmp_path: Path, epochs: int = 1) -> object:
    return tiny_config(tmp_path / "m.db", "data.image_size=32", f"train.epochs={epochs}",
                       "train.batch_size=16", "tracking.log_checkpoint=false")


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


def test_resume_after_interrupt_matches_an_uninterrupted_run(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from embryo_ml.cli import main

    overrides = [f"model.name={TINY_MODEL}", "data.image_size=32", "train.epochs=3",
                 "train.batch_size=16", "tracking.log_checkpoint=false"]
    straight_db = f"sqlite:///{tmp_path / 'a.db'}"
    straight_cfg = load_config(None, [*overrides, f"tracking.tracking_uri={straight_db}"])
    straight = fit_module.fit(straight_cfg, synth_data, tmp_path / "a", progress=False)

    resumed_db = f"sqlite:///{tmp_path / 'b.db'}"
    real_epoch = trainer_module.train_one_epoch

    def interrupted(*args: object, **kwargs: object) -> float:
        if args[6] == 2:  # the epoch argument: Ctrl-C during the third epoch
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_one_epoch", interrupted)
    code = main(["-q", "train", "--data", str(synth_data), "--out", str(tmp_path / "b"),
                 *[x for o in [*overrides, f"tracking.tracking_uri={resumed_db}"]
                   for x in ("--set", o)]])
    assert code == 130 and not (tmp_path / "b" / "metrics.json").exists()
    monkeypatch.setattr(trainer_module, "train_one_epoch", real_epoch)
    assert main(["-q", "train", "--resume", str(tmp_path / "b")]) == 0

    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in ("val_auc", "val_loss", "temperature", "threshold", "best_epoch"):
        assert resumed[key] == straight.metrics[key], key
    client = mlflow.MlflowClient(resumed_db)
    runs = client.search_runs([client.get_experiment_by_name("embryo-ml").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "val_auc")) == 3


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    from embryo_ml.cli import main

    assert main(["-q", "train", "--resume", str(tmp_path)]) == 2


def _recording_build(monkeypatch: pytest.MonkeyPatch, weights: str | None = None
                     ) -> dict[str, torch.Tensor]:
    """Record the freshly built model's parameters (and, with `weights`, report that source)."""
    initial: dict[str, torch.Tensor] = {}
    real_build = fit_module.build_model_with_source

    def recording_build(*args: object, **kwargs: object) -> tuple[torch.nn.Module, str]:
        model, source = real_build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.named_parameters()})
        return model, weights or source

    monkeypatch.setattr(fit_module, "build_model_with_source", recording_build)
    return initial


def _head_names(names: list[str]) -> set[str]:
    head = {n for n in names if n.startswith("fc.") or ".fc." in n or n.startswith("head")}
    assert head, sorted(names)[-4:]
    return head


def test_recipe_options_train_with_loaded_weights(synth_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Class weights, focal loss, smoothing, sampler, EMA and, because weights were loaded
    (model.pretrained_file, written here), a frozen backbone in the first epoch."""
    from embryo_ml.config import ModelConfig
    from embryo_ml.train.models import build_model

    weights = tmp_path / "weights.pt"
    torch.save(build_model(ModelConfig(name=TINY_MODEL), num_classes=2).state_dict(), weights)
    initial = _recording_build(monkeypatch)
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32", "train.epochs=1",
                      "train.batch_size=16", "loss.class_weights=auto",
                      "loss.focal_gamma=2", "loss.label_smoothing=0.1",
                      "train.weighted_sampler=true", "train.ema=true",
                      "train.freeze_backbone_epochs=1", "train.head_lr=0.01",
                      f"model.pretrained_file={weights}", "tracking.log_checkpoint=false")
    result = fit_module.fit(cfg, synth_data, tmp_path / "run", progress=False)
    assert np.isfinite(result.metrics["val_loss"])
    assert result.metrics["recipe"]["rule"] == "fine-tune"
    assert result.metrics["recipe"]["weights"] == "file"
    last = fit_module.load_checkpoint(tmp_path / "run" / "last.pt")
    head = _head_names(list(initial))
    for name, before in initial.items():
        after = last["model"][name]
        if name in head:
            assert not torch.equal(before, after), name  # the head learned
        else:
            assert torch.equal(before, after), name  # the backbone stayed frozen
    best = fit_module.load_checkpoint(tmp_path / "run" / "best.pt")["state_dict"]
    ema = last["ema"]["module"]
    assert last["ema"]["updates"] == 6  # one per optimizer step (97 images, batches of 16)
    assert all(torch.equal(best[k], ema[k]) for k in best)  # the EMA is what is exported
    # 6 steps: the horizon cap (a tenth of the run) leaves nothing to average over
    assert result.metrics["recipe"]["ema_max_decay"] == 0.0


def test_from_scratch_run_does_not_freeze_its_backbone(synth_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same freeze setting without loaded weights: every layer trains, at one rate."""
    initial = _recording_build(monkeypatch)
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32", "train.epochs=1",
                      "train.batch_size=16", "train.freeze_backbone_epochs=1",
                      "train.lr=0.0001", "train.head_lr=0.003", "tracking.log_checkpoint=false")
    result = fit_module.fit(cfg, synth_data, tmp_path / "run", progress=False)
    recipe = result.metrics["recipe"]
    assert (recipe["rule"], recipe["weights"], recipe["freeze_backbone_epochs"]) == (
        "from-scratch", "none", 0)
    assert recipe["backbone_lr"] == recipe["head_lr"] == 0.003  # head_lr for every layer
    last = fit_module.load_checkpoint(tmp_path / "run" / "last.pt")
    backbone = [n for n in initial if n not in _head_names(list(initial))]
    moved = [n for n in backbone if not torch.equal(initial[n], last["model"][n])]
    assert len(moved) == len(backbone), set(backbone) - set(moved)
    # as written (the rule switched off), the random backbone would have stayed frozen
    cfg.train.adapt_to_weights = False
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path / 'n.db'}"
    old = fit_module.fit(cfg, synth_data, tmp_path / "old", progress=False)
    assert old.metrics["recipe"]["rule"] == "as-written"
    last = fit_module.load_checkpoint(tmp_path / "old" / "last.pt")
    assert all(torch.equal(initial[n], last["model"][n]) for n in backbone)
