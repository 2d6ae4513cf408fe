"""Score files: written row by row as images are scored, readable after any interruption.

The format follows the extension of the output path:

- `.csv`: one header line, then one record per row.
- `.jsonl` (JSON Lines): one JSON object per line; numbers are numbers, a missing score is null.
- `.parquet`: a Parquet file cannot be valid while half written (its footer comes last), so rows
  go to a JSON Lines sidecar `<out>.partial.jsonl` as they are scored, and the sidecar is
  converted to `<out>` (temp name, then rename) when the run ends or is interrupted. After a
  finished run the sidecar is deleted; after an interrupted one it stays as the resume log.
  pyarrow is imported only here, only for Parquet.

Rows are appended and flushed (and fsync'ed) batch by batch. A writer remembers the file size
after its last complete flush; when it is closed because of an error or an interrupt it cuts the
file back to that size, so the file never ends in half a row.

A process killed outright (SIGKILL, power cut) can still leave a torn last record;
`recover_rows` finds and drops it before a resumed run appends to the file: a CSV record or JSON
line that does not end in a newline, has unbalanced quotes or the wrong number of fields.

Per-embryo results go beside the scores in the same format: `scores.csv` -> `scores.embryos.csv`
(`embryos_path`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from embryo_ml.errors import ConfigError, DataError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
PARQUET_CHUNK_ROWS = 8192

_FLOAT_COLUMNS = {"score", "embryo_score"}
_INT_COLUMNS = {"display_score", "rank_in_cohort", "n_images", "n_scored"}


def output_format(path: str | os.PathLike[str]) -> str:
    """'csv', 'jsonl' or 'parquet' from the extension; `ConfigError` for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {path}: unknown output format {suffix or '(no extension)'!r}; "
                          "use .csv, .jsonl or .parquet")
    return FORMATS[suffix]


def embryos_path(out: str | os.PathLike[str]) -> Path:
    """`scores.csv` -> `scores.embryos.csv` (same folder, same format)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.embryos{out.suffix}")


def settings_path(out: str | os.PathLike[str]) -> Path:
    """`scores.csv` -> `scores.scoring.json`: which model and options wrote the scores file."""
    out = Path(out)
    return out.with_name(f"{out.stem}.scoring.json")


def partial_path(out: str | os.PathLike[str]) -> Path:
    """The JSON Lines sidecar a Parquet output is written through: `<out>.partial.jsonl`."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def column_kind(column: str) -> str:
    """'float', 'int' or 'str': how JSON Lines and Parquet type a column (CSV is all text)."""
    if column in _FLOAT_COLUMNS or (column.startswith("p_") and not column.endswith("_pred")):
        return "float"
    return "int" if column in _INT_COLUMNS else "str"


def _typed(value: Any, kind: str) -> Any:
    if kind == "str":
        return "" if value is None else str(value)
    if value is None or value == "":
        return None
    number = float(value)
    if not math.isfinite(number):
        return None
    return int(number) if kind == "int" else number


def typed_row(row: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """A row with JSON/Parquet types: empty numbers become None."""
    return {c: _typed(row.get(c), column_kind(c)) for c in columns}


def text_row(row: Mapping[str, Any], columns: Sequence[str]) -> dict[str, str]:
    """A row as CSV text: None becomes "", whole numbers of int columns lose their ".0"."""
    out = {}
    for c in columns:
        value = row.get(c)
        if value is None:
            out[c] = ""
        elif isinstance(value, float) and column_kind(c) == "int":
            out[c] = str(int(value))
        elif isinstance(value, float):
            out[c] = f"{value:.6f}"
        else:
            out[c] = str(value)
    return out


class _RowWriter:
    """Buffer rows; `flush()` appends them to the file in one write and fsyncs it."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str],
                 append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        append = append and self.path.is_file() and self.path.stat().st_size > 0
        self._handle: BinaryIO = open(self.path, "ab" if append else "wb")  # noqa: SIM115
        self._good = self._handle.tell()
        self._pending: list[str] = [] if append else self._preamble()
        self.flush()

    def _preamble(self) -> list[str]:
        return []

    def _format(self, row: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def write(self, row: Mapping[str, Any]) -> None:
        self._pending.append(self._format(row))

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write(row)
        self.flush()

    def flush(self) -> None:
        """Make every row written so far durable; remember where the file is whole."""
        if self._pending:
            self._handle.write("".join(self._pending).encode("utf-8"))
            self._pending = []
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._good = self._handle.tell()

    def close(self, complete: bool = True) -> None:
        """`complete=False` (error, interrupt): drop unflushed rows and cut back anything after
        the last complete flush, so the file ends with a whole row."""
        if self._handle.closed:
            return
        if complete:
            self.flush()
        else:
            self._pending = []
            self._handle.flush()
            if self._handle.tell() != self._good:
                self._handle.truncate(self._good)
        self._handle.close()

    def __enter__(self) -> _RowWriter:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(complete=kind is None)


class CsvRowWriter(_RowWriter):
    """Append rows to a CSV (header first unless appending to a non-empty file)."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str],
                 append: bool = False) -> None:
        self._text = io.StringIO()
        self._csv = csv.writer(self._text)
        super().__init__(path, columns, append)

    def _line(self, values: Sequence[str]) -> str:
        self._text.seek(0)
        self._text.truncate()
        self._csv.writerow(values)
        return self._text.getvalue()

    def _preamble(self) -> list[str]:
        return [self._line(self.columns)]

    def _format(self, row: Mapping[str, Any]) -> str:
        text = text_row(row, self.columns)
        return self._line([text[c] for c in self.columns])


class JsonlRowWriter(_RowWriter):
    """Append rows to a JSON Lines file, typed per `column_kind`."""

    def _format(self, row: Mapping[str, Any]) -> str:
        return json.dumps(typed_row(row, self.columns), ensure_ascii=False) + "\n"


def row_writer(path: str | os.PathLike[str], columns: Sequence[str],
               append: bool = False) -> _RowWriter:
    """The streaming writer for `path`'s format (the sidecar for Parquet)."""
    fmt = output_format(path)
    if fmt == "csv":
        return CsvRowWriter(path, columns, append)
    if fmt == "jsonl":
        return JsonlRowWriter(path, columns, append)
    _pyarrow_parquet()  # fail before scoring, not at the end, if pyarrow is missing
    return JsonlRowWriter(partial_path(path), columns, append)


# ---------------------------------------------------------------- reading back (resume) ----


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


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


def repair(path: str | os.PathLike[str], columns: Sequence[str]) -> bool:
    """Cut a torn last record off a CSV or JSON Lines file; True if something was cut."""
    path = Path(path)
    scan = _scan_jsonl if path.suffix.lower() == ".jsonl" else _scan_csv
    size = path.stat().st_size
    good = scan(path, columns)
    if good != size:
        _truncate(path, good)
    return good != size


def iter_file_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of a (repaired) CSV, JSON Lines or Parquet file, streamed."""
    path = Path(path)
    fmt = "jsonl" if path.name.endswith(".jsonl") else output_format(path)
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)
    else:
        parquet = _pyarrow_parquet()
        for batch in parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_CHUNK_ROWS):
            yield from batch.to_pylist()


def recover_rows(out: str | os.PathLike[str], columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """For a resumed run: repair the output so it can be appended to, and stream its rows.

    For Parquet the sidecar is the log: rows of an existing `<out>` that it lacks (e.g. the
    sidecar was deleted after a finished run) are copied into it first. Yields nothing when
    there is no output yet."""
    out = Path(out)
    fmt = output_format(out)
    log = partial_path(out) if fmt == "parquet" else out
    if log.is_file():
        repair(log, columns)
    if fmt == "parquet" and out.is_file():
        seen = {row["path"] for row in iter_file_rows(log)} if log.is_file() else set()
        with JsonlRowWriter(log, columns, append=True) as writer:
            for row in iter_file_rows(out):
                if row.get("path") not in seen:
                    writer.write(row)
    if log.is_file():
        yield from iter_file_rows(log)


# ------------------------------------------------------------------- whole-file writes ----


def _pyarrow_parquet():  # -> the pyarrow.parquet module
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ConfigError("writing .parquet needs pyarrow (pip install pyarrow); "
                          "or use --out with .csv or .jsonl") from None
    return parquet


def _arrow_schema(columns: Sequence[str]):  # -> pyarrow.Schema
    import pyarrow as pa

    types = {"float": pa.float64(), "int": pa.int64(), "str": pa.string()}
    return pa.schema([(c, types[column_kind(c)]) for c in columns])


def write_table(path: str | os.PathLike[str], columns: Sequence[str],
                rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write all `rows` to `path` in its format, atomically (temp name, then rename), streaming
    (rows may be a generator over a file much larger than memory)."""
    path = Path(path)
    fmt = output_format(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if fmt == "parquet":
            parquet = _pyarrow_parquet()
            import pyarrow as pa

            schema = _arrow_schema(columns)
            with parquet.ParquetWriter(tmp, schema) as writer:
                chunk: list[dict[str, Any]] = []
                for row in rows:
                    chunk.append(typed_row(row, columns))
                    if len(chunk) >= PARQUET_CHUNK_ROWS:
                        writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                        chunk = []
                if chunk:
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
        else:
            with (CsvRowWriter if fmt == "csv" else JsonlRowWriter)(tmp, columns) as writer:
                for i, row in enumerate(rows, 1):
                    writer.write(row)
                    if i % PARQUET_CHUNK_ROWS == 0:
                        writer.flush()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
