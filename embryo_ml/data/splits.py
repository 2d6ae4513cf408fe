"""Patient-grouped, label-stratified splits.

Images of one patient (and so of one embryo: its focal planes, time points) must sit on one side
of a split; otherwise validation measures recall of a patient's look, not generalisation, and
reports a score the model never reaches in the clinic.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from embryo_ml.errors import DataError

log = logging.getLogger(__name__)


def group_keys(table: pd.DataFrame) -> tuple[str, np.ndarray]:
    """The grouping column used for splitting: patient, else embryo (with a warning)."""
    for column in ("patient_id", "embryo_id"):
        if column in table.columns and table[column].notna().all():
            if column == "embryo_id":
                log.warning("no complete patient_id column: grouping splits by embryo_id instead")
            return column, table[column].astype(str).to_numpy()
    log.warning(
        "no patient_id or embryo_id column: each image is its own group. If several images show "
        "one embryo, validation scores will be optimistic; add ids to the manifest."
    )
    return "image", np.arange(len(table)).astype(str)


def grouped_split(
    table: pd.DataFrame, val_fraction: float, seed: int, label_column: str = "label"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (train_index, val_index, group_column): stratified by label, no group on both sides.

    Deterministic by seed. Raises `DataError` when there are too few groups to split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    group_column, groups = group_keys(table)
    n_groups = len(set(groups))
    n_splits = max(2, round(1.0 / val_fraction))
    if n_groups < n_splits:
        raise DataError(
            f"only {n_groups} distinct {group_column} value(s): need at least {n_splits} "
            f"to hold out {val_fraction:.0%} for validation"
        )
    labels = table[label_column].astype(str).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_index, val_index = next(splitter.split(np.zeros(len(table)), labels, groups))
    overlap = set(groups[train_index]) & set(groups[val_index])
    if overlap:  # a guard on our own logic: this must never happen
        raise AssertionError(f"{len(overlap)} {group_column} groups on both sides of the split")
    return np.sort(train_index), np.sort(val_index), group_column
