"""`embryo-ml evaluate`: a scores file joined with a labelled manifest, evaluated and plotted.

Path matching: each file's relative paths are read against that file's own folder, as
everywhere in embryo-ml: the manifest's against the manifest's folder, the scores' against
`images` when given (the folder that was scored, or the manifest CSV that was scored, which
stands for its folder: `embryo-ml score` writes paths relative to what it scored), else the
scores file's folder. Absolute paths stay as they are. Both sides are then resolved (`..` and
symbolic links) and compared exactly. Rows that match nothing are counted, never silently
lost: scores without a label, manifest rows without a score, scores whose `status` is not `ok`;
if nothing matches the error shows one path from each side.

Only the manifest's labels, subgroup columns, `patient_id`, `embryo_id` and `grade` are used;
the score is the scores file's `score` (the calibrated positive-class probability) and the
decision its `label_pred` (the bundle's threshold), else `score >= 0.5`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.config import Config
from embryo_ml.data.labels import build_targets
from embryo_ml.data.manifest import read_manifest
from embryo_ml.errors import DataError
from embryo_ml.evaluation.report import Evaluation, evaluate_predictions, evaluation_figures
from embryo_ml.fileio import atomic_write_text

METRICS_NAME = "metrics.json"
TABLE_NAME = "subgroup_metrics.csv"


@dataclass
class EvaluateResult:
    evaluation: Evaluation
    counts: dict[str, int]
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_scores(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A scores file from `embryo-ml score` (.csv, .jsonl or .parquet) as a table."""
    from embryo_ml.data.scores_file import FORMATS, iter_file_rows, scores_exist

    path = Path(path)
    if not scores_exist(path):
        raise DataError(f"scores file not found: {path}")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: expected a scores file ending in .csv, .jsonl or .parquet")
    try:
        table = pd.DataFrame(list(iter_file_rows(path)))
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"{path}: not a readable scores file ({error})") from None
    missing = [c for c in ("path", "score") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(c) for c in missing)} column; expected "
                        "the output of `embryo-ml score`")
    return table


def _root(scores: Path, images: str | os.PathLike[str] | None) -> Path:
    if images is None:
        return scores.resolve().parent
    root = Path(images)
    return root.resolve().parent if root.is_file() else root.resolve()


def _resolved(paths: pd.Series, root: Path) -> list[str]:
    return [str((root / str(p)).resolve()) for p in paths]


def _labelled(manifest: pd.DataFrame, cfg: Config, source: Path) -> tuple[pd.DataFrame, int]:
    """Manifest rows that have a label (by `cfg.labels`), with `y`; and how many had none."""
    column = (cfg.labels.grade_column if cfg.labels.from_grade or cfg.labels.task == "gardner"
              else cfg.labels.column)
    if column not in manifest.columns:
        raise DataError(f"{source}: no '{column}' column to take the labels from")
    has = manifest[column].notna() & (manifest[column].astype(str).str.strip() != "")
    rows = manifest[has].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"{source}: no row has a '{column}'")
    targets = build_targets(rows, cfg.labels, cfg.data.positive_class)
    if cfg.labels.grade_column != "grade" and cfg.labels.grade_column in rows.columns:
        rows = rows.drop(columns="grade", errors="ignore").rename(
            columns={cfg.labels.grade_column: "grade"})
    rows = rows.assign(label=targets.labels)
    return rows.assign(y=(rows["label"] == cfg.data.positive_class).to_numpy()), int((~has).sum())


def evaluate_scores(
    scores: str | os.PathLike[str], labels: str | os.PathLike[str],
    out_dir: str | os.PathLike[str], cfg: Config, images: str | os.PathLike[str] | None = None,
    train_labels: str | os.PathLike[str] | None = None,
) -> EvaluateResult:
    """Join, evaluate (`evaluate_predictions`) and write `metrics.json`, `subgroup_metrics.csv`
    and the plots into `out_dir`. Shortcut baselines are fit on `train_labels` (the training
    manifest) when given, else on the evaluated rows themselves."""
    scores, labels, out_dir = Path(scores), Path(labels), Path(out_dir)
    table = read_scores(scores)
    manifest, unlabelled = _labelled(read_manifest(labels), cfg, labels)
    table = table.assign(_key=_resolved(table["path"], _root(scores, images)))
    duplicates = int(table["_key"].duplicated(keep="last").sum())
    table = table.drop_duplicates("_key", keep="last")
    status = (table["status"].astype(str) if "status" in table.columns
              else pd.Series("ok", index=table.index))
    score = pd.to_numeric(table["score"], errors="coerce")
    usable = (status == "ok") & score.notna()
    known = set(manifest["path"])
    matched = table["_key"].isin(known)
    counts = {"score_rows": len(table) + duplicates, "duplicate_score_rows": duplicates,
              "manifest_rows": len(manifest) + unlabelled, "manifest_rows_unlabelled": unlabelled,
              "scores_without_label": int((~matched).sum()),
              "matched_not_scored": int((matched & ~usable).sum()),
              "labelled_without_score": int(len(known - set(table["_key"])))}
    if not (matched & usable).any():
        example = table["_key"].iloc[0] if len(table) else "(no rows)"
        raise DataError(
            f"no scored image of {scores} matches a labelled row of {labels}: e.g. the score "
            f"path {example} vs the manifest path {manifest['path'].iloc[0]}; pass --images "
            "with the folder (or manifest) that was scored")
    scored = table[matched & usable].assign(score=score[matched & usable])
    keep = ["_key", "score"] + (["label_pred"] if "label_pred" in scored.columns else [])
    manifest = manifest.drop(columns=["score", "label_pred", "predicted"], errors="ignore")
    frame = manifest.merge(scored[keep], left_on="path", right_on="_key", how="inner")
    notes = []
    if "label_pred" in frame.columns:
        predicted = (frame["label_pred"].astype(str) == cfg.data.positive_class).to_numpy()
    else:
        predicted = (frame["score"] >= 0.5).to_numpy()
        notes.append("no label_pred column: decisions are score >= 0.5")
    frame = frame.drop(columns="_key").assign(predicted=predicted)
    counts["evaluated"] = len(frame)
    train, source = None, None
    if train_labels is not None:
        train, _ = _labelled(read_manifest(train_labels), cfg, Path(train_labels))
        source = f"the training manifest {Path(train_labels).name}"
    evaluation = evaluate_predictions(frame, cfg.eval, cfg.data.positive_class, cfg.seed,
                                      train=train, baseline_source=source)
    files = _write(out_dir, frame, evaluation, counts, cfg, scores, labels, notes)
    return EvaluateResult(evaluation, counts, out_dir, files, notes)


def _write(out_dir: Path, frame: pd.DataFrame, evaluation: Evaluation, counts: dict[str, int],
           cfg: Config, scores: Path, labels: Path, notes: list[str]) -> list[Path]:
    from embryo_ml.evaluation.plots import confusion_matrix_figure, reliability_figure, save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    positive = cfg.data.positive_class
    negative = next((str(v) for v in sorted(frame["label"].unique()) if v != positive), "other")
    figures: dict[str, Any] = evaluation_figures(frame, evaluation, negative)
    y, p = frame["y"].to_numpy(bool), frame["score"].to_numpy(float)
    figures["reliability_diagram.png"] = reliability_figure(y, None, p)
    if "label_pred" in frame.columns:
        truth, decided = frame["label"].astype(str), frame["label_pred"].astype(str)
        classes = sorted(set(truth) | set(decided), key=lambda c: (c != positive, c))
        index = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), dtype=int)
        np.add.at(matrix, (truth.map(index).to_numpy(), decided.map(index).to_numpy()), 1)
        figures["confusion_matrix.png"] = confusion_matrix_figure(matrix, classes)
    files = []
    for name, figure in figures.items():
        save_figure(figure, str(out_dir / name))
        files.append(out_dir / name)
    document = {"scores": str(scores), "labels": str(labels), "counts": counts, "notes": notes,
                **evaluation.to_json()}
    atomic_write_text(out_dir / METRICS_NAME, json.dumps(document, indent=2, default=float))
    atomic_write_text(out_dir / TABLE_NAME, evaluation.table().to_csv(index=False))
    return [out_dir / METRICS_NAME, out_dir / TABLE_NAME, *files]


def format_counts(counts: dict[str, int]) -> str:
    """How the join went, in one line per problem (nothing when every row matched)."""
    lines = [f"evaluated {counts['evaluated']} scored image(s) with labels"]
    for key, text in (("scores_without_label", "score row(s) match no labelled manifest row"),
                      ("matched_not_scored", "labelled image(s) have no ok score (status)"),
                      ("labelled_without_score", "labelled manifest row(s) have no score row"),
                      ("manifest_rows_unlabelled", "manifest row(s) have no label"),
                      ("duplicate_score_rows", "duplicate score row(s): the last one is used")):
        if counts.get(key):
            lines.append(f"  {counts[key]} {text}")
    return "\n".join(lines)
