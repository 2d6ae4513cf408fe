"""The training-run folder: the name of every file in it, and the format of its checkpoints.

One owner, as `embryo_ml.export.bundle` owns the bundle folder: training writes these files;
export, the model card, the trust layer and `train --resume` read them; nobody else spells a
name. A run folder (`embryo_ml.train.fit`):

    best.pt               what export needs of the model (`BestCheckpoint`)
    last.pt               the full training state `--resume` continues from
    selection.pt          with `train.refit`: the validation run's best.pt
    run.json              {"data": the training data's absolute path}, read by `--resume`
    run_id.txt            the MLflow run id
    config.yaml           the resolved config
    history.csv           one row per finished epoch
    metrics.json          the final validation figures, verdict and evaluation
    quality.json          the image-quality limits export puts in the bundle
    subgroup_metrics.csv  the validation evaluation per subgroup
    val_predictions.csv   validation images, labels and calibrated probabilities
    train_images.csv      the training images (the OOD reference, the model card's counts)

A cross-validation folder (`embryo_ml.train.cv`) holds `config.yaml`, a run folder per fold
(`fold_folder`), `oof_predictions.csv`, `cv_summary.csv`, `cv_subgroups.csv` and
`cv_summary.json`.

Checkpoint format. best.pt, last.pt and selection.pt are torch files of plain values, loaded with
`weights_only=True` (no code from the file runs), written atomically (temp name, fsync, rename),
and carry `format_version` (`CHECKPOINT_FORMAT`). Decision: a checkpoint *without*
`format_version` was written before checkpoints were versioned, and that layout is identical to
version 1, so it is read as version 1 (`tests/data/golden/run/best.pt` is such a file and keeps
exporting). Any other version is refused in one line that names the file, the version found and
the versions this embryo-ml reads; a future layout change raises `CHECKPOINT_FORMAT` and teaches
the reader the old one.

Torch is imported inside the functions that read or write a checkpoint: the torch-free scoring
and report path imports the file names from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embryo_ml.errors import DataError
from embryo_ml.fileio import atomic_path

BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
SELECTION_FILE = "selection.pt"
RUN_RECORD_FILE = "run.json"
RUN_ID_FILE = "run_id.txt"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
QUALITY_FILE = "quality.json"
SUBGROUP_METRICS_FILE = "subgroup_metrics.csv"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
TRAIN_IMAGES_FILE = "train_images.csv"
# cross-validation
OOF_PREDICTIONS_FILE = "oof_predictions.csv"
CV_SUMMARY_FILE = "cv_summary.csv"
CV_SUBGROUPS_FILE = "cv_subgroups.csv"
CV_SUMMARY_JSON_FILE = "cv_summary.json"

FORMAT_KEY = "format_version"
CHECKPOINT_FORMAT = 1  # what this embryo-ml writes
READABLE_FORMATS = (1,)  # what it reads (a checkpoint without FORMAT_KEY is version 1)


def fold_folder(cv_dir: str | Path, fold: int) -> Path:
    """The run folder of cross-validation fold `fold` (0-based)."""
    return Path(cv_dir) / f"fold{fold}"


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write a run checkpoint (a dict of plain values and tensors) atomically, with the format
    version this embryo-ml writes."""
    import torch

    with atomic_path(path) as tmp:
        torch.save({**state, FORMAT_KEY: CHECKPOINT_FORMAT}, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a run checkpoint (best.pt, last.pt, selection.pt) with `weights_only=True`; its
    `format_version` is checked (absent: version 1, see the module text) and always set."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise DataError(f"{path}: not an embryo-ml checkpoint (a {type(state).__name__}, "
                        "not a dict)")
    version = state.setdefault(FORMAT_KEY, 1)
    if isinstance(version, bool) or version not in READABLE_FORMATS:
        readable = ", ".join(map(str, READABLE_FORMATS))
        raise DataError(f"{path}: checkpoint {FORMAT_KEY} {version!r} is not one this "
                        f"embryo-ml reads ({readable}); it was written by another version")
    return state


@dataclass
class BestCheckpoint:
    """best.pt: the weights and what export needs to rebuild the model and feed it images."""

    state_dict: dict[str, Any]
    model_name: str
    classes: list[str]
    positive_class: str
    image_size: int
    mean: list[float]
    std: list[float]
    epoch: int
    config: dict[str, Any]  # the resolved config, `Config.model_dump(mode="json")`
    val_metrics: dict[str, float] = field(default_factory=dict)
    heads: dict[str, Any] = field(default_factory=dict)  # Gardner grade heads after the classes
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further keys, e.g. refit=True
    format_version: int = CHECKPOINT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The file's layout: the fields as keys, `extra`'s keys beside them."""
        stored = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "extra"}
        return {**stored, **self.extra}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], path: str | Path) -> BestCheckpoint:
        """The checkpoint of a loaded best.pt; DataError naming the keys it lacks."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [f.name for f in dataclasses.fields(cls) if f.name in names
                    and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in state]
        if missing:
            raise DataError(f"{path}: not a best.pt of embryo-ml (no {', '.join(missing)})")
        known = {k: v for k, v in state.items() if k in names}
        return cls(**known, extra={k: v for k, v in state.items() if k not in names})


def save_best(checkpoint: BestCheckpoint, path: str | Path) -> None:
    """Write best.pt (or selection.pt) atomically."""
    save_checkpoint(checkpoint.to_dict(), path)


def load_best(path: str | Path) -> BestCheckpoint:
    """Read best.pt (or selection.pt), version checked."""
    return BestCheckpoint.from_dict(load_checkpoint(path), path)


def listed_images(run_dir: str | Path, table_file: str) -> list[str]:
    """The image paths of a run's table (`TRAIN_IMAGES_FILE`, `VAL_PREDICTIONS_FILE`); [] when
    the run has no such file (a run from before it existed)."""
    import pandas as pd

    table_path = Path(run_dir) / table_file
    if not table_path.is_file():
        return []
    table = pd.read_csv(table_path, usecols=["path"], dtype="string", keep_default_na=False)
    return [p for p in table["path"].tolist() if p]
