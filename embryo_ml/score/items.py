"""What a run scores: one `ScoreItem` per image, from a folder or a manifest, streamed.

A folder is walked lazily (never listed with its pixels into memory). The embryo and patient
ids that group images into cohorts come from the manifest's columns, or from the image's path
with `--embryo-pattern` (a regex with a named group `embryo_id`, optionally `patient_id`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import pandas as pd

from embryo_ml.data.manifest import iter_image_files, read_manifest
from embryo_ml.errors import ConfigError, DataError


@dataclass(frozen=True)
class ScoreItem:
    """One image to score: `path` as the user will read it, `file` where it is on disk."""

    path: str
    file: str
    patient_id: str = ""
    embryo_id: str = ""
    data: bytes | None = field(default=None, repr=False)  # encoded image in memory, not `file`


def compile_embryo_pattern(pattern: str) -> re.Pattern[str]:
    """The `--embryo-pattern` regex; `ConfigError` (one line) if invalid or without `embryo_id`."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"--embryo-pattern is not a valid regular expression: {error}") from None
    if "embryo_id" not in regex.groupindex:
        raise ConfigError("--embryo-pattern needs a named group embryo_id, e.g. "
                          "'(?P<embryo_id>\\d+)_(?P<focal_plane>-?\\d+)'")
    return regex


def apply_embryo_pattern(item: ScoreItem, regex: re.Pattern[str]) -> ScoreItem:
    """Ids from the pattern searched in `item.path`; `patient_id` falls back to the manifest's.
    A path the pattern does not match is an embryo of its own (no embryo id)."""
    match = regex.search(item.path)
    embryo = match.group("embryo_id") if match else None
    if not embryo:
        return replace(item, embryo_id="")
    groups = match.groupdict()  # type: ignore[union-attr]
    return replace(item, embryo_id=embryo, patient_id=groups.get("patient_id") or item.patient_id)


def iter_items(
    source: str | os.PathLike[str], embryo_pattern: re.Pattern[str] | str | None = None
) -> Iterator[ScoreItem]:
    """Images to score from a folder (recursive) or a manifest CSV; raises `DataError` for a
    missing source or one with no images."""
    source = Path(source)
    if source.is_dir():
        items: Iterator[ScoreItem] = (
            ScoreItem(file.relative_to(source).as_posix(), str(file))
            for file in iter_image_files(source)
        )
    elif source.is_file() and source.suffix.lower() == ".csv":
        table = read_manifest(source)
        raw = pd.read_csv(source, usecols=["path"], dtype="string", keep_default_na=False)
        items = (
            ScoreItem(shown, file, patient, embryo)
            for shown, file, patient, embryo in zip(
                raw["path"], table["path"], _column(table, "patient_id"),
                _column(table, "embryo_id"))
        )
    elif source.exists():
        raise DataError(f"{source}: expected a folder of images or a manifest .csv")
    else:
        raise DataError(f"not found: {source}")
    if embryo_pattern is not None:
        regex = (compile_embryo_pattern(embryo_pattern) if isinstance(embryo_pattern, str)
                 else embryo_pattern)
        items = (apply_embryo_pattern(item, regex) for item in items)
    first = next(items, None)
    if first is None:
        raise DataError(f"{source}: no images found (looked for .jpg .jpeg .png .bmp .tif .tiff)")
    return chain([first], items)


def _column(table: pd.DataFrame, name: str) -> list[str]:
    if name not in table.columns:
        return [""] * len(table)
    return ["" if pd.isna(v) else str(v) for v in table[name]]
