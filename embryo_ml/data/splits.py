"""Patient-grouped, label-stratified splits.

Images of one patient (and so of one embryo: its focal planes, time points) must sit on one side
of a split; otherwise validation measures recall of a patient's look, not generalisation, and
reports a score the model never reaches in the clinic.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

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
    from sklearn.model_selection import StratifiedGroupKFold  # [train] extra; not for `data check`

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_index, val_index = next(splitter.split(np.zeros(len(table)), labels, groups))
    overlap = set(groups[train_index]) & set(groups[val_index])
    if overlap:  # a guard on our own logic: this must never happen
        raise AssertionError(f"{len(overlap)} {group_column} groups on both sides of the split")
    return np.sort(train_index), np.sort(val_index), group_column


def _fold_of_groups(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> np.ndarray:
    """Fold index (0..n_splits-1) per row; every group in exactly one fold."""
    fold = np.full(len(labels), -1, dtype=np.int64)
    from sklearn.model_selection import StratifiedGroupKFold  # [train] extra; not for `data check`

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[held_out] = k
    return fold


def make_splits(
    table: pd.DataFrame, folds: int = 5, test_fraction: float = 0.2, seed: int = 0,
    label_column: str = "label",
) -> pd.DataFrame:
    """A held-out test split plus `folds` cross-validation folds over the rest, all grouped.

    Returns `path, split, fold, group`: `split` is `test` or `train`; `fold` (0..folds-1) is the
    fold in which a `train` row is validation, -1 for `test` rows. Stratified by label,
    deterministic by seed, and verified: no group in two folds or in both train and test.
    """
    if folds < 2:
        raise DataError(f"--folds must be at least 2, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if label_column not in table.columns:
        raise DataError(f"no '{label_column}' column to stratify the split by")
    group_column, groups = group_keys(table)
    labels = table[label_column].astype(str).to_numpy()
    is_test = np.zeros(len(table), dtype=bool)
    if test_fraction > 0:
        n_test_splits = max(2, round(1.0 / test_fraction))
        _require_groups(groups, n_test_splits, group_column)
        is_test = _fold_of_groups(labels, groups, n_test_splits, seed) == 0
    rest = ~is_test
    _require_groups(groups[rest], folds, group_column)
    fold = np.full(len(table), -1, dtype=np.int64)
    fold[rest] = _fold_of_groups(labels[rest], groups[rest], folds, seed + 1)
    result = pd.DataFrame({"path": table["path"].to_numpy(),
                           "split": np.where(is_test, "test", "train"), "fold": fold,
                           "group": groups})
    verify_no_group_leak(result)
    return result


def _require_groups(groups: np.ndarray, n_splits: int, group_column: str) -> None:
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise DataError(f"only {n_groups} distinct {group_column} value(s): need at least "
                        f"{n_splits} to split")


def split_parts(splits: pd.DataFrame) -> pd.Series:
    """The side of each row: `test`, or `fold<k>` for cross-validation rows (each fold is a
    side of its own: a group in two folds leaks in cross-validation)."""
    if "fold" not in splits.columns:
        return splits["split"].astype(str)
    fold = "fold" + splits["fold"].astype(str)
    return pd.Series(np.where(splits["split"] == "test", "test", fold), index=splits.index)


def verify_no_group_leak(splits: pd.DataFrame) -> None:
    """Raise if a group sits in two folds, or in both train and test."""
    sides = pd.DataFrame({"group": splits["group"], "part": split_parts(splits)})
    sides = sides.drop_duplicates()
    shared = sides.groupby("group").size()
    if (shared > 1).any():
        raise AssertionError(f"{int((shared > 1).sum())} group(s) on two sides of the split")
