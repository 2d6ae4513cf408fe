"""Batch scoring with ONNX Runtime: decode in worker threads, infer in batches, write as we go.

Images are streamed (a folder is walked lazily, never listed with its pixels into memory). A file
that cannot be decoded gets a row whose `status` says why, and the run goes on. Every batch's rows
are flushed to disk before the next batch, so an interrupted run keeps what it finished. When all
images are scored, embryos are ranked within each patient and the file is rewritten atomically
with `rank_in_cohort` filled in.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from embryo_ml.data.images import DEFAULT_MAX_PIXELS, read_image, read_image_bytes
from embryo_ml.data.manifest import iter_image_files, read_manifest
from embryo_ml.data.preprocess import preprocess
from embryo_ml.errors import DataError, ImageReadError
from embryo_ml.export.bundle import Bundle, read_bundle
from embryo_ml.fileio import atomic_write_text
from embryo_ml.numeric import softmax
from embryo_ml.score.cohort import rank_in_cohort
from embryo_ml.score.quality import QualityThresholds, image_flags, join_flags, logit_flags
from embryo_ml.score.writers import CsvRowWriter


@dataclass(frozen=True)
class ScoreItem:
    """One image to score: `path` as the user will read it, `file` where it is on disk."""

    path: str
    file: str
    patient_id: str = ""
    embryo_id: str = ""
    data: bytes | None = field(default=None, repr=False)  # encoded image in memory, not `file`


@dataclass
class ScoreSummary:
    out: Path
    n_images: int = 0
    n_scored: int = 0
    n_failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds else 0.0


def score_columns(classes: list[str]) -> list[str]:
    return ["path", "status", "score", "label_pred", *[f"p_{c}" for c in classes], "flags",
            "embryo_id", "patient_id", "rank_in_cohort"]


def iter_items(source: str | os.PathLike[str]) -> Iterator[ScoreItem]:
    """Images to score from a folder (recursive) or a manifest CSV; raises `DataError` for a
    missing source or one with no images."""
    source = Path(source)
    if source.is_dir():
        items: Iterator[ScoreItem] = (
            ScoreItem(file.relative_to(source).as_posix(), str(file))
            for file in iter_image_files(source)
        )
    elif source.is_file() and source.suffix.lower() == ".csv":
        table = read_manifest(source)
        raw = pd.read_csv(source, usecols=["path"], dtype="string", keep_default_na=False)
        items = (
            ScoreItem(shown, file, _text(row, "patient_id"), _text(row, "embryo_id"))
            for shown, file, row in zip(raw["path"], table["path"], table.to_dict("records"))
        )
    elif source.exists():
        raise DataError(f"{source}: expected a folder of images or a manifest .csv")
    else:
        raise DataError(f"not found: {source}")
    first = next(items, None)
    if first is None:
        raise DataError(f"{source}: no images found (looked for .jpg .jpeg .png .bmp .tif .tiff)")
    return chain([first], items)


def _text(row: dict[str, object], key: str) -> str:
    value = row.get(key)
    return "" if value is None or pd.isna(value) else str(value)


class OnnxScorer:
    """An ONNX Runtime session for a verified bundle, with deliberate session options."""

    def __init__(
        self, bundle: Bundle, threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.quality = QualityThresholds.from_dict(bundle.quality) if bundle.quality else None
        self.session = ort.InferenceSession(
            str(bundle.model_path), options, providers=["CPUExecutionProvider"]
        )

    def prepare(self, image: np.ndarray) -> np.ndarray:
        b = self.bundle
        return preprocess(image, b.input_size, b.mean, b.std)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) raw logits."""
        return self.session.run([self.bundle.output_name], {self.bundle.input_name: batch})[0]

    def image_flags(self, image: np.ndarray) -> list[str]:
        return image_flags(image, self.quality) if self.quality else []

    def logit_flags(self, logits: np.ndarray) -> list[list[str]]:
        if self.quality is None:
            return [[] for _ in logits]
        return logit_flags(logits, self.quality)


Loaded = tuple[ScoreItem, np.ndarray | None, str, list[str]]


def load_item(scorer: OnnxScorer, item: ScoreItem) -> Loaded:
    """Decode, check image quality and preprocess one image (runs in a worker thread)."""
    try:
        image = (read_image(item.file, scorer.max_pixels) if item.data is None
                 else read_image_bytes(item.data, scorer.max_pixels, name=item.path))
        return item, scorer.prepare(image), "ok", scorer.image_flags(image)
    except ImageReadError as error:
        return item, None, f"unreadable: {error.reason}", []
    except Exception as error:  # a decoder bug must not stop a clinic's whole folder
        return item, None, f"unreadable: {error.__class__.__name__}: {error}", []


def _prefetch(
    scorer: OnnxScorer, items: Iterator[ScoreItem], pool: ThreadPoolExecutor, depth: int
) -> Iterator[Loaded]:
    """Decode ahead in threads, at most `depth` images in flight (bounded memory)."""
    queue: deque[Future[Loaded]] = deque()
    for item in items:
        queue.append(pool.submit(load_item, scorer, item))
        if len(queue) >= depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def batch_rows(scorer: OnnxScorer, batch: list[Loaded]) -> list[dict]:
    """Output rows (column -> text) for a batch of loaded images: one ONNX run for the
    decodable ones, a status-only row for the others."""
    bundle = scorer.bundle
    good = [i for i, loaded in enumerate(batch) if loaded[1] is not None]
    probs, model_flags = None, []
    if good:
        logits = scorer.logits(np.stack([batch[i][1] for i in good]))
        probs = softmax(logits, bundle.temperature)
        model_flags = scorer.logit_flags(logits)
    rows = []
    for position, (item, _, status, pixel_flags) in enumerate(batch):
        row: dict[str, object] = {"path": item.path, "status": status, "flags": "",
                                  "patient_id": item.patient_id, "embryo_id": item.embryo_id,
                                  "rank_in_cohort": ""}
        if probs is not None and position in good:
            p = probs[good.index(position)]
            row["flags"] = join_flags(pixel_flags + model_flags[good.index(position)])
            score = float(p[bundle.positive_index])
            if len(bundle.classes) == 2:
                negative = bundle.classes[1 - bundle.positive_index]
                label = bundle.positive_class if score >= bundle.threshold else negative
            else:
                label = bundle.classes[int(p.argmax())]
            row.update({"score": f"{score:.6f}", "label_pred": label,
                        **{f"p_{c}": f"{v:.6f}" for c, v in zip(bundle.classes, p)}})
        rows.append(row)
    return rows


def score_images(
    source: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    batch_size: int = 32,
    workers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ScoreSummary:
    """Score every image in `source` with the bundle; write `out` (CSV) row by row."""
    bundle = read_bundle(bundle_dir)  # verifies the hash before anything else
    items = iter_items(source)
    scorer = OnnxScorer(bundle, threads, max_pixels)
    summary = ScoreSummary(Path(out))
    columns = score_columns(bundle.classes)
    workers = workers or min(4, os.cpu_count() or 1)
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="scoring", unit="img")
    with CsvRowWriter(out, columns) as writer, ThreadPoolExecutor(workers) as pool:
        batch: list[Loaded] = []
        stream = _prefetch(scorer, items, pool, depth=batch_size * 2)
        for loaded in chain(stream, [None]):
            if loaded is not None:
                batch.append(loaded)
            if batch and (loaded is None or len(batch) >= batch_size):
                for row in batch_rows(scorer, batch):
                    writer.write(row)
                    summary.n_images += 1
                    if row["status"] == "ok":
                        summary.n_scored += 1
                    else:
                        summary.n_failed += 1
                        summary.failures.append((str(row["path"]), str(row["status"])))
                writer.flush()
                if bar is not None:
                    bar.update(len(batch))
                batch = []
    if bar is not None:
        bar.close()
    _fill_ranks(Path(out))
    summary.seconds = time.perf_counter() - started
    return summary


def _fill_ranks(path: Path) -> None:
    """Rewrite the finished file with `rank_in_cohort` (temp file + rename: never half a file)."""
    table = pd.read_csv(path, dtype="string", keep_default_na=False)
    if (table["patient_id"] == "").all():
        return
    scored = table.assign(score=pd.to_numeric(table["score"], errors="coerce"))
    table["rank_in_cohort"] = rank_in_cohort(scored).astype(str)
    atomic_write_text(path, table.to_csv(index=False))
