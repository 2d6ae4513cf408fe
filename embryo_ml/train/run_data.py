"""What one training run works on: its labelled table and split, how images reach the model, and
where it runs. Built once at the start of `embryo_ml.train.fit.fit`, read by every later step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from embryo_ml.config import Config
from embryo_ml.data.cache import DecodedCache
from embryo_ml.data.dataset import EmbryoImageDataset
from embryo_ml.data.heads import Heads, head_layout
from embryo_ml.data.labels import build_targets
from embryo_ml.data.manifest import load_table
from embryo_ml.data.preprocess import decode_side
from embryo_ml.data.splits import grouped_split
from embryo_ml.data.transforms import build_train_transform
from embryo_ml.train.distributed import DistContext
from embryo_ml.train.loop import Precision
from embryo_ml.train.run_folder import BestCheckpoint

# Columns of train_images.csv beside path and label, where the manifest has them: what the
# model card summarises (counts only; identifiers never leave the run folder).
TRAIN_IMAGE_COLUMNS = ("day", "clinic", "source", "focal_plane", "patient_id", "embryo_id")


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


def evaluation_frame(table: pd.DataFrame, rows: np.ndarray, positive_class: str,
                     grade_column: str) -> pd.DataFrame:
    """Manifest columns of `rows` with `y` (is the positive class) for `embryo_ml.evaluation`;
    the Gardner grade goes under `grade` whatever its manifest column is called."""
    frame = table.iloc[rows].reset_index(drop=True)
    if grade_column != "grade" and grade_column in frame.columns:
        frame = frame.drop(columns="grade", errors="ignore").rename(columns={grade_column: "grade"})
    return frame.assign(y=(frame["label"] == positive_class).to_numpy())


def training_images(run: RunData, rows: np.ndarray) -> pd.DataFrame:
    """path, label and the TRAIN_IMAGE_COLUMNS the table has, for `rows` of the run's table."""
    table = run.table.iloc[rows]
    frame = pd.DataFrame({"path": table["path"].to_numpy(),
                          "label": [run.classes[t] for t in run.targets[rows]]})
    for column in TRAIN_IMAGE_COLUMNS:
        if column in table.columns:
            frame[column] = table[column].to_numpy()
    return frame


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


def model_inputs(cfg: Config, default_mean: tuple[float, ...],
                 default_std: tuple[float, ...]) -> Inputs:
    """The input settings of `cfg` (mean/std from the model's pretrained config unless set)."""
    size = cfg.data.image_size
    cache = (DecodedCache(cfg.data.cache_dir, size, cfg.data.max_pixels)
             if cfg.data.cache_dir else None)
    return Inputs(size, tuple(cfg.data.mean or default_mean), tuple(cfg.data.std or default_std),
                  cache, cfg.data.max_pixels)


def training_set(cfg: Config, run: RunData, inputs: Inputs, rows: np.ndarray,
                 seed: int) -> tuple[EmbryoImageDataset, Any]:
    """The augmented training dataset of `rows`, and its augmentation pipeline (whose random
    state `last.pt` keeps)."""
    augment = build_train_transform(inputs.size, inputs.mean, inputs.std,
                                    cfg.augment if cfg.train.augment else None, seed=seed)
    paths = run.paths
    return inputs.dataset([paths[i] for i in rows], run.item_targets[rows], augment), augment


@dataclass
class RunSetup:
    """What every step of a run reads: the config, the data and inputs, where it runs and
    writes."""

    cfg: Config
    run: RunData
    inputs: Inputs
    device: torch.device
    precision: Precision
    context: DistContext
    run_dir: Path
    progress: bool
    pretraining: dict[str, Any] | None = None  # embryo_ml.train.pretrain_check

    @property
    def main(self) -> bool:
        """The one process that writes files and talks to MLflow."""
        return self.context.is_main

    def best_checkpoint(self, scored: nn.Module, epoch: int, metrics: dict[str, float],
                        run_id: str | None, **extra: Any) -> BestCheckpoint:
        """`best.pt` of `scored` at `epoch`: what export needs of the model and its inputs."""
        cfg, run, inputs = self.cfg, self.run, self.inputs
        return BestCheckpoint(
            state_dict=scored.state_dict(), model_name=cfg.model.name, classes=run.classes,
            positive_class=cfg.data.positive_class, image_size=inputs.size,
            mean=list(inputs.mean), std=list(inputs.std), epoch=epoch,
            config=cfg.model_dump(mode="json"), val_metrics=metrics, heads=run.heads,
            run_id=run_id, extra=extra)
