"""Find images and read/write manifests (the CSV contract between pipeline stages).

A manifest has one row per image: `path,label,patient_id,embryo_id,day,focal_plane` plus optional
`grade` and any extra columns, which are kept. Paths are relative to the manifest's folder. A
folder-per-class tree (`good/`, `poor/`) reads as a manifest whose `label` is the folder name.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from embryo_ml.data.images import is_image_file
from embryo_ml.errors import DataError
from embryo_ml.fileio import atomic_write_text

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
        with warnings.catch_warnings():
            # A first row with more fields than the header would silently become the index
            # (every column shifted by one); index_col=False warns instead, made an error here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(
                path, dtype={c: "string" for c in ("path", "label", "grade", *ID_COLUMNS)},
                keep_default_na=False, na_values=[""], index_col=False,
            )
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: a row has more fields than the header; not a readable CSV "
                        "manifest") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError,
            ValueError) as error:
        reason = " ".join(str(error).split())
        raise DataError(f"{path}: not a readable CSV manifest ({reason})") from None
    if "path" not in table.columns:
        raise DataError(f"{path}: manifest has no 'path' column (columns: {list(table.columns)})")
    if table.empty:
        raise DataError(f"{path}: manifest has no rows")
    missing = table["path"].isna().to_numpy()
    if missing.any():
        row = int(missing.argmax()) + 2  # header is line 1 (a quoted newline shifts this)
        raise DataError(f"{path}: line {row} has an empty 'path'")
    base = path.resolve().parent
    table["path"] = [_resolved(base, p, path, i) for i, p in enumerate(table["path"])]
    return table


def _resolved(base: Path, entry: str, manifest: Path, i: int) -> str:
    """A manifest's `path` entry as an absolute path; DataError for one no file can have."""
    try:
        return str((base / entry).resolve())
    except (ValueError, OSError) as error:  # e.g. an embedded NUL byte
        raise DataError(f"{manifest}: row {i + 2}: unusable path {entry!r} ({error})") from None


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
    return atomic_write_text(path, table.to_csv(index=False))


def _collapse_groups(match: re.Match[str]) -> dict[str, str]:
    """Named groups -> columns. `name__2`-style groups fill `name` (Python forbids repeating a
    group name, but a layout often has two places a field can come from)."""
    values: dict[str, str] = {}
    for name, value in match.groupdict().items():
        column = name.split("__", 1)[0]
        if value is not None and not values.get(column):
            values[column] = value
        values.setdefault(column, "")
    return values


def build_manifest(
    source: str | os.PathLike[str],
    pattern: str | None = None,
    out: str | os.PathLike[str] | None = None,
    label_from_folder: bool | None = None,
    allow_unmatched: bool = False,
) -> pd.DataFrame:
    """A manifest from a folder of images (recursive), a folder-per-class tree or a CSV.

    `pattern` is a regular expression searched in each image's path relative to the folder
    (forward slashes); its named groups become columns, e.g.
    `(?P<embryo_id>\\d+)_(?P<focal_plane>-?\\d+)_(?P<grade>[^.]+)` for `33996213_-15_3AB.jpg`.
    The label is the top-level folder name when `label_from_folder` (default: only when there
    is no pattern; a pattern can take the label from a folder: `(?P<label>good|poor)/`).
    A path the pattern does not match is an error naming it, unless `allow_unmatched`.
    Paths in the result are relative to `out`'s folder (absolute when `out` is None).
    Extra columns of a CSV source are kept.
    """
    source = Path(source)
    regex = None
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise DataError(f"--pattern is not a valid regular expression: {error}") from None
        if not regex.groupindex:
            raise DataError("--pattern has no named groups, e.g. (?P<embryo_id>\\d+)")
    if source.is_file():
        table = read_manifest(source)
        base = source.resolve().parent
        relative = [Path(p).relative_to(base).as_posix() if Path(p).is_relative_to(base)
                    else Path(p).name for p in table["path"]]
    elif source.is_dir():
        files = list(iter_image_files(source))
        if not files:
            raise DataError(f"{source}: no images found")
        relative = [f.relative_to(source).as_posix() for f in files]
        table = pd.DataFrame({"path": [str(f.resolve()) for f in files]})
        if label_from_folder is None:
            label_from_folder = regex is None
        if label_from_folder:
            table["label"] = [r.split("/", 1)[0] if "/" in r else pd.NA for r in relative]
    else:
        raise DataError(f"not found: {source}")

    if regex is not None:
        rows, unmatched = [], []
        for rel in relative:
            match = regex.search(rel)
            if match is None:
                unmatched.append(rel)
                rows.append({})
            else:
                rows.append(_collapse_groups(match))
        if unmatched and not allow_unmatched:
            raise DataError(f"--pattern does not match {len(unmatched)} of {len(relative)} "
                            f"path(s), first: {unmatched[0]}")
        extracted = pd.DataFrame(rows, index=table.index).replace("", pd.NA)
        for column in extracted.columns:
            table[column] = extracted[column].astype("string")
    if out is not None:
        base = Path(out).resolve().parent
        table["path"] = [os.path.relpath(p, base).replace(os.sep, "/") for p in table["path"]]
    ordered = [c for c in MANIFEST_COLUMNS if c in table.columns]
    return table[ordered + [c for c in table.columns if c not in ordered]]
