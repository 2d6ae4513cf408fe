"""The epochs of a validation run: train, evaluate, log, keep the best checkpoint, save `last.pt`.

The best epoch is chosen by a metric a small subgroup cannot dominate
(`embryo_ml.evaluation.selection`), never during the learning-rate warm-up (whose epochs are
not validated at all unless `train.validate_warmup`: a pass that cannot change the outcome); with
`train.select_within_se` a later epoch within one standard error of the best is preferred.
`last.pt` after every epoch holds all `--resume` needs to continue exactly. Both checkpoints are
written on a background thread while the next epoch trains (`embryo_ml.train.background_save`);
the loop waits for them when its epochs end, on an error too.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from embryo_ml.data.heads import head_accuracies, main_output
from embryo_ml.evaluation.selection import Selection, keep_epoch
from embryo_ml.fileio import atomic_write_text
from embryo_ml.train.background_save import CheckpointWriter
from embryo_ml.train.distributed import DistContext, gather_rows, mean_across_ranks
from embryo_ml.train.loop import EvalOutput, Precision, evaluate
from embryo_ml.train.metrics import binary_metrics, softmax
from embryo_ml.train.run_data import RunSetup
from embryo_ml.train.run_folder import (
    BEST_FILE,
    HISTORY_FILE,
    LAST_FILE,
    save_checkpoint,
)
from embryo_ml.train.state import restore_rng_state, rng_state
from embryo_ml.train.trainer import Trainer

log = logging.getLogger(__name__)
LEARNING_CAUSES = ("likely causes: a learning rate too low or too high (train.lr, "
                   "train.scratch_lr), a frozen random backbone (train.freeze_backbone_epochs "
                   "without pretrained weights), or labels that do not follow the images "
                   "(check the manifest's label column)")


def evaluate_all(
    model: nn.Module, loader: DataLoader, device: torch.device, criterion: nn.Module,
    precision: Precision, context: DistContext,
) -> EvalOutput:
    """`evaluate` on this rank's validation slice, gathered so every rank sees all of it in the
    original order (single process: just `evaluate`). Always in float32 (the memory format
    kept): calibration, the gate and the trust layer are fit on these logits, and the exported
    model scores in float32; bf16 logits differed by ~1e-3, enough to shift the OOD limit and
    the conformal coverage."""
    out = evaluate(model, loader, device, criterion,
                   precision=Precision(None, precision.channels_last))
    if not context.enabled:
        return out
    loss = mean_across_ranks(out.loss * len(out.targets), len(out.targets), context)
    return EvalOutput(gather_rows(out.logits, context), gather_rows(out.targets, context), loss)


def _val_metrics(logits: np.ndarray, targets: np.ndarray, positive_index: int) -> dict[str, float]:
    probs = softmax(logits)
    return binary_metrics(targets == positive_index, probs[:, positive_index])


def learning_warning(history: list[dict[str, Any]], check_epoch: int,
                     baseline_loss: float) -> str | None:
    """A plain warning when the lowest training loss up to `check_epoch` is still at the loss
    of a constant prediction (within 3%): the model is not learning from the images."""
    if not check_epoch or len(history) <= check_epoch:
        return None
    loss = min(row["train_loss"] for row in history[:check_epoch + 1])
    if loss < 0.97 * baseline_loss:
        return None
    return (f"the training loss is still at the level of a constant prediction after "
            f"{check_epoch + 1} epochs (lowest {loss:.4f}; a constant prediction scores "
            f"{baseline_loss:.4f}): the model may not be learning from the images; "
            f"{LEARNING_CAUSES}")


class EpochLoop:
    """The epochs of the validation run: train, evaluate, log, keep the best, save `last.pt`."""

    def __init__(self, setup: RunSetup, trainer: Trainer, selection: Selection,
                 val_loader: DataLoader, tracker: Any, augment: Any) -> None:
        self.setup, self.cfg, self.run_data = setup, setup.cfg, setup.run
        self.trainer, self.selection, self.val_loader = trainer, selection, val_loader
        self.tracker, self.augment = tracker, augment
        self.history: list[dict[str, Any]] = []
        # best_score: the highest score so far (early stopping counts epochs without a new
        # one); best_epoch / chosen_score: the epoch kept in best.pt (see `_choose`)
        self.best_score, self.best_epoch, self.stale = -math.inf, -1, 0
        self.chosen_score = -math.inf
        self.warnings: list[str] = []
        self.best_output: EvalOutput | None = None  # the best epoch's validation logits
        # No epoch of the learning-rate warm-up can be "best": it has not trained at its rate.
        self.first_candidate = min(self.cfg.train.warmup_epochs, self.cfg.train.epochs - 1)
        self.writer = CheckpointWriter(save_checkpoint)  # best.pt and last.pt, rank 0

    def run(self, state: dict[str, Any] | None) -> None:
        """The epochs from the start or after `state`'s; returns once every checkpoint is on
        disk (an error or Ctrl-C, too, waits for the epochs already finished)."""
        first_epoch = 0
        if state is not None:
            first_epoch = self._restore(state)
        patience = self.cfg.train.patience
        try:
            for epoch in range(first_epoch, self.cfg.train.epochs):
                if self.stale and patience and self.stale >= patience:
                    break  # a resumed run that had already stopped early
                self._epoch(epoch)
                if patience and self.stale >= patience:
                    log.info("early stop at epoch %d (best epoch %d)", epoch, self.best_epoch)
                    break
        finally:
            self.writer.flush()

    def _restore(self, state: dict[str, Any]) -> int:
        self.trainer.restore(state)
        self.history = list(state["history"])
        self.best_epoch, self.stale = state["best_epoch"], state["stale"]
        self.best_score = state["best_score"]
        self.chosen_score = state.get("chosen_score", self.best_score)
        restore_rng_state(state["rng"], self.trainer.generator, self.augment)
        scaler = self.setup.precision.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resuming %s at epoch %d (best so far: epoch %d)", self.setup.run_dir,
                 state["epoch"] + 1, self.best_epoch)
        return state["epoch"] + 1

    def _epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        setup, trainer = self.setup, self.trainer
        train_loss = trainer.run_epoch(epoch, setup.device, setup.precision, setup.context,
                                       setup.progress and setup.main)
        validated = epoch >= self.first_candidate or self.cfg.train.validate_warmup
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
        if validated:
            full = evaluate_all(trainer.scored, self.val_loader, setup.device,
                                trainer.criterion, setup.precision, setup.context)
            metrics, out = self._metrics(full)
            row |= {"val_loss": out.loss, **{f"val_{k}": v for k, v in metrics.items()}}
        row |= {"lr": trainer.optimizer.param_groups[-1]["lr"],
                "train_side": trainer.side(epoch), "epoch_seconds": time.perf_counter() - started}
        self.history.append(row)
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if setup.main:
            atomic_write_text(setup.run_dir / HISTORY_FILE,
                              pd.DataFrame(self.history).to_csv(index=False))
        if validated:
            self._choose(epoch, metrics, out.loss, full)
        self._check_learning(epoch)
        self._save_last(epoch)
        if setup.progress and setup.main:
            self._print(epoch, train_loss, row)

    def _metrics(self, full: EvalOutput) -> tuple[dict[str, float], EvalOutput]:
        """The epoch's validation metrics (the main classes', the grade heads' accuracies, the
        selection metric) and the main classes' output."""
        run = self.run_data
        out = main_output(full, len(run.classes))  # all below reads the main classes only
        metrics = {**_val_metrics(out.logits, out.targets, run.positive_index),
                   **head_accuracies(full.logits, full.targets, run.heads)}
        if self.selection.metric != "auc":  # the same gathered rows on every rank
            metrics[self.selection.metric] = self.selection.score(
                out.targets == run.positive_index, softmax(out.logits)[:, run.positive_index])
        return metrics, out

    def _save_last(self, epoch: int) -> None:
        """`last.pt`: the trainer, the loop's bookkeeping and every random stream (rank 0)."""
        if not self.setup.main:
            return
        trainer, scaler = self.trainer, self.setup.precision.scaler
        self.writer.save({
            **trainer.state(), "epoch": epoch, "history": self.history,
            "best_score": self.best_score, "best_epoch": self.best_epoch, "stale": self.stale,
            "chosen_score": self.chosen_score,
            "run_id": self.tracker.run_id, "rng": rng_state(trainer.generator, self.augment),
            "scaler": scaler.state_dict() if scaler else None,
        }, self.setup.run_dir / LAST_FILE)

    def _print(self, epoch: int, train_loss: float, row: dict[str, Any]) -> None:
        side = ("" if row["train_side"] == self.cfg.data.image_size else
                f", trained at {row['train_side']} px")
        if "val_loss" not in row:
            validation = "warm-up epoch, not validated (never chosen)"
        else:
            chosen = ("" if self.selection.metric == "auc" else
                      f"  val_{self.selection.metric} {row[f'val_{self.selection.metric}']:.4f}")
            validation = f"val_loss {row['val_loss']:.4f}  val_auc {row['val_auc']:.4f}{chosen}"
        print(f"epoch {epoch:3d}  train_loss {train_loss:.4f}  {validation}  "
              f"({row['epoch_seconds']:.1f}s{side})", flush=True)

    def _choose(self, epoch: int, metrics: dict[str, float], val_loss: float,
                full: EvalOutput) -> None:
        """Keep `best.pt` (and its validation logits) for this epoch when it is the best so far
        or, with `train.select_within_se`, within one standard error of the best (a later
        epoch is preferred: see `embryo_ml.evaluation.selection`). Epochs before
        `first_candidate` are never kept."""
        if epoch < self.first_candidate:
            return
        chosen = metrics[self.selection.metric]
        score = chosen if not math.isnan(chosen) else -val_loss
        best = max(self.best_score, score)
        tolerance = (self.selection.standard_error(best)
                     if self.cfg.train.select_within_se and not math.isnan(chosen) else 0.0)
        improved, keep = keep_epoch(score, self.best_score, tolerance)
        if improved:
            self.best_score, self.stale = score, 0
        else:
            self.stale += 1
        if keep:
            self.best_epoch, self.chosen_score, self.best_output = epoch, score, full
            if self.setup.main:  # every rank holds the same weights
                best = self.setup.best_checkpoint(self.trainer.scored, epoch, metrics,
                                                  self.tracker.run_id)
                self.writer.save(best.to_dict(), self.setup.run_dir / BEST_FILE)

    def _check_learning(self, epoch: int) -> None:
        warning = (learning_warning(self.history, self.cfg.train.learning_check_epoch,
                                    self.trainer.baseline_loss)
                   if epoch == self.cfg.train.learning_check_epoch else None)
        if warning and self.setup.main:
            self.warnings.append(warning)
            log.warning("%s", warning)
