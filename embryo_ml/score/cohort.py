"""Per-embryo aggregation and ranking within a patient's cohort, computed while streaming.

An embryo is the pair (`patient_id`, `embryo_id`) of its image rows; a row without an embryo id
is an embryo of its own, keyed by its path (the embryos table then shows the path as its
`embryo_id`). Several images of one embryo (focal planes, time points) give one embryo score:

- `embryo_score`: the mean (`aggregate="mean"`, default) or the maximum (`"max"`) of the
  calibrated positive-class probability (`score`) over the embryo's `ok` images; empty when none
  of its images could be scored.
- `rank_in_cohort`: the embryo's rank among the embryos of the same patient that have a score,
  1 = highest `embryo_score`. Ties share the best rank of their group (0.9, 0.7, 0.7, 0.2 ->
  1, 2, 2, 4); scores are compared as written (6 decimals). No patient id (no cohort) or no
  scorable image: no rank.

`Cohorts` keeps one small record per embryo (sums and counts, never the image rows), so ranking
a run of any length costs memory in proportion to the number of embryos only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from embryo_ml.data.quality import FLAG_NAMES
from embryo_ml.numeric import finite_float

AGGREGATES = ("mean", "max")
EMBRYO_COLUMNS = ["patient_id", "embryo_id", "embryo_score", "display_score", "label_pred",
                  "n_images", "n_scored", "flags", "rank_in_cohort"]


def display_score(probability: float) -> int:
    """The 1-10 display scale: `clip(ceil(10 * p), 1, 10)`; 7 means 0.6 < p <= 0.7.

    10 * p is rounded to 9 decimals before the ceiling, so binary floating-point noise does not
    push an exact boundary up a point (10 * 0.3 is 3.0000000000000004 in floating point)."""
    if not math.isfinite(probability):
        raise ValueError(f"display_score needs a finite probability, got {probability}")
    return min(10, max(1, math.ceil(round(10.0 * probability, 9))))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _join_flags(flags: set[str]) -> str:
    """Known flags in their usual order, then any others (from an older file) sorted."""
    known = [f for f in FLAG_NAMES if f in flags]
    return ";".join(known + sorted(flags - set(known)))


def embryo_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """(patient_id, embryo_id, path-if-no-embryo-id): the embryo an image row belongs to."""
    embryo = _text(row.get("embryo_id"))
    return _text(row.get("patient_id")), embryo, "" if embryo else _text(row.get("path"))


class _Embryo:
    __slots__ = ("n_images", "n_scored", "total", "best", "class_total", "class_best", "flags",
                 "order", "score", "rank")

    def __init__(self, order: int, n_classes: int) -> None:
        self.order = order
        self.n_images = self.n_scored = 0
        self.total, self.best = 0.0, -math.inf
        self.class_total = [0.0] * n_classes
        self.class_best = [-math.inf] * n_classes
        self.flags: set[str] = set()
        self.score: float | None = None
        self.rank: int | None = None


class Cohorts:
    """Streamed per-embryo aggregation: `add` every image row, then `finish` once.

    `classes` and `positive_class` are the bundle's; with more than two classes the embryo's
    `label_pred` is the argmax of its aggregated class probabilities (`p_<class>` columns), with
    two it is the bundle's threshold applied to `embryo_score`, as for an image."""

    def __init__(self, classes: Sequence[str], positive_class: str, threshold: float = 0.5,
                 aggregate: str = "mean") -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.classes = list(classes)
        self.positive_class = positive_class
        self.threshold = threshold
        self.aggregate = aggregate
        self._multiclass = len(self.classes) > 2
        self._embryos: dict[tuple[str, str, str], _Embryo] = {}
        self._finished = False

    def __len__(self) -> int:
        return len(self._embryos)

    def add(self, row: Mapping[str, Any]) -> None:
        self._finished = False
        key = embryo_key(row)
        embryo = self._embryos.get(key)
        if embryo is None:
            n = len(self.classes) if self._multiclass else 0
            embryo = self._embryos[key] = _Embryo(len(self._embryos), n)
        embryo.n_images += 1
        embryo.flags.update(f for f in _text(row.get("flags")).split(";") if f)
        score = finite_float(row.get("score"))
        if _text(row.get("status")) != "ok" or score is None:
            return
        embryo.n_scored += 1
        embryo.total += score
        embryo.best = max(embryo.best, score)
        if self._multiclass:
            for i, c in enumerate(self.classes):
                p = finite_float(row.get(f"p_{c}")) or 0.0
                embryo.class_total[i] += p
                embryo.class_best[i] = max(embryo.class_best[i], p)

    def finish(self) -> None:
        """Compute every embryo's score and its rank within its patient."""
        by_patient: dict[str, list[_Embryo]] = {}
        for (patient, _, _), embryo in self._embryos.items():
            embryo.score = embryo.rank = None
            if embryo.n_scored:
                value = embryo.total / embryo.n_scored if self.aggregate == "mean" else embryo.best
                embryo.score = round(value, 6)
                if patient:
                    by_patient.setdefault(patient, []).append(embryo)
        for embryos in by_patient.values():
            ordered = sorted(embryos, key=lambda e: -e.score)  # type: ignore[operator]
            for position, embryo in enumerate(ordered):
                previous = ordered[position - 1] if position else None
                tie = previous is not None and previous.score == embryo.score
                embryo.rank = previous.rank if tie else position + 1  # type: ignore[union-attr]
        self._finished = True

    @property
    def any_ranked(self) -> bool:
        if not self._finished:
            self.finish()
        return any(e.rank is not None for e in self._embryos.values())

    def rank_of(self, row: Mapping[str, Any]) -> int | None:
        """The rank of the embryo an image row belongs to (after `finish`)."""
        if not self._finished:
            self.finish()
        embryo = self._embryos.get(embryo_key(row))
        return None if embryo is None else embryo.rank

    def _label(self, embryo: _Embryo) -> str:
        if embryo.score is None:
            return ""
        if not self._multiclass:
            negative = [c for c in self.classes if c != self.positive_class]
            if embryo.score >= self.threshold or not negative:
                return self.positive_class
            return negative[0]
        vector = ([t / embryo.n_scored for t in embryo.class_total]
                  if self.aggregate == "mean" else embryo.class_best)
        return self.classes[max(range(len(vector)), key=vector.__getitem__)]

    def rows(self) -> list[dict[str, str]]:
        """The embryos table (`EMBRYO_COLUMNS`, as text): patients in order, each patient's
        embryos best first; embryos without a patient or a rank after, in scoring order."""
        if not self._finished:
            self.finish()
        items = sorted(
            self._embryos.items(),
            key=lambda kv: (kv[0][0] == "", kv[0][0],
                            kv[1].rank if kv[1].rank is not None else math.inf, kv[1].order))
        rows = []
        for (patient, embryo_id, path), embryo in items:
            scored = embryo.score is not None
            rows.append({
                "patient_id": patient,
                "embryo_id": embryo_id or path,
                "embryo_score": f"{embryo.score:.6f}" if scored else "",
                "display_score": str(display_score(embryo.score)) if scored else "",
                "label_pred": self._label(embryo),
                "n_images": str(embryo.n_images),
                "n_scored": str(embryo.n_scored),
                "flags": _join_flags(embryo.flags),
                "rank_in_cohort": "" if embryo.rank is None else str(embryo.rank),
            })
        return rows
