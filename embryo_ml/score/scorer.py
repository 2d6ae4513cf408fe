"""Batch scoring with ONNX Runtime: decode in worker threads, infer in batches, write as we go.

Images are streamed (a folder is walked lazily, never listed with its pixels into memory). A file
that cannot be decoded gets a row whose `status` says why, and the run goes on. Every batch's rows
are flushed to disk before the next batch, so an interrupted run keeps what it finished; the
output format (`.csv`, `.jsonl`, `.parquet`) and how each survives an interruption are described
in `embryo_ml.data.scores_file`.

Columns of an `ok` row:

- `score`: the calibrated probability p of the positive class, softmax(logits / T)[positive] with
  the bundle's temperature T, over the main classes only (`logits[:, :len(classes)]`).
- `display_score`: p on a 1-10 scale for people, `clip(ceil(10 * p), 1, 10)`: "7" means a
  calibrated probability above 60% and at most 70%; p = 0 and p = 0.1 show 1, p = 1 shows 10.
- `label_pred`: the bundle's threshold applied to p (two classes), else the most probable class.
- `p_<class>`: every main class's calibrated probability.
- with Gardner heads in the bundle (`Bundle.heads`: extra logit columns after the main
  classes): `<head>_pred`, the most probable class of each head, and `grade_pred` when
  `expansion`, `icm` and `te` all exist: e.g. `4AB`, or just the expansion (`2`) below 3, where
  ICM and TE cannot be assessed.
- `flags`, `embryo_id`, `patient_id`, `rank_in_cohort` (see `embryo_ml.score.cohort`).

Test-time augmentation (`tta=True`) scores the 8 symmetries of the square (4 rotations by 90
degrees, each with and without a mirror flip) of the preprocessed image, averages their logits,
then applies the bundle's temperature. Logits, not probabilities, are averaged so the result is
again one logit vector and the calibration step stays the one fitted in validation,
softmax(logits / T); averaging calibrated probabilities would instead feed the temperature's
correction through a second, non-linear averaging. T was fitted on single-view logits and an
average of views is usually a little less extreme, so TTA scores may be slightly under-confident;
the `out_of_distribution` flag uses the unaugmented view, the one its threshold was fitted on.

Rows go to the partial file (`scores.csv` -> `scores.csv.partial.csv`, see
`embryo_ml.data.scores_file`); the scores file itself is replaced only when the run has finished, so
an earlier complete one survives a failed or interrupted re-run. `--resume` continues the partial
file (or starts it from a finished scores file): it skips images whose `path` is already there
(after dropping a torn last record) and appends the rest. SIGINT (Ctrl-C) and SIGTERM request a
clean stop: the batch in hand is finished and flushed, and `ScoringInterrupted` (a
`KeyboardInterrupt`) is raised, its summary's `out` naming the partial file; a second signal
stops at once, cutting the file back to its last complete batch. When all images are scored,
embryos are aggregated and ranked, the partial file's rows become the scores file (written with
`rank_in_cohort` to a temporary name, fsync'ed, renamed over it), the embryos table is written
beside it (`scores.csv` -> `scores.embryos.csv`), and only then is the partial file deleted. An
`--out` that would overwrite an input (the manifest, an image) is refused before any work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.data.images import DEFAULT_MAX_PIXELS, is_image_file
from embryo_ml.data.manifest import iter_image_files, read_manifest
from embryo_ml.data.preprocess import RESIZE_POLICY, preprocess, read_for_model
from embryo_ml.data.quality import QualityThresholds, image_flags, join_flags, logit_flags
from embryo_ml.data.scores_file import (
    embryos_path,
    iter_file_rows,
    output_format,
    partial_path,
    recover_rows,
    row_writer,
    settings_path,
    write_table,
)
from embryo_ml.errors import BundleError, ConfigError, DataError, ImageReadError
from embryo_ml.evaluation.conformal import conformal_flags
from embryo_ml.evaluation.ood import FeatureReference
from embryo_ml.export.bundle import Bundle, read_bundle, validation_warning
from embryo_ml.fileio import atomic_write_text
from embryo_ml.numeric import softmax
from embryo_ml.score.cohort import AGGREGATES, EMBRYO_COLUMNS, Cohorts, display_score
from embryo_ml.score.shift import shift_record

GARDNER_HEADS = ("expansion", "icm", "te")
log = logging.getLogger(__name__)


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
    out: Path  # the scores file; after an interrupt, the partial file that holds the rows
    n_images: int = 0  # scored in this call (ok or not)
    n_scored: int = 0
    n_failed: int = 0
    n_resumed: int = 0  # rows already in the output (--resume), skipped
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embryos_out: Path | None = None
    n_embryos: int = 0
    precision: str = "fp32"  # the model that scored: "fp32" or "int8"
    # Set when the model did not pass its validation check (`validation_warning`): say it.
    validation_warning: str | None = None
    # The dataset-shift record of the whole output (`embryo_ml.score.shift.shift_record`), also
    # in the settings sidecar under "shift"; None until a run finishes.
    shift: dict[str, Any] | None = None

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds else 0.0


class ScoringInterrupted(KeyboardInterrupt):
    """Raised after a clean stop (Ctrl-C, SIGTERM); `summary` counts the rows kept."""

    def __init__(self, summary: ScoreSummary) -> None:
        super().__init__(f"interrupted; {summary.n_images} new row(s) kept in {summary.out}")
        self.summary = summary


def head_columns(heads: dict[str, dict[str, Any]] | None) -> list[str]:
    if not heads:
        return []
    gardner = ["grade_pred"] if all(h in heads for h in GARDNER_HEADS) else []
    return [f"{name}_pred" for name in heads] + gardner


def score_columns(classes: list[str], heads: dict[str, dict[str, Any]] | None = None) -> list[str]:
    return ["path", "status", "score", "display_score", "label_pred",
            *[f"p_{c}" for c in classes], *head_columns(heads), "flags",
            "embryo_id", "patient_id", "rank_in_cohort"]


def compile_embryo_pattern(pattern: str) -> re.Pattern[str]:
    """The `--embryo-pattern` regex; `ConfigError` (one line) if invalid or without `embryo_id`."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"--embryo-pattern is not a valid regular expression: {error}") from None
    if "embryo_id" not in regex.groupindex:
        raise ConfigError("--embryo-pattern needs a named group embryo_id, e.g. "
                          "'(?P<embryo_id>\\d+)_(?P<focal_plane>-?\\d+)'")
    return regex


def apply_embryo_pattern(item: ScoreItem, regex: re.Pattern[str]) -> ScoreItem:
    """Ids from the pattern searched in `item.path`; `patient_id` falls back to the manifest's.
    A path the pattern does not match is an embryo of its own (no embryo id)."""
    match = regex.search(item.path)
    embryo = match.group("embryo_id") if match else None
    if not embryo:
        return replace(item, embryo_id="")
    groups = match.groupdict()  # type: ignore[union-attr]
    return replace(item, embryo_id=embryo, patient_id=groups.get("patient_id") or item.patient_id)


def iter_items(
    source: str | os.PathLike[str], embryo_pattern: re.Pattern[str] | str | None = None
) -> Iterator[ScoreItem]:
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
            ScoreItem(shown, file, patient, embryo)
            for shown, file, patient, embryo in zip(
                raw["path"], table["path"], _column(table, "patient_id"),
                _column(table, "embryo_id"))
        )
    elif source.exists():
        raise DataError(f"{source}: expected a folder of images or a manifest .csv")
    else:
        raise DataError(f"not found: {source}")
    if embryo_pattern is not None:
        regex = (compile_embryo_pattern(embryo_pattern) if isinstance(embryo_pattern, str)
                 else embryo_pattern)
        items = (apply_embryo_pattern(item, regex) for item in items)
    first = next(items, None)
    if first is None:
        raise DataError(f"{source}: no images found (looked for .jpg .jpeg .png .bmp .tif .tiff)")
    return chain([first], items)


def _column(table: pd.DataFrame, name: str) -> list[str]:
    if name not in table.columns:
        return [""] * len(table)
    return ["" if pd.isna(v) else str(v) for v in table[name]]


def dihedral_views(batch: np.ndarray) -> Iterator[np.ndarray]:
    """The 8 symmetries of the square of an NCHW batch: rotations by 0, 90, 180, 270 degrees,
    then the same of the mirror image. The identity comes first."""
    for mirrored in (batch, batch[..., ::-1]):
        for k in range(4):
            yield np.ascontiguousarray(np.rot90(mirrored, k, axes=(2, 3)))


PRECISIONS = ("auto", "fp32", "int8")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def choose_model(bundle: Bundle, precision: str = "auto") -> tuple[Path, str]:
    """(model file, "fp32" or "int8"): "auto" takes the bundle's int8 model when it has one
    (it passed its parity check at export), "int8" insists on it, "fp32" never uses it."""
    check_precision(precision)
    int8 = bundle.int8_path
    if precision == "int8" and int8 is None:
        raise BundleError(f"bundle {bundle.path} has no int8 model (export builds one when it "
                          "agrees with fp32 on the validation images); use --precision fp32")
    if int8 is not None and precision != "fp32":
        return int8, "int8"
    return bundle.model_path, "fp32"


class OnnxScorer:
    """An ONNX Runtime session for a verified bundle, with deliberate session options.

    `precision`: see `choose_model`; the class activation map (heatmaps) always comes from the
    fp32 model, so `explain` asks for "fp32"."""

    def __init__(
        self, bundle: Bundle, threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        tta: bool = False, precision: str = "auto",
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle ORT threads would otherwise spin for a while after each run, burning the cores
        # the decoding threads need; measured 10-25% more images/s on 2 cores without it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.tta = tta
        if bundle.resize_policy != RESIZE_POLICY:
            log.warning(
                "bundle %s was validated on images prepared as %r; this version prepares them "
                "as %r (pixels a few grey levels apart), so scores may differ slightly from its "
                "validation figures; export the run again to validate it on the same pixels",
                bundle.path, bundle.resize_policy, RESIZE_POLICY)
        self.quality = QualityThresholds.from_dict(bundle.quality) if bundle.quality else None
        model_path, self.precision = choose_model(bundle, precision)
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.width = _logit_width(bundle)
        outputs = {o.name: o for o in self.session.get_outputs()}
        if bundle.output_name not in outputs:
            raise BundleError(f"bundle {bundle.path}: model has no output {bundle.output_name!r} "
                              f"(outputs: {sorted(outputs)})")
        declared = outputs[bundle.output_name].shape[-1]
        if isinstance(declared, int):
            _check_width(bundle, declared, self.width)
        # The feature-space out-of-distribution reference of the model that scores; without
        # one (older bundles) the logits' energy is the out-of-distribution signal.
        self.reference: FeatureReference | None = None
        if bundle.ood is not None:
            feature_output = str(bundle.ood.get("feature_output", ""))
            if feature_output not in outputs:
                raise BundleError(f"bundle {bundle.path}: 'ood' reads the model output "
                                  f"{feature_output!r}, which the model does not have")
            self.reference = FeatureReference.load(bundle.path, bundle.ood, self.precision)
            self._fetch = [bundle.output_name, feature_output]
        else:
            self._fetch = [bundle.output_name]

    def read(self, item: ScoreItem) -> np.ndarray:
        """The item's image decoded as training and validation decoded it (reduced JPEG scale,
        see `embryo_ml.data.preprocess.decode_side`), not yet resized."""
        return read_for_model(item.file, self.bundle.input_size, self.max_pixels,
                              data=item.data, name=item.path)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        b = self.bundle
        return preprocess(image, b.input_size, b.mean, b.std)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) raw logits of one view (no TTA)."""
        return self.session.run([self.bundle.output_name], {self.bundle.input_name: batch})[0]

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled features or None without a reference) of one view, one ONNX run."""
        found = self.session.run(self._fetch, {self.bundle.input_name: batch})
        return found[0], (found[1] if len(found) > 1 else None)

    def tta_logits(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean logits over the 8 `dihedral_views`, logits of the unaugmented view), float64."""
        mean, plain, _ = self.tta_outputs(batch)
        return mean, plain

    def tta_outputs(
        self, batch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(mean logits over the 8 `dihedral_views`, logits and features of the unaugmented
        view): the flags are judged on the view their limits were fitted on."""
        total, plain, features = None, None, None
        for view in dihedral_views(batch):
            if plain is None:
                logits, features = self.outputs(view)
                plain = logits.astype(np.float64)
                total = plain.copy()
            else:
                total += self.logits(view).astype(np.float64)
        return total / 8.0, plain, features  # type: ignore[operator,return-value]

    def image_flags(self, image: np.ndarray) -> list[str]:
        return image_flags(image, self.quality) if self.quality else []

    def logit_flags(self, logits: np.ndarray) -> list[list[str]]:
        if self.quality is None:
            return [[] for _ in logits]
        return logit_flags(logits, self.quality)

    def model_flags(self, logits: np.ndarray, features: np.ndarray | None) -> list[list[str]]:
        """`out_of_distribution` (feature distance, or the logits' energy for bundles without
        a reference) and `uncertain` (conformal sets), per row, from one view's raw outputs."""
        main = logits[:, :len(self.bundle.classes)]
        if self.reference is not None and features is not None:
            ood = self.reference.flags(features)
        else:
            ood = self.logit_flags(main)
        probs = softmax(main, self.bundle.temperature)
        uncertain = conformal_flags(probs, self.bundle.conformal, self.bundle.classes)
        return [a + b for a, b in zip(ood, uncertain, strict=True)]


def _logit_width(bundle: Bundle) -> int:
    """Columns the `logits` output must have: the main classes, then every head's slice."""
    width = len(bundle.classes)
    for name, head in (bundle.heads or {}).items():
        offset, classes = head.get("offset"), head.get("classes")
        if not isinstance(offset, int) or offset < len(bundle.classes) or not classes:
            raise BundleError(f"bundle {bundle.path}: head {name!r} needs an integer offset >= "
                              f"{len(bundle.classes)} and a list of classes, got {head}")
        width = max(width, offset + len(classes))
    return width


def _check_width(bundle: Bundle, actual: int, expected: int) -> None:
    if actual < expected or (not bundle.heads and actual != expected):
        raise BundleError(f"bundle {bundle.path}: the model gives {actual} logits per image, the "
                          f"bundle describes {expected} ({len(bundle.classes)} classes"
                          f"{' + heads' if bundle.heads else ''})")


def _head_predictions(bundle: Bundle, logits: np.ndarray) -> list[dict[str, str]]:
    heads = bundle.heads or {}
    predicted: dict[str, list[str]] = {}
    for name, head in heads.items():
        offset, classes = head["offset"], [str(c) for c in head["classes"]]
        chosen = logits[:, offset:offset + len(classes)].argmax(axis=1)
        predicted[name] = [classes[int(j)] for j in chosen]
    rows = [{f"{name}_pred": values[i] for name, values in predicted.items()}
            for i in range(len(logits))]
    if all(h in heads for h in GARDNER_HEADS):
        for row, expansion, icm, te in zip(rows, *(predicted[h] for h in GARDNER_HEADS)):
            row["grade_pred"] = (expansion if expansion.isdigit() and int(expansion) < 3
                                 else f"{expansion}{icm}{te}")
    return rows


Loaded = tuple[ScoreItem, np.ndarray | None, str, list[str]]


def load_item(scorer: OnnxScorer, item: ScoreItem) -> Loaded:
    """Decode, check image quality and preprocess one image (runs in a worker thread)."""
    try:
        image = scorer.read(item)
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
    """Output rows (column -> text) for a batch of loaded images: one ONNX run (eight with TTA)
    for the decodable ones, a status-only row for the others."""
    bundle = scorer.bundle
    n_classes = len(bundle.classes)
    good = {position: i for i, position in
            enumerate(p for p, loaded in enumerate(batch) if loaded[1] is not None)}
    probs, model_flags, heads = None, [], []
    if good:
        pixels = np.stack([batch[p][1] for p in good])  # type: ignore[misc]
        if scorer.tta:
            logits, plain, features = scorer.tta_outputs(pixels)
        else:
            logits, features = scorer.outputs(pixels)
            plain = logits
        _check_width(bundle, logits.shape[1], scorer.width)
        probs = softmax(logits[:, :n_classes], bundle.temperature)
        model_flags = scorer.model_flags(plain, features)
        heads = _head_predictions(bundle, logits) if bundle.heads else [{} for _ in good]
    rows = []
    for position, (item, _, status, pixel_flags) in enumerate(batch):
        row: dict[str, object] = {"path": item.path, "status": status, "flags": "",
                                  "patient_id": item.patient_id, "embryo_id": item.embryo_id,
                                  "rank_in_cohort": ""}
        if probs is not None and position in good:
            i = good[position]
            p = probs[i]
            row["flags"] = join_flags(pixel_flags + model_flags[i])
            score = float(p[bundle.positive_index])
            if n_classes == 2:
                negative = bundle.classes[1 - bundle.positive_index]
                label = bundle.positive_class if score >= bundle.threshold else negative
            else:
                label = bundle.classes[int(p.argmax())]
            row.update({"score": f"{score:.6f}",
                        "display_score": str(display_score(score)) if math.isfinite(score) else "",
                        "label_pred": label,
                        **{f"p_{c}": f"{v:.6f}" for c, v in zip(bundle.classes, p)},
                        **heads[i]})
        rows.append(row)
    return rows


class _StopRequest:
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """SIGINT and SIGTERM ask for a clean stop at the next batch boundary; a second one raises
    KeyboardInterrupt at once. Handlers are restored on exit; off the main thread (where Python
    cannot install handlers) this does nothing and Ctrl-C arrives as KeyboardInterrupt."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is not signal.SIG_IGN:  # e.g. a background job ignores Ctrl-C: keep that
            previous[signum] = current
            signal.signal(signum, handler)
    try:
        yield stop
    finally:
        for signum, current in previous.items():
            signal.signal(signum, current)


def score_images(
    source: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    batch_size: int = 32,
    workers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    resume: bool = False,
    tta: bool = False,
    aggregate: str = "mean",
    embryo_pattern: str | None = None,
    precision: str = "auto",
) -> ScoreSummary:
    """Score every image in `source` with the bundle; write `out` (.csv, .jsonl or .parquet)
    row by row, then its ranks and the embryos table (`embryos_path(out)`).

    `resume`: keep the rows already in `out` and score only images not in it. `aggregate`:
    "mean" or "max" of an embryo's image scores. `embryo_pattern`: regex with a named group
    `embryo_id` (and optionally `patient_id`) searched in each image's path. `precision`:
    "auto" (the bundle's int8 model when it has one), "fp32" or "int8". Raises
    `ScoringInterrupted` after a clean stop on Ctrl-C or SIGTERM."""
    out = Path(out)
    output_format(out)  # user errors first, before any work
    _refuse_overwriting_inputs(source, out)
    if aggregate not in AGGREGATES:
        raise ConfigError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    regex = compile_embryo_pattern(embryo_pattern) if embryo_pattern is not None else None
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_precision(precision)  # before the bundle is read and hashed
    bundle = read_bundle(bundle_dir)  # verifies the hash before anything else
    items = iter_items(source, regex)
    scorer = OnnxScorer(bundle, threads, max_pixels, tta=tta, precision=precision)
    columns = score_columns(bundle.classes, bundle.heads)
    cohorts = Cohorts(bundle.classes, bundle.positive_class, bundle.threshold, aggregate)
    summary = ScoreSummary(out, precision=scorer.precision,
                           validation_warning=validation_warning(bundle))
    log = partial_path(out)  # the rows until the run has finished; `out` is replaced only then
    started = time.perf_counter()
    settings = _settings(bundle, scorer, embryo_pattern)
    if resume:  # the settings of the rows resumed: the partial file's, else the output's
        own = log.is_file() and settings_path(log).is_file()
        _check_resumable(log if own else out, settings)  # before anything is touched
    out.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        done: set[str] = set()
        summary.n_resumed = _resume(out, log, columns, cohorts, done)
        items = (item for item in items if item.path not in done)
    atomic_write_text(settings_path(log), json.dumps(settings, indent=2) + "\n")
    embryos_out = embryos_path(out)  # an earlier run's stays until this one has finished

    writer = row_writer(out, columns, append=resume)
    pool = ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="scoring", unit="img", initial=summary.n_resumed)

    def flush(batch: list[Loaded]) -> None:
        for row in batch_rows(scorer, batch):
            writer.write(row)
            cohorts.add(row)
            summary.n_images += 1
            if row["status"] == "ok":
                summary.n_scored += 1
            else:
                summary.n_failed += 1
                summary.failures.append((str(row["path"]), str(row["status"])))
        writer.flush()
        if bar is not None:
            bar.update(len(batch))

    try:
        with _stop_on_signals() as stop:
            batch: list[Loaded] = []
            for loaded in _prefetch(scorer, items, pool, depth=batch_size * 2):
                batch.append(loaded)
                if len(batch) >= batch_size or stop.requested:
                    flush(batch)
                    batch = []
                if stop.requested:
                    break
            if batch and not stop.requested:
                flush(batch)
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
    except BaseException as error:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close(complete=False)  # cut back to the last complete batch
        summary.out = log  # the finished rows; an earlier complete `out` is untouched
        summary.seconds = time.perf_counter() - started
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, ScoringInterrupted):
            raise ScoringInterrupted(summary) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - started
    if stop.requested:
        summary.out = log
        raise ScoringInterrupted(summary)

    cohorts.finish()
    # The partial file becomes `out` (with ranks; temp name, then rename), and is deleted last,
    # after the embryos table and settings: until then it is what `--resume` continues.
    write_table(out, columns, (_with_rank(row, cohorts) for row in iter_file_rows(log)))
    write_table(embryos_out, EMBRYO_COLUMNS, cohorts.rows())
    summary.embryos_out, summary.n_embryos = embryos_out, len(cohorts)
    # every row of the output, resumed ones too; the sidecar gains the record at the very end
    summary.shift = shift_record(bundle, summary.precision, iter_file_rows(out))
    atomic_write_text(settings_path(out),
                      json.dumps({**settings, "shift": summary.shift}, indent=2) + "\n")
    settings_path(log).unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _settings(bundle: Bundle, scorer: OnnxScorer, embryo_pattern: str | None) -> dict[str, Any]:
    """What decides the numbers in a scores file: the bundle (its identity `bundle_sha256`,
    which covers bundle.json and every file in it), the model file, test-time augmentation and
    how embryos are named, and whether the model passed its validation check. Written beside it
    (`settings_path`) when a run starts, and again with the run's dataset-shift record
    (`"shift"`, `embryo_ml.score.shift`) when it finishes; `--resume` checks the first four,
    `report` the bundle."""
    int8 = scorer.precision == "int8" and bundle.int8 is not None
    model_sha = bundle.int8["sha256"] if int8 else bundle.sha256  # type: ignore[index]
    return {"bundle_sha256": bundle.bundle_sha256, "model": scorer.precision,
            "model_sha256": model_sha,
            "tta": scorer.tta, "embryo_pattern": embryo_pattern, "bundle": str(bundle.path),
            "validation": bundle.verdict}  # the model's quality gate; None = before the gate


def _check_resumable(out: Path, settings: dict[str, Any]) -> None:
    """`--resume` must not mix scores of two models or option sets in one file: ConfigError
    (one line) when the earlier run's settings differ. An output without settings (written by an
    older version) cannot be checked and is resumed."""
    path = settings_path(out)
    if not path.is_file() or not (out.is_file() or partial_path(out).is_file()):
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    differ = []
    if earlier.get("bundle_sha256", settings["bundle_sha256"]) != settings["bundle_sha256"]:
        differ.append(f"bundle {str(earlier['bundle_sha256'])[:12]}... -> "
                      f"{str(settings['bundle_sha256'])[:12]}... (bundle.json or a file in it "
                      "changed)")
    if earlier.get("model_sha256", settings["model_sha256"]) != settings["model_sha256"]:
        differ.append(f"model {earlier.get('model')} {str(earlier['model_sha256'])[:12]}... -> "
                      f"{settings['model']} {settings['model_sha256'][:12]}...")
    for key, option in (("tta", "--tta"), ("embryo_pattern", "--embryo-pattern")):
        if key in earlier and earlier[key] != settings[key]:
            differ.append(f"{option} {earlier[key]!r} -> {settings[key]!r}")
    if differ:
        said = ", ".join(differ)
        raise ConfigError(f"--resume: {out} was scored with other settings ({said}; see "
                          f"{path.name}); resume with the same bundle and options, or score to "
                          "a new --out")


def _resume(out: Path, log: Path, columns: list[str], cohorts: Cohorts, done: set[str]) -> int:
    """Read back the rows already scored (dropping a torn last record): their paths go to
    `done`, their scores to `cohorts`. Ranks of a finished earlier run are cleared, so the file
    never shows stale ranks if this run is interrupted too."""
    ranked = False
    for row in recover_rows(out, columns):
        done.add(str(row["path"]))
        cohorts.add(row)
        ranked = ranked or row.get("rank_in_cohort") not in (None, "")
    if ranked:
        write_table(log, columns, ({**row, "rank_in_cohort": ""} for row in iter_file_rows(log)))
    return len(done)


def _with_rank(row: dict[str, Any], cohorts: Cohorts) -> dict[str, Any]:
    rank = cohorts.rank_of(row)
    return {**row, "rank_in_cohort": "" if rank is None else str(rank)}


def _refuse_overwriting_inputs(source: str | os.PathLike[str], out: Path) -> None:
    """ConfigError (one line), before any work, when a file this run writes (`out`, its partial
    file, embryos table or settings) is one of its inputs: the manifest being scored, an image
    it lists, or an image inside the scored folder."""
    log = partial_path(out)
    written = {out: "scores", log: "partial file", embryos_path(out): "embryos table",
               settings_path(out): "settings file", settings_path(log): "settings file"}
    source = Path(source)
    inputs: list[tuple[Path, str]] = []
    if source.is_file():
        inputs = [(source, "the manifest being scored")]
        inputs += [(image, f"an image being scored ({image})")
                   for image in _listed_like(source, [p.name for p in written])]
    elif source.is_dir():
        inputs = [(path, f"an image being scored ({path})") for path in written
                  if is_image_file(path) and source.resolve() in path.resolve().parents]
    for path, kind in written.items():
        for given, what in inputs:
            if _same_file(path, given) and path == out:
                raise ConfigError(f"--out {out} is {what}; choose another --out")
            if _same_file(path, given):
                raise ConfigError(f"--out {out} would overwrite {what} with its {kind} "
                                  f"({path}); choose another --out")


def _listed_like(manifest: Path, names: list[str]) -> list[Path]:
    """The manifest's entries whose path ends like one of `names` (only those can be a file
    this run writes), resolved against its folder as `read_manifest` does."""
    try:
        raw = pd.read_csv(manifest, usecols=["path"], dtype="string", keep_default_na=False)
    except (ValueError, OSError):
        return []  # `iter_items` says what is wrong with it
    paths = raw["path"]
    like = paths[paths.str.lower().str.endswith(tuple(n.lower() for n in names))]
    base = manifest.resolve().parent
    return [base / p for p in like]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:
        return False  # one of them does not exist yet
