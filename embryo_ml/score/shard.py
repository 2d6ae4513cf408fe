"""One shard of a distributed scoring run, as a Dask worker runs it (`score_shard`).

A shard is a list of `ScoreItem`s. The worker scores it with the local engine's own steps,
`load_item` then `score_batch` (`embryo_ml.score.batch`), batch by batch, so both engines give the
same rows, and writes them to the shard's part file in one go (`write_table`: a temporary name
beside it, fsync'ed, renamed; `embryo_ml.fileio`): a part is complete or absent, whatever
happens to the worker. A retried shard writes the same part again.

Each worker process keeps one `OnnxScorer` per bundle and settings (`_SCORERS`), built by its
first shard: the bundle is read and verified once per process, not once per shard. Its ONNX
Runtime threads are the worker's own thread count (`--nthreads` of `dask worker`; 1 in the
local cluster), not the machine's cores, which the other workers on it share; `--threads`
overrides it. The bundle's identity (`bundle_sha256`) must be the driver's: a worker whose copy
differs refuses the shard rather than mix two models in one file.

No dask import at module level: the scoring path imports this module without it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embryo_ml.data.scores_file import write_table
from embryo_ml.errors import BundleError
from embryo_ml.export.bundle import identity, read_bundle
from embryo_ml.score.batch import load_item, score_batch
from embryo_ml.score.items import ScoreItem
from embryo_ml.score.session import OnnxScorer

MAX_CACHED_SCORERS = 4  # a long-lived worker serving runs of several bundles keeps the last few


@dataclass(frozen=True)
class ShardJob:
    """What every shard of one run shares (small: pickled with each task)."""

    bundle_dir: str  # absolute, as the workers see it
    bundle_sha256: str  # the identity the driver verified
    threads: int | None  # ONNX Runtime intra-op threads; None: the worker's thread count
    max_pixels: int
    tta: bool
    precision: str
    batch_size: int
    columns: tuple[str, ...]


@dataclass(frozen=True)
class ShardResult:
    """What a shard tells the driver: its part file's name and its counts, never its rows."""

    part: str
    n_rows: int
    n_scored: int
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, status), not ok


_SCORERS: dict[tuple[object, ...], OnnxScorer] = {}
_SCORERS_LOCK = threading.Lock()


def dask_setup(worker: object) -> None:
    """Run by each worker of a cluster the driver starts, as it starts (`preload`): Ctrl-C in a
    terminal reaches every process of its group, and the driver handles it (no new shard, the
    ones in flight finish), so its workers ignore it rather than die under their shards."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_threads() -> int:
    """The thread count of the Dask worker this runs in (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError):  # ValueError: not inside a worker
        return 1


def shard_scorer(job: ShardJob) -> OnnxScorer:
    """This process's scorer for `job`, built (and the bundle verified) by its first shard."""
    threads = job.threads or worker_threads()
    key = (job.bundle_dir, job.bundle_sha256, threads, job.max_pixels, job.tta, job.precision)
    with _SCORERS_LOCK:
        scorer = _SCORERS.get(key)
        if scorer is None:
            bundle = read_bundle(job.bundle_dir)  # verifies the hash
            if identity(bundle) != job.bundle_sha256:
                raise BundleError(f"bundle {job.bundle_dir} on this worker is not the one the "
                                  "run was started with (bundle_sha256 differs); give every "
                                  "worker the same bundle")
            scorer = OnnxScorer(bundle, threads, job.max_pixels, tta=job.tta,
                                precision=job.precision)
            while len(_SCORERS) >= MAX_CACHED_SCORERS:
                _SCORERS.pop(next(iter(_SCORERS)))
            _SCORERS[key] = scorer
    return scorer


def score_shard(job: ShardJob, items: Sequence[ScoreItem], part: str) -> ShardResult:
    """Score `items` into the part file `part` (absolute path; its extension sets the format);
    returns its counts. An unreadable image is a row whose `status` says why, as locally."""
    scorer = shard_scorer(job)
    rows = []
    for start in range(0, len(items), job.batch_size):
        batch = [load_item(scorer, item) for item in items[start:start + job.batch_size]]
        rows.extend(score_batch(scorer, batch))
    write_table(part, job.columns, rows)
    failures = [(str(row["path"]), str(row["status"])) for row in rows if row["status"] != "ok"]
    return ShardResult(Path(part).name, len(rows), len(rows) - len(failures), failures)
