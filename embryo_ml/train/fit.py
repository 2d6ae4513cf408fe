"""One training run end to end: data -> grouped split -> model -> epochs -> best checkpoint.

The run directory (`embryo_ml.train.run_folder` names its files) receives, as they happen:
`config.yaml` (resolved), `best.pt` (best validation score so far by `train.select_metric`,
written atomically), `history.csv`, and at the end `metrics.json`, `val_predictions.csv` and
`subgroup_metrics.csv`. MLflow receives the same, plus plots and the dataset fingerprint.

`fit` reads as its steps: prepare the data and split (`embryo_ml.train.run_data`), build the
model and its loaders and trainer, resume from `last.pt` when asked, run the epochs
(`embryo_ml.train.epochs`), then finish (`embryo_ml.train.finish`): calibrate, evaluate and judge
the kept checkpoint, write the run's files and figures.

Which rules train the model depends on whether pretrained weights were loaded
(`embryo_ml.train.recipe`); the EMA warms up (`embryo_ml.train.ema`). With `train.refit` the
model is then retrained on train + validation for the chosen number of epochs (`best.pt` is that
model; the validation run's checkpoint stays as `selection.pt`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import embryo_ml
from embryo_ml.config import Config, save_config
from embryo_ml.data.heads import output_width
from embryo_ml.data.transforms import build_eval_transform
from embryo_ml.errors import ConfigError
from embryo_ml.evaluation.gate import verdict_line
from embryo_ml.evaluation.selection import Selection, resolve_selection
from embryo_ml.fileio import atomic_write_text, durable_replace
from embryo_ml.train.distributed import DistContext, init_distributed, shard_indices, shutdown
from embryo_ml.train.epochs import EpochLoop
from embryo_ml.train.finish import (
    log_finish,
    report_evaluation,
    validate_kept,
    write_json,
    write_run_files,
)
from embryo_ml.train.loop import Precision
from embryo_ml.train.models import build_model_with_source, model_normalization
from embryo_ml.train.precision import resolve_precision
from embryo_ml.train.pretrain_check import pretraining_check
from embryo_ml.train.recipe import Recipe, resolve_recipe
from embryo_ml.train.run_data import (
    Inputs,
    RunData,
    RunSetup,
    load_run_data,
    model_inputs,
    training_set,
)
from embryo_ml.train.run_folder import (
    BEST_FILE,
    CONFIG_FILE,
    LAST_FILE,
    RUN_ID_FILE,
    RUN_RECORD_FILE,
    SELECTION_FILE,
    load_checkpoint,
    save_best,
)
from embryo_ml.train.tracking import (
    NullTracker,
    RunTracker,
    check_reachable,
    git_commit,
    resolve_tracking_uri,
)
from embryo_ml.train.trainer import Trainer, build_trainer, loader_args
from embryo_ml.versions import package_versions

log = logging.getLogger(__name__)

__all__ = ["FitResult", "fit", "resolve_precision", "load_checkpoint", "print_verdict"]


@dataclass
class FitResult:
    run_id: str
    run_dir: Path
    metrics: dict[str, Any]
    tracking_uri: str


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


def dataset_fingerprint(table: pd.DataFrame) -> dict[str, Any]:
    """What data a run saw, without patient identifiers: a hash of (file name, label) pairs and
    counts per class. Same files + labels -> same hash, wherever the folder lives."""
    pairs = sorted(f"{Path(p).name}\t{lbl}" for p, lbl in zip(table["path"], table["label"]))
    digest = hashlib.sha256("\n".join(pairs).encode()).hexdigest()
    counts = table["label"].value_counts().sort_index()
    return {"data.sha256": digest, "data.n_images": len(table),
            **{f"data.count.{k}": int(v) for k, v in counts.items()}}


def build_run_model(cfg: Config, run: RunData, device: torch.device,
                    precision: Precision) -> tuple[nn.Module, Recipe, Inputs]:
    """The model (weights as configured), the recipe that follows from what was loaded, and
    the input pipeline settings (mean/std from the model's pretrained config unless set)."""
    model, weights = build_model_with_source(
        cfg.model, num_classes=output_width(len(run.classes), run.heads))
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    inputs = model_inputs(cfg, *model_normalization(model))
    return model, resolve_recipe(cfg.train, weights), inputs


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
    rank 0 logs to MLflow and writes the run folder; every rank returns the same metrics.
    `train.threads` holds only while `fit` runs: the caller's thread count comes back."""
    device = pick_device(cfg.train.device)
    context = init_distributed(device.type == "cuda")
    threads = torch.get_num_threads()
    try:
        return _fit(cfg, data, Path(run_dir), progress, resume, split, nested, device, context)
    finally:
        torch.set_num_threads(threads)  # a notebook's torch keeps its own setting
        shutdown(context)


def _fit(
    cfg: Config, data: str | os.PathLike[str] | None, run_dir: Path, progress: bool,
    resume: bool, split: tuple[np.ndarray, np.ndarray] | None, nested: bool,
    device: torch.device, context: DistContext,
) -> FitResult:
    """The steps of `fit`, in order (the order fixes the random streams: keep it)."""
    source = _training_source(cfg, data, context)
    state = load_checkpoint(run_dir / LAST_FILE) if resume else None
    run = load_run_data(cfg, source, split)
    selection: Selection = resolve_selection(
        cfg, run.table.iloc[run.val_idx], run.targets[run.val_idx] == run.positive_index)
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # `fit` restores the caller's
    if device.type == "cuda" and context.enabled:
        device = torch.device("cuda", context.local_rank)
    precision = resolve_precision(cfg.train.amp, cfg.train.channels_last, device)
    model, recipe, inputs = build_run_model(cfg, run, device, precision)  # may refuse offline
    setup = RunSetup(cfg, run, inputs, device, precision, context, run_dir, progress)
    if recipe.weights == "file" and context.is_main:
        setup.pretraining = pretraining_check(cfg, run.table.iloc[run.val_idx], inputs.mean,
                                              inputs.std)
    if setup.main:
        _start_run_folder(setup, source)
    train_set, augment = training_set(cfg, run, inputs, run.train_idx, cfg.seed + context.rank)
    val_loader = _validation_loader(setup)
    trainer = build_trainer(cfg, model, recipe, train_set, run.targets[run.train_idx],
                            len(run.classes), run.heads, device, context, cfg.train.epochs)
    with _tracker(setup, state, nested) as tracker:
        if state is None:
            _log_start(tracker, setup, recipe, trainer)
        if setup.main:
            _announce(setup, tracker, recipe, trainer, selection)
        loop = EpochLoop(setup, trainer, selection, val_loader, tracker, augment)
        loop.run(state)
        return _finish(setup, trainer, selection, loop, val_loader, tracker)


def _training_source(cfg: Config, data: str | os.PathLike[str] | None,
                     context: DistContext) -> str | os.PathLike[str]:
    """The training data, once the run is known to be possible (before any heavy work)."""
    source = data or cfg.data.manifest
    if source is None:
        raise ConfigError("no training data: pass --data or set data.manifest")
    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))
    if context.enabled and cfg.train.weighted_sampler:
        raise ConfigError("train.weighted_sampler is not available with torchrun (DDP); use "
                          "loss.class_weights=auto instead")
    if context.enabled and cfg.train.refit:
        raise ConfigError("train.refit is not available with torchrun (DDP) yet")
    return source


def _start_run_folder(setup: RunSetup, source: str | os.PathLike[str]) -> None:
    """The run folder with its resolved config and `run.json` (what `--resume` reads)."""
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(setup.cfg, setup.run_dir / CONFIG_FILE)
    write_json({"data": str(Path(source).resolve())}, setup.run_dir / RUN_RECORD_FILE)


def _validation_loader(setup: RunSetup) -> DataLoader:
    """The validation images in order, this rank's slice of them under DDP. The loader draws
    its worker seed from a generator of its own: whether and when an epoch is validated
    (`train.validate_warmup`, a resumed run) never moves the training run's random stream."""
    run, inputs, context = setup.run, setup.inputs, setup.context
    val_set = inputs.dataset([run.paths[i] for i in run.val_idx], run.item_targets[run.val_idx],
                             build_eval_transform(inputs.size, inputs.mean, inputs.std))
    val_shard = (Subset(val_set, shard_indices(len(val_set), context)) if context.enabled
                 else val_set)
    return DataLoader(val_shard, shuffle=False, generator=torch.Generator().manual_seed(
        setup.cfg.seed), **loader_args(setup.cfg, setup.device))


def _tracker(setup: RunSetup, state: dict[str, Any] | None,
             nested: bool) -> RunTracker | NullTracker:
    """The run's MLflow run (the resumed one's again), on rank 0; a stand-in elsewhere."""
    cfg = setup.cfg
    if not setup.main:
        return NullTracker(cfg.tracking.tracking_uri)
    return RunTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment,
                      run_name=setup.run_dir.name,
                      run_id=state["run_id"] if state else None, nested=nested)


def _log_start(tracker: Any, setup: RunSetup, recipe: Recipe, trainer: Trainer) -> None:
    """The run's parameters, tags and config in MLflow (a new run only)."""
    cfg, run, precision, context = setup.cfg, setup.run, setup.precision, setup.context
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
                      "torch_version": torch.__version__, "device": setup.device.type,
                      **{f"version.{k}": v for k, v in package_versions().items()}})
    tracker.log_config(cfg.model_dump(mode="json"))  # paths hashed (privacy)


def _ranges(sides: list[int]) -> str:
    """[80, 80, 96] -> '80 (epochs 0-1), 96 (epoch 2)'."""
    parts, start = [], 0
    for epoch in range(1, len(sides) + 1):
        if epoch == len(sides) or sides[epoch] != sides[start]:
            span = f"epoch {start}" if epoch - 1 == start else f"epochs {start}-{epoch - 1}"
            parts.append(f"{sides[start]} ({span})")
            start = epoch
    return ", ".join(parts)


def _announce(setup: RunSetup, tracker: Any, recipe: Recipe, trainer: Trainer,
              selection: Selection) -> None:
    """`run_id.txt`, and the log lines that say how this run trains and chooses its model."""
    cfg, run, context = setup.cfg, setup.run, setup.context
    atomic_write_text(setup.run_dir / RUN_ID_FILE, tracker.run_id or "")
    log.info("MLflow run %s; %d train / %d val images grouped by %s%s", tracker.run_id,
             len(run.train_idx), len(run.val_idx), run.group_column,
             f"; {context.world_size} DDP processes" if context.enabled else "")
    log.info("%s", recipe.describe())
    log.info("data loading: %d worker process(es) (data.num_workers=%s)",
             trainer.loader.num_workers, cfg.data.num_workers)
    if trainer.ema is not None:
        log.info("EMA of the weights: decay warmed up from 0.1, at most %.4f (%d steps)",
                 trainer.ema.max_decay, cfg.train.epochs * len(trainer.loader))
    if trainer.sides[0] != cfg.data.image_size:
        log.info("progressive resizing: training sides %s px by epoch; validation and the "
                 "exported model at %d px", _ranges(trainer.sides), cfg.data.image_size)
    log.info("best checkpoint by %s (%s)%s", selection.metric, selection.note,
             f"; keeps the latest epoch within one standard error of the best (about "
             f"{selection.standard_error(0.75):.3f} at 0.75 on {selection.n_positive}+"
             f"{selection.n_negative} images)" if cfg.train.select_within_se else "")


def _finish(setup: RunSetup, trainer: Trainer, selection: Selection, loop: EpochLoop,
            val_loader: DataLoader, tracker: Any) -> FitResult:
    """After the epochs: the kept checkpoint's calibration, evaluation and verdict, the refit
    when asked for, the run folder's files and MLflow's figures (rank 0)."""
    final = validate_kept(setup, trainer, selection, loop, val_loader, tracker.run_id)
    if not setup.main:
        return FitResult("", setup.run_dir, final.metrics, tracker.tracking_uri)
    report_evaluation(final.evaluation, setup.progress)
    if setup.pretraining:
        final.metrics["pretraining"] = setup.pretraining
        overlap = setup.pretraining["overlap"]
        tracker.set_tags({"pretraining.sha256": setup.pretraining["fingerprint"],
                          "pretraining.overlap_images": overlap["images"],
                          "pretraining.overlap_patients": overlap["patients"]})
    if setup.cfg.train.refit:
        final.metrics["refit"] = _refit(setup, loop.best_epoch + 1, tracker.run_id)
    write_run_files(setup, final)
    log_finish(setup, tracker, final, loop.history)
    return FitResult(tracker.run_id or "", setup.run_dir, final.metrics, tracker.tracking_uri)


def _refit(setup: RunSetup, epochs: int, run_id: str | None) -> dict[str, Any]:
    """`train.refit`: a fresh model trained on train + validation for `epochs` epochs (the
    validation run's best epoch count, its schedule compressed to that length) replaces
    `best.pt`; the validation run's checkpoint is kept as `selection.pt`. Nothing is held out
    from the refit model: its calibration and verdict are the validation run's (said so in
    `metrics.json`)."""
    cfg, run, device, context = setup.cfg, setup.run, setup.device, setup.context
    durable_replace(setup.run_dir / BEST_FILE, setup.run_dir / SELECTION_FILE)
    seed_everything(cfg.seed)
    model, recipe, _ = build_run_model(cfg, run, device, setup.precision)
    rows = np.sort(np.concatenate([run.train_idx, run.val_idx]))
    train_set, _ = training_set(cfg, run, setup.inputs, rows, cfg.seed)
    trainer = build_trainer(cfg, model, recipe, train_set, run.targets[rows], len(run.classes),
                            run.heads, device, context, epochs)
    log.info("refit: %d epochs on all %d images (train + validation)", epochs, len(rows))
    losses = [trainer.run_epoch(epoch, device, setup.precision, context, setup.progress)
              for epoch in range(epochs)]
    save_best(setup.best_checkpoint(trainer.scored, epochs - 1, {}, run_id, refit=True),
              setup.run_dir / BEST_FILE)
    if setup.progress:
        print(f"refit: {epochs} epochs on {len(rows)} images, final train_loss {losses[-1]:.4f}",
              flush=True)
    return {"epochs": epochs, "n_images": len(rows), "train_loss": losses,
            "calibration": "temperature, threshold and day prior fit on the validation run's "
            "held-out predictions; the refit model has no held-out images of its own",
            "validation": "the verdict is the validation run's (selection.pt)"}


def print_verdict(metrics: dict[str, Any]) -> None:
    """The verdict line `train` ends with (and the learning warnings before it)."""
    for warning in metrics.get("learning_warnings") or []:
        print(f"  WARNING: {warning}")
    prior = metrics.get("prior")
    if prior:
        offsets = ", ".join(f"{k} {v:+.2f}" for k, v in prior["offsets"].items())
        print(f"day prior: scores of images whose manifest gives the '{prior['column']}' use it "
              f"(logit offsets {offsets}); validation AUC {prior['val_auc_with_prior']:.3f} "
              f"with it (optimistic: fit on these images), "
              f"{prior['val_auc_without_prior']:.3f} from the image alone")
    if metrics.get("validation"):
        print(verdict_line(metrics["validation"]))
