"""The shortcut data set of the synthetic generator (`label_rule="day"`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from embryo_ml.data.synthetic import generate_dataset


def test_day_rule_keeps_the_images_and_labels_follow_the_day_only(tmp_path: Path) -> None:
    default = pd.read_csv(generate_dataset(tmp_path / "a", n=200, size=48, seed=4))
    shortcut = pd.read_csv(generate_dataset(tmp_path / "b", n=200, size=48, seed=4,
                                            label_rule="day", day_good_rates=(0.1, 0.9)))
    # the same embryos, drawn and rendered identically: only the label (and folder) changes
    assert list(default["embryo_id"]) == list(shortcut["embryo_id"])
    assert list(default["day"]) == list(shortcut["day"])
    assert list(default["grade"].fillna("")) == list(shortcut["grade"].fillna(""))
    for a, b in zip(default["path"][:20], shortcut["path"][:20]):
        assert (tmp_path / "a" / a).read_bytes() == (tmp_path / "b" / b).read_bytes()
    good = shortcut["label"] == "good"
    rates = good.groupby(shortcut["day"]).mean()
    assert rates[3] < 0.25 and rates[5] > 0.75
    # within a day the label says nothing about the morphology the image was drawn with
    looks_good = default["label"] == "good"
    for day in (3, 5):
        rows = shortcut["day"] == day
        agreement = (good[rows] == looks_good[rows]).mean()
        assert abs(agreement - 0.5) < 0.2  # half of each day looks good; labels independent
    for path, label in zip(shortcut["path"], shortcut["label"]):
        assert path.startswith(f"images/{label}/")


def test_day_rule_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label_rule"):
        generate_dataset(tmp_path, n=4, label_rule="stage")
    with pytest.raises(ValueError, match="day_good_rates"):
        generate_dataset(tmp_path, n=4, label_rule="day", day_good_rates=(0.1, 1.5))
