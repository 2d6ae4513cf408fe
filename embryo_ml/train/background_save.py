"""Checkpoints written on a background thread, so the next epoch trains while they reach the disk.

`last.pt` (model, EMA and two optimizer moments: 180 MB for resnet18) and `best.pt` are written
after every epoch, atomically and with fsync; in the main thread that cost 0.65 s an epoch of a
4-epoch resnet18 run at 128 px on 2 CPU cores (about 4% of the run). `CheckpointWriter.save`
copies the state's tensors (tens of milliseconds: the training step that follows changes the live
ones in place) and hands the write to one worker thread, which writes in the order submitted.

Nothing finished is lost: `flush` (called when the epochs end, also on an error or Ctrl-C)
waits for every write; a failed write raises at the next `save` or at `flush`; every file is
still written atomically, so an interrupted write leaves the previous one whole. At most
`max_pending` snapshots wait in memory: `save` blocks on the oldest beyond that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch


def snapshot(value: Any) -> Any:
    """`value` with every tensor replaced by a CPU copy of it (dicts, lists, tuples walked)."""
    if isinstance(value, torch.Tensor):
        copy = value.detach()
        return copy.to("cpu", copy=True) if copy.device.type != "cpu" else copy.clone()
    if isinstance(value, Mapping):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [snapshot(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


class CheckpointWriter:
    """Writes `(state, path)` with `write(state, path)` in submission order on one thread."""

    def __init__(self, write: Callable[[Any, Path], None], max_pending: int = 2) -> None:
        self._write = write
        self._max_pending = max_pending
        self._pending: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def save(self, state: Any, path: str | Path) -> None:
        """Queue a write of a copy of `state` to `path`; raises a failed earlier write."""
        self._collect(keep=self._max_pending - 1)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="embryo-ml-checkpoint")
        self._pending.append(self._pool.submit(self._write, snapshot(state), Path(path)))

    def flush(self) -> None:
        """Wait for every queued write; raises the first that failed."""
        try:
            self._collect(keep=0)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _collect(self, keep: int) -> None:
        """Wait until at most `keep` writes are pending; re-raise a failed one."""
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            self._pending.popleft().result()
