"""One training run end to end: data -> grouped split -> model -> epochs -> best checkpoint.

The run directory receives, as they happen: `config.yaml` (resolved), `best.pt` (best validation
score so far by `train.select_metric`, written atomically), `history.csv`, and at the end
`metrics.json`, `val_predictions.csv` and `subgroup_metrics.csv`. MLflow receives the same,
plus plots and the dataset fingerprint.

The final validation is evaluated by `embryo_ml.evaluation` (subgroups, shortcut baselines fit
on the training rows, within-patient ranking): `metrics.json` holds it under `evaluation`, its
headline numbers as `val_within_<column>_auc`, `val_within_patient_auc`, `val_top1_accuracy`,
..., and the checkpoint metric as `select_metric` / `best_score`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, WeightedRandomSampler

import embryo_ml
from embryo_ml.config import CalibrationConfig, Config, save_config
from embryo_ml.data.cache import DecodedCache
from embryo_ml.data.dataset import EmbryoImageDataset
from embryo_ml.data.labels import build_targets
from embryo_ml.data.manifest import load_table
from embryo_ml.data.preprocess import decode_side, read_for_model
from embryo_ml.data.splits import grouped_split
from embryo_ml.data.transforms import build_eval_transform, build_train_transform
from embryo_ml.errors import ConfigError
from embryo_ml.evaluation.report import Evaluation, evaluate_predictions, evaluation_figures
from embryo_ml.evaluation.selection import Selection, resolve_selection
from embryo_ml.fileio import atomic_write_text
from embryo_ml.models import build_model, model_normalization
from embryo_ml.report.plots import (
    confusion_matrix_figure,
    reliability_figure,
    training_curves_figure,
)
from embryo_ml.score.quality import QualityThresholds, fit_thresholds
from embryo_ml.train.calibration import (
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
)
from embryo_ml.train.distributed import (
    DistContext,
    barrier,
    gather_rows,
    init_distributed,
    mean_across_ranks,
    shard_indices,
    shutdown,
)
from embryo_ml.train.heads import (
    head_accuracies,
    head_columns,
    head_layout,
    head_summary,
    main_output,
    output_width,
)
from embryo_ml.train.loop import EvalOutput, Precision, evaluate, train_one_epoch
from embryo_ml.train.losses import MultiHeadLoss, build_criterion
from embryo_ml.train.metrics import binary_metrics, confusion, softmax
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
    resolve_tracking_uri,
)
from embryo_ml.versions import package_versions

log = logging.getLogger(__name__)
QUALITY_NAME = "quality.json"


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


def _worker_init(worker_id: int) -> None:
    """Give each DataLoader worker its own, repeatable augmentation stream."""
    info = torch.utils.data.get_worker_info()
    seed = int(info.seed % 2**31) if info else worker_id
    random.seed(seed)
    np.random.seed(seed)
    if info is not None:
        info.dataset.transform.set_random_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_precision(amp: str, channels_last: str | bool, device: torch.device) -> Precision:
    """Mixed precision and memory format for `device`: `auto` turns both on with CUDA only
    (bf16 where the GPU supports it, else fp16 with a gradient scaler); on CPU, `bf16` may be
    asked for explicitly (useful on CPUs with bf16 instructions), `fp16` is refused."""
    cuda = device.type == "cuda"
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    if amp == "fp16" and not cuda:
        raise ConfigError("train.amp=fp16 needs CUDA; use train.amp=bf16 or off on CPU")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    use_nhwc = channels_last is True or (channels_last == "auto" and cuda)
    return Precision(dtype, use_nhwc, scaler)


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


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """LR multiplier per step: linear warmup, then cosine decay to 1% of the base rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


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
    cfg: Config, table: pd.DataFrame, train_idx: np.ndarray, val_idx: np.ndarray,
    p_positive: np.ndarray, predicted_positive: np.ndarray,
) -> tuple[Evaluation, pd.DataFrame]:
    """The final validation predictions through `embryo_ml.evaluation` (shortcut baselines fit
    on the training rows); returns the evaluation and the frame it read."""
    positive = cfg.data.positive_class
    frame = evaluation_frame(table, val_idx, positive, cfg.labels.grade_column).assign(
        score=p_positive, predicted=predicted_positive)
    train = evaluation_frame(table, train_idx, positive, cfg.labels.grade_column)
    return evaluate_predictions(frame, cfg.eval, positive, cfg.seed, train=train), frame


def _parameter_groups(model: nn.Module, cfg: Config) -> tuple[list[dict], list[nn.Parameter]]:
    """Backbone and head as two optimizer groups (separate learning rates); returns the groups
    and the backbone parameters (frozen during `freeze_backbone_epochs`)."""
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": backbone, "lr": cfg.train.lr},
              {"params": head, "lr": cfg.train.head_lr or cfg.train.lr}]
    return [g for g in groups if g["params"]], backbone


def _train_sampler(
    targets: np.ndarray, n_classes: int, generator: torch.Generator
) -> WeightedRandomSampler:
    """Each class drawn equally often in expectation (with replacement)."""
    counts = np.bincount(targets, minlength=n_classes).astype(float)
    weights = 1.0 / counts[targets]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(targets),
                                 replacement=True, generator=generator)


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
    try:
        return _fit(cfg, data, run_dir, progress, resume, split, nested, device, context)
    finally:
        shutdown(context)


def _fit(
    cfg: Config, data: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str],
    progress: bool, resume: bool, split: tuple[np.ndarray, np.ndarray] | None, nested: bool,
    device: torch.device, context: DistContext,
) -> FitResult:
    source = data or cfg.data.manifest
    if source is None:
        raise ConfigError("no training data: pass --data or set data.manifest")
    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))  # before any heavy work
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / LAST_NAME) if resume else None
    table = load_table(source)
    labelled = build_targets(table, cfg.labels, cfg.data.positive_class)
    classes, targets = labelled.classes, labelled.y  # the main head: scored and ranked
    heads = head_layout(cfg.labels.task, len(classes))  # gardner: grade heads after the classes
    item_targets = labelled.item_targets()  # what the loader yields: y, or gardner target rows
    table = table.assign(label=labelled.labels)  # what the split stratifies and hashes
    positive_index = classes.index(cfg.data.positive_class)
    if split is None:
        train_idx, val_idx, group_column = grouped_split(table, cfg.data.val_fraction, cfg.seed)
    else:
        (train_idx, val_idx), group_column = split, "given"

    main = context.is_main  # the one process that writes files and talks to MLflow
    selection: Selection = resolve_selection(
        cfg, table.iloc[val_idx], targets[val_idx] == positive_index)
    if context.enabled and cfg.train.weighted_sampler:
        raise ConfigError("train.weighted_sampler is not available with torchrun (DDP); use "
                          "loss.class_weights=auto instead")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _write_json({"data": str(Path(source).resolve())}, run_dir / "run.json")
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda" and context.enabled:
        device = torch.device("cuda", context.local_rank)
    precision = resolve_precision(cfg.train.amp, cfg.train.channels_last, device)

    model = build_model(cfg.model, num_classes=output_width(len(classes), heads)).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    default_mean, default_std = model_normalization(model)
    mean = tuple(cfg.data.mean or default_mean)
    std = tuple(cfg.data.std or default_std)
    size = cfg.data.image_size
    paths = table["path"].tolist()
    max_pixels = cfg.data.max_pixels
    cache = DecodedCache(cfg.data.cache_dir, size, max_pixels) if cfg.data.cache_dir else None
    augment = build_train_transform(size, mean, std, cfg.augment if cfg.train.augment else None,
                                    seed=cfg.seed + context.rank)
    train_set = EmbryoImageDataset(
        [paths[i] for i in train_idx], item_targets[train_idx], augment, cache, max_pixels,
        decode_side(size))
    val_set = EmbryoImageDataset(
        [paths[i] for i in val_idx], item_targets[val_idx], build_eval_transform(size, mean, std),
        cache, max_pixels, decode_side(size),
    )
    val_shard = (Subset(val_set, shard_indices(len(val_set), context)) if context.enabled
                 else val_set)
    loader_args: dict[str, Any] = {
        "batch_size": cfg.train.batch_size, "num_workers": cfg.data.num_workers,
        "pin_memory": device.type == "cuda", "worker_init_fn": _worker_init,
        "persistent_workers": cfg.data.num_workers > 0,
    }
    generator = torch.Generator().manual_seed(cfg.seed)
    drop_last = len(train_set) > cfg.train.batch_size * context.world_size
    if context.enabled:
        sampler = DistributedSampler(train_set, context.world_size, context.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=drop_last)
    else:
        sampler = (_train_sampler(targets[train_idx], len(classes), generator)
                   if cfg.train.weighted_sampler else None)
    train_loader = DataLoader(train_set, shuffle=sampler is None, sampler=sampler,
                              drop_last=drop_last, generator=generator, **loader_args)
    val_loader = DataLoader(val_shard, shuffle=False, **loader_args)
    # DDP averages gradients across ranks; frozen-backbone epochs leave some parameters unused.
    trained = (DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=cfg.train.freeze_backbone_epochs > 0)
        if context.enabled else model)

    criterion = build_criterion(cfg.loss, targets[train_idx], len(classes))
    if heads:
        criterion = MultiHeadLoss(criterion, len(classes), heads, cfg.loss.grade_weight)
    criterion = criterion.to(device)
    groups, backbone = _parameter_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        cfg.train.epochs * steps_per_epoch, cfg.train.warmup_epochs * steps_per_epoch))
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    scored = ema.module if ema is not None else model  # what is evaluated and exported

    checkpoint_path = run_dir / CHECKPOINT_NAME
    history: list[dict[str, float]] = []
    best_score, best_epoch, stale, first_epoch = -math.inf, -1, 0, 0
    run_id = None
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_epoch, stale = list(state["history"]), state["best_epoch"], state["stale"]
        best_score, first_epoch, run_id = state["best_score"], state["epoch"] + 1, state["run_id"]
        restore_rng_state(state["rng"], generator, augment)
        if precision.scaler is not None and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        log.info("resuming %s at epoch %d (best so far: epoch %d)", run_dir, first_epoch,
                 best_epoch)
    tracker_context = (RunTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment,
                                  run_name=run_dir.name, run_id=run_id, nested=nested)
                       if main else NullTracker(cfg.tracking.tracking_uri))
    with tracker_context as tracker:
        if state is None:
            tracker.log_params(cfg.flat())
            tracker.log_params({"data.classes": ",".join(classes),
                                "data.split_group": group_column,
                                "data.n_train": len(train_idx), "data.n_val": len(val_idx),
                                "train.world_size": context.world_size,
                                "train.precision": str(precision.amp_dtype or "float32"),
                                "train.channels_last_used": precision.channels_last})
            tracker.set_tags({**dataset_fingerprint(table), "git_commit": git_commit(),
                              "embryo_ml_version": embryo_ml.__version__,
                              "torch_version": torch.__version__, "device": device.type,
                              **{f"version.{k}": v for k, v in package_versions().items()}})
            tracker.log_artifact(run_dir / "config.yaml")
        if main:
            (run_dir / "run_id.txt").write_text(tracker.run_id or "", encoding="utf-8")
        if main:
            log.info("MLflow run %s; %d train / %d val images grouped by %s%s", tracker.run_id,
                     len(train_idx), len(val_idx), group_column,
                     f"; {context.world_size} DDP processes" if context.enabled else "")
            log.info("best checkpoint by %s (%s)", selection.metric, selection.note)

        for epoch in range(first_epoch, cfg.train.epochs):
            if stale and cfg.train.patience and stale >= cfg.train.patience:
                break  # a resumed run that had already stopped early
            started = time.perf_counter()
            for parameter in backbone:
                parameter.requires_grad_(epoch >= cfg.train.freeze_backbone_epochs)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            train_loss = train_one_epoch(trained, train_loader, optimizer, criterion, device,
                                         scheduler, epoch, progress and main, ema, precision)
            train_loss = mean_across_ranks(train_loss, 1, context)
            full = evaluate_all(scored, val_loader, device, criterion, precision, context)
            out = main_output(full, len(classes))  # all below reads the main classes only
            metrics = {**_val_metrics(out.logits, out.targets, positive_index),
                       **head_accuracies(full.logits, full.targets, heads)}
            if selection.metric != "auc":  # the same gathered rows on every rank
                metrics[selection.metric] = selection.score(
                    out.targets == positive_index, softmax(out.logits)[:, positive_index])
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": out.loss,
                   **{f"val_{k}": v for k, v in metrics.items()},
                   "lr": optimizer.param_groups[-1]["lr"],
                   "epoch_seconds": time.perf_counter() - started}
            history.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            if main:
                atomic_write_text(run_dir / "history.csv",
                                  pd.DataFrame(history).to_csv(index=False))
            chosen = metrics[selection.metric]
            score = chosen if not math.isnan(chosen) else -out.loss
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                _save_on_main(main, {
                    "state_dict": scored.state_dict(), "model_name": cfg.model.name,
                    "classes": classes, "positive_class": cfg.data.positive_class,
                    "image_size": size, "mean": list(mean), "std": list(std), "epoch": epoch,
                    "val_metrics": metrics, "config": cfg.model_dump(mode="json"),
                    "heads": heads,
                    "run_id": tracker.run_id,
                }, checkpoint_path)
            else:
                stale += 1
            _save_on_main(main, {
                "model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "history": history, "best_score": best_score,
                "best_epoch": best_epoch, "stale": stale, "run_id": tracker.run_id,
                "rng": rng_state(generator, augment),
                "scaler": precision.scaler.state_dict() if precision.scaler else None,
            }, run_dir / LAST_NAME)
            if progress and main:
                chosen_text = ("" if selection.metric == "auc" else
                               f"  val_{selection.metric} {metrics[selection.metric]:.4f}")
                print(f"epoch {epoch:3d}  train_loss {train_loss:.4f}  val_loss {out.loss:.4f}  "
                      f"val_auc {metrics['auc']:.4f}{chosen_text}  "
                      f"({row['epoch_seconds']:.1f}s)", flush=True)
            if cfg.train.patience and stale >= cfg.train.patience:
                log.info("early stop at epoch %d (best epoch %d)", epoch, best_epoch)
                break

        # Final numbers come from the best checkpoint, not the last epoch.
        barrier(context)  # rank 0 has written it
        scored.load_state_dict(load_checkpoint(checkpoint_path)["state_dict"])
        full = evaluate_all(scored, val_loader, device, criterion, precision, context)
        out = main_output(full, len(classes))
        calibrated = calibrate(out.logits, out.targets, positive_index, cfg.calibration)
        probs = softmax(out.logits, calibrated["temperature"])
        is_positive = out.targets == positive_index
        metrics = binary_metrics(is_positive, probs[:, positive_index], calibrated["threshold"])
        predicted = predict_classes(probs, positive_index, calibrated["threshold"])
        matrix = confusion(out.targets, predicted, len(classes))
        evaluation, eval_frame = _evaluate_validation(
            cfg, table, train_idx, val_idx, probs[:, positive_index], predicted == positive_index)
        final = {**{f"val_{k}": v for k, v in metrics.items()}, "val_loss": out.loss,
                 **{f"val_{k}": v for k, v in evaluation.headline().items()},
                 "select_metric": selection.metric, "best_score": best_score,
                 **calibrated, "best_epoch": best_epoch, "epochs_run": len(history),
                 "n_train": len(train_idx), "n_val": len(val_idx), "classes": classes,
                 "positive_class": cfg.data.positive_class,
                 "val_confusion_matrix": matrix.tolist(),
                 **head_summary(full.logits, full.targets, heads), "run_id": tracker.run_id,
                 "shortcut_warnings": evaluation.warnings, "evaluation": evaluation.to_json()}
        if not main:
            return FitResult("", run_dir, final, tracker.tracking_uri)
        if progress:
            print(evaluation.format(), flush=True)
        else:
            for warning in evaluation.warnings:
                log.warning("%s", warning.removeprefix("WARNING: "))
        _write_json(final, run_dir / "metrics.json")
        atomic_write_text(run_dir / "subgroup_metrics.csv", evaluation.table().to_csv(index=False))
        _write_json(quality_thresholds([paths[i] for i in train_idx], out.logits, cfg.seed,
                                       max_pixels, size).to_dict(), run_dir / QUALITY_NAME)
        predictions = pd.DataFrame({"path": [paths[i] for i in val_idx],
                                    "label": [classes[t] for t in out.targets]})
        for i, name in enumerate(classes):
            predictions[f"p_{name}"] = probs[:, i]
        predictions["label_pred"] = [classes[i] for i in predict_classes(
            probs, positive_index, calibrated["threshold"])]
        predictions = predictions.assign(**head_columns(full.logits, full.targets, heads))
        predictions.to_csv(run_dir / "val_predictions.csv", index=False)

        tracker.log_metrics({f"best_{k}": v for k, v in final.items()
                             if isinstance(v, int | float) and k != "best_epoch"})
        tracker.log_metrics({"best_epoch": best_epoch})
        tracker.log_metrics({f"val_eval.{k}": v for k, v in evaluation.flat_metrics().items()})
        if evaluation.warnings:
            tracker.set_tags({"eval.shortcut_warning": ",".join(
                s.column for s in evaluation.shortcuts if s.warning)})
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
            tracker.log_artifact(run_dir / name)
        if cfg.tracking.log_checkpoint:
            tracker.log_artifact(checkpoint_path, "checkpoint")
        return FitResult(tracker.run_id or "", run_dir, final, tracker.tracking_uri)
