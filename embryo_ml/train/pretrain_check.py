"""What `train` checks of weights made by `embryo-ml pretrain` (`model.pretrained_file`).

The weights file records the images it was pretrained on (`embryo_ml.train.pretrain_data`).
A validation patient whose images were among them has been seen, without labels, by the
backbone being judged: the validation AUC (and the gate's verdict) is then optimistic, as any
evaluation on data a model learned from. `train` says so in one warning and in `metrics.json`
(`pretraining.overlap`); it does not refuse, because pretraining on every unlabelled image of a
clinic is a fair choice when the model is evaluated elsewhere (a held-out test split that
`pretrain --exclude-splits` kept out). It also warns when the weights were made for another
input size or normalisation than the run uses.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from embryo_ml.config import Config
from embryo_ml.train.pretrain_data import COLLAPSE_SPREAD, read_record, validation_overlap

log = logging.getLogger(__name__)


def pretraining_check(cfg: Config, validation: pd.DataFrame, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> dict[str, Any] | None:
    """The pretraining record of `model.pretrained_file` with its overlap with the
    `validation` rows and the warnings that follow, or None when the file has no record."""
    if not cfg.model.pretrained_file:
        return None
    record = read_record(cfg.model.pretrained_file)
    if record is None:
        return None
    overlap = validation_overlap(record, validation)
    warnings = []
    if overlap.images or overlap.patients:
        who = (f"{overlap.patients} of the validation {overlap.column.replace('_id', '')}s"
               if overlap.column else "validation images")
        warnings.append(
            f"model.pretrained_file was pretrained on images of {who} ({overlap.images} of "
            f"{len(validation)} validation images by content): the validation figures and "
            "the verdict are optimistic; pretrain with --exclude-splits for the patients you "
            "evaluate on")
    if record.output_spread is not None and record.output_spread < COLLAPSE_SPREAD:
        warnings.append(f"model.pretrained_file comes from a collapsed pretraining run (output "
                        f"spread {record.output_spread:.3f}): its features are nearly constant")
    if record.model_name != cfg.model.name:
        warnings.append(f"model.pretrained_file was pretrained for {record.model_name}, this "
                        f"run trains {cfg.model.name}: only tensors of matching shape load")
    if record.image_size != cfg.data.image_size:
        warnings.append(f"model.pretrained_file was pretrained at {record.image_size} px, this "
                        f"run trains at {cfg.data.image_size} px")
    if [round(v, 6) for v in (*record.mean, *record.std)] != [
            round(v, 6) for v in (*mean, *std)]:
        warnings.append("model.pretrained_file was pretrained with another normalisation "
                        f"(mean {record.mean}, std {record.std}) than this run uses")
    for text in warnings:
        log.warning("%s", text)
    log.info("pretrained weights: %s", record.describe())
    return {"method": record.method, "epochs": record.epochs, "images": record.images,
            "fingerprint": record.fingerprint, "image_size": record.image_size,
            "probe": record.probe, "overlap": overlap.to_json(), "warnings": warnings}
