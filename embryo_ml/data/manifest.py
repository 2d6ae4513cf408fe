"""Find images and read/write manifests (the CSV contract between pipeline stages).

A manifest has one row per image: `path,label,patient_id,embryo_id,day,focal_plane` plus optional
`grade` and any extra columns, which are kept. Paths are relative to the manifest's folder. A
folder-per-class tree (`good/`, `poor/`) reads as a manifest whose `label` is the folder name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from embryo_ml.data.images import is_image_file
from embryo_ml.errors import DataError

MANIFEST_COLUMNS = ("path", "label", "patient_id", "embryo_id", "day", "focal_plane", "grade")
ID_COLUMNS = ("patient_id", "embryo_id")


def iter_image_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield image files under `root` recursively, in a stable sorted order, without listing the
    whole tree first (a time-lapse archive can hold millions of frames). Hidden folders skipped."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_image_file(name):
                yield Path(folder) / name


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest CSV; `path` entries become absolute (resolved against its folder).

    Id-like columns are read as text so `007` stays `007`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        table = pd.read_csv(
            path, dtype={c: "string" for c in ("path", "label", "grade", *ID_COLUMNS)},
            keep_default_na=False, na_values=[""],
        )
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: not a readable CSV manifest ({error})") from None
    if "path" not in table.columns:
        raise DataError(f"{path}: manifest has no 'path' column (columns: {list(table.columns)})")
    if table.empty:
        raise DataError(f"{path}: manifest has no rows")
    missing = table["path"].isna()
    if missing.any():
        row = int(missing.idxmax()) + 2  # header is line 1
        raise DataError(f"{path}: line {row} has an empty 'path'")
    base = path.resolve().parent
    table["path"] = [str((base / p).resolve()) for p in table["path"]]
    return table


def read_class_folders(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a folder-per-class tree: each direct sub-folder is a class, its images the rows."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = [
        {"path": str(file.resolve()), "label": label}
        for label in classes
        for file in iter_image_files(root / label)
    ]
    if not rows:
        raise DataError(f"{root}: no images found in class sub-folders")
    return pd.DataFrame(rows, columns=["path", "label"]).astype({"label": "string"})


def load_table(source: str | os.PathLike[str]) -> pd.DataFrame:
    """A manifest CSV or a folder-per-class tree, as a table with absolute paths."""
    source = Path(source)
    if source.is_dir():
        return read_class_folders(source)
    if source.is_file():
        return read_manifest(source)
    raise DataError(f"data not found: {source} (expected a manifest CSV or a folder of classes)")


def load_labelled(source: str | os.PathLike[str]) -> pd.DataFrame:
    """Like `load_table`, for training: every row must have a label."""
    table = load_table(source)
    if "label" not in table.columns:
        raise DataError(f"{source}: no 'label' column; training needs one label per image")
    unlabelled = table["label"].isna()
    if unlabelled.any():
        raise DataError(
            f"{source}: {int(unlabelled.sum())} row(s) have no label, first: "
            f"{table.loc[unlabelled, 'path'].iloc[0]}"
        )
    return table


def write_manifest(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp name, then rename) so a reader never sees half a manifest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path
