"""One training run end to end: data -> grouped split -> model -> epochs -> best checkpoint.

The run directory receives, as they happen: `config.yaml` (resolved), `best.pt` (best validation
score so far by `train.select_metric`, written atomically), `history.csv`, and at the end
`metrics.json`, `val_predictions.csv` and `subgroup_metrics.csv`. MLflow receives the same,
plus plots and the dataset fingerprint.

Which rules train the model depends on whether pretrained weights were loaded
(`embryo_ml.train.recipe`); the EMA warms up (`embryo_ml.train.ema`); the best epoch is chosen by
a metric a small subgroup cannot dominate (`embryo_ml.evaluation.selection`), never during the
learning-rate warm-up. After the epochs, the final validation is evaluated by
`embryo_ml.evaluation` and judged by the model-quality gate (`embryo_ml.evaluation.gate`):
`metrics.json` holds the verdict under `validation`, the evaluation under `evaluation`, its
headline numbers as `val_within_<column>_auc`, ..., and the checkpoint metric as
`select_metric` / `best_score`. With `train.refit` the model is then retrained on train +
validation for the chosen number of epochs (`best.pt` is that model; the validation run's
checkpoint stays as `selection.pt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import embryo_ml
from embryo_ml.config import CalibrationConfig, Config, save_config
from embryo_ml.data.cache import DecodedCache
from embryo_ml.data.dataset import EmbryoImageDataset
from embryo_ml.data.heads import (
    Heads,
    head_accuracies,
    head_columns,
    head_layout,
    head_summary,
    main_output,
    output_width,
)
from embryo_ml.data.labels import build_targets
from embryo_ml.data.manifest import load_table
from embryo_ml.data.preprocess import decode_side, read_for_model
from embryo_ml.data.quality import QualityThresholds, fit_thresholds
from embryo_ml.data.splits import grouped_split
from embryo_ml.data.transforms import build_eval_transform, build_train_transform
from embryo_ml.errors import ConfigError
from embryo_ml.evaluation.calibration import (
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
)
from embryo_ml.evaluation.gate import FAILED, validation_verdict, verdict_line
from embryo_ml.evaluation.report import Evaluation, evaluate_predictions, evaluation_figures
from embryo_ml.evaluation.selection import Selection, keep_epoch, resolve_selection
from embryo_ml.fileio import atomic_write_text, durable_replace
from embryo_ml.train.distributed import (
    DistContext,
    barrier,
    gather_rows,
    init_distributed,
    mean_across_ranks,
    shard_indices,
    shutdown,
)
from embryo_ml.train.loop import EvalOutput, Precision, evaluate
from embryo_ml.train.metrics import binary_metrics, confusion, softmax
from embryo_ml.train.models import build_model_with_source, model_normalization
from embryo_ml.train.precision import resolve_precision
from embryo_ml.train.recipe import Recipe, resolve_recipe
from embryo_ml.train.state import (
    CHECKPOINT_NAME,
    LAST_NAME,
    atomic_torch_save,
    load_checkpoint,
    restore_rng_state,
    rng_state,
)
from embryo_ml.train.tracking import (
    NullTracker,
    RunTracker,
    check_reachable,
    git_commit,
    redact_tree,
    resolve_tracking_uri,
)
from embryo_ml.train.trainer import Trainer, build_trainer, loader_args
from embryo_ml.versions import package_versions

log = logging.getLogger(__name__)
QUALITY_NAME = "quality.json"
TRAIN_IMAGES_NAME = "train_images.csv"  # the training images: export's feature reference
# Columns of train_images.csv beside path and label, where the manifest has them: what the
# model card summarises (counts only; identifiers never leave the run folder).
TRAIN_IMAGE_COLUMNS = ("day", "clinic", "source", "focal_plane", "patient_id", "embryo_id")
SELECTION_NAME = "selection.pt"  # with train.refit: the validation run's best checkpoint
LEARNING_CAUSES = ("likely causes: a learning rate too low or too high (train.lr, "
                   "train.scratch_lr), a frozen random backbone (train.freeze_backbone_epochs "
                   "without pretrained weights), or labels that do not follow the images "
                   "(check the manifest's label column)")

__all__ = ["FitResult", "fit", "resolve_precision", "load_checkpoint", "evaluation_frame"]


@dataclass
class FitResult:
    run_id: str
    run_dir: Path
    metrics: dict[str, Any]
    tracking_uri: str


@dataclass
class RunData:
    """The labelled table of a run and its split."""

    table: pd.DataFrame
    classes: list[str]
    targets: np.ndarray  # main-class index per row
    item_targets: np.ndarray  # what the loader yields: targets, or gardner target rows
    heads: Heads
    positive_index: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    group_column: str

    @cached_property
    def paths(self) -> list[str]:
        return self.table["path"].tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def evaluate_all(
    model: nn.Module, loader: DataLoader, device: torch.device, criterion: nn.Module,
    precision: Precision, context: DistContext,
) -> EvalOutput:
    """`evaluate` on this rank's validation slice, gathered so every rank sees all of it in the
    original order (single process: just `evaluate`)."""
    out = evaluate(model, loader, device, criterion, precision=precision)
    if not context.enabled:
        return out
    loss = mean_across_ranks(out.loss * len(out.targets), len(out.targets), context)
    return EvalOutput(gather_rows(out.logits, context), gather_rows(out.targets, context), loss)


def dataset_fingerprint(table: pd.DataFrame) -> dict[str, Any]:
    """What data a run saw, without patient identifiers: a hash of (file name, label) pairs and
    counts per class. Same files + labels -> same hash, wherever the folder lives."""
    pairs = sorted(f"{Path(p).name}\t{lbl}" for p, lbl in zip(table["path"], table["label"]))
    digest = hashlib.sha256("\n".join(pairs).encode()).hexdigest()
    counts = table["label"].value_counts().sort_index()
    return {"data.sha256": digest, "data.n_images": len(table),
            **{f"data.count.{k}": int(v) for k, v in counts.items()}}


def _save_on_main(main: bool, state: dict[str, Any], path: Path) -> None:
    """Checkpoints are written by DDP rank 0 only (every rank holds the same weights)."""
    if main:
        atomic_torch_save(state, path)


def _write_json(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=float))


def calibrate(
    logits: np.ndarray, targets: np.ndarray, positive_index: int, cfg: CalibrationConfig
) -> dict[str, float]:
    """Temperature and threshold fit on validation logits, with ECE and Brier before/after."""
    is_positive = targets == positive_index
    raw = softmax(logits)[:, positive_index]
    temperature = fit_temperature(logits, targets) if cfg.method == "temperature" else 1.0
    scaled = softmax(logits, temperature)[:, positive_index]
    threshold = choose_threshold(is_positive, scaled, cfg.threshold, cfg.target_sensitivity,
                                 cfg.fixed_threshold)
    return {"temperature": temperature, "threshold": threshold,
            "val_ece_before": expected_calibration_error(is_positive, raw),
            "val_ece_after": expected_calibration_error(is_positive, scaled),
            "val_brier_before": brier_score(is_positive, raw),
            "val_brier_after": brier_score(is_positive, scaled)}


def quality_thresholds(
    train_paths: list[str], val_logits: np.ndarray, seed: int, max_pixels: int, size: int,
    sample: int = 300,
) -> QualityThresholds:
    """Image-quality limits for the bundle: focus from (a sample of) the training images,
    decoded as the scorer decodes them for a `size` px model, the out-of-distribution energy
    limit from the validation logits."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train_paths), min(sample, len(train_paths)), replace=False)
    grays = (read_for_model(train_paths[i], size, max_pixels) for i in sorted(chosen))
    return fit_thresholds(grays, val_logits)


def predict_classes(probs: np.ndarray, positive_index: int, threshold: float) -> np.ndarray:
    """Binary: positive when its probability reaches the threshold; more classes: argmax."""
    if probs.shape[1] != 2:
        return probs.argmax(axis=1)
    return np.where(probs[:, positive_index] >= threshold, positive_index, 1 - positive_index)


def _val_metrics(logits: np.ndarray, targets: np.ndarray, positive_index: int) -> dict[str, float]:
    probs = softmax(logits)
    return binary_metrics(targets == positive_index, probs[:, positive_index])


def evaluation_frame(table: pd.DataFrame, rows: np.ndarray, positive_class: str,
                      grade_column: str) -> pd.DataFrame:
    """Manifest columns of `rows` with `y` (is the positive class) for `embryo_ml.evaluation`;
    the Gardner grade goes under `grade` whatever its manifest column is called."""
    frame = table.iloc[rows].reset_index(drop=True)
    if grade_column != "grade" and grade_column in frame.columns:
        frame = frame.drop(columns="grade", errors="ignore").rename(columns={grade_column: "grade"})
    return frame.assign(y=(frame["label"] == positive_class).to_numpy())


def _evaluate_validation(
    cfg: Config, run: RunData, p_positive: np.ndarray, predicted_positive: np.ndarray,
) -> tuple[Evaluation, pd.DataFrame]:
    """The final validation predictions through `embryo_ml.evaluation` (shortcut baselines fit
    on the training rows); returns the evaluation and the frame it read."""
    positive = cfg.data.positive_class
    frame = evaluation_frame(run.table, run.val_idx, positive, cfg.labels.grade_column).assign(
        score=p_positive, predicted=predicted_positive)
    train = evaluation_frame(run.table, run.train_idx, positive, cfg.labels.grade_column)
    return evaluate_predictions(frame, cfg.eval, positive, cfg.seed, train=train), frame


def load_run_data(cfg: Config, source: str | os.PathLike[str],
                  split: tuple[np.ndarray, np.ndarray] | None) -> RunData:
    """The manifest with its training targets, and the grouped split (or the given one)."""
    table = load_table(source)
    labelled = build_targets(table, cfg.labels, cfg.data.positive_class)
    classes = labelled.classes
    table = table.assign(label=labelled.labels)  # what the split stratifies and hashes
    if split is None:
        train_idx, val_idx, group_column = grouped_split(table, cfg.data.val_fraction, cfg.seed)
    else:
        (train_idx, val_idx), group_column = split, "given"
    return RunData(table, classes, labelled.y, labelled.item_targets(),
                   head_layout(cfg.labels.task, len(classes)),
                   classes.index(cfg.data.positive_class), train_idx, val_idx, group_column)


@dataclass
class Inputs:
    """How images reach the model: size, normalisation, the decoded cache."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cache: DecodedCache | None
    max_pixels: int

    def dataset(self, paths: list[str], targets: np.ndarray, transform: Any) -> EmbryoImageDataset:
        return EmbryoImageDataset(paths, targets, transform, self.cache, self.max_pixels,
                                  decode_side(self.size))


def training_set(cfg: Config, run: RunData, inputs: Inputs, rows: np.ndarray,
                 seed: int) -> tuple[EmbryoImageDataset, Any]:
    """The augmented training dataset of `rows`, and its augmentation pipeline (whose random
    state `last.pt` keeps)."""
    augment = build_train_transform(inputs.size, inputs.mean, inputs.std,
                                    cfg.augment if cfg.train.augment else None, seed=seed)
    paths = run.paths
    return inputs.dataset([paths[i] for i in rows], run.item_targets[rows], augment), augment


def build_run_model(cfg: Config, run: RunData, device: torch.device,
                    precision: Precision) -> tuple[nn.Module, Recipe, Inputs]:
    """The model (weights as configured), the recipe that follows from what was loaded, and
    the input pipeline settings (mean/std from the model's pretrained config unless set)."""
    model, weights = build_model_with_source(
        cfg.model, num_classes=output_width(len(run.classes), run.heads))
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    default_mean, default_std = model_normalization(model)
    size = cfg.data.image_size
    cache = (DecodedCache(cfg.data.cache_dir, size, cfg.data.max_pixels)
             if cfg.data.cache_dir else None)
    inputs = Inputs(size, tuple(cfg.data.mean or default_mean), tuple(cfg.data.std or default_std),
                    cache, cfg.data.max_pixels)
    return model, resolve_recipe(cfg.train, weights), inputs


def _best_checkpoint(cfg: Config, run: RunData, scored: nn.Module, inputs: Inputs,
                     epoch: int, metrics: dict[str, float], run_id: str | None,
                     **extra: Any) -> dict[str, Any]:
    """`best.pt`: what export needs of the model and its inputs."""
    return {"state_dict": scored.state_dict(), "model_name": cfg.model.name,
            "classes": run.classes, "positive_class": cfg.data.positive_class,
            "image_size": inputs.size, "mean": list(inputs.mean), "std": list(inputs.std),
            "epoch": epoch, "val_metrics": metrics, "config": cfg.model_dump(mode="json"),
            "heads": run.heads, "run_id": run_id, **extra}


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


def fit(
    cfg: Config, data: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str],
    progress: bool = True, resume: bool = False,
    split: tuple[np.ndarray, np.ndarray] | None = None, nested: bool = False,
) -> FitResult:
    """Train one model as `cfg` says; return the MLflow run id and final validation metrics.

    `resume=True` continues the run in `run_dir` from its `last.pt` (same MLflow run).
    `split` gives (train, validation) row indices instead of the grouped split (a CV fold);
    `nested` logs the run as a child of the active MLflow run.

    Under `torchrun` (WORLD_SIZE > 1) the run is data-parallel (see `train.distributed`): only
    rank 0 logs to MLflow and writes the run folder; every rank returns the same metrics."""
    device = pick_device(cfg.train.device)
    context = init_distributed(device.type == "cuda")
    threads = torch.get_num_threads()
    try:
        return _fit(cfg, data, run_dir, progress, resume, split, nested, device, context)
    finally:
        torch.set_num_threads(threads)  # a notebook's torch keeps its own setting
        shutdown(context)


def _log_start(tracker: Any, cfg: Config, run: RunData, recipe: Recipe, trainer: Trainer,
               precision: Precision, device: torch.device, context: DistContext) -> None:
    """The run's parameters and tags in MLflow (a new run only)."""
    tracker.log_params(cfg.flat())
    tracker.log_params({"data.classes": ",".join(run.classes),
                        "data.split_group": run.group_column,
                        "data.n_train": len(run.train_idx), "data.n_val": len(run.val_idx),
                        "train.world_size": context.world_size,
                        "train.precision": str(precision.amp_dtype or "float32"),
                        "train.channels_last_used": precision.channels_last,
                        **{f"recipe.{k}": v for k, v in recipe.to_json().items()},
                        "recipe.ema_max_decay": trainer.ema.max_decay if trainer.ema else None})
    tracker.set_tags({**dataset_fingerprint(run.table), "git_commit": git_commit(),
                      "embryo_ml_version": embryo_ml.__version__,
                      "torch_version": torch.__version__, "device": device.type,
                      **{f"version.{k}": v for k, v in package_versions().items()}})


def _fit(
    cfg: Config, data: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str],
    progress: bool, resume: bool, split: tuple[np.ndarray, np.ndarray] | None, nested: bool,
    device: torch.device, context: DistContext,
) -> FitResult:
    source = data or cfg.data.manifest
    if source is None:
        raise ConfigError("no training data: pass --data or set data.manifest")
    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))  # before any heavy work
    if context.enabled and cfg.train.weighted_sampler:
        raise ConfigError("train.weighted_sampler is not available with torchrun (DDP); use "
                          "loss.class_weights=auto instead")
    if context.enabled and cfg.train.refit:
        raise ConfigError("train.refit is not available with torchrun (DDP) yet")
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / LAST_NAME) if resume else None
    run = load_run_data(cfg, source, split)
    main = context.is_main  # the one process that writes files and talks to MLflow
    selection: Selection = resolve_selection(
        cfg, run.table.iloc[run.val_idx], run.targets[run.val_idx] == run.positive_index)
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda" and context.enabled:
        device = torch.device("cuda", context.local_rank)
    precision = resolve_precision(cfg.train.amp, cfg.train.channels_last, device)
    model, recipe, inputs = build_run_model(cfg, run, device, precision)  # may refuse offline
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _write_json({"data": str(Path(source).resolve())}, run_dir / "run.json")
    train_set, augment = training_set(cfg, run, inputs, run.train_idx, cfg.seed + context.rank)
    val_set = inputs.dataset([run.paths[i] for i in run.val_idx], run.item_targets[run.val_idx],
                             build_eval_transform(inputs.size, inputs.mean, inputs.std))
    val_shard = (Subset(val_set, shard_indices(len(val_set), context)) if context.enabled
                 else val_set)
    val_loader = DataLoader(val_shard, shuffle=False, **loader_args(cfg, device))
    trainer = build_trainer(cfg, model, recipe, train_set, run.targets[run.train_idx],
                            len(run.classes), run.heads, device, context, cfg.train.epochs)

    tracker_context = (RunTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment,
                                  run_name=run_dir.name,
                                  run_id=state["run_id"] if state else None, nested=nested)
                       if main else NullTracker(cfg.tracking.tracking_uri))
    with tracker_context as tracker:
        if state is None:
            _log_start(tracker, cfg, run, recipe, trainer, precision, device, context)
            tracker.log_config(cfg.model_dump(mode="json"))  # paths hashed (privacy)
        if main:
            atomic_write_text(run_dir / "run_id.txt", tracker.run_id or "")
            log.info("MLflow run %s; %d train / %d val images grouped by %s%s", tracker.run_id,
                     len(run.train_idx), len(run.val_idx), run.group_column,
                     f"; {context.world_size} DDP processes" if context.enabled else "")
            log.info("%s", recipe.describe())
            if trainer.ema is not None:
                log.info("EMA of the weights: decay warmed up from 0.1, at most %.4f (%d steps)",
                         trainer.ema.max_decay, cfg.train.epochs * len(trainer.loader))
            log.info("best checkpoint by %s (%s)%s", selection.metric, selection.note,
                     f"; keeps the latest epoch within one standard error of the best (about "
                     f"{selection.standard_error(0.75):.3f} at 0.75 on {selection.n_positive}+"
                     f"{selection.n_negative} images)" if cfg.train.select_within_se else "")
        loop = _EpochLoop(cfg, run, trainer, inputs, selection, val_loader, device, precision,
                          context, run_dir, main, progress, tracker, augment)
        loop.run(state)
        return _finish(cfg, run, trainer, inputs, selection, loop, val_loader, device,
                       precision, context, run_dir, tracker, progress, source)


class _EpochLoop:
    """The epochs of the validation run: train, evaluate, log, keep the best, save `last.pt`."""

    def __init__(self, cfg: Config, run: RunData, trainer: Trainer, inputs: Inputs,
                 selection: Selection, val_loader: DataLoader, device: torch.device,
                 precision: Precision, context: DistContext, run_dir: Path, main: bool,
                 progress: bool, tracker: Any, augment: Any) -> None:
        self.cfg, self.run_data, self.trainer, self.inputs = cfg, run, trainer, inputs
        self.selection, self.val_loader, self.device = selection, val_loader, device
        self.precision, self.context, self.run_dir, self.main = precision, context, run_dir, main
        self.progress, self.tracker, self.augment = progress, tracker, augment
        self.history: list[dict[str, Any]] = []
        # best_score: the highest score so far (early stopping counts epochs without a new
        # one); best_epoch / chosen_score: the epoch kept in best.pt (see `_choose`)
        self.best_score, self.best_epoch, self.stale = -math.inf, -1, 0
        self.chosen_score = -math.inf
        self.warnings: list[str] = []
        self.best_output: EvalOutput | None = None  # the best epoch's validation logits
        # No epoch of the learning-rate warm-up can be "best": it has not trained at its rate.
        self.first_candidate = min(cfg.train.warmup_epochs, cfg.train.epochs - 1)

    def run(self, state: dict[str, Any] | None) -> None:
        first_epoch = 0
        if state is not None:
            first_epoch = self._restore(state)
        patience = self.cfg.train.patience
        for epoch in range(first_epoch, self.cfg.train.epochs):
            if self.stale and patience and self.stale >= patience:
                break  # a resumed run that had already stopped early
            self._epoch(epoch)
            if patience and self.stale >= patience:
                log.info("early stop at epoch %d (best epoch %d)", epoch, self.best_epoch)
                break

    def _restore(self, state: dict[str, Any]) -> int:
        self.trainer.restore(state)
        self.history = list(state["history"])
        self.best_epoch, self.stale = state["best_epoch"], state["stale"]
        self.best_score = state["best_score"]
        self.chosen_score = state.get("chosen_score", self.best_score)
        restore_rng_state(state["rng"], self.trainer.generator, self.augment)
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        log.info("resuming %s at epoch %d (best so far: epoch %d)", self.run_dir,
                 state["epoch"] + 1, self.best_epoch)
        return state["epoch"] + 1

    def _epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        run, trainer, n_classes = self.run_data, self.trainer, len(self.run_data.classes)
        train_loss = trainer.run_epoch(epoch, self.device, self.precision, self.context,
                                       self.progress and self.main)
        full = evaluate_all(trainer.scored, self.val_loader, self.device, trainer.criterion,
                            self.precision, self.context)
        out = main_output(full, n_classes)  # all below reads the main classes only
        metrics = {**_val_metrics(out.logits, out.targets, run.positive_index),
                   **head_accuracies(full.logits, full.targets, run.heads)}
        if self.selection.metric != "auc":  # the same gathered rows on every rank
            metrics[self.selection.metric] = self.selection.score(
                out.targets == run.positive_index, softmax(out.logits)[:, run.positive_index])
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": out.loss,
               **{f"val_{k}": v for k, v in metrics.items()},
               "lr": trainer.optimizer.param_groups[-1]["lr"],
               "epoch_seconds": time.perf_counter() - started}
        self.history.append(row)
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if self.main:
            atomic_write_text(self.run_dir / "history.csv",
                              pd.DataFrame(self.history).to_csv(index=False))
        self._choose(epoch, metrics, out.loss, full)
        self._check_learning(epoch)
        _save_on_main(self.main, {
            **trainer.state(), "epoch": epoch, "history": self.history,
            "best_score": self.best_score, "best_epoch": self.best_epoch, "stale": self.stale,
            "chosen_score": self.chosen_score,
            "run_id": self.tracker.run_id, "rng": rng_state(trainer.generator, self.augment),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
        }, self.run_dir / LAST_NAME)
        if self.progress and self.main:
            chosen = ("" if self.selection.metric == "auc" else
                      f"  val_{self.selection.metric} {metrics[self.selection.metric]:.4f}")
            print(f"epoch {epoch:3d}  train_loss {train_loss:.4f}  val_loss {out.loss:.4f}  "
                  f"val_auc {metrics['auc']:.4f}{chosen}  ({row['epoch_seconds']:.1f}s)",
                  flush=True)

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
            _save_on_main(self.main, _best_checkpoint(
                self.cfg, self.run_data, self.trainer.scored, self.inputs, epoch, metrics,
                self.tracker.run_id), self.run_dir / CHECKPOINT_NAME)

    def _check_learning(self, epoch: int) -> None:
        warning = (learning_warning(self.history, self.cfg.train.learning_check_epoch,
                                    self.trainer.baseline_loss)
                   if epoch == self.cfg.train.learning_check_epoch else None)
        if warning and self.main:
            self.warnings.append(warning)
            log.warning("%s", warning)


def _finish(cfg: Config, run: RunData, trainer: Trainer, inputs: Inputs, selection: Selection,
            loop: _EpochLoop, val_loader: DataLoader, device: torch.device,
            precision: Precision, context: DistContext, run_dir: Path, tracker: Any,
            progress: bool, source: str | os.PathLike[str]) -> FitResult:
    """After the epochs: the best checkpoint's calibration, evaluation and verdict, the run
    folder's files and MLflow's figures; the refit, when asked for."""
    main = context.is_main
    barrier(context)  # rank 0 has written best.pt
    checkpoint_path = run_dir / CHECKPOINT_NAME
    trainer.scored.load_state_dict(load_checkpoint(checkpoint_path)["state_dict"])
    # One process: the kept epoch's logits are those of best.pt (evaluation is deterministic).
    # Under DDP each rank's BatchNorm statistics can differ from rank 0's (DDP broadcasts them
    # at the next training forward), so every rank re-evaluates rank 0's checkpoint.
    full = None if context.enabled else loop.best_output
    if full is None:  # DDP, or the kept epoch was before a resume
        full = evaluate_all(trainer.scored, val_loader, device, trainer.criterion, precision,
                            context)
    out = main_output(full, len(run.classes))
    calibrated = calibrate(out.logits, out.targets, run.positive_index, cfg.calibration)
    probs = softmax(out.logits, calibrated["temperature"])
    is_positive = out.targets == run.positive_index
    metrics = binary_metrics(is_positive, probs[:, run.positive_index], calibrated["threshold"])
    predicted = predict_classes(probs, run.positive_index, calibrated["threshold"])
    evaluation, eval_frame = _evaluate_validation(cfg, run, probs[:, run.positive_index],
                                                  predicted == run.positive_index)
    validation = validation_verdict(evaluation, cfg.eval)
    warnings = list(loop.warnings)
    if validation["verdict"] == FAILED:
        warnings.append(f"the model did not learn to rank the validation images: "
                        f"{LEARNING_CAUSES}")
    final = {**{f"val_{k}": v for k, v in metrics.items()}, "val_loss": out.loss,
             **{f"val_{k}": v for k, v in evaluation.headline().items()},
             "select_metric": selection.metric, "selection_rule": selection.note,
             "best_score": loop.best_score, "chosen_score": loop.chosen_score,
             "select_within_se": cfg.train.select_within_se,
             **calibrated, "best_epoch": loop.best_epoch,
             "epochs_run": len(loop.history), "n_train": len(run.train_idx),
             "n_val": len(run.val_idx), "classes": run.classes,
             "positive_class": cfg.data.positive_class,
             "val_confusion_matrix": confusion(out.targets, predicted, len(run.classes)).tolist(),
             **head_summary(full.logits, full.targets, run.heads), "run_id": tracker.run_id,
             "recipe": {**trainer.recipe.to_json(),
                        "ema_max_decay": trainer.ema.max_decay if trainer.ema else None},
             "validation": validation, "learning_warnings": warnings,
             "shortcut_warnings": evaluation.warnings, "evaluation": evaluation.to_json()}
    if not main:
        return FitResult("", run_dir, final, tracker.tracking_uri)
    if progress:
        print(evaluation.format(), flush=True)
    else:
        for warning in evaluation.warnings:
            log.warning("%s", warning.removeprefix("WARNING: "))
    if cfg.train.refit:
        final["refit"] = _refit(cfg, run, inputs, device, precision, context, run_dir,
                                loop.best_epoch + 1, tracker.run_id, progress)
    _write_run_files(cfg, run, inputs, final, evaluation, out, full, probs, calibrated,
                     run_dir)
    _log_finish(cfg, run, tracker, final, evaluation, eval_frame, loop.history, out, probs,
                calibrated, is_positive, checkpoint_path)
    return FitResult(tracker.run_id or "", run_dir, final, tracker.tracking_uri)


def _refit(cfg: Config, run: RunData, inputs: Inputs, device: torch.device,
           precision: Precision, context: DistContext, run_dir: Path, epochs: int,
           run_id: str | None, progress: bool) -> dict[str, Any]:
    """`train.refit`: a fresh model trained on train + validation for `epochs` epochs (the
    validation run's best epoch count, its schedule compressed to that length) replaces
    `best.pt`; the validation run's checkpoint is kept as `selection.pt`. Nothing is held out
    from the refit model: its calibration and verdict are the validation run's (said so in
    `metrics.json`)."""
    durable_replace(run_dir / CHECKPOINT_NAME, run_dir / SELECTION_NAME)
    seed_everything(cfg.seed)
    model, recipe, _ = build_run_model(cfg, run, device, precision)
    rows = np.sort(np.concatenate([run.train_idx, run.val_idx]))
    train_set, _ = training_set(cfg, run, inputs, rows, cfg.seed)
    trainer = build_trainer(cfg, model, recipe, train_set, run.targets[rows], len(run.classes),
                            run.heads, device, context, epochs)
    log.info("refit: %d epochs on all %d images (train + validation)", epochs, len(rows))
    losses = [trainer.run_epoch(epoch, device, precision, context, progress)
              for epoch in range(epochs)]
    atomic_torch_save(_best_checkpoint(cfg, run, trainer.scored, inputs, epochs - 1, {},
                                       run_id, refit=True), run_dir / CHECKPOINT_NAME)
    if progress:
        print(f"refit: {epochs} epochs on {len(rows)} images, final train_loss {losses[-1]:.4f}",
              flush=True)
    return {"epochs": epochs, "n_images": len(rows), "train_loss": losses,
            "calibration": "temperature and threshold fit on the validation run's held-out "
            "predictions; the refit model has no held-out images of its own",
            "validation": "the verdict is the validation run's (selection.pt)"}


def _write_run_files(cfg: Config, run: RunData, inputs: Inputs, final: dict[str, Any],
                     evaluation: Evaluation, out: EvalOutput, full: EvalOutput,
                     probs: np.ndarray, calibrated: dict[str, float], run_dir: Path) -> None:
    """metrics.json, subgroup_metrics.csv, quality.json and val_predictions.csv."""
    paths = run.paths
    _write_json(final, run_dir / "metrics.json")
    atomic_write_text(run_dir / "subgroup_metrics.csv", evaluation.table().to_csv(index=False))
    _write_json(quality_thresholds([paths[i] for i in run.train_idx], out.logits, cfg.seed,
                                   inputs.max_pixels, inputs.size).to_dict(),
                run_dir / QUALITY_NAME)
    predictions = pd.DataFrame({"path": [paths[i] for i in run.val_idx],
                                "label": [run.classes[t] for t in out.targets]})
    for i, name in enumerate(run.classes):
        predictions[f"p_{name}"] = probs[:, i]
    predictions["label_pred"] = [run.classes[i] for i in predict_classes(
        probs, run.positive_index, calibrated["threshold"])]
    predictions = predictions.assign(**head_columns(full.logits, full.targets, run.heads))
    atomic_write_text(run_dir / "val_predictions.csv", predictions.to_csv(index=False))
    atomic_write_text(run_dir / TRAIN_IMAGES_NAME,
                      training_images(run, run.train_idx).to_csv(index=False))


def training_images(run: RunData, rows: np.ndarray) -> pd.DataFrame:
    """path, label and the TRAIN_IMAGE_COLUMNS the table has, for `rows` of the run's table."""
    table = run.table.iloc[rows]
    frame = pd.DataFrame({"path": table["path"].to_numpy(),
                          "label": [run.classes[t] for t in run.targets[rows]]})
    for column in TRAIN_IMAGE_COLUMNS:
        if column in table.columns:
            frame[column] = table[column].to_numpy()
    return frame


def _log_finish(cfg: Config, run: RunData, tracker: Any, final: dict[str, Any],
                evaluation: Evaluation, eval_frame: pd.DataFrame, history: list[dict],
                out: EvalOutput, probs: np.ndarray, calibrated: dict[str, float],
                is_positive: np.ndarray, checkpoint_path: Path) -> None:
    """Final metrics, tags, figures and artifacts to MLflow."""
    from embryo_ml.evaluation.plots import (  # matplotlib: imported when the figures are drawn
        confusion_matrix_figure,
        reliability_figure,
        training_curves_figure,
    )

    classes, positive_index = run.classes, run.positive_index
    tracker.log_metrics({f"best_{k}": v for k, v in final.items()
                         if isinstance(v, int | float) and k != "best_epoch"})
    tracker.log_metrics({"best_epoch": final["best_epoch"]})
    tracker.log_metrics({f"val_eval.{k}": v for k, v in evaluation.flat_metrics().items()})
    tracker.set_tags({"validation.verdict": final["validation"]["verdict"]})
    if evaluation.warnings:
        tracker.set_tags({"eval.shortcut_warning": ",".join(
            s.column for s in evaluation.shortcuts if s.warning)})
    matrix = np.array(final["val_confusion_matrix"])
    tracker.log_figure(confusion_matrix_figure(matrix, classes), "plots/confusion_matrix.png")
    for name, result in final.get("val_heads", {}).items():
        tracker.log_figure(confusion_matrix_figure(
            np.array(result["confusion_matrix"]), result["classes"],
            f"{name} (n={result['n']} assessable)"), f"plots/confusion_matrix_{name}.png")
    negative = classes[1 - positive_index] if len(classes) == 2 else "other"
    for name, figure in evaluation_figures(eval_frame, evaluation, negative,
                                           calibrated["threshold"]).items():
        tracker.log_figure(figure, f"plots/{name}")
    tracker.log_figure(training_curves_figure(history), "plots/training_curves.png")
    tracker.log_figure(reliability_figure(
        is_positive, softmax(out.logits)[:, positive_index], probs[:, positive_index],
        calibrated["temperature"]), "plots/reliability_diagram.png")
    for name in ("metrics.json", "history.csv", "subgroup_metrics.csv"):
        tracker.log_artifact(checkpoint_path.parent / name)
    if cfg.tracking.log_checkpoint:
        _log_checkpoint(tracker, checkpoint_path)


def _log_checkpoint(tracker: Any, checkpoint_path: Path) -> None:
    """best.pt as MLflow keeps it: its config's paths hashed (`redact_tree`), as the params
    are; the run folder's own best.pt keeps the real paths (resume and export read them)."""
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["config"] = redact_tree(checkpoint["config"])
    with tempfile.TemporaryDirectory(prefix="embryo-ml-checkpoint-") as folder:
        copy = Path(folder) / checkpoint_path.name
        atomic_torch_save(checkpoint, copy)
        tracker.log_artifact(copy, "checkpoint")


def print_verdict(metrics: dict[str, Any]) -> None:
    """The verdict line `train` ends with (and the learning warnings before it)."""
    for warning in metrics.get("learning_warnings") or []:
        print(f"  WARNING: {warning}")
    if metrics.get("validation"):
        print(verdict_line(metrics["validation"]))
