"""Which images a pretraining run learns from, what it excludes, and the record it leaves.

Sources are folders (every image under them, labels ignored) or manifest CSVs (their `path`
column; `patient_id`/`embryo_id`/`focal_plane` when present, and `label` for the linear probe
only). Images are identified by content (a hash of the file's bytes), so a copy under another
name is the same image.

Leakage rule: a model must not be evaluated on patients whose images it was pretrained on.
`--exclude-splits` removes from the pretraining set every image whose content, patient or
embryo is in the named splits of a `data split` file (or of any manifest). The weights file
keeps a record of what it saw (`PretrainRecord`: content hashes and salted hashes of the ids,
never the ids or paths themselves), and `train` checks its validation images against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embryo_ml.data.manifest import iter_image_files, read_manifest
from embryo_ml.errors import DataError
from embryo_ml.train.pretrain_views import neighbour_index
from embryo_ml.train.tracking import salted_hash

DIGEST_HEX = 16  # 64 bits of the content hash: no accidental collision in any clinic's archive
ID_COLUMNS = ("patient_id", "embryo_id")
RECORD_KEY = "embryo_ml.pretrain"  # the safetensors metadata entry
RECORD_FORMAT = 1
MIN_IMAGES = 8  # fewer cannot fill two BatchNorm batches
COLLAPSE_SPREAD = 0.1  # output spread below this: every image maps to (nearly) one point


def content_digest(path: str | os.PathLike[str]) -> str:
    """The hash of a file's bytes (shortened): equal for copies under other names."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:DIGEST_HEX]


def id_hash(column: str, value: object) -> str:
    """A salted hash of an identifier (the one MLflow logging uses): comparable between
    runs, not readable."""
    return salted_hash(f"{column}:{value}")


def read_sources(sources: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """One table of every image in `sources` (folders and manifest CSVs), duplicates by path
    dropped; a DataError for a source that is missing or holds no image."""
    tables = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            paths = [str(p) for p in iter_image_files(source)]
            if not paths:
                raise DataError(f"{source}: no images found (pretraining reads every image "
                                "under a folder, or the path column of a manifest CSV)")
            tables.append(pd.DataFrame({"path": paths}))
        elif source.is_file():
            table = read_manifest(source)
            if table.empty:
                raise DataError(f"{source}: the manifest lists no images")
            tables.append(table)
        else:
            raise DataError(f"images not found: {source} (expected a folder or a manifest CSV)")
    table = pd.concat(tables, ignore_index=True)
    return table.drop_duplicates("path").reset_index(drop=True)


@dataclass(frozen=True)
class Exclusion:
    """What may not be pretrained on: image contents and patient/embryo ids (hashed)."""

    digests: frozenset[str] = frozenset()
    ids: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_splits(cls, path: str | os.PathLike[str], names: Sequence[str] = ("test",)
                    ) -> Exclusion:
        """The rows of `path` (a `data split` CSV or any manifest) whose `split` is in
        `names`; every row where the file has no `split` column."""
        table = read_manifest(path)
        if "split" in table.columns:
            known = sorted(set(table["split"].dropna().astype(str)))
            missing = [n for n in names if n not in known]
            if missing:
                raise DataError(f"{path}: no rows of split {missing[0]!r} (it has: "
                                f"{', '.join(known) or 'none'})")
            table = table[table["split"].astype(str).isin(names)]
        digests = frozenset(content_digest(p) for p in table["path"] if os.path.isfile(p))
        ids: dict[str, frozenset[str]] = {}
        for column in ID_COLUMNS:
            values = set()
            for source in (column, "group"):  # `data split` writes the grouping id as `group`
                if source in table.columns:
                    values |= {id_hash(column, v) for v in table[source].dropna().astype(str)}
            if values:
                ids[column] = frozenset(values)
        return cls(digests, ids)

    def excluded_rows(self, table: pd.DataFrame, digests: Sequence[str]) -> np.ndarray:
        """A boolean mask of the rows of `table` (with their content `digests`) to drop."""
        drop = np.array([d in self.digests for d in digests], dtype=bool)
        for column, hashes in self.ids.items():
            if column in table.columns:
                drop |= np.array([v is not None and not pd.isna(v) and id_hash(column, v) in
                                  hashes for v in table[column].astype(object)], dtype=bool)
        return drop


@dataclass
class PretrainRecord:
    """What a pretrained weights file was made from (stored in its metadata)."""

    model_name: str
    image_size: int
    mean: list[float]
    std: list[float]
    method: str
    epochs: int
    images: int
    fingerprint: str  # sha256 of the sorted content hashes
    digests: list[str]
    id_hashes: dict[str, list[str]]
    excluded_images: int = 0
    final_loss: float | None = None
    output_spread: float | None = None
    probe: dict[str, float] | None = None
    format_version: int = RECORD_FORMAT

    def to_metadata(self) -> dict[str, str]:
        return {RECORD_KEY: json.dumps(asdict(self), separators=(",", ":"))}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> PretrainRecord | None:
        """The record in a safetensors file's metadata, or None (weights from elsewhere)."""
        text = (metadata or {}).get(RECORD_KEY)
        if not text:
            return None
        try:
            fields = json.loads(text)
            if int(fields.get("format_version", 0)) != RECORD_FORMAT:
                return None
            return cls(**fields)
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return (f"self-supervised ({self.method}, {self.epochs} epochs) on {self.images} "
                f"unlabelled images")


def fingerprint(digests: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def read_record(path: str | os.PathLike[str]) -> PretrainRecord | None:
    """The pretraining record of a `.safetensors` weights file, or None when it has none."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return PretrainRecord.from_metadata(handle.metadata())
    except (SafetensorError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class Overlap:
    images: int  # validation images whose content was pretrained on
    patients: int  # validation patients (or embryos) with an image in the pretraining set
    column: str | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def validation_overlap(record: PretrainRecord, table: pd.DataFrame) -> Overlap:
    """How much of `table` (the validation rows: path and ids) the pretraining set held."""
    seen = set(record.digests)
    hits = [content_digest(p) in seen for p in table["path"]]
    column = next((c for c in ID_COLUMNS if c in table.columns), None)
    if column is None:
        return Overlap(int(sum(hits)), 0, None)
    hashes = set(record.id_hashes.get(column, []))
    values = table[column].astype(object).where(table[column].notna(), None).tolist()
    touched = {v for v, hit in zip(values, hits, strict=True)
               if v is not None and (hit or id_hash(column, v) in hashes)}
    return Overlap(int(sum(hits)), len(touched), column)


@dataclass
class PretrainSet:
    table: pd.DataFrame  # path and whatever columns the manifests had
    digests: list[str]
    excluded: int

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.digests)


def collect_images(sources: list[str | os.PathLike[str]],
                   exclusion: Exclusion | None = None) -> PretrainSet:
    """Every image of `sources`, minus what `exclusion` names; a DataError when none is left
    or a file cannot be read (hashed here, decoded by `check_readable`)."""
    table = read_sources(sources)
    digests = []
    for path in table["path"]:
        try:
            digests.append(content_digest(path))
        except OSError as error:
            raise DataError(f"{path}: cannot read the image ({error.strerror or error})") from None
    excluded = 0
    if exclusion is not None:
        drop = exclusion.excluded_rows(table, digests)
        excluded = int(drop.sum())
        table = table[~drop].reset_index(drop=True)
        digests = [d for d, gone in zip(digests, drop, strict=True) if not gone]
    if len(table) < MIN_IMAGES:
        raise DataError(f"only {len(table)} image(s) to pretrain on"
                        + (f" after excluding {excluded}" if excluded else "")
                        + f"; need at least {MIN_IMAGES}")
    return PretrainSet(table, digests, excluded)


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the numbers in a name by value: RUN9 before RUN10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", text) if part)


def pair_partners(table: pd.DataFrame, window: int) -> list[list[int]]:
    """Neighbouring images of the same embryo (`embryo_id`), ordered by `focal_plane` when
    numeric, else by path: the candidates for a positive pair."""
    if "embryo_id" not in table.columns or table["embryo_id"].isna().all():
        return [[] for _ in range(len(table))]
    plane = (pd.to_numeric(table["focal_plane"], errors="coerce")
             if "focal_plane" in table.columns else np.nan)
    frame = pd.DataFrame({"embryo": table["embryo_id"], "path": table["path"], "plane": plane})
    frame["name"] = [natural_key(p) for p in frame["path"]]  # frame 9 before frame 10
    groups = []
    for _, members in frame.dropna(subset=["embryo"]).groupby("embryo", sort=False):
        if members["plane"].notna().all():
            ordered = members.sort_values("plane", kind="stable")
        else:
            ordered = members.loc[sorted(members.index, key=lambda i: frame.at[i, "name"])]
        groups.append(ordered.index.tolist())
    return neighbour_index(groups, window, len(table))
