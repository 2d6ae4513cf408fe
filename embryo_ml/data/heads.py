"""Output layout of the Gardner multi-task model: one logits row, main classes first.

With `labels.task=gardner` one backbone feeds one linear layer whose row of logits is

    [good, poor | expansion 1..6 | ICM A, B, C | TE A, B, C]        (2 + 6 + 3 + 3 = 14)

The main classes are what a run scores, ranks, calibrates, thresholds and early-stops on, and
what the out-of-distribution energy is measured on: all of that reads `main_logits`, never the
whole row. The grade heads are auxiliary outputs for embryologists to read; each is its own
softmax block (`head_logits`). The layout, `{name: {"offset": first column, "classes": [...]}}`,
is stored in the checkpoint and written into the scoring bundle as `heads`; `layout_problem` is
the one judge of a layout read back from a file, and `predicted_grades` the scorer's per-image
grade columns (`grade_column_names`).

Targets of a gardner run are (N, 4) rows `[main, expansion, icm, te]`
(`embryo_ml.data.labels.GARDNER_TARGET_COLUMNS`), -1 where a grade is not assessable; other tasks
have (N,) class indices. Slicing works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import numpy as np

from embryo_ml.data.labels import (
    EXPANSION_CLASSES,
    GARDNER_TARGET_COLUMNS,
    LETTERS,
    MIN_ASSESSABLE_EXPANSION,
)
from embryo_ml.numeric import softmax

GRADE_HEADS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expansion", EXPANSION_CLASSES), ("icm", LETTERS), ("te", LETTERS))
GARDNER_HEADS = tuple(name for name, _ in GRADE_HEADS)  # the heads a Gardner grade is made of

Heads = dict[str, dict[str, Any]]
Array = TypeVar("Array")  # np.ndarray or torch.Tensor
Output = TypeVar("Output")  # a dataclass with `logits` and `targets` (train.loop.EvalOutput)


def head_layout(task: str, n_classes: int) -> Heads:
    """The grade heads after `n_classes` main logits; {} for tasks without extra heads."""
    if task != "gardner":
        return {}
    layout: Heads = {}
    offset = n_classes
    for name, classes in GRADE_HEADS:
        layout[name] = {"offset": offset, "classes": list(classes)}
        offset += len(classes)
    return layout


def output_width(n_classes: int, heads: Heads) -> int:
    """Logits per row: the main classes, then every head's block, up to the end of the last
    one (a layout read from a bundle may leave columns between blocks)."""
    ends = [int(head["offset"]) + len(head["classes"]) for head in heads.values()]
    return max([n_classes, *ends])


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def layout_problem(heads: object, n_classes: int) -> str | None:
    """What is wrong with a layout read from a file, naming the head; None when there are no
    heads or every head is a block of unique class names after the main classes, none
    overlapping. The one judge of a layout: the bundle reader asks it."""
    if heads is None:
        return None
    if not isinstance(heads, dict):
        return f"'heads' must be an object (name -> offset and classes), got {heads!r}"
    blocks = []
    for name, head in heads.items():
        offset = head.get("offset") if isinstance(head, dict) else None
        classes = head.get("classes") if isinstance(head, dict) else None
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < n_classes:
            return (f"'heads' {name!r}: 'offset' must be a whole number >= {n_classes} "
                    f"(after the main classes), got {offset!r}")
        if not (isinstance(classes, list) and classes and all(map(_is_name, classes))
                and len(set(classes)) == len(classes)):
            return f"'heads' {name!r}: 'classes' must be a list of unique names, got {classes!r}"
        blocks.append((offset, offset + len(classes), name))
    blocks.sort()
    for (_, end, first), (start, _, second) in zip(blocks, blocks[1:]):
        if start < end:
            return f"'heads' {first!r} and {second!r} overlap (column {start})"
    return None


def main_logits(logits: Array, n_classes: int) -> Array:
    """The main classes' logits (the whole row when there are no extra heads)."""
    return logits[:, :n_classes]  # type: ignore[index]


def head_logits(logits: Array, head: dict[str, Any]) -> Array:
    """One head's block of logits."""
    start = int(head["offset"])
    return logits[:, start:start + len(head["classes"])]  # type: ignore[index]


def main_targets(targets: Array) -> Array:
    """Main-class indices: the targets themselves, or column 0 of gardner target rows."""
    return targets if targets.ndim == 1 else targets[:, 0]  # type: ignore[attr-defined,index]


def head_targets(targets: Array, name: str) -> Array:
    """One head's class indices from gardner target rows (-1 = not assessable)."""
    return targets[:, GARDNER_TARGET_COLUMNS.index(name)]  # type: ignore[index]


def main_output(out: Output, n_classes: int) -> Output:
    """A copy of an evaluation output with only the main classes' logits and targets: what
    metrics, early stopping, calibration, the threshold and the OOD limit are computed on."""
    return dataclasses.replace(out, logits=main_logits(out.logits, n_classes),  # type: ignore
                               targets=main_targets(out.targets))  # type: ignore[attr-defined]


def blockwise_softmax(logits: np.ndarray, n_classes: int, heads: Heads,
                      temperature: float = 1.0) -> np.ndarray:
    """Probabilities of the main classes, then of each head, side by side; the main block at
    `temperature` (the heads are not calibrated)."""
    blocks = [softmax(main_logits(logits, n_classes), temperature)]
    blocks += [softmax(head_logits(logits, head)) for head in heads.values()]
    return np.concatenate(blocks, axis=1)


def head_predictions(logits: np.ndarray, heads: Heads) -> dict[str, np.ndarray]:
    """Each head's predicted class index per row (argmax of its block)."""
    return {name: head_logits(logits, head).argmax(axis=1) for name, head in heads.items()}


def head_metrics(logits: np.ndarray, targets: np.ndarray, heads: Heads) -> dict[str, Any]:
    """Per head: accuracy and confusion matrix (rows = true class) over the rows whose grade
    is assessable, and how many rows that was (`n`); accuracy is NaN when `n` is 0."""
    out: dict[str, Any] = {}
    predicted = head_predictions(logits, heads)
    for name, head in heads.items():
        truth = np.asarray(head_targets(targets, name))
        valid = truth >= 0
        k = len(head["classes"])
        matrix = np.zeros((k, k), dtype=np.int64)  # also right when no row is assessable
        np.add.at(matrix, (truth[valid], predicted[name][valid]), 1)
        n = int(valid.sum())
        accuracy = float(np.trace(matrix) / n) if n else float("nan")
        out[name] = {"classes": list(head["classes"]), "confusion_matrix": matrix.tolist(),
                     "n": n, "accuracy": accuracy}
    return out


def head_accuracies(logits: np.ndarray, targets: np.ndarray, heads: Heads) -> dict[str, float]:
    """`{"expansion_accuracy": ..., "icm_accuracy": ..., "te_accuracy": ...}` ({} without
    heads), each over the rows where that grade is assessable."""
    return {f"{name}_accuracy": result["accuracy"]
            for name, result in head_metrics(logits, targets, heads).items()}


def head_summary(logits: np.ndarray, targets: np.ndarray, heads: Heads) -> dict[str, Any]:
    """The heads' part of metrics.json: `val_<head>_accuracy` and `val_heads` (classes,
    confusion matrix, n, accuracy per head); {} without heads."""
    if not heads:
        return {}
    results = head_metrics(logits, targets, heads)
    return {**{f"val_{name}_accuracy": r["accuracy"] for name, r in results.items()},
            "val_heads": results}


def head_columns(logits: np.ndarray, targets: np.ndarray, heads: Heads) -> dict[str, list[str]]:
    """Per-row columns for val_predictions.csv: `<head>` (the true grade, "" where not
    assessable) and `<head>_pred` (the head's argmax, given for every row)."""
    columns: dict[str, list[str]] = {}
    predicted = head_predictions(logits, heads)
    for name, head in heads.items():
        classes = head["classes"]
        truth = np.asarray(head_targets(targets, name))
        columns[name] = [classes[t] if t >= 0 else "" for t in truth]
        columns[f"{name}_pred"] = [classes[i] for i in predicted[name]]
    return columns


def grade_column_names(heads: Heads | None) -> list[str]:
    """The scores file's grade columns: `<head>_pred` for each head, then `grade_pred` when
    all three Gardner heads are there; [] without heads."""
    if not heads:
        return []
    gardner = ["grade_pred"] if all(name in heads for name in GARDNER_HEADS) else []
    return [f"{name}_pred" for name in heads] + gardner


def gardner_text(expansion: str, icm: str, te: str) -> str:
    """A predicted grade as clinics write it: `4AB`, or the expansion alone (`2`) below 3,
    where ICM and TE cannot be assessed."""
    if expansion.isdigit() and int(expansion) < MIN_ASSESSABLE_EXPANSION:
        return expansion
    return f"{expansion}{icm}{te}"


def predicted_grades(logits: np.ndarray, heads: Heads) -> list[dict[str, str]]:
    """Per row, the values of the `grade_column_names`: each head's most probable class and,
    with the Gardner heads, the grade they make (`gardner_text`)."""
    predicted = {name: [str(heads[name]["classes"][int(i)]) for i in chosen]
                 for name, chosen in head_predictions(logits, heads).items()}
    rows = [{f"{name}_pred": values[row] for name, values in predicted.items()}
            for row in range(len(logits))]
    if all(name in heads for name in GARDNER_HEADS):
        for row, *grades in zip(rows, *(predicted[name] for name in GARDNER_HEADS)):
            row["grade_pred"] = gardner_text(*grades)
    return rows
