"""`embryo-ml score --engine dask`: the same scoring, spread over a Dask cluster, resumable.

The driver (this module) streams the images (`iter_items`: a folder is walked lazily) into
shards of `shard_size` images and keeps at most `IN_FLIGHT_PER_THREAD` shards per worker thread
submitted, so the listing is never held whole. Each shard is one task (`score_shard` in
`embryo_ml.score.shard`): the worker scores it with the local engine's own `load_item` and
`score_batch`, so both engines give the same rows, and writes a part file. The shard size is
rounded up to a multiple of the batch size (`whole_batches`), so the model sees the same batches
as in a local run: ONNX Runtime's results depend on the batch in the last bits, enough to move
an image across a flag's limit. The files, and which parts count when a run is resumed, are
described in `embryo_ml.score.parts`. When every shard is done the driver does what the local
engine does at its end (`finish_scores`): ranks the embryos, writes the output (one file for
.csv/.jsonl, a Parquet dataset folder for .parquet), the embryos table, and the settings with
the dataset-shift record of every row.

Paths go to the workers as absolute paths: the workers need embryo-ml installed (with its
scoring dependencies) and read access to the images and the bundle at the same paths, and write
access to the folder of `--out` (a shared file system on a multi-machine cluster).

What survives what:

- `--resume` keeps every part that counts, skips their images and scores the rest into new
  shards; it also continues a finished output of either engine, or the local engine's partial
  file, as the local engine does. A run with other settings (bundle, model, --tta,
  --embryo-pattern) is refused.
- SIGINT / SIGTERM on the driver: no new shard is submitted, the shards in flight finish
  (a second signal cancels them at once), finished parts are kept, and `ScoringInterrupted` is
  raised; its summary's `out` names the staging folder.
- A worker lost mid-shard (killed, out of memory, its machine gone): the scheduler runs the
  shard again elsewhere (up to `distributed.scheduler.allowed-failures` times); an exception in
  the shard is retried `SHARD_RETRIES` times.
- A shard that still fails is not written as rows: a failure of a whole shard is the cluster's
  or the environment's (a lost machine, a worker without the bundle, a full disk), not its
  images', and rows saying so would make `--resume` skip those images for good. The other
  shards go on (unless the shard's own code failed, which would recur on every shard: then no
  new shard is submitted), and the run ends with `ShardsFailed`, one message with the number of
  images left out, the first of their paths, the file that lists them all
  (`OUT.parts/failed.txt`) and the error; the output is not written, and `--resume` scores
  exactly those images (and any not yet submitted). An image that cannot be decoded is a row
  with its `status`, as with the local engine.

Progress is a bar of the images scored across the cluster, advanced as shards finish; the
dashboard's address is printed when the cluster has one. dask is imported only here (and in
`embryo_ml.score.cluster`), only when this engine runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from itertools import chain, islice
from pathlib import Path
from typing import Any

from embryo_ml.data.images import DEFAULT_MAX_PIXELS
from embryo_ml.data.scores_file import (
    DATASET_COMPLETE,
    iter_file_rows,
    partial_path,
    recover_rows,
    settings_path,
)
from embryo_ml.errors import ConfigError, EmbryoMLError
from embryo_ml.export.bundle import Bundle, identity, read_bundle, validation_warning
from embryo_ml.score.batch import score_columns
from embryo_ml.score.cluster import INSTALL_HINT, dask_client
from embryo_ml.score.cohort import Cohorts
from embryo_ml.score.items import ScoreItem
from embryo_ml.score.outputs import check_resumable, run_settings
from embryo_ml.score.parts import (
    Staging,
    output_rows,
    parts_rows,
    write_output,
)
from embryo_ml.score.scorer import (
    ScoreSummary,
    ScoringInterrupted,
    check_options,
    finish_scores,
    prior_items,
    stop_on_signals,
)
from embryo_ml.score.session import OnnxScorer
from embryo_ml.score.shard import ShardJob, ShardResult, score_shard

DEFAULT_SHARD_SIZE = 256  # images per task: ~2-4 s of work per core at 224 px
IN_FLIGHT_PER_THREAD = 2  # shards submitted per worker thread (one queued behind each running)
SHARD_RETRIES = 2  # an exception raised by a shard is retried this many times
FAILED_SHOWN = 10  # image paths of failed shards named in the message (all in failed.txt)


class ShardsFailed(EmbryoMLError):
    """Shards failed after their retries; `summary` counts what the others scored and
    `images` lists the paths left for `--resume`."""

    def __init__(self, message: str, summary: ScoreSummary, images: list[str]) -> None:
        super().__init__(message)
        self.summary = summary
        self.images = images


def _chunks(items: Iterator[ScoreItem], size: int) -> Iterator[list[ScoreItem]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _lost_worker(error: BaseException) -> bool:
    """True when the shard failed because its worker died, not because its code raised."""
    from distributed.scheduler import KilledWorker

    return isinstance(error, KilledWorker)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{error.__class__.__name__}: {text[:300]}"


class _DaskRun:
    """One call of `score_images_dask`, one method per step (start, stream, finish)."""

    def __init__(self, out: Path, bundle: Bundle, job: ShardJob, precision: str, aggregate: str,
                 settings: dict[str, Any]) -> None:
        self.out, self.bundle, self.job, self.settings = out, bundle, job, settings
        self.columns = list(job.columns)
        self.staging = Staging(out)
        self.cohorts = Cohorts(bundle.classes, bundle.positive_class, bundle.threshold, aggregate)
        self.summary = ScoreSummary(out, precision=precision,
                                    validation_warning=validation_warning(bundle))
        self.own_parts: list[str] = []
        self.failed: list[tuple[list[ScoreItem], BaseException]] = []
        self.broken = False  # a shard's own code failed: it would on the next ones too
        self.token = os.urandom(4).hex()  # task keys unique on a cluster shared by runs
        self.started = time.perf_counter()

    def start(self, items: Iterator[ScoreItem], resume: bool) -> Iterator[ScoreItem]:
        """Stage what `resume` continues (or start afresh), begin the attempt; returns the
        items still to score, with absolute paths for the workers."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        staging = self.staging
        if not resume:
            staging.remove()  # a stopped run's parts: without --resume, everything afresh
        elif staging.exists():
            check_resumable(staging.index, self.settings)
        else:
            self._seed_from_output()
        staging.begin(self.settings)
        done = {str(row["path"]) for row in parts_rows(staging.paths())}
        self.summary.n_resumed = len(done)
        return (replace(item, file=os.path.abspath(item.file))
                for item in items if item.path not in done)

    def _seed_from_output(self) -> None:
        """`--resume` without staging: continue an earlier output (or the local engine's
        partial file), its settings checked first."""
        out, staging = self.out, self.staging
        if out.is_dir():  # a finished Parquet dataset of this engine
            finished = (out / DATASET_COMPLETE).is_file()
            staging.seed(iter_file_rows(out) if finished else (), self.columns,
                         settings_path(out))
            try:
                check_resumable(staging.index, self.settings)
            except ConfigError:
                staging.remove()
                raise
            return
        partial = partial_path(out)
        own = partial.is_file() and settings_path(partial).is_file()
        check_resumable(partial if own else out, self.settings)  # before anything is written
        staging.seed(recover_rows(out, self.columns), self.columns,
                     settings_path(partial if own else out))
        settings_path(partial).unlink(missing_ok=True)  # its rows are staged now
        partial.unlink(missing_ok=True)

    def stream(self, client: Any, items: Iterator[ScoreItem], shard_size: int,
               progress: bool) -> None:
        """Score `items` shard by shard on the cluster, at most a few shards in flight.
        Raises `ScoringInterrupted` after a stop request, `ShardsFailed` after failures."""
        from distributed import as_completed
        from tqdm.auto import tqdm

        shards = enumerate(_chunks(items, shard_size))
        limit = IN_FLIGHT_PER_THREAD * max(1, sum(client.nthreads().values()))
        in_flight: dict[Any, list[ScoreItem]] = {}
        with tqdm(desc="scoring", unit="img", initial=self.summary.n_resumed,
                  disable=not progress) as bar, stop_on_signals() as stop:
            try:
                pending = as_completed(loop=client.loop)
                self._submit(client, shards, pending, in_flight, limit)
                for future in pending:
                    self._collect(future, in_flight.pop(future), bar)
                    if not (stop.requested or self.broken):
                        self._submit(client, shards, pending, in_flight, limit)
            except KeyboardInterrupt:  # a second signal: what is in flight is cancelled
                client.cancel(list(in_flight))
                raise ScoringInterrupted(self._kept()) from None
            except BaseException:  # the driver's own error (or the cluster's): kept as well
                client.cancel(list(in_flight))
                self._kept()
                raise
        if stop.requested:
            raise ScoringInterrupted(self._kept())
        if self.failed:
            raise self._failure()

    def _submit(self, client: Any, shards: Iterator[tuple[int, list[ScoreItem]]],
                pending: Any, in_flight: dict[Any, list[ScoreItem]], limit: int) -> None:
        """Submit shards until `limit` are in flight or there are no more."""
        while len(in_flight) < limit:
            taken = next(shards, None)
            if taken is None:
                return
            shard, items = taken
            future = client.submit(score_shard, self.job, items, str(self.staging.part(shard)),
                                   key=f"score-shard-{self.token}-{shard}",
                                   retries=SHARD_RETRIES, pure=False)
            in_flight[future] = items
            pending.add(future)

    def _collect(self, future: Any, items: list[ScoreItem], bar: Any) -> None:
        """Count a finished shard; remember a failed one with its images."""
        if future.status != "finished":
            try:
                error = future.exception()
            except BaseException as cancelled:  # CancelledError: no exception to give
                error = cancelled
            self.failed.append((items, error))
            self.broken = self.broken or not _lost_worker(error)
            return
        result: ShardResult = future.result()
        self.own_parts.append(result.part)
        summary = self.summary
        summary.n_images += result.n_rows
        summary.n_scored += result.n_scored
        summary.n_failed += len(result.failures)
        summary.failures.extend(result.failures)
        bar.update(result.n_rows)

    def _kept(self) -> ScoreSummary:
        """The summary of a run that did not finish: its rows are in the staging folder."""
        self.summary.out = self.staging.folder
        self.summary.seconds = time.perf_counter() - self.started
        return self.summary

    def _failure(self) -> ShardsFailed:
        images = [item.path for items, _ in self.failed for item in items]
        listing = self.staging.list_failed(images)
        shown = ", ".join(images[:FAILED_SHOWN])
        more = f" and {len(images) - FAILED_SHOWN} more" if len(images) > FAILED_SHOWN else ""
        stopped = (" No further shard was submitted: this error would recur on every shard."
                   if self.broken else "")
        message = (
            f"{len(self.failed)} shard(s) failed after their retries "
            f"({_one_line(self.failed[0][1])}); their {len(images)} image(s) are not scored: "
            f"{shown}{more} (all listed in {listing}).{stopped} The {len(self.own_parts)} "
            f"finished shard(s) are kept in {self.staging.folder}; fix the cause (the workers "
            "need embryo-ml installed and read access to the images and the bundle) and run "
            "the same command with --resume")
        return ShardsFailed(message, self._kept(), images)

    def finish(self) -> ScoreSummary:
        """Every shard is done: rank and write the output from the parts that count, exactly
        as the local engine finishes, then delete the staging folder (last)."""
        parts = self.staging.paths(self.own_parts)
        for row in parts_rows(parts):
            self.cohorts.add(row)

        def write_ranked(rank: Any) -> None:
            write_output(self.out, self.columns, parts, rank)

        finish_scores(self.out, self.bundle, self.settings, self.cohorts, self.summary,
                      write_ranked, lambda: output_rows(self.out))
        self.staging.remove()
        self.summary.seconds = time.perf_counter() - self.started
        return self.summary


def whole_batches(shard_size: int, batch_size: int) -> int:
    """`shard_size` rounded up to a multiple of `batch_size`: a shard's batches are then the
    local engine's batches, and ONNX Runtime's sums (which depend a little on the batch) the
    same, to the last bit."""
    return -(-shard_size // batch_size) * batch_size


def _check_cluster_options(workers: int | None, scheduler: str | None, shard_size: int) -> None:
    if workers is not None and scheduler is not None:
        raise ConfigError("--workers starts a cluster on this machine, --scheduler uses a "
                          "running one: give one of them")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")


def score_images_dask(
    source: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    threads: int | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resume: bool = False,
    tta: bool = False,
    aggregate: str = "mean",
    embryo_pattern: str | None = None,
    precision: str = "auto",
) -> ScoreSummary:
    """`score_images` on a Dask cluster: a local one of `workers` single-threaded processes
    (default: one per core) or the running one at `scheduler`. Same rows, same files (a
    .parquet `out` is a dataset folder; see `embryo_ml.score.parts`), same options; `threads`
    are ONNX Runtime threads per worker (default: the worker's thread count). Raises
    `ScoringInterrupted` after a clean stop, `ShardsFailed` when shards failed."""
    out = Path(out)
    regex = check_options(source, out, batch_size, aggregate, embryo_pattern, precision)
    _check_cluster_options(workers, scheduler, shard_size)
    bundle = read_bundle(bundle_dir)  # verifies the hash before anything else
    items, coverage = prior_items(source, regex, bundle)
    # The model is loaded here once too: a bundle it cannot run fails before any cluster starts.
    scorer = OnnxScorer(bundle, 1, max_pixels, tta=tta, precision=precision)
    settings = run_settings(bundle, scorer, embryo_pattern)
    job = ShardJob(str(Path(bundle_dir).resolve()), identity(bundle), threads, max_pixels, tta,
                   precision, batch_size, tuple(score_columns(bundle.classes, bundle.heads)))
    run = _DaskRun(out, bundle, job, scorer.precision, aggregate, settings)
    del scorer
    remaining = run.start(items, resume)
    first = next(remaining, None)
    if first is not None:  # else every image is in the output already: no cluster needed
        with dask_client(workers, scheduler, announce=progress) as client:
            run.stream(client, chain([first], remaining), whole_batches(shard_size, batch_size),
                       progress)
    run.summary.prior_warning = coverage.warning() if coverage else None  # every item seen
    return run.finish()


__all__ = ["DEFAULT_SHARD_SIZE", "INSTALL_HINT", "ShardsFailed", "score_images_dask"]
