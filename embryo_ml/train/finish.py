"""After the epochs: the best checkpoint's calibration, evaluation and verdict, then the run
folder's final files and MLflow's figures.

The final validation is evaluated by `embryo_ml.evaluation` and judged by the model-quality gate
(`embryo_ml.evaluation.gate`): `metrics.json` holds the verdict under `validation`, the
evaluation under `evaluation`, its headline numbers as `val_within_<column>_auc`, ..., and the
checkpoint metric as `select_metric` / `best_score`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from embryo_ml.config import CalibrationConfig
from embryo_ml.data.heads import head_columns, head_summary, main_output
from embryo_ml.data.preprocess import read_for_model
from embryo_ml.data.quality import QualityThresholds, fit_thresholds
from embryo_ml.evaluation.calibration import (
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
)
from embryo_ml.evaluation.gate import FAILED, validation_verdict
from embryo_ml.evaluation.metrics import roc_auc
from embryo_ml.evaluation.prior import apply_prior, fit_prior, prior_value, two_class_margin
from embryo_ml.evaluation.report import Evaluation, evaluate_predictions, evaluation_figures
from embryo_ml.evaluation.selection import Selection
from embryo_ml.fileio import atomic_write_text
from embryo_ml.train.distributed import barrier
from embryo_ml.train.epochs import LEARNING_CAUSES, EpochLoop, evaluate_all
from embryo_ml.train.loop import EvalOutput
from embryo_ml.train.metrics import binary_metrics, confusion, softmax
from embryo_ml.train.run_data import RunSetup, evaluation_frame, training_images
from embryo_ml.train.run_folder import (
    BEST_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    QUALITY_FILE,
    SUBGROUP_METRICS_FILE,
    TRAIN_IMAGES_FILE,
    VAL_PREDICTIONS_FILE,
    load_checkpoint,
    save_checkpoint,
)
from embryo_ml.train.tracking import redact_tree
from embryo_ml.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class FinalValidation:
    """The kept checkpoint on the validation images: what `metrics.json` and the figures say."""

    metrics: dict[str, Any]  # metrics.json
    evaluation: Evaluation
    frame: pd.DataFrame  # the rows the evaluation read
    full: EvalOutput  # every output (main classes, then the grade heads)
    out: EvalOutput  # the main classes
    calibrated: dict[str, float]  # temperature, threshold, ECE and Brier before/after
    probs: np.ndarray  # calibrated probabilities of the main classes


def write_json(data: dict[str, Any], path: Path) -> None:
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


def day_prior(setup: RunSetup, out: EvalOutput, probs: np.ndarray, temperature: float,
              cfg: CalibrationConfig) -> dict[str, Any] | None:
    """The bundle's day prior (`embryo_ml.evaluation.prior`): offsets from the validation
    images' scores and every labelled image's day, with the validation AUC with and without
    it; None (logged) when it does not apply. The with-day AUC is optimistic: the offsets were
    chosen on these images."""
    run, column = setup.run, cfg.prior_column
    if column is None or len(run.classes) != 2 or column not in run.table.columns:
        return None
    day = run.table[column]
    values = [prior_value(v) for v in day.iloc[run.val_idx]]
    margin = two_class_margin(out.logits, run.positive_index)
    is_positive = out.targets == run.positive_index
    labelled = np.concatenate([run.train_idx, run.val_idx])
    record, note = fit_prior(margin / temperature, values, day.iloc[labelled].tolist(),
                             (run.table["label"].iloc[labelled] == setup.cfg.data.positive_class
                              ).to_numpy(), column, temperature)
    log.info("%s", note)
    if record is None:
        return None
    aware, used = apply_prior(probs, margin, values, record, run.positive_index)
    p_aware, p_free = aware[:, run.positive_index], probs[:, run.positive_index]
    record["val_auc_with_prior"] = float(roc_auc(is_positive, p_aware)[0])
    record["val_auc_without_prior"] = float(roc_auc(is_positive, p_free)[0])
    record["n_val_without_offset"] = int((~used).sum())
    return record


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


def _evaluate_validation(
    setup: RunSetup, p_positive: np.ndarray, predicted_positive: np.ndarray,
) -> tuple[Evaluation, pd.DataFrame]:
    """The final validation predictions through `embryo_ml.evaluation` (shortcut baselines fit
    on the training rows); returns the evaluation and the frame it read."""
    cfg, run = setup.cfg, setup.run
    positive = cfg.data.positive_class
    frame = evaluation_frame(run.table, run.val_idx, positive, cfg.labels.grade_column).assign(
        score=p_positive, predicted=predicted_positive)
    train = evaluation_frame(run.table, run.train_idx, positive, cfg.labels.grade_column)
    return evaluate_predictions(frame, cfg.eval, positive, cfg.seed, train=train), frame


def kept_output(setup: RunSetup, trainer: Trainer, loop: EpochLoop,
                val_loader: DataLoader) -> EvalOutput:
    """The validation output of the checkpoint in best.pt, its weights loaded into the model.

    One process: the kept epoch's logits (evaluation is deterministic). Under DDP each rank's
    BatchNorm statistics can differ from rank 0's (DDP broadcasts them at the next training
    forward), so every rank re-evaluates rank 0's checkpoint."""
    barrier(setup.context)  # rank 0 has written best.pt
    trainer.scored.load_state_dict(load_checkpoint(setup.run_dir / BEST_FILE)["state_dict"])
    full = None if setup.context.enabled else loop.best_output
    if full is None:  # DDP, or the kept epoch was before a resume
        full = evaluate_all(trainer.scored, val_loader, setup.device, trainer.criterion,
                            setup.precision, setup.context)
    return full


def validate_kept(setup: RunSetup, trainer: Trainer, selection: Selection, loop: EpochLoop,
                  val_loader: DataLoader, run_id: str | None) -> FinalValidation:
    """Calibrate, evaluate and judge the kept checkpoint on the validation images."""
    cfg, run = setup.cfg, setup.run
    full = kept_output(setup, trainer, loop, val_loader)
    out = main_output(full, len(run.classes))
    calibrated = calibrate(out.logits, out.targets, run.positive_index, cfg.calibration)
    probs = softmax(out.logits, calibrated["temperature"])
    prior = day_prior(setup, out, probs, calibrated["temperature"], cfg.calibration)
    is_positive = out.targets == run.positive_index
    metrics = binary_metrics(is_positive, probs[:, run.positive_index], calibrated["threshold"])
    predicted = predict_classes(probs, run.positive_index, calibrated["threshold"])
    evaluation, frame = _evaluate_validation(setup, probs[:, run.positive_index],
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
             **calibrated, "prior": prior, "best_epoch": loop.best_epoch,
             "epochs_run": len(loop.history), "n_train": len(run.train_idx),
             "n_val": len(run.val_idx), "classes": run.classes,
             "positive_class": cfg.data.positive_class,
             "val_confusion_matrix": confusion(out.targets, predicted, len(run.classes)).tolist(),
             **head_summary(full.logits, full.targets, run.heads), "run_id": run_id,
             "recipe": {**trainer.recipe.to_json(),
                        "ema_max_decay": trainer.ema.max_decay if trainer.ema else None},
             "validation": validation, "learning_warnings": warnings,
             "shortcut_warnings": evaluation.warnings, "evaluation": evaluation.to_json()}
    return FinalValidation(final, evaluation, frame, full, out, calibrated, probs)


def report_evaluation(evaluation: Evaluation, progress: bool) -> None:
    """The evaluation's table on stdout, or (quiet) its shortcut warnings in the log."""
    if progress:
        print(evaluation.format(), flush=True)
        return
    for warning in evaluation.warnings:
        log.warning("%s", warning.removeprefix("WARNING: "))


def write_run_files(setup: RunSetup, final: FinalValidation) -> None:
    """metrics.json, subgroup_metrics.csv, quality.json, val_predictions.csv and
    train_images.csv."""
    cfg, run, inputs, run_dir = setup.cfg, setup.run, setup.inputs, setup.run_dir
    paths = run.paths
    write_json(final.metrics, run_dir / METRICS_FILE)
    atomic_write_text(run_dir / SUBGROUP_METRICS_FILE,
                      final.evaluation.table().to_csv(index=False))
    write_json(quality_thresholds([paths[i] for i in run.train_idx], final.out.logits, cfg.seed,
                                  inputs.max_pixels, inputs.size).to_dict(),
               run_dir / QUALITY_FILE)
    atomic_write_text(run_dir / VAL_PREDICTIONS_FILE,
                      _val_predictions(setup, final).to_csv(index=False))
    listed = training_images(run, run.train_idx)
    column = cfg.calibration.prior_column
    if column and column in run.table.columns and column not in listed.columns:
        listed[column] = run.table[column].iloc[run.train_idx].to_numpy()  # the day check's
    atomic_write_text(run_dir / TRAIN_IMAGES_FILE, listed.to_csv(index=False))


def _val_predictions(setup: RunSetup, final: FinalValidation) -> pd.DataFrame:
    """val_predictions.csv: path, true label, calibrated probabilities, the predicted label,
    the grade heads' columns and, where the data has it, the day-prior column (export fits
    the day check on it)."""
    run, probs = setup.run, final.probs
    predictions = pd.DataFrame({"path": [run.paths[i] for i in run.val_idx],
                                "label": [run.classes[t] for t in final.out.targets]})
    for i, name in enumerate(run.classes):
        predictions[f"p_{name}"] = probs[:, i]
    predictions["label_pred"] = [run.classes[i] for i in predict_classes(
        probs, run.positive_index, final.calibrated["threshold"])]
    column = setup.cfg.calibration.prior_column
    if column and column in run.table.columns and column not in predictions.columns:
        predictions[column] = run.table[column].iloc[run.val_idx].to_numpy()
    return predictions.assign(**head_columns(final.full.logits, final.full.targets, run.heads))


def _log_checkpoint(tracker: Any, checkpoint_path: Path) -> None:
    """best.pt as MLflow keeps it: its config's paths hashed (`redact_tree`), as the params
    are; the run folder's own best.pt keeps the real paths (resume and export read them)."""
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["config"] = redact_tree(checkpoint["config"])
    with tempfile.TemporaryDirectory(prefix="embryo-ml-checkpoint-") as folder:
        copy = Path(folder) / checkpoint_path.name
        save_checkpoint(checkpoint, copy)
        tracker.log_artifact(copy, "checkpoint")


def log_finish(setup: RunSetup, tracker: Any, final: FinalValidation,
               history: list[dict[str, Any]]) -> None:
    """Final metrics, tags, figures and artifacts to MLflow."""
    metrics, evaluation = final.metrics, final.evaluation
    tracker.log_metrics({f"best_{k}": v for k, v in metrics.items()
                         if isinstance(v, int | float) and k != "best_epoch"})
    tracker.log_metrics({"best_epoch": metrics["best_epoch"]})
    tracker.log_metrics({f"val_eval.{k}": v for k, v in evaluation.flat_metrics().items()})
    tracker.set_tags({"validation.verdict": metrics["validation"]["verdict"]})
    if evaluation.warnings:
        tracker.set_tags({"eval.shortcut_warning": ",".join(
            s.column for s in evaluation.shortcuts if s.warning)})
    _log_figures(setup, tracker, final, history)
    for name in (METRICS_FILE, HISTORY_FILE, SUBGROUP_METRICS_FILE):
        tracker.log_artifact(setup.run_dir / name)
    if setup.cfg.tracking.log_checkpoint:
        _log_checkpoint(tracker, setup.run_dir / BEST_FILE)


def _log_figures(setup: RunSetup, tracker: Any, final: FinalValidation,
                 history: list[dict[str, Any]]) -> None:
    """Confusion matrices, the evaluation's figures, training curves, reliability diagram."""
    from embryo_ml.evaluation.plots import (  # matplotlib: imported when the figures are drawn
        confusion_matrix_figure,
        reliability_figure,
        training_curves_figure,
    )

    classes, positive_index = setup.run.classes, setup.run.positive_index
    metrics, calibrated = final.metrics, final.calibrated
    matrix = np.array(metrics["val_confusion_matrix"])
    tracker.log_figure(confusion_matrix_figure(matrix, classes), "plots/confusion_matrix.png")
    for name, result in metrics.get("val_heads", {}).items():
        tracker.log_figure(confusion_matrix_figure(
            np.array(result["confusion_matrix"]), result["classes"],
            f"{name} (n={result['n']} assessable)"), f"plots/confusion_matrix_{name}.png")
    negative = classes[1 - positive_index] if len(classes) == 2 else "other"
    for name, figure in evaluation_figures(final.frame, final.evaluation, negative,
                                           calibrated["threshold"]).items():
        tracker.log_figure(figure, f"plots/{name}")
    tracker.log_figure(training_curves_figure(history), "plots/training_curves.png")
    is_positive = final.out.targets == positive_index
    tracker.log_figure(reliability_figure(
        is_positive, softmax(final.out.logits)[:, positive_index], final.probs[:, positive_index],
        calibrated["temperature"]), "plots/reliability_diagram.png")
