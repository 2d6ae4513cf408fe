"""Checkpoint files of a run and the full training state that `--resume` continues from.

`best.pt` holds what export needs (weights, classes, input size, normalisation, config).
`last.pt` holds everything to continue an interrupted run exactly: model, EMA, optimizer and
scheduler state, the epoch, the history so far, and every random-number stream (torch, numpy,
python, the DataLoader's shuffling generator and each augmentation's generators). Both are
written to a temporary name, fsync'ed and renamed (`embryo_ml.fileio`), and both load with
`weights_only=True`: only tensors and plain Python values, never arbitrary pickled objects.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch

from embryo_ml.errors import DataError
from embryo_ml.fileio import atomic_path

CHECKPOINT_NAME = "best.pt"
LAST_NAME = "last.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through `embryo_ml.fileio.atomic_path`: temp name, fsync, rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `fit` (weights_only: no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _transforms(compose: A.Compose) -> list[Any]:
    return [compose, *compose.transforms]


def rng_state(generator: torch.Generator, augment: A.Compose) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
        "loader": generator.get_state(),
        "augment": [(t.random_generator.bit_generator.state, t.py_random.getstate())
                    for t in _transforms(augment)],
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator,
                      augment: A.Compose) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))
    generator.set_state(state["loader"])
    for transform, (numpy_state, python_state) in zip(_transforms(augment), state["augment"]):
        transform.random_generator.bit_generator.state = numpy_state
        transform.py_random.setstate(_as_tuples(python_state))


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples back (serialisation may turn them into lists)."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value
