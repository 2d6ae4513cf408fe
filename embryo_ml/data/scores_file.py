"""Score files: written row by row as images are scored, readable after any interruption.

Format by extension: `.csv` (a header line, one record per row); `.jsonl` (JSON Lines: one
object per line, numbers as numbers, a missing score null); `.parquet` (typed as JSON Lines;
pyarrow is imported only here, only for Parquet; a `.parquet` folder is a dataset, see
`iter_file_rows`).

`<out>` is only ever replaced whole, when a run has finished. Rows go to a partial file beside
it as they are scored (`partial_path`: `scores.csv.partial.csv`, and for Parquet, which cannot be
valid half written, `scores.parquet.partial.jsonl`); at the end they are written, with the cohort
ranks, to a temporary name, fsync'ed and renamed over `<out>` (`write_table`, `embryo_ml.fileio`),
so an earlier complete `<out>` stays as it was until the new one is whole. The partial file is
deleted last; after an interrupted or failed run it stays, a valid file of every finished row,
and is the log `--resume` continues. Rows are appended, flushed and fsync'ed batch by batch; a
writer closed by an error or an interrupt cuts the file back to its last complete flush, so it
never ends in half a row. A process killed outright (SIGKILL, power cut) can still leave a torn
last record; `recover_rows` drops it before a resumed run appends (a record that does not end in
a newline, has unbalanced quotes or the wrong number of fields).

Per-embryo results go beside the scores in the same format: `scores.csv` -> `scores.embryos.csv`
(`embryos_path`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

from embryo_ml.data.torn_records import repair, whole_records_size
from embryo_ml.errors import ConfigError, DataError
from embryo_ml.fileio import atomic_open, atomic_path, fsync_dir
from embryo_ml.numeric import finite_float

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
PARQUET_CHUNK_ROWS = 8192
DATASET_COMPLETE = "_SUCCESS"  # a Parquet dataset folder is complete once this file exists
DATASET_PARTS = "part-*.parquet"  # its part files (`embryo_ml.score.parts` names them)

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
    """The file a run appends its rows to before it becomes `out`: `<out>.partial.csv` for CSV,
    `<out>.partial.jsonl` for JSON Lines and Parquet."""
    out = Path(out)
    log_suffix = ".jsonl" if output_format(out) == "parquet" else out.suffix
    return out.with_name(f"{out.name}.partial{log_suffix}")


def column_kind(column: str) -> str:
    """'float', 'int' or 'str': how JSON Lines and Parquet type a column (CSV is all text)."""
    if column in _FLOAT_COLUMNS or (column.startswith("p_") and not column.endswith("_pred")):
        return "float"
    return "int" if column in _INT_COLUMNS else "str"


def _typed(value: Any, kind: str) -> Any:
    if kind == "str":
        return "" if value is None else str(value)
    number = finite_float(value)
    return int(number) if kind == "int" and number is not None else number


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
        if not append:
            fsync_dir(self.path.parent)  # the new file's name is durable too

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


def row_writer(out: str | os.PathLike[str], columns: Sequence[str],
               append: bool = False) -> _RowWriter:
    """The streaming writer of `out`'s partial file (`partial_path`), in its format."""
    fmt = output_format(out)
    if fmt == "csv":
        return CsvRowWriter(partial_path(out), columns, append)
    if fmt == "parquet":
        _pyarrow_parquet()  # fail before scoring, not at the end, if pyarrow is missing
    return JsonlRowWriter(partial_path(out), columns, append)


# ---------------------------------------------------------------- reading back (resume) ----


def scores_exist(path: Path) -> bool:
    """A scores file, or a Parquet dataset folder of one (`score --engine dask`)."""
    return path.is_file() or (path.is_dir() and path.suffix.lower() == ".parquet")


def iter_file_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of a (repaired) CSV, JSON Lines or Parquet file, streamed; a `.parquet` folder is a
    Parquet dataset (`score --engine dask`): its part files in name order, once it is complete.
    A file that is not what its extension says (not UTF-8, a line that is not a JSON object,
    not Parquet) raises `DataError` naming the file (and the line)."""
    path = Path(path)
    fmt = "jsonl" if path.name.endswith(".jsonl") else output_format(path)
    if fmt == "parquet" and path.is_dir():
        return _dataset_rows(path)
    return _file_rows(path, fmt)


def _file_rows(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    try:
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8") as handle:
                yield from csv.DictReader(handle)
        elif fmt == "jsonl":
            with open(path, encoding="utf-8") as handle:
                yield from _jsonl_rows(path, handle)
        else:
            parquet = _pyarrow_parquet()
            for batch in parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_CHUNK_ROWS):
                yield from batch.to_pylist()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte offset {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
            raise  # the file system's own message, with the file name (`cli.main`)
        reason = " ".join(str(error).split()) or error.__class__.__name__
        raise DataError(f"{path}: not a readable {fmt} file ({reason})") from None


def _dataset_rows(folder: Path) -> Iterator[dict[str, Any]]:
    if not (folder / DATASET_COMPLETE).is_file():
        raise DataError(f"{folder}: an unfinished Parquet dataset (no {DATASET_COMPLETE}); "
                        "finish it with `embryo-ml score ... --engine dask --resume`")
    for part in sorted(folder.glob(DATASET_PARTS)):
        yield from _file_rows(part, "parquet")


def _jsonl_rows(path: Path, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object of one row's "
                            "columns") from None
        yield row


def recover_rows(out: str | os.PathLike[str], columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """For a resumed run: the partial file (`partial_path`), repaired so it can be appended to,
    and its rows, streamed.

    Without a partial file (the last run finished, or an older version wrote rows straight into
    `out`) it is started from `out`'s whole records; `out` itself is only read. Raises
    `DataError`, before anything is written, for an `out` of other columns or damaged before its
    end. Yields nothing when there is neither."""
    out = Path(out)
    log = partial_path(out)
    if not log.is_file() and out.is_file():
        _seed_log(out, log, columns)
    if log.is_file():
        repair(log, columns)
        yield from iter_file_rows(log)


def _seed_log(out: Path, log: Path, columns: Sequence[str]) -> None:
    """Start the partial file from `out`: its whole records (a torn last one is left out)."""
    if output_format(out) == "parquet":
        write_table(log, columns, iter_file_rows(out))
        return
    good = whole_records_size(out, columns, jsonl=output_format(out) == "jsonl")
    with open(out, "rb") as source, atomic_open(log, "wb") as target:
        shutil.copyfileobj(source, target)
        target.truncate(good)


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
    """Write all `rows` to `path` in its format, atomically and durably (`embryo_ml.fileio`),
    streaming (rows may be a generator over a file much larger than memory)."""
    path = Path(path)
    fmt = output_format(path)
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            parquet = _pyarrow_parquet()
            import pyarrow as pa

            schema = _arrow_schema(columns)
            rows = iter(rows)
            with parquet.ParquetWriter(tmp, schema) as writer:
                while chunk := [typed_row(r, columns) for r in islice(rows, PARQUET_CHUNK_ROWS)]:
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
        else:
            with (CsvRowWriter if fmt == "csv" else JsonlRowWriter)(tmp, columns) as writer:
                for i, row in enumerate(rows, 1):
                    writer.write(row)
                    if i % PARQUET_CHUNK_ROWS == 0:
                        writer.flush()
    return path
