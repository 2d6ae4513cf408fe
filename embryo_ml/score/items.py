"""What a run scores: one `ScoreItem` per image, from a folder or a manifest, streamed.

A folder is walked lazily (never listed with its pixels into memory). The embryo and patient
ids that group images into cohorts come from the manifest's columns, or from the image's path
with `--embryo-pattern` (a regex with a named group `embryo_id`, optionally `patient_id`, and
a group named like the bundle's day-prior column, e.g. `day`, for the day).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import pandas as pd

from embryo_ml.data.manifest import iter_image_files, read_manifest
from embryo_ml.errors import ConfigError, DataError
from embryo_ml.evaluation.prior import prior_value


@dataclass(frozen=True)
class ScoreItem:
    """One image to score: `path` as the user will read it, `file` where it is on disk."""

    path: str
    file: str
    patient_id: str = ""
    embryo_id: str = ""
    data: bytes | None = field(default=None, repr=False)  # encoded image in memory, not `file`
    # The value of the bundle's day-prior column (`Bundle.prior`) in the manifest, normalised by
    # `embryo_ml.evaluation.prior.prior_value`; "" = none given (a folder, or a blank cell).
    prior_value: str = ""


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


def pattern_prior_value(item: ScoreItem, regex: re.Pattern[str], column: str) -> ScoreItem:
    """The day from the pattern's group named like the prior column (e.g. `(?P<day>\\d)`),
    searched in `item.path`; a manifest's own value wins, a path it does not match keeps ""."""
    if item.prior_value:
        return item
    match = regex.search(item.path)
    value = match.group(column) if match else None
    return replace(item, prior_value=prior_value(value)) if value else item


def iter_items(
    source: str | os.PathLike[str], embryo_pattern: re.Pattern[str] | str | None = None,
    prior_column: str | None = None,
) -> Iterator[ScoreItem]:
    """Images to score from a folder (recursive) or a manifest CSV; raises `DataError` for a
    missing source or one with no images. `prior_column`: the manifest column whose value each
    item carries as `prior_value` (the bundle's day prior)."""
    source = Path(source)
    if source.is_dir():
        items: Iterator[ScoreItem] = (
            ScoreItem(file.relative_to(source).as_posix(), str(file))
            for file in iter_image_files(source)
        )
    elif source.is_file() and source.suffix.lower() == ".csv":
        table = read_manifest(source)
        raw = pd.read_csv(source, usecols=["path"], dtype="string", keep_default_na=False)
        prior = ([prior_value(v) for v in table[prior_column]]
                 if prior_column and prior_column in table.columns else [""] * len(table))
        items = (
            ScoreItem(shown, file, patient, embryo, prior_value=value)
            for shown, file, patient, embryo, value in zip(
                raw["path"], table["path"], _column(table, "patient_id"),
                _column(table, "embryo_id"), prior)
        )
    elif source.exists():
        raise DataError(f"{source}: expected a folder of images or a manifest .csv")
    else:
        raise DataError(f"not found: {source}")
    if embryo_pattern is not None:
        regex = (compile_embryo_pattern(embryo_pattern) if isinstance(embryo_pattern, str)
                 else embryo_pattern)
        items = (apply_embryo_pattern(item, regex) for item in items)
        if prior_column and prior_column in regex.groupindex:
            items = (pattern_prior_value(item, regex, prior_column) for item in items)
    first = next(items, None)
    if first is None:
        raise DataError(f"{source}: no images found (looked for .jpg .jpeg .png .bmp .tif .tiff)")
    return chain([first], items)


def _column(table: pd.DataFrame, name: str) -> list[str]:
    if name not in table.columns:
        return [""] * len(table)
    return ["" if pd.isna(v) else str(v) for v in table[name]]


@dataclass
class PriorCoverage:
    """Which scored images the bundle's day prior (`Bundle.prior`) could not apply to: no day
    in the source, or a day it has no offset for. They are scored from the image alone (the
    day-free calibration); `warning` says so once per run."""

    column: str
    known: frozenset[str]
    n_items: int = 0
    n_without: int = 0
    unknown: dict[str, int] = field(default_factory=dict)  # value ("" = none) -> images

    @classmethod
    def of(cls, prior: dict[str, Any] | None) -> PriorCoverage | None:
        if prior is None:
            return None
        return cls(str(prior["column"]), frozenset(prior["offsets"]))

    def watch(self, items: Iterator[ScoreItem]) -> Iterator[ScoreItem]:
        """`items`, counted as they pass."""
        for item in items:
            self.n_items += 1
            if item.prior_value not in self.known:
                self.n_without += 1
                self.unknown[item.prior_value] = self.unknown.get(item.prior_value, 0) + 1
            yield item

    def warning(self) -> str | None:
        """One line, or None when every image had a day the model knows."""
        if not self.n_without:
            return None
        days = ", ".join(sorted(self.known, key=_natural))
        if set(self.unknown) == {""}:
            where = (f"no '{self.column}' for any of the {self.n_items} images (a folder, or "
                     f"a manifest without the column)" if self.n_without == self.n_items else
                     f"{self.n_without} of {self.n_items} images have no '{self.column}' in "
                     "the manifest")
            return (f"{where}: their scores come from the image alone, without the day prior "
                    f"this model was calibrated with (days {days}); score a manifest with a "
                    f"'{self.column}' column for the day-aware scores")
        shown = ", ".join(repr(v) if v else "blank" for v in sorted(self.unknown, key=_natural))
        return (f"{self.n_without} of {self.n_items} images have no '{self.column}' this model "
                f"is calibrated for ({shown}; it knows {days}): their scores come from the image "
                "alone; check the days in the manifest or the file names")


def _natural(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)
