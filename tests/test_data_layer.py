"""Manifests, folder trees, grouped splits and the train/eval transforms."""

import logging
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest

from embryo_ml.config import AugmentConfig
from embryo_ml.data.manifest import iter_image_files, load_labelled, load_table, read_manifest
from embryo_ml.data.preprocess import preprocess
from embryo_ml.data.splits import grouped_split
from embryo_ml.data.transforms import build_eval_transform, build_train_transform
from embryo_ml.errors import DataError
from tests.conftest import write_image

PIXELS = np.full((8, 8), 100, np.uint8)


def test_manifest_paths_resolve_against_its_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", PIXELS)
    (tmp_path / "m.csv").write_text("path,label,patient_id,extra\nimgs/a.png,good,007,x\n")
    table = read_manifest(tmp_path / "m.csv")
    assert table.loc[0, "path"] == str((tmp_path / "imgs" / "a.png").resolve())
    assert table.loc[0, "patient_id"] == "007"  # ids stay text
    assert table.loc[0, "extra"] == "x"  # extra columns are kept


def test_folder_per_class_tree(tmp_path: Path) -> None:
    for label in ("good", "poor"):
        for i in range(2):
            write_image(tmp_path / label / "sub" / f"{i}.png", PIXELS)
    (tmp_path / "good" / "readme.txt").write_text("not an image")
    table = load_table(tmp_path)
    assert sorted(table["label"]) == ["good", "good", "poor", "poor"]
    assert len(list(iter_image_files(tmp_path))) == 4


def test_bad_manifests(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_table(tmp_path / "missing.csv")
    (tmp_path / "nopath.csv").write_text("file,label\na.png,good\n")
    with pytest.raises(DataError, match="no 'path' column"):
        read_manifest(tmp_path / "nopath.csv")
    (tmp_path / "nolabel.csv").write_text("path,label\na.png,good\nb.png,\n")
    with pytest.raises(DataError, match="1 row\\(s\\) have no label"):
        load_labelled(tmp_path / "nolabel.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_table(tmp_path / "empty")


def _table(n_patients: int = 30, per_patient: int = 4) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        for e in range(per_patient):
            label = "good" if (p + e) % 3 else "poor"
            rows += [{"path": f"{p}_{e}_{f}.png", "label": label, "patient_id": f"P{p}",
                      "embryo_id": f"P{p}-E{e}"} for f in range(2)]
    return pd.DataFrame(rows)


def test_grouped_split_has_no_patient_on_both_sides_and_is_stratified() -> None:
    table = _table()
    train, val, column = grouped_split(table, 0.2, seed=1)
    assert column == "patient_id"
    assert not set(table.patient_id[train]) & set(table.patient_id[val])
    assert len(train) + len(val) == len(table)
    assert 0.1 < len(val) / len(table) < 0.3
    rate = (table.label == "good").mean()
    assert abs((table.label[val] == "good").mean() - rate) < 0.15
    again, _, _ = grouped_split(table, 0.2, seed=1)
    other, _, _ = grouped_split(table, 0.2, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_split_falls_back_to_embryo_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    table = _table().drop(columns="patient_id")
    with caplog.at_level(logging.WARNING):
        train, val, column = grouped_split(table, 0.25, seed=0)
    assert column == "embryo_id" and "embryo_id" in caplog.text
    assert not set(table.embryo_id[train]) & set(table.embryo_id[val])


def test_split_refuses_too_few_groups() -> None:
    with pytest.raises(DataError, match="distinct patient_id"):
        grouped_split(_table(n_patients=3), 0.2, seed=0)


def test_eval_transform_matches_scoring_preprocess() -> None:
    """Validation and the ONNX scorer must see identical tensors."""
    image = np.random.default_rng(0).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    via_albumentations = build_eval_transform(48, mean, std)(image=image)["image"]
    via_scorer = preprocess(image, 48, mean, std)
    assert np.allclose(via_albumentations.transpose(2, 0, 1), via_scorer, atol=1e-5)


def test_train_transform_augments_and_keeps_shape() -> None:
    image = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    transform = build_train_transform(64, (0.5,) * 3, (0.25,) * 3, AugmentConfig(), seed=0)
    assert isinstance(transform, A.Compose)
    outputs = [transform(image=image)["image"] for _ in range(6)]
    assert outputs[0].shape == (64, 64, 3) and outputs[0].dtype == np.float32
    # random augmentation differs call to call
    assert any(not np.allclose(outputs[0], other) for other in outputs[1:])
    again = build_train_transform(64, (0.5,) * 3, (0.25,) * 3, AugmentConfig(), seed=0)
    assert np.array_equal(again(image=image)["image"], outputs[0])  # repeatable by seed
