"""Export a training run's best checkpoint to an ONNX scoring bundle, checked against PyTorch.

The bundle is assembled in a temporary folder beside the target and swapped into place only after
ONNX Runtime reproduces PyTorch's probabilities (max abs difference <= `tolerance`), so a failed
or mismatching export never leaves a bundle that looks usable. The swap is durable and leaves no
moment without a bundle: the staging folder's files are fsync'ed, then exchanged with the old
bundle in one step (or, where the OS cannot, the old one is renamed aside and the new one in), and
only then is the old one deleted (`embryo_ml.fileio.replace_folder`).

A Gardner multi-task checkpoint (`heads` in best.pt) exports the same `logits` output, wider
(main classes, then the grade heads); the layout goes into bundle.json as `heads`. The ONNX
model itself, its optional `cam` and `features` outputs and the parity checks are
`embryo_ml.export.onnx_model`; the int8 copy `embryo_ml.export.quantize`; the trust layer
`embryo_ml.export.trust`; the model card `embryo_ml.export.model_card`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from embryo_ml.config import ModelConfig, TrustConfig
from embryo_ml.data.heads import Heads, output_width
from embryo_ml.data.preprocess import RESIZE_POLICY
from embryo_ml.errors import BundleError, DataError
from embryo_ml.evaluation.ood import FEATURE_OUTPUT
from embryo_ml.export.bundle import (
    BUNDLE_FILE,
    MODEL_FILE,
    Bundle,
    file_sha256,
    read_bundle,
    write_bundle_json,
)
from embryo_ml.export.gate import bundle_validation, check_exportable, run_validation
from embryo_ml.export.model_card import write_model_card
from embryo_ml.export.onnx_model import (
    CAM_OUTPUT,
    ExportModel,
    cam_model,
    check_cam_parity,
    check_output_parity,
    check_parity,
    export_onnx,
    has_pooled_features,
)
from embryo_ml.export.quantize import build_int8
from embryo_ml.export.trust import (
    ImageFeatures,
    build_day_check,
    build_reference,
    conformal_record,
)
from embryo_ml.fileio import recover_folder, replace_folder
from embryo_ml.train.models import build_model
from embryo_ml.train.run_folder import BEST_FILE, METRICS_FILE, QUALITY_FILE, load_best
from embryo_ml.versions import package_versions

log = logging.getLogger(__name__)


def _export_checked(
    model: nn.Module, path: Path, size: int, classes: list[str], heads: Heads,
) -> dict[str, float]:
    """Export `model` to `path` with `cam` and `features` outputs where its head allows, and
    check parity of each. An optional output whose export or parity fails is dropped (logged)
    and the export tried again without it: the bundle is never lost for a heatmap or the OOD
    score. Returns the bundle's parity figures (`parity_max_abs_diff`, and
    `parity_cam_max_rel_diff` / `parity_features_max_rel_diff` for the outputs kept)."""
    cam = cam_model(model, len(classes), size)
    local_head = cam.local_head if cam is not None else None
    features = has_pooled_features(model, size)
    while True:
        wrapped = ExportModel(model, local_head, len(classes), features)
        try:
            export_onnx(wrapped, size, path)
            parity = {"parity_max_abs_diff": check_parity(model, path, size,
                                                          n_classes=len(classes), heads=heads)}
            if local_head is not None:
                parity["parity_cam_max_rel_diff"] = check_cam_parity(wrapped, path, size)
            if features:
                parity["parity_features_max_rel_diff"] = check_output_parity(
                    wrapped, path, size, FEATURE_OUTPUT)
            return parity
        except Exception as error:
            if local_head is not None:
                log.warning("export with a '%s' output failed (%s); exporting without it (no "
                            "heatmaps from this bundle)", CAM_OUTPUT, error)
                local_head = None
            elif features:
                log.warning("export with a '%s' output failed (%s); exporting without it (no "
                            "feature-space out-of-distribution check)", FEATURE_OUTPUT, error)
                features = False
            else:
                raise



def load_run_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of `run_dir/best.pt` in eval mode, and the checkpoint as stored (classes,
    heads, input size, mean/std, config: `embryo_ml.train.run_folder.BestCheckpoint`'s keys)."""
    checkpoint_path = Path(run_dir) / BEST_FILE
    if not checkpoint_path.is_file():
        raise DataError(f"{run_dir}: no {BEST_FILE}; is this a training run folder?")
    checkpoint = load_best(checkpoint_path)
    model_cfg = ModelConfig.model_validate(
        {**checkpoint.config["model"], "pretrained": False, "pretrained_file": None})
    model = build_model(model_cfg, num_classes=output_width(len(checkpoint.classes),
                                                            dict(checkpoint.heads or {})))
    model.load_state_dict(checkpoint.state_dict)
    return model.eval(), checkpoint.to_dict()


@dataclass
class _Source:
    """What a bundle is made of besides the ONNX model: the run's checkpoint, metrics.json
    (calibration, figures) and quality.json."""

    run_dir: Path
    checkpoint: dict[str, Any]
    metrics: dict[str, Any]
    quality: dict[str, Any] | None
    trust: TrustConfig
    classes: list[str]
    heads: Heads  # Gardner grade heads after the classes
    size: int

    @classmethod
    def read(cls, run_dir: Path, checkpoint: dict[str, Any]) -> _Source:
        trust = TrustConfig.model_validate(checkpoint["config"].get("trust") or {})
        classes = list(checkpoint["classes"])
        heads: Heads = dict(checkpoint.get("heads") or {})
        size = int(checkpoint["image_size"])
        metrics_path, quality_path = run_dir / METRICS_FILE, run_dir / QUALITY_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        quality = json.loads(quality_path.read_text()) if quality_path.is_file() else None
        return cls(run_dir, checkpoint, metrics, quality, trust, classes, heads, size)


def export_bundle(run_dir: str | Path, out_dir: str | Path, int8: bool = True, *,
                  allow_failed_validation: bool = False) -> Bundle:
    """Write `out_dir/model.onnx` + `bundle.json` from `run_dir/best.pt`; return the bundle.

    `int8`: also build `model.int8.onnx` for fast CPU scoring, kept only if it agrees with the
    fp32 model on the run's validation images (`embryo_ml.export.quantize`).
    A run whose quality gate failed raises `ValidationFailedError` before any work (and before
    `out_dir` is touched) unless `allow_failed_validation`; see `embryo_ml.export.gate`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    validation = _check_exportable(run_dir, out_dir, allow_failed_validation)
    model, checkpoint = load_run_model(run_dir)
    source = _Source.read(run_dir, checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _assemble(staging, model, source, validation, int8)
        replace_folder(staging, out_dir)  # the old bundle stays in place until the new is whole
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_bundle(out_dir)


def _check_exportable(run_dir: Path, out_dir: Path,
                      allow_failed_validation: bool) -> dict[str, Any] | None:
    """The run's validation record, once the run may be exported into `out_dir` (refusals
    before any work and before `out_dir` is touched)."""
    if not (run_dir / BEST_FILE).is_file():
        raise DataError(f"{run_dir}: no {BEST_FILE}; is this a training run folder?")
    validation = run_validation(run_dir)
    check_exportable(validation, run_dir, allow_failed_validation)
    recover_folder(out_dir)  # an earlier export that crashed while swapping bundles
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / BUNDLE_FILE).exists():
        raise BundleError(f"{out_dir} exists and is not a bundle; choose an empty or new folder")
    return validation


def _assemble(staging: Path, model: nn.Module, source: _Source,
              validation: dict[str, Any] | None, int8: bool) -> None:
    """The whole bundle in `staging`: ONNX model(s), trust layer, model card, bundle.json,
    checked as the scorer checks it."""
    checkpoint, metrics, classes, size = (source.checkpoint, source.metrics, source.classes,
                                          source.size)
    parity = _export_checked(model, staging / MODEL_FILE, size, classes, source.heads)
    temperature = float(metrics.get("temperature", 1.0))
    threshold = float(metrics.get("threshold", 0.5))
    mean = [float(x) for x in checkpoint["mean"]]
    std = [float(x) for x in checkpoint["std"]]
    int8_entry = (_int8_model(staging, source, mean, std, threshold, temperature)
                  if int8 else None)
    models = {"fp32": MODEL_FILE} | ({"int8": int8_entry["file"]} if int8_entry else {})
    seed = int(checkpoint["config"].get("seed", 0))
    features = ImageFeatures.of_models(staging, models, size, mean, std, "image")  # shared
    ood = build_reference(staging, source.run_dir, features, trust=source.trust, seed=seed)
    bundle = Bundle(
        architecture=checkpoint["model_name"], classes=classes,
        positive_class=checkpoint["positive_class"], input_size=size, mean=mean, std=std,
        sha256=file_sha256(staging / MODEL_FILE), resize_policy=RESIZE_POLICY,
        temperature=temperature, threshold=threshold, run_id=checkpoint.get("run_id"),
        val_metrics={k: v for k, v in metrics.items() if k.startswith("val_")}
        | parity | {"best_epoch": checkpoint["epoch"]},
        quality=source.quality, heads=source.heads or None, versions=package_versions(),
        cam_output=CAM_OUTPUT if "parity_cam_max_rel_diff" in parity else None,
        int8=int8_entry, ood=ood,
        conformal=conformal_record(source.run_dir, classes, source.trust.conformal_alpha),
        prior=metrics.get("prior"),
        day_check=build_day_check(source.run_dir, metrics.get("prior"), features,
                                  trust=source.trust, seed=seed) if ood else None,
        validation=bundle_validation(validation),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    bundle = write_model_card(source.run_dir, bundle, staging)  # MODEL_CARD.md + model_card
    write_bundle_json(bundle, staging)
    read_bundle(staging)  # what we wrote must pass the same check the scorer applies


def _int8_model(staging: Path, source: _Source, mean: list[float], std: list[float],
                threshold: float, temperature: float) -> dict[str, Any] | None:
    """The bundle's `int8` entry (with its hash), or None when no int8 model is kept."""
    classes = source.classes
    entry = build_int8(
        staging, MODEL_FILE, source.run_dir, size=source.size, mean=mean, std=std,
        input_name="image", output_name="logits", classes=classes,
        positive_index=classes.index(source.checkpoint["positive_class"]),
        threshold=threshold, temperature=temperature, heads=source.heads)
    if entry is not None:
        entry["sha256"] = file_sha256(staging / entry["file"])
    return entry
