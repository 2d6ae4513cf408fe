"""Audit a data set before training: what is in it, what cannot be read, what leaks.

Real embryo data holds the same file under several names, several images per embryo, unreadable
exports and mixed bit depths. A split that puts one file (or a re-saved copy of it, or one
patient) on both sides measures memory, not generalisation, and inflates validation scores.
`check_data` decodes every image once (with the one reader, `read_image`) and reports all of this
as plain numbers and lists; `format_report` renders them for a terminal. Torch-free.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from statistics import median

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from embryo_ml.data.images import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, read_image
from embryo_ml.errors import DataError, ImageReadError

COUNT_COLUMNS = ("label", "day", "patient_id")
GROUP_COLUMNS = ("patient_id", "embryo_id")  # leakage grouping: patient, else embryo
MISSING = "<missing>"
LIST_CAP = 20  # longest list `format_report` prints before "... and N more"
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


def _dct_bits(image: np.ndarray, side: int, keep: int) -> np.ndarray:
    """Shrink to side x side gray, 2-D DCT, keep x keep lowest frequencies vs their median."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or 0 in array.shape[:2]:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.dtype} {array.shape}")
    if array.ndim == 3:
        if array.shape[2] != 3:
            raise ValueError(f"expected 3 channels, got shape {array.shape}")
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(array, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:keep, :keep].ravel()
    bits = low > np.median(low[1:])
    bits[0] = False  # the DC term is mean brightness: not structure
    return np.packbits(bits).view(">u8").astype(np.uint64)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT hash of an RGB (or grayscale) uint8 image: near copies differ in few bits.

    Gray, shrink to 32x32 (INTER_AREA), 2-D DCT, keep the 8x8 lowest frequencies and set a bit
    where a coefficient exceeds the median of the 63 non-DC ones; the DC bit is always 0, so a
    brightness shift, re-encoding or resizing leaves the hash (almost) unchanged while unrelated
    images differ in about half the bits. Every hash has the same number of set bits, so
    distances between hashes are even.
    """
    return int(_dct_bits(image, 32, 8)[0])


def detail_hash(image: np.ndarray) -> np.ndarray:
    """256-bit hash (4 x uint64) like `perceptual_hash` but from a 64x64 shrink.

    The 64-bit hash sees mostly the layout of the frame; in EmbryoScope-like wells (bright ring,
    dark corners) different embryos share it within 2-4 bits. This one also sees the embryo,
    so it confirms which 64-bit matches are the same picture.
    """
    return _dct_bits(image, 64, 16)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in; older numpy counts byte by byte)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def detail_threshold(threshold: int) -> int:
    """Bits allowed between 256-bit detail hashes for a pair within `threshold` 64-bit bits.

    3x, not 4x, the 64-bit allowance: re-saved, resized, blurred or brightened copies stay
    within about 12 of 256 bits, while different embryos in one kind of well start near 18.
    """
    return 3 * threshold


def near_duplicate_groups(hashes: Sequence[int] | np.ndarray, threshold: int,
                          details: np.ndarray | None = None,
                          block: int = 2048) -> list[list[int]]:
    """Indices grouped by 64-bit hamming distance <= `threshold`, chained (A~B, B~C: one group).

    With `details` ((N, 4) uint64 from `detail_hash`), a pair must also be within
    `detail_threshold(threshold)` bits there. All pairs are compared, O(N^2), in numpy blocks:
    about a minute at 100k images; identical hashes are merged first, so many copies of one
    blank frame cost nothing extra. Beyond a few 100k images this wants an index (multi-index
    hashing or a BK-tree).
    """
    if len(hashes) < 2:
        return []
    coarse = np.asarray(hashes, dtype=np.uint64).reshape(-1, 1)
    keys = coarse if details is None else np.hstack([coarse, np.asarray(details, np.uint64)])
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    codes, fine = unique[:, 0], unique[:, 1:]
    fine_limit = detail_threshold(threshold)
    sets = _UnionFind(len(unique))
    for start in range(0, len(unique), block):
        for col in range(start, len(unique), block):
            distance = _popcount(codes[start:start + block, None] ^ codes[None, col:col + block])
            rows, cols = np.nonzero(distance <= threshold)
            rows, cols = rows + start, cols + col
            keep = rows < cols
            rows, cols = rows[keep], cols[keep]
            if fine.shape[1] and len(rows):
                close = _popcount(fine[rows] ^ fine[cols]).sum(axis=1) <= fine_limit
                rows, cols = rows[close], cols[close]
            for a, b in zip(rows.tolist(), cols.tolist()):
                sets.union(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for index, code in enumerate(inverse.ravel().tolist()):
        members[sets.find(code)].append(index)
    return [group for group in members.values() if len(group) > 1]


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
    if "path" not in table.columns:
        raise DataError(f"data table has no 'path' column (columns: {list(table.columns)})")
    if not 0 <= near_threshold <= 64:
        raise DataError(f"near-duplicate threshold must be 0..64 bits, got {near_threshold}")
    paths = list(dict.fromkeys(table["path"].astype(str)))  # a path listed twice is read once
    infos = _inspect_all(paths, max_pixels or DEFAULT_MAX_PIXELS, workers, progress)
    good = [info for info in infos if info.error is None]

    by_content: dict[str, list[str]] = defaultdict(list)
    for info in good:
        by_content[str(info.sha256)].append(info.path)
    exact = sorted(sorted(g) for g in by_content.values() if len(g) > 1)
    near = []
    details = np.array([info.detail for info in good], dtype=np.uint64).reshape(-1, 4)
    hashes = [int(info.phash or 0) for info in good]
    for group in near_duplicate_groups(hashes, near_threshold, details):
        members = sorted(good[i].path for i in group)
        if len({good[i].sha256 for i in group}) > 1:  # not just byte copies (listed above)
            near.append(members)
    near.sort()

    labels: dict[str, str] = {}
    if "label" in table.columns:
        labels = {str(p): _key(v) for p, v in zip(table["path"], table["label"])}
    conflicts = [{"match": match, "paths": group,
                  "labels": sorted({labels.get(p, MISSING) for p in group})}
                 for match, groups in (("exact", exact), ("near", near)) for group in groups
                 if len({labels.get(p, MISSING) for p in group}) > 1]

    where = _split_map(table, splits)
    leakage: list[dict[str, object]] = []
    group_column = next((c for c in GROUP_COLUMNS if _has_values(table, c)), None)
    if where is not None:
        if group_column is not None:
            members: dict[str, list[str]] = defaultdict(list)
            for path, value in zip(table["path"].astype(str), table[group_column]):
                if _key(value) != MISSING:
                    members[_key(value)].append(path)
            leakage += _leaks("group", sorted(members.items()), where, column=group_column)
        every_content = defaultdict(list)  # singletons too: one file listed in two splits
        for info in good:
            every_content[str(info.sha256)].append(info.path)
        leakage += _leaks("content", sorted(every_content.items()), where, match="exact")
        leakage += _leaks("content", [(f"near-{i + 1}", g) for i, g in enumerate(near)], where,
                          match="near")

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
        label_conflicts=conflicts,
        labels=labels,
    )


# ---------------------------------------------------------------- plain-text rendering


def _table(rows: list[tuple[object, ...]], align: str = "") -> list[str]:
    """Columns padded to their widest cell; `align` per column: 'l' or 'r' (default 'l')."""
    if not rows:
        return []
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if align[i:i + 1] == "r" else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def _capped(lines: list[str], n_items: int | None = None) -> list[str]:
    total = len(lines) if n_items is None else n_items
    if len(lines) <= LIST_CAP:
        return lines
    return lines[:LIST_CAP] + [f"  ... and {total - LIST_CAP} more"]


def _count_table(counts: dict[str, int | float], total: int) -> list[str]:
    rows = [(k, v, f"{100 * v / total:.1f}%" if total else "-") for k, v in counts.items()]
    return _capped(_table(rows, "lrr"))


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root) if root else path


def _groups(groups: list[list[str]], root: str, labels: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for number, group in enumerate(groups[:LIST_CAP], 1):
        tags = {labels.get(p, MISSING) for p in group}
        note = f"  (labels differ: {', '.join(sorted(tags))})" if labels and len(tags) > 1 else ""
        lines.append(f"  group {number}: {len(group)} files{note}")
        lines += [f"    {_relative(p, root)}" for p in group]
    if len(groups) > LIST_CAP:
        lines.append(f"  ... and {len(groups) - LIST_CAP} more groups")
    return lines


def _root(report: CheckReport) -> str:
    """The common folder of every path printed, so listings stay short and readable."""
    paths = [p for p, _ in report.unreadable]
    paths += [p for g in report.exact_duplicates + report.near_duplicates for p in g]
    paths += [str(p) for leak in report.leakage for p in leak["paths"]]  # type: ignore[attr-defined]
    if not paths:
        return ""
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # different drives, or relative and absolute mixed
        return ""


def verdict(report: CheckReport) -> str:
    """One line: "OK" or "PROBLEMS: ..." (what fails `ok()`), then what deserves a look."""
    problems = []
    if report.unreadable:
        problems.append(f"{len(report.unreadable)} unreadable")
    if report.leakage:
        problems.append(f"{len(report.leakage)} leak" + ("s" if len(report.leakage) > 1 else ""))
    warnings = []
    if report.exact_duplicates:
        warnings.append(f"{len(report.exact_duplicates)} exact-duplicate group(s)")
    if report.near_duplicates:
        warnings.append(f"{len(report.near_duplicates)} near-duplicate group(s)")
    if report.label_conflicts:
        warnings.append(f"{len(report.label_conflicts)} duplicate group(s) with differing labels")
    line = f"PROBLEMS: {', '.join(problems)}" if problems else "OK"
    return f"{line}; to review: {', '.join(warnings)}" if warnings else line


def format_report(report: CheckReport) -> str:
    """The report as aligned plain-text sections for a terminal; long lists are capped."""
    root = _root(report)
    n_readable = report.n_images - len(report.unreadable)
    out: list[str] = ["Images", *_table([
        ("rows", report.n_images), ("unreadable", len(report.unreadable)),
        ("exact-duplicate groups", len(report.exact_duplicates)),
        ("near-duplicate groups", len(report.near_duplicates)),
    ], "lr")]
    if root:
        out.append(f"  (paths below are relative to {root})")

    def section(title: str, lines: list[str], empty: str = "none") -> None:
        out.extend(["", title, *(lines or [f"  {empty}"])])

    counts = report.counts
    section("Classes", _count_table(counts["label"], report.n_images) if "label" in counts else [],
            "no label column")
    section("Days", _count_table(counts["day"], report.n_images) if "day" in counts else [],
            "no day column")
    section("Patients", _table(list(counts["patient_id"].items()), "lr")
            if "patient_id" in counts else [], "no patient_id column")
    section("Images per embryo", _table(list(report.images_per_embryo.items()), "lr"),
            "no embryo_id column")
    section("Sizes", _count_table(report.sizes, n_readable))
    section("Modes", _count_table(report.modes, n_readable))
    section("Unreadable files", _capped(
        [f"  {_relative(p, root)}: {reason}" for p, reason in report.unreadable]))
    section("Exact duplicates", _groups(report.exact_duplicates, root, report.labels))
    section("Near duplicates", _groups(report.near_duplicates, root, report.labels))

    leak_lines: list[str] = []
    for leak in report.leakage[:LIST_CAP]:
        paths = list(leak["paths"])  # type: ignore[call-overload]
        if leak["kind"] == "group":
            what = f"{leak['column']} {leak['key']}"
        elif leak.get("match") == "exact":
            what = f"same file content (sha256 {str(leak['key'])[:12]})"
        else:
            what = f"near-duplicate group {str(leak['key']).removeprefix('near-')}"
        leak_lines.append(f"  {what} in {' + '.join(leak['splits'])}: "  # type: ignore[arg-type]
                          f"{len(paths)} file(s)")
        leak_lines += [f"    {_relative(p, root)}" for p in paths[:5]]
        if len(paths) > 5:
            leak_lines.append(f"    ... and {len(paths) - 5} more")
    if len(report.leakage) > LIST_CAP:
        leak_lines.append(f"  ... and {len(report.leakage) - LIST_CAP} more")
    section("Leakage between splits", leak_lines,
            "none" if report.split_column else "not checked (no split given)")
    out.extend(["", verdict(report)])
    return "\n".join(out)
