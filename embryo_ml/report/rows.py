"""The report's rows: one `ReportRow` per image of a scores file, grouped into cohorts.

`read_rows` reads a scores file (`.csv`, `.jsonl` or `.parquet`, as `embryo-ml score` writes it)
and refuses one that is not a scores file or was scored with other classes than the bundle's;
`group_cohorts` orders them as the report lists them; `embryo_scores` reads the embryos table
beside the scores, when there is one. Cells are read leniently (a blank, NaN or odd cell is
"" or None), because a scores file may have been opened and saved by a spreadsheet.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embryo_ml.data.scores_file import embryos_path, iter_file_rows, output_format, scores_exist
from embryo_ml.errors import DataError
from embryo_ml.export.bundle import Bundle
from embryo_ml.numeric import finite_float

# The report's warnings keep one logger name, whichever module raises them: the CLI prints it.
log = logging.getLogger("embryo_ml.report.html")


@dataclass
class ReportRow:
    """One image as the report shows it: the scores file's cells, then its place in the report
    (`order`) and its pictures (data URIs, or a note that says why there is none)."""

    path: str
    status: str
    score: float | None
    display: str
    label: str
    flags: list[str]
    patient: str
    embryo: str
    rank: int | None
    grades: dict[str, str]
    order: int = 0
    thumb: str = ""  # data URI
    thumb_note: str = ""
    heat: str = ""
    heat_note: str = ""
    missing: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def embryo_key(self) -> tuple[str, str]:
        return self.patient, self.embryo or self.path


def cell_text(value: Any) -> str:
    """A cell as text: "" for None and NaN, whole floats without ".0" (ids read as numbers)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def _cell_int(value: Any) -> int | None:
    number = finite_float(value)
    return None if number is None else int(number)


def _head_columns(columns: list[str]) -> list[str]:
    """The extra heads' prediction columns (`*_pred` other than `label_pred`)."""
    return [c for c in columns if c.endswith("_pred") and c != "label_pred"]


def _check_columns(scores: Path, columns: list[str], bundle: Bundle) -> None:
    """DataError unless the file has the scores file's own columns and the bundle's classes."""
    missing = [c for c in ("path", "status", "score") if c not in columns]
    if missing:
        raise DataError(f"{scores}: not a scores file from `embryo-ml score` (no "
                        f"column {', '.join(missing)}; columns: {columns})")
    classes = sorted(c[2:] for c in columns if c.startswith("p_"))
    if classes != sorted(bundle.classes):
        raise DataError(
            f"{scores} was not scored with bundle {bundle.path}: its classes "
            f"{classes} differ from the bundle's {sorted(bundle.classes)}")


def _report_row(raw: dict[str, Any], heads: list[str]) -> ReportRow:
    return ReportRow(
        path=cell_text(raw.get("path")), status=cell_text(raw.get("status")) or "unknown",
        score=finite_float(raw.get("score")), display=cell_text(raw.get("display_score")),
        label=cell_text(raw.get("label_pred")),
        flags=[f for f in cell_text(raw.get("flags")).split(";") if f],
        patient=cell_text(raw.get("patient_id")), embryo=cell_text(raw.get("embryo_id")),
        rank=_cell_int(raw.get("rank_in_cohort")),
        grades={c: cell_text(raw.get(c)) for c in heads})


def read_rows(scores: Path, bundle: Bundle) -> tuple[list[ReportRow], list[str]]:
    """The scores file's rows and its head columns (`*_pred` other than `label_pred`)."""
    if not scores_exist(scores):
        raise DataError(f"scores file not found: {scores}")
    output_format(scores)  # .csv, .jsonl or .parquet, else a clear error
    rows: list[ReportRow] = []
    columns: list[str] = []
    heads: list[str] = []
    for i, raw in enumerate(iter_file_rows(scores)):
        if i == 0:
            columns = list(raw)
            _check_columns(scores, columns, bundle)
            heads = _head_columns(columns)
        rows.append(_report_row(raw, heads))
    if not rows:
        raise DataError(f"{scores}: no rows")
    return rows, heads


def embryo_scores(scores: Path) -> dict[tuple[str, str], tuple[float, str]]:
    """(patient, embryo) -> (embryo score, display score) from the embryos table, if any."""
    table = embryos_path(scores)
    if not table.is_file():
        return {}
    out = {}
    try:
        for raw in iter_file_rows(table):
            score = finite_float(raw.get("embryo_score"))
            if score is not None:
                key = (cell_text(raw.get("patient_id")), cell_text(raw.get("embryo_id")))
                out[key] = (score, cell_text(raw.get("display_score")))
    except Exception as error:  # the report does not depend on it
        log.warning("%s: embryos table not read (%s); embryo scores left out", table, error)
        return {}
    return out


def group_cohorts(rows: list[ReportRow]) -> list[tuple[str, list[ReportRow]]]:
    """Patients in order (ids compared as text), each cohort in rank order: ranked embryos
    best first (an embryo's images together, best image first), then unranked images; images
    without a patient id last, best score first. Numbers the rows' `order` as listed."""
    by_patient: dict[str, list[ReportRow]] = {}
    for row in rows:
        by_patient.setdefault(row.patient, []).append(row)

    def key(row: ReportRow) -> tuple:
        return (row.rank is None, row.rank or 0, row.embryo_key[1],
                -(row.score if row.score is not None else -1.0), row.path)

    out = [(patient, sorted(group, key=key))
           for patient, group in sorted(by_patient.items()) if patient]
    if "" in by_patient:
        out.append(("", sorted(by_patient[""], key=key)))
    order = 0
    for _, group in out:
        for row in group:
            row.order = order
            order += 1
    return out


def shift_rows(rows: list[ReportRow]) -> list[dict[str, Any]]:
    """The rows as the dataset-shift check reads them (`embryo_ml.score.shift`)."""
    return [{"patient_id": r.patient, "status": r.status, "flags": r.flags} for r in rows]
