"""`check_data`: counts, unreadable files, exact and near duplicates, leakage between splits."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from embryo_ml.data.check import CheckReport, check_data
from embryo_ml.data.check_format import format_report
from embryo_ml.data.manifest import load_table
from embryo_ml.data.near_duplicates import detail_hash, near_duplicate_groups, perceptual_hash
from embryo_ml.errors import DataError
from tests.conftest import SHARED_DATA, write_image

STAGE = SHARED_DATA / "stage-grade" / "data"


def texture(seed: int, channels: int = 3) -> np.ndarray:
    """A smooth random 48x48 texture: coarse noise upsampled, like blobs under a microscope."""
    rng = np.random.default_rng(seed)
    shape = (12, 12, channels) if channels > 1 else (12, 12)
    coarse = rng.integers(0, 256, shape, dtype=np.uint8)
    return cv2.resize(coarse, (48, 48), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("check")
    a = texture(1)
    paths = {
        "a": write_image(root / "good" / "a.png", a),
        "a_jpeg": write_image(root / "good" / "a_resaved.jpg", a, quality=90),
        "a_bright": write_image(root / "poor" / "a_bright.png",
                                np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)),
        "b": write_image(root / "good" / "b.png", texture(2)),
        "gray": write_image(root / "poor" / "gray.png", texture(3, channels=1)),
        "deep": write_image(root / "poor" / "deep.png",
                            texture(4, channels=1).astype(np.uint16) * 257),
    }
    paths["a_copy"] = root / "poor" / "copy_of_a.png"
    shutil.copyfile(paths["a"], paths["a_copy"])
    paths["empty"] = root / "poor" / "empty.png"
    paths["empty"].write_bytes(b"")
    paths["text"] = root / "good" / "notes.jpg"
    paths["text"].write_text("not an image\n")
    return {name: str(path.resolve()) for name, path in paths.items()}


def manifest(files: dict[str, str], names: list[str] | None = None) -> pd.DataFrame:
    """One row per file; label from the folder, patient p1 owns b and gray, embryo e1 = a*."""
    names = names or list(files)
    rows = [{"path": files[n], "label": Path(files[n]).parent.name,
             "patient_id": {"b": "p1", "gray": "p1"}.get(n, f"p-{n}"),
             "embryo_id": "e1" if n.startswith("a") else f"e-{n}",
             "day": 5 if n.startswith("a") else 3} for n in names]
    table = pd.DataFrame(rows)
    for column in ("label", "patient_id", "embryo_id"):
        table[column] = table[column].astype("string")
    return table


@pytest.fixture(scope="module")
def report(files: dict[str, str]) -> CheckReport:
    return check_data(manifest(files), workers=2)


def test_exact_duplicates_are_byte_copies(report: CheckReport, files: dict[str, str]) -> None:
    assert report.exact_duplicates == [sorted([files["a"], files["a_copy"]])]


def test_near_duplicates_find_resaved_and_brightened(report: CheckReport,
                                                     files: dict[str, str]) -> None:
    expected = sorted(files[n] for n in ("a", "a_copy", "a_jpeg", "a_bright"))
    assert report.near_duplicates == [expected]
    assert files["b"] not in report.near_duplicates[0]
    # a copy in two class folders is a label conflict worth a look
    labels = {tuple(c["labels"]) for c in report.label_conflicts}
    assert ("good", "poor") in labels


def test_unreadable_files_are_listed_with_reasons(report: CheckReport,
                                                  files: dict[str, str]) -> None:
    reasons = dict(report.unreadable)
    assert set(reasons) == {files["empty"], files["text"]}
    assert "empty" in reasons[files["empty"]]
    assert "not a readable image" in reasons[files["text"]]


def test_modes_sizes_and_counts(report: CheckReport) -> None:
    assert report.n_images == 9
    assert report.modes == {"RGB": 5, "L": 1, "I;16": 1}  # as stored, before conversion
    assert report.sizes == {"48x48": 7}
    assert report.counts["label"] == {"good": 4, "poor": 5}
    assert report.counts["day"] == {"3": 5, "5": 4}
    patients = report.counts["patient_id"]
    assert patients["n_patients"] == 8 and patients["images_per_patient_max"] == 2
    assert report.images_per_embryo == {"n_embryos": 6, "min": 1, "median": 1, "max": 4}
    assert report.leakage == [] and report.split_column is None


def test_leakage_content_and_group(files: dict[str, str]) -> None:
    table = manifest(files, ["a", "a_copy", "b", "gray"])
    splits = pd.DataFrame({"path": [files["a"], files["a_copy"], files["b"], files["gray"]],
                           "split": ["train", "val", "train", "val"]})
    report = check_data(table.drop(columns="embryo_id"), splits)
    kinds = {(leak["kind"], leak.get("match")) for leak in report.leakage}
    assert kinds == {("group", None), ("content", "exact")}
    group = next(leak for leak in report.leakage if leak["kind"] == "group")
    assert group["column"] == "patient_id" and group["key"] == "p1"
    assert group["splits"] == ["train", "val"]
    assert group["paths"] == sorted([files["b"], files["gray"]])
    content = next(leak for leak in report.leakage if leak["kind"] == "content")
    assert content["paths"] == sorted([files["a"], files["a_copy"]])
    assert not report.ok() and report.ok(allow=True)
    assert "PROBLEMS: 2 leaks" in format_report(report).splitlines()[-1]


def test_near_duplicate_leak_and_split_column_in_table(files: dict[str, str]) -> None:
    table = manifest(files, ["a", "a_jpeg", "b"]).drop(columns=["patient_id", "embryo_id"])
    table["split"] = ["fold0", "fold1", "fold1"]
    report = check_data(table)
    assert report.split_column == "split"
    assert [(leak["kind"], leak["match"]) for leak in report.leakage] == [("content", "near")]
    assert report.leakage[0]["paths"] == sorted([files["a"], files["a_jpeg"]])


def test_clean_split_is_ok(files: dict[str, str]) -> None:
    names = ["a", "a_copy", "a_jpeg", "b", "gray", "deep"]
    table = manifest(files, names)
    splits = pd.DataFrame({"path": [files[n] for n in names],
                           "split": ["train", "train", "train", "val", "val", "test"]})
    report = check_data(table, splits)
    assert report.leakage == [] and report.unreadable == []
    assert report.ok() and report.group_column == "patient_id"
    text = format_report(report)
    assert text.splitlines()[-1].startswith("OK")
    assert "Leakage between splits\n  none" in text


def test_split_table_must_match_the_data(files: dict[str, str]) -> None:
    table = manifest(files, ["a", "b"])
    with pytest.raises(DataError, match="shares no path"):
        check_data(table, pd.DataFrame({"path": ["good/a.png"], "split": ["train"]}))
    with pytest.raises(DataError, match="split"):
        check_data(table, pd.DataFrame({"path": [files["a"]]}))


def test_json_and_text_report(report: CheckReport, files: dict[str, str]) -> None:
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and len(data["unreadable"]) == 2
    text = format_report(report)
    for title in ("Images", "Classes", "Days", "Patients", "Images per embryo", "Sizes",
                  "Modes", "Unreadable files", "Exact duplicates", "Near duplicates",
                  "Leakage between splits"):
        assert f"\n{title}\n" in f"\n{text}"
    assert "poor/empty.png: empty file" in text and "good/notes.jpg" in text
    assert "poor/copy_of_a.png" in text
    assert text.splitlines()[-1].startswith("PROBLEMS: 2 unreadable")


def test_perceptual_hash_ignores_brightness_not_content() -> None:
    a, b = texture(1), texture(2)
    brighter = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)
    assert perceptual_hash(a) == perceptual_hash(brighter)
    assert 0 <= perceptual_hash(a) < 2**64
    assert bin(perceptual_hash(a) ^ perceptual_hash(b)).count("1") > 16
    gray = texture(3, channels=1)
    assert perceptual_hash(gray) == perceptual_hash(np.repeat(gray[:, :, None], 3, axis=2))
    assert detail_hash(a).shape == (4,)
    with pytest.raises(ValueError):
        perceptual_hash(a.astype(np.float32))


def test_near_groups_chain_and_respect_threshold() -> None:
    hashes = [0b0000, 0b0011, 0b1111, 2**63 - 1]  # 0-2 and 2-4 bits apart, then far away
    assert near_duplicate_groups(hashes, 2) == [[0, 1, 2]]
    assert near_duplicate_groups(hashes, 1) == []
    assert near_duplicate_groups(hashes, 2, block=1) == [[0, 1, 2]]  # across block edges


@pytest.mark.skipif(not STAGE.is_dir(), reason="shared stage-grade sample not present")
def test_stage_grade_sample_has_exact_duplicates() -> None:
    table = load_table(STAGE)
    started = time.perf_counter()
    report = check_data(table, workers=2)
    seconds = time.perf_counter() - started
    print(f"\nstage-grade: {report.n_images} images in {seconds:.1f} s, "
          f"{len(report.exact_duplicates)} exact-duplicate groups, "
          f"{len(report.near_duplicates)} near-duplicate groups, "
          f"{len(report.label_conflicts)} with differing labels")
    assert report.n_images == 450 and report.unreadable == []
    assert len(report.exact_duplicates) >= 1
    assert all(len(group) >= 2 for group in report.exact_duplicates)
    assert report.sizes == {"256x256": 450}
