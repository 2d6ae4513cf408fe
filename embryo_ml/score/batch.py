"""One batch of images -> scores-file rows: the scoring step `embryo-ml score` and the served
model share, so both give the same numbers.

`load_item` decodes, checks and preprocesses one image (in a worker thread); `score_batch` runs
the model once on the batch's decodable images (eight times with TTA) and returns one row per
image, in order. A file that cannot be decoded gets a row whose `status` says why.

Columns of an `ok` row (`score_columns`):

- `score`: the calibrated probability p of the positive class, softmax(logits / T)[positive] with
  the bundle's temperature T, over the main classes only (`logits[:, :len(classes)]`); with a
  day prior in the bundle and the image's day in the manifest, sigmoid(margin / T_day +
  offset[day]) instead (`embryo_ml.evaluation.prior`).
- `display_score`: p on a 1-10 scale for people, `clip(ceil(10 * p), 1, 10)`: "7" means a
  calibrated probability above 60% and at most 70%; p = 0 and p = 0.1 show 1, p = 1 shows 10.
- `label_pred`: the bundle's threshold applied to p (two classes), else the most probable class.
- `p_<class>`: every main class's calibrated probability.
- with Gardner heads in the bundle (`Bundle.heads`: extra logit columns after the main
  classes): `<head>_pred`, the most probable class of each head, and `grade_pred` when
  `expansion`, `icm` and `te` all exist: e.g. `4AB`, or just the expansion (`2`) below 3, where
  ICM and TE cannot be assessed (`embryo_ml.data.heads.predicted_grades`).
- `flags`, `embryo_id`, `patient_id`, `rank_in_cohort` (see `embryo_ml.score.cohort`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from embryo_ml.data.heads import Heads, grade_column_names, main_logits, predicted_grades
from embryo_ml.data.quality import join_flags
from embryo_ml.errors import ImageReadError
from embryo_ml.evaluation.day_check import day_flags
from embryo_ml.evaluation.prior import apply_prior, two_class_margin
from embryo_ml.export.bundle import Bundle
from embryo_ml.numeric import softmax
from embryo_ml.score.cohort import display_score
from embryo_ml.score.items import ScoreItem
from embryo_ml.score.session import OnnxScorer


def score_columns(classes: list[str], heads: Heads | None = None) -> list[str]:
    """The columns of a scores file, in order, for a bundle's classes and grade heads."""
    return ["path", "status", "score", "display_score", "label_pred",
            *[f"p_{c}" for c in classes], *grade_column_names(heads), "flags",
            "embryo_id", "patient_id", "rank_in_cohort"]


@dataclass(frozen=True)
class LoadedImage:
    """One image ready for the model (`pixels`, preprocessed) with its pixel-quality flags; or,
    when it could not be read, no pixels and a `status` that says why."""

    item: ScoreItem
    pixels: np.ndarray | None
    status: str = "ok"
    flags: list[str] = field(default_factory=list)

    @classmethod
    def failed(cls, item: ScoreItem, status: str) -> LoadedImage:
        return cls(item, None, status)


class ImageReader(Protocol):
    """What `load_item` asks of a scorer: an `OnnxScorer`, or a served request that reads
    under its own limits (`embryo_ml.serving.served_input.ServedRequest`)."""

    def read(self, item: ScoreItem) -> np.ndarray: ...

    def prepare(self, image: np.ndarray) -> np.ndarray: ...

    def image_flags(self, image: np.ndarray) -> list[str]: ...


def load_item(reader: ImageReader, item: ScoreItem) -> LoadedImage:
    """Decode, check image quality and preprocess one image (runs in a worker thread)."""
    try:
        image = reader.read(item)
        return LoadedImage(item, reader.prepare(image), "ok", reader.image_flags(image))
    except ImageReadError as error:
        return LoadedImage.failed(item, f"unreadable: {error.reason}")
    except Exception as error:  # a decoder bug must not stop a clinic's whole folder
        return LoadedImage.failed(item, f"unreadable: {error.__class__.__name__}: {error}")


def score_batch(scorer: OnnxScorer, batch: Sequence[LoadedImage]) -> list[dict[str, Any]]:
    """The rows (column -> text, see `score_columns`) of a batch of loaded images, in order:
    one ONNX run (eight with TTA) for the decodable ones, a status-only row for the others."""
    decodable = [image for image in batch if image.pixels is not None]
    scored = iter(_model_columns(scorer, decodable) if decodable else [])
    rows = []
    for image in batch:
        row: dict[str, Any] = {"path": image.item.path, "status": image.status, "flags": "",
                               "patient_id": image.item.patient_id,
                               "embryo_id": image.item.embryo_id, "rank_in_cohort": ""}
        if image.pixels is not None:
            model_flags, columns = next(scored)
            row["flags"] = join_flags(image.flags + model_flags)
            row.update(columns)
        rows.append(row)
    return rows


def _model_columns(scorer: OnnxScorer, images: list[LoadedImage]
                   ) -> list[tuple[list[str], dict[str, str]]]:
    """Per image: the model's flags and the score, probability and grade columns."""
    bundle = scorer.bundle
    pixels = np.stack([image.pixels for image in images])  # type: ignore[misc]
    if scorer.tta:
        logits, plain, features = scorer.tta_outputs(pixels)
    else:
        logits, features = scorer.outputs(pixels)
        plain = logits
    scorer.check_width(logits.shape[1])
    days = [image.item.prior_value for image in images]
    probs = calibrated(bundle, main_logits(logits, len(bundle.classes)), days)
    model_flags = [flags + day for flags, day in zip(
        scorer.model_flags(plain, features),
        day_flags(bundle.day_check, scorer.precision, features, days), strict=True)]
    grades = predicted_grades(logits, bundle.heads or {})
    return [(flags, {**_probability_columns(bundle, p), **grade})
            for flags, p, grade in zip(model_flags, probs, grades, strict=True)]


def calibrated(bundle: Bundle, main: np.ndarray, prior_values: Sequence[str]) -> np.ndarray:
    """The main classes' calibrated probabilities: softmax(logits / T), with the day prior
    (`Bundle.prior`) where the row's day has an offset. One threshold serves both: it is a
    level of calibrated probability (a trade-off of errors), whichever facts the probability
    was computed from."""
    probs = softmax(main, bundle.temperature)
    if bundle.prior is None:
        return probs
    margin = two_class_margin(main, bundle.positive_index)
    return apply_prior(probs, margin, prior_values, bundle.prior, bundle.positive_index)[0]


def _probability_columns(bundle: Bundle, p: np.ndarray) -> dict[str, str]:
    score = float(p[bundle.positive_index])
    return {"score": f"{score:.6f}",
            "display_score": str(display_score(score)) if math.isfinite(score) else "",
            "label_pred": _label(bundle, p, score),
            **{f"p_{c}": f"{v:.6f}" for c, v in zip(bundle.classes, p)}}


def _label(bundle: Bundle, p: np.ndarray, score: float) -> str:
    """The bundle's threshold on the score with two classes, else the most probable class."""
    if len(bundle.classes) == 2:
        negative = bundle.classes[1 - bundle.positive_index]
        return bundle.positive_class if score >= bundle.threshold else negative
    return bundle.classes[int(p.argmax())]
