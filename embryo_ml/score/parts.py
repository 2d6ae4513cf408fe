"""The files of a distributed scoring run (`embryo_ml.score.distributed`): the parts the workers
stage while it runs, and what they become when it has finished.

For `--out OUT` (say `scores.csv` or `scores.parquet`):

    OUT.parts/                     staging, only while the run is not finished
        parts.jsonl                the index: the attempt now running (line 1, {"attempt": k}),
                                   then one line per part kept from earlier attempts
        parts.scoring.json         the settings of the staged rows (`run_settings`); --resume
                                   refuses other ones (`check_resumable`)
        part-AAAA-SSSSSS.<ext>     the rows of shard S of attempt A, in OUT's format, without
                                   ranks; a worker writes it to a temporary name and renames
                                   it, so a part is complete or absent
        failed.txt                 after shards failed: their images, one path per line
    OUT                            .csv / .jsonl: one file, assembled from the parts at the end
    OUT/                           .parquet: a Parquet dataset folder (readable as one table by
                                   pandas, pyarrow, Spark, DuckDB, Polars):
        part-AAAA-SSSSSS.parquet   one per staged part, the same rows with rank_in_cohort
        _SUCCESS                   empty, written last: the dataset is complete
    scores.embryos.<ext>, scores.scoring.json
                                   the embryos table and the settings, as the local engine
                                   writes them (a single file each)

OUT is replaced whole when the run has finished (a folder by an atomic exchange, `replace_folder`),
so an earlier complete output survives a failed or interrupted run; the staging folder goes last.

Which parts count. An attempt (one `embryo-ml score` call) numbers its parts with its own
attempt number, so no two attempts write the same name; a retried shard rewrites its own part
with the same rows. A driver that is killed can leave shards running on an outside cluster,
and their parts may land later. When attempt k starts, it keeps the parts its index lists, and
the parts of attempt k-1 (the one interrupted), and deletes any other part: one that landed after
attempt k-1 had started was scored again by k-1 or later, so keeping it would duplicate rows.
The kept list is written to the index before any shard is submitted. So every image has at most
one row among the parts that count, and a finished part is never lost.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from embryo_ml.data.scores_file import (
    DATASET_COMPLETE,
    iter_file_rows,
    output_format,
    settings_path,
    write_table,
)
from embryo_ml.errors import DataError
from embryo_ml.fileio import (
    aside_path,
    atomic_write_text,
    durable_replace,
    fsync_dir,
    replace_folder,
)

INDEX = "parts.jsonl"
FAILED_LIST = "failed.txt"
_PART = re.compile(r"part-(\d{4,})-(\d{6,})\.(csv|jsonl|parquet)")

Row = dict[str, Any]


def staging_path(out: str | os.PathLike[str]) -> Path:
    """`scores.csv` -> `scores.csv.parts` (a folder beside it)."""
    out = Path(out)
    return out.with_name(f"{out.name}.parts")


def part_attempt(name: str) -> int | None:
    """The attempt number in a part file's name; None for any other name."""
    match = _PART.fullmatch(name)
    return int(match.group(1)) if match else None


def part_files(folder: Path) -> list[Path]:
    """The complete part files in `folder`, in order (attempt, then shard); temporary files
    (hidden names) and anything else are left out."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _PART.fullmatch(p.name))


def parts_rows(parts: Iterable[Path]) -> Iterator[Row]:
    """Every row of the parts, in order, streamed."""
    for part in parts:
        yield from iter_file_rows(part)


class Staging:
    """The staging folder of one `--out`: its index, settings and parts (see the module
    docstring). `begin` starts an attempt; `part` names its shards' files."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.folder = staging_path(out)
        self.index = self.folder / INDEX
        self.settings_file = settings_path(self.index)  # parts.scoring.json
        self.suffix = f".{output_format(out)}"
        self.attempt = 0
        self.accepted: list[str] = []

    def exists(self) -> bool:
        return self.index.is_file()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def part(self, shard: int) -> Path:
        return self.folder / f"part-{self.attempt:04d}-{shard:06d}{self.suffix}"

    def paths(self, own: Iterable[str] = ()) -> list[Path]:
        """The parts that count: those kept from earlier attempts, then `own` (this
        attempt's, by name), in order."""
        return sorted(self.folder / name for name in [*self.accepted, *own])

    def seed(self, rows: Iterable[Row], columns: list[str], settings_file: Path | None) -> None:
        """Stage an earlier output's rows (ranks cleared) as attempt 0's only part, with the
        settings that scored them: what `--resume` continues when there is no staging yet."""
        self.remove()
        self.folder.mkdir(parents=True)
        self.attempt, self.accepted = 0, []
        if settings_file is not None and settings_file.is_file():
            shutil.copyfile(settings_file, self.settings_file)
        rows = iter(rows)
        first = next(rows, None)
        if first is not None:
            cleared = ({**row, "rank_in_cohort": ""} for row in [first, *rows])
            write_table(self.part(0), columns, cleared)
            self.accepted = [self.part(0).name]
        self._write_index()

    def begin(self, settings: dict[str, Any]) -> None:
        """Start the next attempt: keep the parts the index lists and those of the attempt it
        names (the one that was interrupted), delete any other, then write the index and the
        settings, before any shard is submitted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        previous, listed = self._read_index()
        on_disk = part_files(self.folder)
        kept = {name for name in listed if (self.folder / name).is_file()}
        kept |= {p.name for p in on_disk if part_attempt(p.name) == previous}
        for part in on_disk:
            if part.name not in kept:
                part.unlink()  # landed after a later attempt had started: scored again since
        self.attempt, self.accepted = previous + 1, sorted(kept)
        atomic_write_text(self.settings_file, json.dumps(settings, indent=2) + "\n")
        self._write_index()

    def _read_index(self) -> tuple[int, list[str]]:
        if not self.index.is_file():
            return 0, []
        try:
            lines = [json.loads(line) for line in self.index.read_text("utf-8").splitlines()]
            return int(lines[0]["attempt"]), [str(line["part"]) for line in lines[1:]]
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(f"{self.index}: damaged, cannot resume safely; remove "
                            f"{self.folder} to score everything again") from None

    def _write_index(self) -> None:
        lines = [{"attempt": self.attempt}, *({"part": name} for name in self.accepted)]
        atomic_write_text(self.index, "".join(json.dumps(line) + "\n" for line in lines))

    def list_failed(self, paths: Iterable[str]) -> Path:
        listing = self.folder / FAILED_LIST
        atomic_write_text(listing, "".join(f"{path}\n" for path in paths))
        return listing


def write_output(out: Path, columns: list[str], parts: list[Path],
                 rank: Callable[[Row], Row]) -> None:
    """`out` from the parts, every row through `rank`, replacing an earlier one whole: one file
    for .csv/.jsonl, a Parquet dataset folder (one part per staged part, then `_SUCCESS`)
    for .parquet."""
    if output_format(out) != "parquet":
        write_table(out, columns, map(rank, parts_rows(parts)))
        return
    new = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    new.mkdir()
    try:
        for part in parts:
            write_table(new / part.name, columns, map(rank, iter_file_rows(part)))
        atomic_write_text(new / DATASET_COMPLETE, "")
        _install_folder(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def output_rows(out: Path) -> Iterator[Row]:
    """The rows of a finished output: a scores file, or a Parquet dataset folder."""
    return iter_file_rows(out)  # a Parquet dataset folder too


def _install_folder(new: Path, out: Path) -> None:
    """Put the complete folder `new` at `out`; an earlier output there may be a folder or a
    single file (the local engine writes .parquet as one file)."""
    if not out.is_file():
        replace_folder(new, out)
        return
    aside = aside_path(out)
    os.replace(out, aside)
    try:
        durable_replace(new, out)
    except BaseException:
        os.replace(aside, out)
        raise
    aside.unlink()
    fsync_dir(out.parent)
