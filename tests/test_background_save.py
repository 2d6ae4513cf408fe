"""Checkpoints written on a background thread: copies taken at save time, order kept, errors
raised, nothing lost at flush."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from embryo_ml.train.background_save import CheckpointWriter, snapshot
from embryo_ml.train.run_folder import load_checkpoint, save_checkpoint


def test_snapshot_is_a_copy_that_later_training_does_not_change():
    model = torch.nn.Linear(4, 2)
    state = {"model": model.state_dict(), "history": [{"epoch": 0}], "pair": (torch.ones(2), 1)}
    copy = snapshot(state)
    with torch.no_grad():
        model.weight.add_(1.0)  # an optimizer step changes the live tensors in place
    state["history"].append({"epoch": 1})
    assert not torch.equal(copy["model"]["weight"], model.weight)
    assert torch.equal(copy["model"]["weight"] + 1.0, model.weight)
    assert copy["history"] == [{"epoch": 0}] and isinstance(copy["pair"], tuple)


def test_writes_land_in_order_with_the_state_at_save_time(tmp_path: Path):
    written: list[tuple[str, float]] = []

    def slow_write(state: dict, path: Path) -> None:
        time.sleep(0.05)  # a write slower than the "training" between saves
        written.append((path.name, float(state["w"].sum())))
        save_checkpoint(state, path)

    weights = torch.zeros(3)
    writer = CheckpointWriter(slow_write)
    for epoch in range(4):
        weights += 1.0
        writer.save({"w": weights, "epoch": epoch}, tmp_path / f"e{epoch}.pt")
        writer.save({"w": weights, "epoch": epoch}, tmp_path / "last.pt")
    writer.flush()
    assert written == [(name, 3.0 * (e + 1)) for e in range(4)
                       for name in (f"e{e}.pt", "last.pt")]
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 3 and torch.equal(last["w"], torch.full((3,), 4.0))


def test_save_does_not_wait_for_the_disk_but_bounds_what_waits_in_memory(tmp_path: Path):
    release = threading.Event()
    started = []

    def blocked_write(state: dict, path: Path) -> None:
        started.append(path.name)
        release.wait(5)

    writer = CheckpointWriter(blocked_write, max_pending=2)
    began = time.perf_counter()
    writer.save({"a": 1}, tmp_path / "a.pt")
    writer.save({"b": 1}, tmp_path / "b.pt")
    assert time.perf_counter() - began < 1.0  # neither save waited for a write
    blocked = threading.Thread(target=writer.save, args=({"c": 1}, tmp_path / "c.pt"))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # a third waits: two snapshots at most in memory
    release.set()
    blocked.join(5)
    writer.flush()
    assert started == ["a.pt", "b.pt", "c.pt"]


def test_a_failed_write_is_raised_at_flush_after_the_others_finish(tmp_path: Path):
    def write(state: dict, path: Path) -> None:
        time.sleep(0.05)
        if state.get("fail"):
            raise OSError("disk full")
        save_checkpoint(state, path)

    writer = CheckpointWriter(write)
    writer.save({"fail": True}, tmp_path / "bad.pt")
    writer.save({"epoch": 1}, tmp_path / "last.pt")  # queued while the first still runs
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert not (tmp_path / "bad.pt").exists()


def test_a_failed_write_stops_the_next_save(tmp_path: Path):
    """The run stops at the epoch after a failed write (a full disk), instead of training on
    without a checkpoint to resume from."""
    def failing(state: dict, path: Path) -> None:
        raise OSError("disk full")

    writer = CheckpointWriter(failing)
    writer.save({"epoch": 0}, tmp_path / "last.pt")
    time.sleep(0.2)
    with pytest.raises(OSError, match="disk full"):
        writer.save({"epoch": 1}, tmp_path / "last.pt")
    writer.flush()  # nothing left pending: no second error
