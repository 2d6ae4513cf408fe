"""Batch scoring with ONNX Runtime: decode in worker threads, infer in batches, write as we go.

`score_images` is `embryo-ml score`. Images are streamed (`embryo_ml.score.items`), decoded
ahead in threads and scored batch by batch (`embryo_ml.score.batch`, whose docstring says what
each column means) by the bundle's ONNX Runtime session (`embryo_ml.score.session`). A file
that cannot be decoded gets a row whose `status` says why, and the run goes on. Every batch's
rows are flushed to disk before the next batch, so an interrupted run keeps what it finished;
the output format (`.csv`, `.jsonl`, `.parquet`) and how each survives an interruption are
described in `embryo_ml.data.scores_file`.

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
`--out` that would overwrite an input (the manifest, an image) is refused before any work
(`embryo_ml.score.outputs`).

The names of the modules this one is made of stay importable from here (`__all__`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embryo_ml.data.images import DEFAULT_MAX_PIXELS
from embryo_ml.data.scores_file import (
    embryos_path,
    iter_file_rows,
    output_format,
    partial_path,
    row_writer,
    settings_path,
    write_table,
)
from embryo_ml.errors import ConfigError
from embryo_ml.evaluation.day_check import FLAG as DAY_FLAG
from embryo_ml.export.bundle import Bundle, read_bundle, validation_warning
from embryo_ml.fileio import atomic_write_text
from embryo_ml.score.batch import LoadedImage, load_item, score_batch, score_columns
from embryo_ml.score.cohort import AGGREGATES, EMBRYO_COLUMNS, Cohorts
from embryo_ml.score.items import (
    PriorCoverage,
    ScoreItem,
    apply_embryo_pattern,
    compile_embryo_pattern,
    iter_items,
)
from embryo_ml.score.outputs import (
    check_resumable,
    read_back,
    refuse_overwriting_inputs,
    run_settings,
    with_rank,
)
from embryo_ml.score.session import (
    PRECISIONS,
    OnnxScorer,
    check_precision,
    choose_model,
    dihedral_views,
)
from embryo_ml.score.shift import OOD_FLAG, count_flags, shift_record_of

__all__ = [
    "PRECISIONS", "LoadedImage", "OnnxScorer", "ScoreItem", "ScoreSummary", "ScoringInterrupted",
    "StopRequest", "apply_embryo_pattern", "check_options", "check_precision", "choose_model",
    "compile_embryo_pattern", "dihedral_views", "finish_scores", "iter_items", "load_item",
    "score_batch", "score_columns", "score_images", "stop_on_signals",
]


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
    # Set when the bundle's day prior could not apply to some images (`PriorCoverage`).
    prior_warning: str | None = None
    # Set when rows of the output are flagged day_mismatch (`day_mismatch_warning`).
    day_warning: str | None = None
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


class StopRequest:
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM ask for a clean stop at the next batch boundary; a second one raises
    KeyboardInterrupt at once. Handlers are restored on exit; off the main thread (where Python
    cannot install handlers) this does nothing and Ctrl-C arrives as KeyboardInterrupt."""
    stop = StopRequest()
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


def _prefetch(
    scorer: OnnxScorer, items: Iterator[ScoreItem], pool: ThreadPoolExecutor, depth: int
) -> Iterator[LoadedImage]:
    """Decode ahead in threads, at most `depth` images in flight (bounded memory)."""
    queue: deque[Future[LoadedImage]] = deque()
    for item in items:
        queue.append(pool.submit(load_item, scorer, item))
        if len(queue) >= depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _batches(images: Iterator[LoadedImage], size: int, stop: StopRequest
             ) -> Iterator[list[LoadedImage]]:
    """Batches of `size` images; a stop request ends the batch in hand, and the stream."""
    batch: list[LoadedImage] = []
    for image in images:
        batch.append(image)
        if len(batch) >= size or stop.requested:
            yield batch
            batch = []
        if stop.requested:
            return
    if batch and not stop.requested:
        yield batch


def check_options(source: str | os.PathLike[str], out: Path, batch_size: int, aggregate: str,
                   embryo_pattern: str | None, precision: str) -> re.Pattern[str] | None:
    """The user's errors first, before any work and before the bundle is read and hashed;
    returns the compiled `embryo_pattern`. Both engines (this one and
    `embryo_ml.score.distributed`) check their options here."""
    output_format(out)
    refuse_overwriting_inputs(source, out)
    if aggregate not in AGGREGATES:
        raise ConfigError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    regex = compile_embryo_pattern(embryo_pattern) if embryo_pattern is not None else None
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_precision(precision)
    return regex


RankRow = Callable[[dict[str, Any]], dict[str, Any]]  # an unranked row -> the row with its rank


class _Run:
    """One call of `score_images`: its files, the cohorts being ranked and the summary, with
    one method per step, in the order `score_images` calls them."""

    def __init__(self, out: Path, bundle: Bundle, scorer: OnnxScorer, aggregate: str,
                 settings: dict[str, Any]) -> None:
        self.out, self.bundle, self.scorer, self.settings = out, bundle, scorer, settings
        self.partial = partial_path(out)  # the rows until the run has finished
        self.columns = score_columns(bundle.classes, bundle.heads)
        self.cohorts = Cohorts(bundle.classes, bundle.positive_class, bundle.threshold, aggregate)
        self.summary = ScoreSummary(out, precision=scorer.precision,
                                    validation_warning=validation_warning(bundle))
        self.started = time.perf_counter()

    def start(self, items: Iterator[ScoreItem], resume: bool) -> Iterator[ScoreItem]:
        """Check and read back what `resume` continues, write the settings sidecar; returns
        the items still to score."""
        if resume:  # the settings of the rows resumed: the partial file's, else the output's
            own = self.partial.is_file() and settings_path(self.partial).is_file()
            check_resumable(self.partial if own else self.out, self.settings)  # before writing
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            done = read_back(self.out, self.columns, self.cohorts)
            self.summary.n_resumed = len(done)
            items = (item for item in items if item.path not in done)
        atomic_write_text(settings_path(self.partial), json.dumps(self.settings, indent=2) + "\n")
        return items

    def stream(self, items: Iterator[ScoreItem], batch_size: int, workers: int, progress: bool,
               append: bool) -> None:
        """Score `items` batch by batch into the partial file. After a stop request, or on any
        error, the partial file keeps its complete batches and the error (a stop:
        `ScoringInterrupted`) is raised."""
        writer = row_writer(self.out, self.columns, append=append)
        pool = ThreadPoolExecutor(workers)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="scoring", unit="img", initial=self.summary.n_resumed)
        try:
            with stop_on_signals() as stop:
                loaded = _prefetch(self.scorer, items, pool, depth=batch_size * 2)
                for batch in _batches(loaded, batch_size, stop):
                    self._write(writer, score_batch(self.scorer, batch))
                    if bar is not None:
                        bar.update(len(batch))
            pool.shutdown(wait=True, cancel_futures=True)
            writer.close()
        except BaseException as error:
            pool.shutdown(wait=True, cancel_futures=True)
            writer.close(complete=False)  # cut back to the last complete batch
            summary = self._kept_partial()
            if isinstance(error, KeyboardInterrupt) and not isinstance(error, ScoringInterrupted):
                raise ScoringInterrupted(summary) from None
            raise
        finally:
            if bar is not None:
                bar.close()
        if stop.requested:
            raise ScoringInterrupted(self._kept_partial())

    def _write(self, writer: Any, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            writer.write(row)
            self.cohorts.add(row)
            self.summary.n_images += 1
            if row["status"] == "ok":
                self.summary.n_scored += 1
            else:
                self.summary.n_failed += 1
                self.summary.failures.append((str(row["path"]), str(row["status"])))
        writer.flush()

    def _kept_partial(self) -> ScoreSummary:
        """The summary of a run that did not finish: its rows are in the partial file, an
        earlier complete `out` is untouched."""
        self.summary.out = self.partial
        self.summary.seconds = time.perf_counter() - self.started
        return self.summary

    def finish(self) -> ScoreSummary:
        """Rank the embryos; the partial file becomes `out` (with ranks; temp name, then
        rename) and is deleted last, after the embryos table and settings: until then it is
        what `--resume` continues."""
        def write_ranked(rank: RankRow) -> None:
            write_table(self.out, self.columns, map(rank, iter_file_rows(self.partial)))

        finish_scores(self.out, self.bundle, self.settings, self.cohorts, self.summary,
                      write_ranked, lambda: iter_file_rows(self.out))
        settings_path(self.partial).unlink(missing_ok=True)
        self.partial.unlink(missing_ok=True)
        self.summary.seconds = time.perf_counter() - self.started
        return self.summary


def day_mismatch_warning(column: str, n_flagged: int, n_scored: int) -> str | None:
    """One line for `n_flagged` of `n_scored` rows flagged `day_mismatch`, None when there are
    none: a typed day the images do not match moved their scores (a shifted column, swapped
    days)."""
    if not n_flagged:
        return None
    return (f"{n_flagged} of {n_scored} images do not look like the '{column}' their manifest "
            f"gives (flag {DAY_FLAG}), and their scores used that {column}: check the "
            f"manifest's '{column}' column for those images")


def finish_scores(out: Path, bundle: Bundle, settings: dict[str, Any], cohorts: Cohorts,
                  summary: ScoreSummary, write_ranked: Callable[[RankRow], None],
                  written_rows: Callable[[], Iterable[dict[str, Any]]]) -> None:
    """The end of a finished run, whichever engine scored it (this one, or
    `embryo_ml.score.distributed`): rank the embryos of `cohorts` (every row added), write
    `out` (`write_ranked(rank)` passes every unranked row through `rank` and replaces `out`
    atomically), the embryos table beside it, then the settings sidecar with the
    dataset-shift record of every row of the written output (`written_rows()`) and the run's
    day-prior warning (`summary.prior_warning`, set by the caller), where the report reads
    them."""
    cohorts.finish()
    write_ranked(lambda row: with_rank(row, cohorts))
    summary.embryos_out = embryos_path(out)  # an earlier run's stayed until now
    write_table(summary.embryos_out, EMBRYO_COLUMNS, cohorts.rows())
    summary.n_embryos = len(cohorts)
    # every row of the output, resumed ones too; the sidecar gains the record at the very end
    counts, n_scored = count_flags(written_rows(), (OOD_FLAG, DAY_FLAG))  # one read
    summary.shift = shift_record_of(bundle, summary.precision, counts[OOD_FLAG], n_scored)
    if bundle.day_check is not None:
        summary.day_warning = day_mismatch_warning(bundle.day_check["column"],
                                                   counts[DAY_FLAG], n_scored)
    said = {"prior_warning": summary.prior_warning} if summary.prior_warning else {}
    atomic_write_text(settings_path(out),
                      json.dumps({**settings, "shift": summary.shift, **said}, indent=2) + "\n")


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
    regex = check_options(source, out, batch_size, aggregate, embryo_pattern, precision)
    bundle = read_bundle(bundle_dir)  # verifies the hash before anything else
    items, coverage = prior_items(source, regex, bundle)
    scorer = OnnxScorer(bundle, threads, max_pixels, tta=tta, precision=precision)
    run = _Run(out, bundle, scorer, aggregate, run_settings(bundle, scorer, embryo_pattern))
    remaining = run.start(items, resume)
    run.stream(remaining, batch_size, workers or min(4, os.cpu_count() or 1), progress,
               append=resume)
    run.summary.prior_warning = coverage.warning() if coverage else None  # every item seen
    return run.finish()


def prior_items(source: str | os.PathLike[str], regex: re.Pattern[str] | None, bundle: Bundle
                ) -> tuple[Iterator[ScoreItem], PriorCoverage | None]:
    """The items to score, each with its day when the bundle has a day prior, and the counter
    of those it cannot apply to (None without a prior)."""
    coverage = PriorCoverage.of(bundle.prior)
    items = iter_items(source, regex, coverage.column if coverage else None)
    return (coverage.watch(items) if coverage else items), coverage
