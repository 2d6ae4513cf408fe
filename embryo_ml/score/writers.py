"""Row writers that make every finished row durable as it is scored (flushed per batch)."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO


class CsvRowWriter:
    """Append rows to a CSV; `flush()` pushes them to disk so an interrupted run keeps them."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self._handle: TextIO = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.DictWriter(self._handle, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()
        self.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow(row)

    def flush(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self.flush()
            self._handle.close()

    def __enter__(self) -> CsvRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
