"""A torn last record: how `recover_rows` (`embryo_ml.data.scores_file`) finds where the whole
records of a partial CSV or JSON Lines scores file end, so a resumed run appends after them.

A process killed outright (SIGKILL, power cut) can leave a last record that does not end in a
newline, has unbalanced quotes or the wrong number of fields; anything malformed *before* the
last record is not a torn write but a damaged file, and is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from embryo_ml.errors import DataError


def _scan_csv(path: Path, columns: Sequence[str]) -> int:
    """Byte size of the whole records at the start of a CSV (header included; 0 if the header
    is torn). Raises `DataError` for a header of other columns or a bad record before the end."""
    good, header, pending, bad = 0, None, b"", None
    with open(path, "rb") as handle:
        for line in handle:
            pending += line
            if pending.count(b'"') % 2 or not pending.endswith(b"\n"):
                continue  # a quoted newline inside the record, or a torn end
            try:
                records = list(csv.reader(io.StringIO(pending.decode("utf-8"), newline="")))
            except (UnicodeDecodeError, csv.Error):
                records = []
            fields = records[0] if len(records) == 1 else None
            if header is None:
                if fields != list(columns):
                    raise DataError(
                        f"{path}: cannot resume: its columns {fields} differ from this bundle's "
                        f"{list(columns)}; score into a new file or drop --resume")
                header = fields
            elif fields is None or len(fields) != len(columns):
                bad = good if bad is None else bad  # only acceptable as the last record
                pending = b""
                continue
            if bad is not None:
                raise DataError(f"{path}: malformed record at byte {bad}; cannot resume safely")
            good += len(pending)
            pending = b""
    return good


def _scan_jsonl(path: Path, columns: Sequence[str]) -> int:
    """Byte size of the whole lines at the start of a JSON Lines file (see `_scan_csv`)."""
    good, bad = 0, None
    with open(path, "rb") as handle:
        for line in handle:
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict):
                bad = good if bad is None else bad
                continue
            if bad is not None:
                raise DataError(f"{path}: malformed line at byte {bad}; cannot resume safely")
            if set(row) != set(columns):
                raise DataError(
                    f"{path}: cannot resume: its columns {sorted(row)} differ from this "
                    f"bundle's {sorted(columns)}; score into a new file or drop --resume")
            good += len(line)
    return good


def whole_records_size(path: Path, columns: Sequence[str], jsonl: bool) -> int:
    """Byte size of the whole records at the start of a CSV (or JSON Lines) scores file."""
    return (_scan_jsonl if jsonl else _scan_csv)(path, columns)


def repair(path: str | os.PathLike[str], columns: Sequence[str]) -> bool:
    """Cut a torn last record off a CSV or JSON Lines file; True if something was cut."""
    path = Path(path)
    size = path.stat().st_size
    good = whole_records_size(path, columns, jsonl=path.suffix.lower() == ".jsonl")
    if good != size:
        os.truncate(path, good)
    return good != size
