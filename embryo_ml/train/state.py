"""The random-number state that `last.pt` keeps, so that `--resume` continues a run exactly.

`last.pt` (written and read by `embryo_ml.train.run_folder`) holds everything to continue an
interrupted run: model, EMA, optimizer and scheduler state, the epoch, the history so far, and
every random-number stream captured here (torch, numpy, python, the DataLoader's shuffling
generator and each augmentation's generators), as plain values that load with
`weights_only=True`.
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import numpy as np
import torch


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
