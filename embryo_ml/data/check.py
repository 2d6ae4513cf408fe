"""Audit a data set before training: what is in it, what cannot be read, what leaks.

Real embryo data holds the same file under several names, several images per embryo, unreadable
exports and mixed bit depths. A split that puts one file (or a re-saved copy of it, or one
patient) on both sides measures memory, not generalisation, and inflates validation scores.
`check_data` decodes every image once (with the one reader, `read_image`) and reports all of this
as plain numbers and lists; `embryo_ml.data.check_format.format_report` renders them for a
terminal, `embryo_ml.data.near_duplicates` finds the re-saved copies. Torch-free.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from statistics import median

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from embryo_ml.data.images import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, read_image
from embryo_ml.data.near_duplicates import detail_hash, near_duplicate_groups, perceptual_hash
from embryo_ml.errors import DataError, ImageReadError

COUNT_COLUMNS = ("label", "day", "patient_id")
GROUP_COLUMNS = ("patient_id", "embryo_id")  # leakage grouping: patient, else embryo
MISSING = "<missing>"
_CHUNK = 256  # images handed to the thread pool at a time: bounded memory on huge trees


@dataclass
class CheckReport:
    """Everything `check_data` found; plain values only, so it prints and serialises as is."""

    n_images: int
    counts: dict[str, dict[str, int | float]]
    images_per_embryo: dict[str, float]
    unreadable: list[tuple[str, str]]
    exact_duplicates: list[list[str]]
    near_duplicates: list[list[str]]
    sizes: dict[str, int]
    modes: dict[str, int]
    leakage: list[dict[str, object]]
    split_column: str | None
    group_column: str | None = None  # the id column group leakage was checked on
    label_conflicts: list[dict[str, object]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict, repr=False)  # path -> label, for listings

    def ok(self, allow: bool = False) -> bool:
        """False when files cannot be read or a split leaks; `allow` accepts them knowingly."""
        return allow or not (self.unreadable or self.leakage)

    def to_json(self) -> dict:
        """A plain dict (lists, str, int, float) that `json.dumps` accepts."""
        data = asdict(self)
        data["unreadable"] = [{"path": p, "reason": r} for p, r in self.unreadable]
        data.pop("labels")
        data["ok"] = self.ok()
        return data


@dataclass
class _ImageInfo:
    path: str
    sha256: str | None = None
    phash: int | None = None
    detail: np.ndarray | None = None
    size: str | None = None
    mode: str | None = None
    error: str | None = None


def _inspect(path: str, max_pixels: int) -> _ImageInfo:
    """Decode once and measure; a bad file becomes a reason, never an exception."""
    info = _ImageInfo(path)
    try:
        image = read_image(path, max_pixels=max_pixels)
        with open(path, "rb") as handle:
            info.sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        # header only: the mode as stored, before conversion (of a file the reader accepted)
        with Image.open(path, formats=IMAGE_FORMATS) as stored:
            info.mode = stored.mode
    except ImageReadError as error:
        info.error = error.reason
        return info
    except OSError as error:  # vanished or changed between the decode and the hash
        info.error = f"cannot read file ({error.strerror or error})"
        return info
    info.size = f"{image.shape[1]}x{image.shape[0]}"
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    info.phash = perceptual_hash(gray)
    info.detail = detail_hash(gray)
    return info


def _inspect_all(paths: list[str], max_pixels: int, workers: int,
                 progress: bool) -> list[_ImageInfo]:
    bar = None
    if progress:
        from tqdm.auto import tqdm  # only the CLI wants a bar

        bar = tqdm(total=len(paths), desc="checking images", unit="img")
    results: list[_ImageInfo] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), _CHUNK):
            chunk = paths[start:start + _CHUNK]
            results.extend(pool.map(lambda p: _inspect(p, max_pixels), chunk))
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return results


def _key(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))  # a day column with gaps reads as float: 3.0 -> "3"
    return str(value)


def _sort_key(text: str) -> tuple[int, float, str]:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1 if text != MISSING else 2, 0.0, text)


def _value_counts(values: Iterable[object]) -> dict[str, int]:
    counts = Counter(_key(v) for v in values)
    return {k: int(counts[k]) for k in sorted(counts, key=_sort_key)}


def _spread(sizes: list[int], prefix: str) -> dict[str, int | float]:
    if not sizes:
        return {f"{prefix}_min": 0, f"{prefix}_median": 0, f"{prefix}_max": 0}
    mid = float(median(sizes))
    return {f"{prefix}_min": int(min(sizes)),
            f"{prefix}_median": int(mid) if mid.is_integer() else mid,
            f"{prefix}_max": int(max(sizes))}


def _has_values(table: pd.DataFrame, column: str) -> bool:
    return column in table.columns and bool(table[column].notna().any())


def _counts(table: pd.DataFrame) -> dict[str, dict[str, int | float]]:
    counts: dict[str, dict[str, int | float]] = {}
    for column in COUNT_COLUMNS:
        if column not in table.columns:
            continue
        if column == "patient_id":
            ids = table[column].dropna().astype(str)
            per_patient = ids.value_counts().tolist()
            counts[column] = {"n_patients": len(per_patient),
                              **_spread(per_patient, "images_per_patient"),
                              "n_missing": int(table[column].isna().sum())}
        else:
            counts[column] = dict(_value_counts(table[column]))
    return counts


def _per_embryo(table: pd.DataFrame) -> dict[str, float]:
    if not _has_values(table, "embryo_id"):
        return {}
    per_embryo = table["embryo_id"].dropna().astype(str).value_counts().tolist()
    spread = _spread(per_embryo, "images")
    return {"n_embryos": len(per_embryo), "min": spread["images_min"],
            "median": spread["images_median"], "max": spread["images_max"]}


def _split_map(table: pd.DataFrame, splits: pd.DataFrame | None) -> dict[str, set[str]] | None:
    """path -> the split(s) it is in; a path listed under two splits is a leak of its own."""
    if splits is None:
        if "split" not in table.columns:
            return None
        splits = table
    missing = {"path", "split"} - set(splits.columns)
    if missing:
        raise DataError(f"split table has no {sorted(missing)} column(s) "
                        f"(columns: {list(splits.columns)})")
    mapping: dict[str, set[str]] = defaultdict(set)
    for path, split in zip(splits["path"].astype(str), splits["split"]):
        if _key(split) != MISSING:
            mapping[path].add(_key(split))
    if not set(mapping) & set(table["path"].astype(str)):
        # Most likely relative vs absolute paths; silence here would read as "no leakage".
        raise DataError("the split table shares no path with the data (paths must be absolute, "
                        "as in the data table)")
    return mapping


def _leaks(kind: str, groups: Iterable[tuple[str, list[str]]],
           where: dict[str, set[str]], **extra: object) -> list[dict[str, object]]:
    leaks = []
    for key, paths in groups:
        found = set().union(*(where.get(p, set()) for p in paths))
        if len(found) > 1:
            leaks.append({"kind": kind, **extra, "key": key, "splits": sorted(found),
                          "paths": sorted(paths)})
    return leaks


def _checked_arguments(table: pd.DataFrame, near_threshold: int) -> list[str]:
    """The paths to read (a path listed twice is read once), after the argument checks."""
    if "path" not in table.columns:
        raise DataError(f"data table has no 'path' column (columns: {list(table.columns)})")
    if not 0 <= near_threshold <= 64:
        raise DataError(f"near-duplicate threshold must be 0..64 bits, got {near_threshold}")
    return list(dict.fromkeys(table["path"].astype(str)))


def _by_content(good: list[_ImageInfo]) -> dict[str, list[str]]:
    """sha256 -> the paths with that content (singletons too)."""
    by_content: dict[str, list[str]] = defaultdict(list)
    for info in good:
        by_content[str(info.sha256)].append(info.path)
    return by_content


def _near_duplicates(good: list[_ImageInfo], near_threshold: int) -> list[list[str]]:
    """Groups of perceptually equal images, except groups of byte copies only (listed as
    exact duplicates)."""
    near = []
    details = np.array([info.detail for info in good], dtype=np.uint64).reshape(-1, 4)
    hashes = [int(info.phash or 0) for info in good]
    for group in near_duplicate_groups(hashes, near_threshold, details):
        members = sorted(good[i].path for i in group)
        if len({good[i].sha256 for i in group}) > 1:  # not just byte copies (listed above)
            near.append(members)
    near.sort()
    return near


def _label_conflicts(labels: dict[str, str], exact: list[list[str]],
                     near: list[list[str]]) -> list[dict[str, object]]:
    """Duplicate groups whose members carry different labels."""
    return [{"match": match, "paths": group,
             "labels": sorted({labels.get(p, MISSING) for p in group})}
            for match, groups in (("exact", exact), ("near", near)) for group in groups
            if len({labels.get(p, MISSING) for p in group}) > 1]


def _leakage(table: pd.DataFrame, good: list[_ImageInfo], near: list[list[str]],
             where: dict[str, set[str]], group_column: str | None) -> list[dict[str, object]]:
    """One patient (else embryo), one file content or one near-duplicate group in two splits."""
    leakage: list[dict[str, object]] = []
    if group_column is not None:
        members: dict[str, list[str]] = defaultdict(list)
        for path, value in zip(table["path"].astype(str), table[group_column]):
            if _key(value) != MISSING:
                members[_key(value)].append(path)
        leakage += _leaks("group", sorted(members.items()), where, column=group_column)
    every_content = _by_content(good)  # singletons too: one file listed in two splits
    leakage += _leaks("content", sorted(every_content.items()), where, match="exact")
    leakage += _leaks("content", [(f"near-{i + 1}", g) for i, g in enumerate(near)], where,
                      match="near")
    return leakage


def check_data(
    table: pd.DataFrame,
    splits: pd.DataFrame | None = None,
    near_threshold: int = 4,
    max_pixels: int | None = None,
    progress: bool = False,
    workers: int = 2,
) -> CheckReport:
    """Audit `table` (as from `load_table`): counts, unreadable files, duplicates, leakage.

    `splits` (columns `path`, `split`) or a `split` column of `table` enables the leakage check:
    a patient (else embryo), one file content, or one near-duplicate group in more than one split.
    Near duplicates: 64-bit perceptual hashes within `near_threshold` bits, confirmed by the
    256-bit detail hash (see `near_duplicate_groups`); groups of byte copies only are left to
    `exact_duplicates`. Unreadable files are left out of duplicate detection (every empty file
    would match).
    """
    paths = _checked_arguments(table, near_threshold)
    infos = _inspect_all(paths, max_pixels or DEFAULT_MAX_PIXELS, workers, progress)
    good = [info for info in infos if info.error is None]
    exact = sorted(sorted(g) for g in _by_content(good).values() if len(g) > 1)
    near = _near_duplicates(good, near_threshold)
    labels: dict[str, str] = {}
    if "label" in table.columns:
        labels = {str(p): _key(v) for p, v in zip(table["path"], table["label"])}
    where = _split_map(table, splits)
    group_column = next((c for c in GROUP_COLUMNS if _has_values(table, c)), None)
    leakage = [] if where is None else _leakage(table, good, near, where, group_column)
    sizes = Counter(str(info.size) for info in good)
    modes = Counter(str(info.mode) for info in good)
    return CheckReport(
        n_images=len(table),
        counts=_counts(table),
        images_per_embryo=_per_embryo(table),
        unreadable=[(info.path, str(info.error)) for info in infos if info.error is not None],
        exact_duplicates=exact,
        near_duplicates=near,
        sizes={k: int(v) for k, v in sizes.most_common()},
        modes={k: int(v) for k, v in modes.most_common()},
        leakage=leakage,
        split_column="split" if where is not None else None,
        group_column=group_column if where is not None else None,
        label_conflicts=_label_conflicts(labels, exact, near),
        labels=labels,
    )
