"""The report's pictures: a thumbnail of each image and, where the bundle can, a heatmap overlay
of where the model looked, both embedded as JPEG `data:` URIs.

Pictures are made for the first `max_thumbnails` rows in report order, in batches of
PICTURE_BATCH images: decoded images are held for one batch only, and the heatmaps of a batch
(`embryo_ml.score.explain`, extra model runs) cost one batch of model runs. An image that cannot
be found or read gets a note that says why instead, and a heatmap that fails does not stop the
report.

Torch- and mlflow-free (house rule 2): numpy, OpenCV, the one image reader and, for heatmaps,
ONNX Runtime.
"""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np

from embryo_ml.data.images import read_image
from embryo_ml.errors import ImageReadError
from embryo_ml.export.bundle import Bundle
from embryo_ml.report.rows import ReportRow

DEFAULT_THUMBNAIL_SIZE = 128
JPEG_QUALITY = 85
HEAT_ALPHA = 0.45
PICTURE_BATCH = 16  # images decoded (and run through the model for heatmaps) at a time


def _resolve(root: Path, path: str) -> Path:
    """A row's image path: absolute as written, else under `root`."""
    p = Path(path)
    return p if p.is_absolute() else root / p


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """The image shrunk (never enlarged) to `size` px on its longer side."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale >= 1.0:
        return image
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, shape, interpolation=cv2.INTER_AREA)


def _data_uri(rgb: np.ndarray) -> str:
    """An RGB picture as a JPEG `data:` URI, embedded in the page."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


class Heatmaps:
    """Heatmap overlays from `embryo_ml.score.explain`, when it exists and the bundle has a
    class activation map output; `note` says why there are none otherwise."""

    def __init__(self, bundle: Bundle, wanted: bool, threads: int | None) -> None:
        self.scorer = None
        self.note = ""
        if not wanted:
            self.note = "heatmaps not computed (turned off for this report)"
            return
        try:
            from embryo_ml.score import explain
        except ImportError:
            self.note = "no heatmap (this embryo-ml version cannot compute heatmaps)"
            return
        if not getattr(bundle, "cam_output", None):
            self.note = "no heatmap (bundle has no CAM output)"
            return
        from embryo_ml.score.scorer import OnnxScorer

        self.explain = explain
        self.scorer = OnnxScorer(bundle, threads, precision="fp32")  # the cam is fp32's

    def overlays(self, images: list[np.ndarray], thumbs: list[np.ndarray],
                 labels: list[str] | None = None) -> list[tuple[str, str]]:
        """(data URI, "") or ("", why not) per decoded image and its thumbnail; one batch of
        model runs for all of them. `labels`: the class the scores file predicts for each
        image, whose evidence its heatmap shows (a label not among the bundle's classes, or
        none: the class the model predicts from the image)."""
        if self.scorer is None or not images:
            return [("", self.note)] * len(images)
        known = set(self.scorer.bundle.classes)
        classes = [c if c in known else None for c in (labels or [None] * len(images))]
        try:
            heats = self.explain.heatmaps(self.scorer, images, image_classes=classes)
        except Exception as error:  # heatmaps must not stop the report: try one by one
            if len(images) > 1:
                return [self.overlays([i], [t], [c])[0]
                        for i, t, c in zip(images, thumbs, classes)]
            return [("", f"heatmap failed: {error.__class__.__name__}: {error}")]
        if heats is None:
            self.scorer, self.note = None, "no heatmap (bundle has no CAM output)"
            return [("", self.note)] * len(images)
        out = []
        for heat, thumb in zip(heats, thumbs):
            heat = np.asarray(heat, dtype=np.float32)
            if heat.shape != thumb.shape[:2]:
                heat = cv2.resize(heat, (thumb.shape[1], thumb.shape[0]),
                                  interpolation=cv2.INTER_AREA)
            out.append((_data_uri(self.explain.overlay(thumb, heat, alpha=HEAT_ALPHA)), ""))
        return out


def _picture_batch(batch: list[ReportRow], root: Path, heatmaps: Heatmaps, size: int) -> None:
    """Decode, thumbnail and (for scored images) overlay one batch of rows."""
    scored: list[tuple[ReportRow, np.ndarray, np.ndarray]] = []
    for row in batch:
        try:
            image = read_image(_resolve(root, row.path))
        except ImageReadError as error:
            row.missing = error.reason == "file not found"
            row.thumb_note = ("image not found" if row.missing
                              else f"image could not be read: {error.reason}")
            row.heat_note = "no image"
            continue
        except Exception as error:
            row.thumb_note = f"image could not be read: {error.__class__.__name__}: {error}"
            row.heat_note = "no image"
            continue
        thumb = _thumbnail(image, size)
        row.thumb = _data_uri(thumb)
        if row.ok:
            scored.append((row, image, thumb))
        else:
            row.heat_note = "not scored"
    results = heatmaps.overlays([i for _, i, _ in scored], [t for _, _, t in scored],
                                [r.label for r, _, _ in scored])
    for (row, _, _), (uri, note) in zip(scored, results):
        row.heat, row.heat_note = uri, note


def add_pictures(rows: list[ReportRow], root: Path, heatmaps: Heatmaps, max_thumbnails: int,
                 size: int, progress: bool) -> None:
    """Thumbnails (and overlays) for the first `max_thumbnails` rows in report order, in
    batches of PICTURE_BATCH images (decoded images are held for one batch only)."""
    ordered = sorted(rows, key=lambda r: r.order)
    todo = ordered[:max_thumbnails]
    for row in ordered[max_thumbnails:]:
        row.thumb_note = row.heat_note = (
            f"not embedded: the report embeds the first {max_thumbnails} images")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="report", unit="img")
    try:
        for start in range(0, len(todo), PICTURE_BATCH):
            batch = todo[start:start + PICTURE_BATCH]
            _picture_batch(batch, root, heatmaps, size)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
