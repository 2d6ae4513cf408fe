"""The Dask cluster a distributed scoring run uses: one started on this machine
(`--workers N`), or a running one (`--scheduler ADDRESS`: `dask scheduler` with `dask worker`s,
dask-jobqueue on Slurm, dask-kubernetes, ...).

A local cluster has N worker processes of one thread each (processes, not threads: decoding and
the model then run in parallel without sharing one interpreter), one per core by default. An
address where no scheduler answers fails within `CONNECT_TIMEOUT_S` with one `ConfigError` line.
dask and distributed are imported here only, when a run asks for them (`pip install
'embryo-ml[dask]'`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from embryo_ml.errors import ConfigError

CONNECT_TIMEOUT_S = 5
WORKER_SETUP = "embryo_ml.score.shard"  # its `dask_setup` runs in each local worker as it starts
INSTALL_HINT = "pip install 'embryo-ml[dask]'"


def _distributed() -> Any:  # -> the distributed module
    try:
        import distributed
    except ImportError:
        raise ConfigError(f"--engine dask needs dask and distributed ({INSTALL_HINT})") from None
    return distributed


def _connect(distributed: Any, address: str) -> Any:  # -> distributed.Client
    try:
        return distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        reason = " ".join(str(error).split()) or error.__class__.__name__
        raise ConfigError(
            f"--scheduler {address}: no Dask scheduler answered ({reason}); start one "
            "(`dask scheduler`, then `dask worker ADDRESS` on the machines that score) or "
            "use --workers N for a cluster on this machine") from None


def _say_where(client: Any, local: bool) -> None:
    """The dashboard's address (and how many workers there are) on stderr, for people."""
    link = client.dashboard_link
    if link and local and importlib.util.find_spec("bokeh") is None:
        link += " (its pages need bokeh: pip install bokeh)"
    if link:
        print(f"dask dashboard: {link}", file=sys.stderr)
    if not client.nthreads():
        print("the scheduler has no workers yet: shards wait until one joins", file=sys.stderr)


@contextmanager
def _quiet_distributed() -> Iterator[None]:
    """distributed's INFO lines (every worker's start and close) are not for the person
    scoring; its warnings and errors still show."""
    logs = logging.getLogger("distributed")
    level = logs.level
    logs.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logs.setLevel(level)


@contextmanager
def dask_client(workers: int | None, scheduler: str | None, announce: bool) -> Iterator[Any]:
    """A `distributed.Client` for the run, closed (and a local cluster shut down) on exit.
    `announce`: print the dashboard's address."""
    distributed = _distributed()
    with _quiet_distributed():
        cluster = None
        if scheduler is not None:
            client = _connect(distributed, scheduler)
        else:
            cluster = distributed.LocalCluster(n_workers=workers or os.cpu_count() or 1,
                                               threads_per_worker=1, processes=True,
                                               dashboard_address=":0", preload=[WORKER_SETUP])
            client = distributed.Client(cluster, set_as_default=False)
        try:
            if announce:
                _say_where(client, local=cluster is not None)
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
