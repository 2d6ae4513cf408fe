"""Manifest building, k-fold splits, decoded cache and the data CLI; real samples when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.data.cache import ENTRY_SUFFIX, DecodedCache
from embryo_ml.data.images import read_image
from embryo_ml.data.manifest import build_manifest, read_manifest
from embryo_ml.data.preprocess import resize_square
from embryo_ml.data.splits import make_splits, verify_no_group_leak
from embryo_ml.errors import DataError
from tests.conftest import SHARED_DATA, tiny_config, write_image

SHARED = SHARED_DATA
STORK = SHARED / "stork" / "images"
TIMELAPSE = SHARED / "timelapse" / "sample_data" / "embryo_dataset"
STORK_PATTERN = (r"(?P<label>good|poor)[/_](?P<embryo_id>\d+)_(?P<focal_plane>-?\d+)_"
                 r"(?P<grade>[^.]+)\.jpg$")
needs_stork = pytest.mark.skipif(not STORK.is_dir(), reason="../shared/data/stork absent")
needs_timelapse = pytest.mark.skipif(not TIMELAPSE.is_dir(), reason="timelapse sample absent")


def _tree(root: Path) -> None:
    pixels = np.full((8, 8), 90, np.uint8)
    for name in ("good/101_-15_4AA.png", "good/101_0_4AA.png", "poor/102_0_2BB-.png",
                 "poor/sub/103_15_3bc.png"):
        write_image(root / name, pixels)


def test_pattern_groups_become_columns_and_paths_are_relative(tmp_path: Path) -> None:
    _tree(tmp_path / "imgs")
    out = tmp_path / "out" / "m.csv"
    table = build_manifest(tmp_path / "imgs",
                           r"(?P<embryo_id>\d+)_(?P<focal_plane>-?\d+)_(?P<grade>[^.]+)",
                           out=out, label_from_folder=True)
    assert list(table.columns) == ["path", "label", "embryo_id", "focal_plane", "grade"]
    assert table["path"].iloc[0] == "../imgs/good/101_-15_4AA.png"
    assert list(table["grade"]) == ["4AA", "4AA", "2BB-", "3bc"]
    assert list(table["label"]) == ["good", "good", "poor", "poor"]
    out.parent.mkdir()
    table.to_csv(out, index=False)
    assert Path(read_manifest(out)["path"].iloc[3]).is_file()  # resolves against its folder


def test_pattern_errors(tmp_path: Path) -> None:
    _tree(tmp_path)
    with pytest.raises(DataError, match="does not match 2 of 4 path\\(s\\), first: poor/102"):
        build_manifest(tmp_path, r"(?P<grade>\d[A-C]{2})\.png")
    kept = build_manifest(tmp_path, r"(?P<grade>\d[A-C]{2})\.png", allow_unmatched=True)
    assert kept["grade"].isna().sum() == 2  # "2BB-" and lowercase "3bc"
    with pytest.raises(DataError, match="not a valid regular expression"):
        build_manifest(tmp_path, r"(?P<x>[")
    with pytest.raises(DataError, match="no named groups"):
        build_manifest(tmp_path, r"\d+")


def test_csv_source_keeps_extra_columns(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "in.csv").write_text("path,label,clinic\ngood/101_0_4AA.png,good,north\n")
    table = build_manifest(tmp_path / "in.csv", r"(?P<embryo_id>\d+)_")
    assert table.loc[0, "clinic"] == "north" and table.loc[0, "embryo_id"] == "101"


def _cohort_table(n_patients: int = 25) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        for e in range(3):
            for f in (-15, 0, 15):
                rows.append({"path": f"/x/{p}_{e}_{f}.png", "patient_id": f"P{p}",
                             "embryo_id": f"P{p}-E{e}", "label": "good" if e % 2 else "poor"})
    return pd.DataFrame(rows)


def test_make_splits_holdout_and_folds_are_grouped_and_deterministic() -> None:
    table = _cohort_table()
    splits = make_splits(table, folds=4, test_fraction=0.2, seed=5)
    assert set(splits["split"]) == {"train", "test"}
    assert set(splits.loc[splits.split == "train", "fold"]) == {0, 1, 2, 3}
    assert (splits.loc[splits.split == "test", "fold"] == -1).all()
    by_group = splits.groupby("group").agg(parts=("fold", "nunique"), splits=("split", "nunique"))
    assert (by_group["parts"] == 1).all() and (by_group["splits"] == 1).all()
    assert 0.1 < (splits.split == "test").mean() < 0.3
    assert splits.equals(make_splits(table, folds=4, test_fraction=0.2, seed=5))
    assert not splits.equals(make_splits(table, folds=4, test_fraction=0.2, seed=6))
    leaked = splits.copy()
    leaked.loc[0, "fold"] = (leaked.loc[0, "fold"] + 1) % 4  # one image of a group moves
    with pytest.raises(AssertionError, match="two sides"):
        verify_no_group_leak(leaked)


def test_make_splits_refusals() -> None:
    with pytest.raises(DataError, match="at least 2"):
        make_splits(_cohort_table(), folds=1)
    with pytest.raises(DataError, match="distinct patient_id"):
        make_splits(_cohort_table(n_patients=4), folds=5, test_fraction=0.0)


def test_decoded_cache_decodes_once_and_notices_changes(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from embryo_ml.data import images

    rng = np.random.default_rng(0)
    path = write_image(tmp_path / "a.png", rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    twin = tmp_path / "twin.png"
    twin.write_bytes(path.read_bytes())
    cache = DecodedCache(tmp_path / "cache", 32)
    reads: list[str] = []
    real_read_bytes, real_decode = Path.read_bytes, images._decode
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(f"read {self.name}")
                        or real_read_bytes(self))
    monkeypatch.setattr(images, "_decode", lambda source, *a: reads.append(
        f"decode {type(source).__name__}") or real_decode(source, *a))
    first = cache.load(path)
    # a miss reads the file once: hashed, then decoded from the same bytes, not opened again
    assert reads == ["read a.png", "decode BytesIO"]
    monkeypatch.undo()
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, resize_square(read_image(path), 32))
    second = cache.load(path)
    assert isinstance(second, np.memmap) and np.array_equal(first, second)
    cache.load(twin)  # same content: served from the same entry
    assert (cache.misses, cache.hits) == (1, 2)
    fresh = DecodedCache(tmp_path / "cache", 32)  # a new process finds the entry on disk
    fresh.load(path)
    assert (fresh.misses, fresh.hits) == (0, 1)
    write_image(path, np.zeros((50, 40, 3), np.uint8))  # the file changes
    os.utime(path, ns=(1, 1))
    assert cache.load(path).max() == 0 and cache.misses == 2


def test_cached_training_reads_no_image_after_first_epoch(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embryo_ml.data import cache as cache_module
    from embryo_ml.train.fit import fit

    decoded: list[str] = []
    real_reader = cache_module.load_square

    def counting_reader(path: str, *args: object, **kwargs: object) -> np.ndarray:
        decoded.append(path)
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "load_square", counting_reader)
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32", "train.epochs=2",
                      f"data.cache_dir={tmp_path / 'cache'}", "tracking.log_checkpoint=false")
    fit(cfg, synth_data, tmp_path / "run", progress=False)
    assert len(decoded) == 120  # each image decoded once, over two epochs and evaluation


@needs_stork
def test_stork_file_names_give_14_embryos_by_7_planes_with_grades() -> None:
    from embryo_ml.data.labels import parse_gardner

    table = build_manifest(STORK, STORK_PATTERN)
    assert len(table) == 98 and table["embryo_id"].nunique() == 14
    assert (table.groupby("embryo_id")["focal_plane"].nunique() == 7).all()
    assert all(parse_gardner(g).expansion >= 1 for g in table["grade"])
    assert set(table["label"]) == {"good", "poor"}
    splits = make_splits(table, folds=3, test_fraction=0.2, seed=0)
    planes_per_side = splits.assign(embryo=table["embryo_id"]).groupby("embryo").agg(
        folds=("fold", "nunique"))
    assert (planes_per_side["folds"] == 1).all()  # an embryo's planes never separated


@needs_timelapse
def test_timelapse_frames_get_their_video_as_embryo_id() -> None:
    table = build_manifest(TIMELAPSE, r"^(?P<embryo_id>[^/]+)/[^/]*_RUN(?P<frame>\d+)\.jpe?g$")
    assert len(table) == 100 and table["embryo_id"].nunique() == 10
    for path, embryo in zip(table["path"], table["embryo_id"]):
        assert Path(path).parent.name == embryo


def test_data_cli_manifest_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tree(tmp_path / "imgs")
    manifest = tmp_path / "m.csv"
    assert main(["data", "manifest", str(tmp_path / "imgs"), "--out", str(manifest)]) == 0
    assert len(pd.read_csv(manifest)) == 4
    assert main(["data", "manifest", str(tmp_path / "imgs"), "--pattern", "(?P<x>[",
                 "--out", str(tmp_path / "bad.csv")]) == 2
    assert "error: --pattern" in capsys.readouterr().err
    assert not (tmp_path / "bad.csv").exists()
    rows = _cohort_table(10)
    rows["path"] = [f"imgs/good/{i}.png" for i in range(len(rows))]
    rows.to_csv(tmp_path / "cohort.csv", index=False)
    out = tmp_path / "splits.csv"
    assert main(["data", "split", str(tmp_path / "cohort.csv"), "--folds", "3",
                 "--test-fraction", "0.2", "--out", str(out)]) == 0
    splits = read_manifest(out)
    assert len(splits) == len(rows) and splits["path"].iloc[0].endswith("imgs/good/0.png")


def test_cache_is_filled_safely_by_several_loader_workers(
    synth_data: Path, tmp_path: Path
) -> None:
    from embryo_ml.train.fit import fit

    cache_dir = tmp_path / "cache"
    cfg = tiny_config(tmp_path / "m.db", "data.image_size=32", "train.epochs=2",
                      "data.num_workers=2", f"data.cache_dir={cache_dir}",
                      "tracking.log_checkpoint=false")
    result = fit(cfg, synth_data, tmp_path / "run", progress=False)
    entries = list(cache_dir.rglob(f"*{ENTRY_SUFFIX}"))
    assert len(entries) == 120 and not list(cache_dir.rglob(".*"))  # no temporary file left
    reader = DecodedCache(cache_dir, 32)  # every entry whole: header, size and checksum
    assert all(reader.load(p).shape == (32, 32, 3) for p in read_manifest(synth_data)["path"])
    assert (reader.hits, reader.misses) == (120, 0)
    assert result.metrics["epochs_run"] == 2


def test_data_check_cli_exit_codes_json_and_fold_leakage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    rng = np.random.default_rng(1)
    rows = []
    for p in range(6):
        for e in range(2):
            image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            name = f"imgs/P{p}_E{e}.png"
            write_image(tmp_path / name, image)
            rows.append({"path": name, "label": "good" if e else "poor", "patient_id": f"P{p}",
                         "embryo_id": f"P{p}-E{e}"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    assert main(["-q", "data", "check", str(tmp_path / "m.csv"), "--json",
                 str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n_images"] == 12

    splits = tmp_path / "splits.csv"
    assert main(["data", "split", str(tmp_path / "m.csv"), "--folds", "3",
                 "--test-fraction", "0", "--out", str(splits)]) == 0
    assert main(["-q", "data", "check", str(tmp_path / "m.csv"), "--splits", str(splits)]) == 0
    moved = pd.read_csv(splits)
    first_group = moved["group"].iloc[0]
    other_fold = (moved.loc[0, "fold"] + 1) % 3
    moved.loc[moved.index[moved["group"] == first_group][0], "fold"] = other_fold
    moved.to_csv(splits, index=False)  # one image of a patient now validates in another fold
    capsys.readouterr()
    assert main(["-q", "data", "check", str(tmp_path / "m.csv"), "--splits", str(splits)]) == 1
    assert first_group in capsys.readouterr().out
    assert main(["-q", "data", "check", str(tmp_path / "m.csv"), "--splits", str(splits),
                 "--allow"]) == 0

    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n")
    pd.DataFrame(rows + [{"path": "imgs/broken.png", "label": "good", "patient_id": "P9",
                          "embryo_id": "P9-E0"}]).to_csv(tmp_path / "m2.csv", index=False)
    capsys.readouterr()
    assert main(["-q", "data", "check", str(tmp_path / "m2.csv")]) == 1
    assert "broken.png" in capsys.readouterr().out
