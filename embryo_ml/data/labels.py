"""Gardner blastocyst grades as clinics write them, and the training targets made from a manifest.

A Gardner grade is the blastocoel expansion (1-6) followed by two letters, inner cell mass (ICM)
then trophectoderm (TE), each A-C and optionally sub-graded with `+`/`-`: `4AA`, `3A-B`, `2`.
Clinics write them loosely (`3bc`, ` 5 AB`), so the parser is lenient about case and spaces and
strict about everything else: a grade that is guessed at becomes a wrong training label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.config import LabelsConfig
from embryo_ml.errors import DataError

LETTERS = ("A", "B", "C")
SUB_GRADES = ("", "+", "-")
MIN_ASSESSABLE_EXPANSION = 3
# Minus-like characters that word processors and LIMS exports put where a clinic typed "-".
_MINUS_LIKE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2010": "-", "\u2011": "-"})
_LEADING_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class GardnerGrade:
    """One parsed grade. `icm`/`te` are None when not assessable or not recorded.

    Below expansion 3 the blastocoel fills less than half the embryo and the inner cell mass and
    trophectoderm cannot yet be told apart, so letters a clinic wrote for such an embryo are
    dropped (the text as written stays in `raw`).
    """

    expansion: int
    icm: str | None
    te: str | None
    icm_sub: str = ""
    te_sub: str = ""
    raw: str = ""

    def __post_init__(self) -> None:
        # Guard direct construction too, so every GardnerGrade in the program is a valid one.
        if not 1 <= self.expansion <= 6:
            raise ValueError(f"expansion {self.expansion} is outside 1-6")
        if (self.icm is None) != (self.te is None):
            raise ValueError("ICM and TE must both be given or both be None")
        for letter, sub in ((self.icm, self.icm_sub), (self.te, self.te_sub)):
            if letter is not None and letter not in LETTERS:
                raise ValueError(f"letter '{letter}' is not A, B or C")
            if sub not in SUB_GRADES or (sub and letter is None):
                raise ValueError(f"sub-grade '{sub}' needs a letter and must be '+' or '-'")

    @property
    def assessable(self) -> bool:
        """True when ICM and TE can be judged: expansion >= 3 and both letters recorded."""
        return (self.expansion >= MIN_ASSESSABLE_EXPANSION
                and self.icm is not None and self.te is not None)

    def __str__(self) -> str:
        if self.icm is None or self.te is None:
            return str(self.expansion)
        return f"{self.expansion}{self.icm}{self.icm_sub}{self.te}{self.te_sub}"


def parse_gardner(text: str) -> GardnerGrade:
    """Parse a grade as written (`4AA`, `3bc`, ` 5 AB`, `3A-A-`, `2`); ValueError says why not.

    Case and spaces are ignored; anything else unexpected is an error rather than a guess.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    raw = text
    compact = "".join(text.split()).upper().translate(_MINUS_LIKE)
    if not compact:
        raise ValueError("empty grade")
    number = _LEADING_NUMBER.match(compact)
    if number is None:
        raise ValueError("must start with the expansion number 1-6")
    expansion = int(number.group())
    if not 1 <= expansion <= 6:
        raise ValueError(f"expansion {number.group()} is outside 1-6")

    letters: list[str] = []
    subs: list[str] = []
    for char in compact[number.end():]:
        if char in "+-":
            if not letters or subs[-1]:
                raise ValueError(f"'{char}' must follow a letter")
            subs[-1] = char
        elif char.isalpha():
            if char not in LETTERS:
                raise ValueError(f"letter '{char}' is not A, B or C")
            letters.append(char)
            subs.append("")
        else:
            raise ValueError(f"unexpected character '{char}'")

    if len(letters) == 1:
        raise ValueError("only one letter; ICM and TE need one each (e.g. 4AB)")
    if len(letters) > 2:
        raise ValueError(f"{len(letters)} letters; expected two (ICM and TE)")
    if not letters or expansion < MIN_ASSESSABLE_EXPANSION:
        return GardnerGrade(expansion, None, None, raw=raw)
    return GardnerGrade(expansion, letters[0], letters[1], subs[0], subs[1], raw=raw)


def is_good(grade: GardnerGrade, cfg: LabelsConfig) -> bool:
    """The configurable good/poor rule: expansion and both letters meet `cfg`'s thresholds.

    Sub-grades are ignored (clinics use them inconsistently); a grade whose ICM/TE cannot be
    judged is never good, whatever `cfg.good_min_expansion` says.
    """
    return (grade.assessable
            and grade.expansion >= cfg.good_min_expansion
            and grade.icm in cfg.good_icm
            and grade.te in cfg.good_te)


def grade_columns(grade: GardnerGrade) -> dict[str, object]:
    """Flat, CSV-friendly fields of a grade, for adding parsed columns to a manifest."""
    return {
        "expansion": grade.expansion,
        "icm": grade.icm or "",
        "te": grade.te or "",
        "icm_sub": grade.icm_sub,
        "te_sub": grade.te_sub,
        "assessable": grade.assessable,
    }


# Columns of the per-image target vector of `labels.task=gardner` (`Targets.item_targets`):
# the good/poor index first, then one column per Gardner grade head.
GARDNER_TARGET_COLUMNS = ("main", "expansion", "icm", "te")
EXPANSION_CLASSES = ("1", "2", "3", "4", "5", "6")


@dataclass
class Targets:
    """What a run learns, one entry per manifest row.

    `y` indexes `classes` (the head that scores and ranks; `labels` are its names). For
    `gardner`, `classes` is ["good", "poor"] by the `is_good` rule (as `binary` + `from_grade`),
    and the grade is learned beside it: `expansion` is expansion - 1 (0..5), `icm`/`te` index
    A/B/C (0/1/2) with -1 where `icm_mask`/`te_mask` is False, so a multi-task loss can skip rows
    whose ICM/TE were not assessable instead of learning a made-up letter. `grades` holds the
    canonical grade text.
    """

    task: str
    classes: list[str]
    y: np.ndarray
    labels: list[str]
    expansion: np.ndarray | None = None
    icm: np.ndarray | None = None
    te: np.ndarray | None = None
    icm_mask: np.ndarray | None = None
    te_mask: np.ndarray | None = None
    grades: list[str] | None = None

    def item_targets(self) -> np.ndarray:
        """What the dataset yields per image: `y` (N,), or for gardner an (N, 4) int64 array
        with the columns of `GARDNER_TARGET_COLUMNS`."""
        if self.task != "gardner":
            return self.y
        if self.expansion is None or self.icm is None or self.te is None:
            raise ValueError("gardner targets without expansion/icm/te")
        return np.stack([self.y, self.expansion, self.icm, self.te], axis=1).astype(np.int64)


def build_targets(table: pd.DataFrame, cfg: LabelsConfig, positive_class: str = "good") -> Targets:
    """Turn a manifest table into targets for `cfg.task`; DataError names the first bad row.

    `positive_class` must be one of the classes (its probability is the score).
    """
    if len(table) == 0:
        raise DataError("manifest has no rows to build targets from")
    grades: list[GardnerGrade] | None = None
    if cfg.task == "gardner" or (cfg.task == "binary" and cfg.from_grade):
        grades = _parse_grade_column(table, cfg.grade_column)
        labels = ["good" if is_good(g, cfg) else "poor" for g in grades]
        classes = ["good", "poor"]
    else:
        labels = _read_labels(table, cfg.column)
        classes = sorted(set(labels))
        if cfg.task == "binary" and len(classes) != 2:
            raise DataError(f"binary task needs exactly 2 distinct values in column "
                            f"'{cfg.column}', found {len(classes)}: {classes}")
        if len(classes) < 2:
            raise DataError(f"multiclass task needs at least 2 distinct values in column "
                            f"'{cfg.column}', found {classes}")
    if positive_class not in classes:
        raise DataError(f"positive class '{positive_class}' is not among the classes {classes}")
    index = {name: i for i, name in enumerate(classes)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    targets = Targets(task=cfg.task, classes=classes, y=y, labels=labels)
    if cfg.task == "gardner" and grades is not None:
        _add_grade_targets(targets, grades)
    return targets


def _add_grade_targets(targets: Targets, grades: list[GardnerGrade]) -> None:
    letter_index = {letter: i for i, letter in enumerate(LETTERS)}
    icm = np.array([letter_index.get(g.icm, -1) if g.assessable else -1 for g in grades],
                   dtype=np.int64)
    te = np.array([letter_index.get(g.te, -1) if g.assessable else -1 for g in grades],
                  dtype=np.int64)
    targets.expansion = np.array([g.expansion - 1 for g in grades], dtype=np.int64)
    targets.icm, targets.te = icm, te
    targets.icm_mask, targets.te_mask = icm >= 0, te >= 0
    targets.grades = [str(g) for g in grades]


def _cells(table: pd.DataFrame, column: str) -> list[str | None]:
    """The column as stripped text, None for empty/missing cells (<NA>, NaN, None, "")."""
    if column not in table.columns:
        raise DataError(f"manifest has no '{column}' column (columns: {list(table.columns)})")
    out: list[str | None] = []
    for value in table[column].tolist():
        text = None if _is_missing(value) else str(value).strip()
        out.append(text or None)
    return out


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-like cells: not "missing", let str() show them
        return False


def _row_name(table: pd.DataFrame, i: int) -> str:
    """`row 3 (img.jpg)`: the line in the CSV (header is line 1) and the image, when known."""
    if "path" in table.columns:
        path = table["path"].iloc[i]
        if not _is_missing(path):
            return f"row {i + 2} ({path})"
    return f"row {i + 2}"


def _fail(table: pd.DataFrame, problems: list[tuple[int, str]], what: str) -> None:
    if problems:
        i, message = problems[0]
        total = f"; {len(problems)} of {len(table)} rows have {what}"
        raise DataError(f"{_row_name(table, i)}: {message}{total}")


def _read_labels(table: pd.DataFrame, column: str) -> list[str]:
    cells = _cells(table, column)
    problems = [(i, f"empty label in column '{column}'") for i, c in enumerate(cells) if c is None]
    _fail(table, problems, "an empty label")
    return [c for c in cells if c is not None]


def _parse_grade_column(table: pd.DataFrame, column: str) -> list[GardnerGrade]:
    grades: list[GardnerGrade] = []
    problems: list[tuple[int, str]] = []
    for i, text in enumerate(_cells(table, column)):
        try:
            if text is None:
                raise ValueError("empty grade")
            grades.append(parse_gardner(text))
        except ValueError as error:
            problems.append((i, f"invalid Gardner grade '{text or ''}': {error}"))
    _fail(table, problems, "an invalid or empty grade")
    return grades
