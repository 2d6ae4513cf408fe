"""The training-run folder's checkpoint format (embryo_ml.train.run_folder): versioned writes,
reads that refuse an unknown version in one line, and pre-versioning files read as version 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from embryo_ml.errors import DataError
from embryo_ml.train.run_folder import (
    BEST_FILE,
    CHECKPOINT_FORMAT,
    FORMAT_KEY,
    LAST_FILE,
    BestCheckpoint,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from tests.data.golden.make_golden import write_best_pt


def _best(**extra: object) -> BestCheckpoint:
    return BestCheckpoint(
        state_dict={"fc.weight": torch.arange(6.0).reshape(2, 3)}, model_name="test_resnet",
        classes=["good", "poor"], positive_class="good", image_size=64, mean=[0.5] * 3,
        std=[0.25] * 3, epoch=2, config={"model": {"name": "test_resnet"}, "seed": 3},
        val_metrics={"auc": 0.75}, heads={}, run_id="abc", extra=dict(extra))


def test_best_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / BEST_FILE
    save_best(_best(refit=True), path)
    stored = torch.load(path, weights_only=True)
    assert stored[FORMAT_KEY] == CHECKPOINT_FORMAT == 1
    assert stored["refit"] is True and stored["classes"] == ["good", "poor"]  # the file's layout
    back = load_best(path)
    assert back.extra == {"refit": True} and back.format_version == 1
    assert (back.classes, back.image_size, back.mean, back.run_id) == (
        ["good", "poor"], 64, [0.5] * 3, "abc")
    assert torch.equal(back.state_dict["fc.weight"], _best().state_dict["fc.weight"])


def test_last_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / LAST_FILE
    save_checkpoint({"epoch": 4, "history": [{"epoch": 0, "train_loss": 0.7}]}, path)
    state = load_checkpoint(path)
    assert state == {"epoch": 4, "history": [{"epoch": 0, "train_loss": 0.7}], FORMAT_KEY: 1}


@pytest.mark.parametrize("version", [2, 0, "1", True])
def test_an_unknown_version_is_refused_in_one_line(tmp_path: Path, version: object) -> None:
    path = tmp_path / LAST_FILE
    torch.save({"epoch": 0, FORMAT_KEY: version}, path)
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and repr(version) in message and "(1)" in message


def test_a_checkpoint_without_a_version_is_read_as_version_1(tmp_path: Path) -> None:
    """The pre-versioning layout (the golden run's best.pt, `make_golden.write_best_pt`) is
    version 1's."""
    (tmp_path / "golden").mkdir()
    golden_best = write_best_pt(tmp_path / "golden")
    stored = torch.load(golden_best, weights_only=True)
    assert FORMAT_KEY not in stored
    legacy = load_best(golden_best)
    assert legacy.format_version == 1 and legacy.extra == {}
    assert legacy.classes == stored["classes"] and legacy.epoch == stored["epoch"]
    copy = tmp_path / BEST_FILE
    shutil.copy2(golden_best, copy)
    save_best(load_best(copy), copy)  # rewritten: the same checkpoint, now with its version
    rewritten = torch.load(copy, weights_only=True)
    assert rewritten[FORMAT_KEY] == 1 and rewritten.keys() - {FORMAT_KEY} == stored.keys()


def test_a_file_that_is_not_a_best_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / BEST_FILE
    torch.save({"epoch": 0}, path)
    with pytest.raises(DataError, match="no state_dict, model_name"):
        load_best(path)
    with pytest.raises(DataError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
