"""Synthetic embryo generator: determinism, the manifest contract, and labels that live in visible
morphology (not in global brightness or a hidden pixel code)."""

from __future__ import annotations

import csv
import re
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from embryo_ml.data.synthetic import (
    CLASSES,
    EmbryoSpec,
    focal_plane_offsets,
    generate_dataset,
    render_embryo,
    sample_embryo,
)

COLUMNS = ["path", "label", "patient_id", "embryo_id", "day", "focal_plane", "grade"]
GRADE = re.compile(r"^([1-6])([ABC][ABC])?$")


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _images(root: Path, rows: list[dict[str, str]]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(root / r["path"]), np.float32) for r in rows])


def _labels(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([r["label"] == "good" for r in rows])


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def _spec(seed: int, label: str, day: int) -> EmbryoSpec:
    return sample_embryo(np.random.default_rng(seed), label, day, "P0001-E01", "P0001")


@pytest.fixture(scope="module")
def set400(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """400 images at 64 px, the size the demo model trains at."""
    root = tmp_path_factory.mktemp("synth400")
    manifest = generate_dataset(root, n=400, size=64, seed=0)
    return root, _rows(manifest)


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    args = {"n": 14, "size": 64, "focal_planes": 2}
    a = generate_dataset(tmp_path / "a", seed=5, **args)
    b = generate_dataset(tmp_path / "b", seed=5, **args)
    c = generate_dataset(tmp_path / "c", seed=6, **args)
    assert a.read_bytes() == b.read_bytes()
    rows = _rows(a)
    for row in rows:
        assert (a.parent / row["path"]).read_bytes() == (b.parent / row["path"]).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    seen = {(a.parent / r["path"]).read_bytes() for r in rows}
    assert not seen & {(c.parent / r["path"]).read_bytes() for r in _rows(c)}


def test_render_is_deterministic_and_planes_share_the_embryo() -> None:
    spec = _spec(3, "good", 3)
    img = render_embryo(spec, 96, 0)
    assert img.dtype == np.uint8 and img.shape == (96, 96)
    assert np.array_equal(img, render_embryo(spec, 96, 0))
    near = render_embryo(spec, 96, 15).astype(float)
    other = render_embryo(_spec(4, "good", 3), 96, 15).astype(float)
    same_embryo = np.corrcoef(img.ravel(), near.ravel())[0, 1]
    different = np.corrcoef(img.ravel(), other.ravel())[0, 1]
    assert same_embryo > 0.8
    assert same_embryo > different + 0.2


@pytest.mark.parametrize("size", [64, 200, 256])
def test_render_sizes(size: int) -> None:
    img = render_embryo(_spec(1, "poor", 5), size)
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert 20 < img.mean() < 235 and img.std() > 3  # an image, not a blank or saturated frame


# --- manifest contract -----------------------------------------------------------------------


def test_manifest_rows_columns_and_files(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, n=23, size=64, seed=2)
    assert manifest == tmp_path / "manifest.csv"
    header = manifest.read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == COLUMNS
    rows = _rows(manifest)
    assert len(rows) == 23
    for row in rows:
        assert row["label"] in CLASSES
        assert row["path"] == f"images/{row['label']}/{row['embryo_id']}_{row['focal_plane']}.png"
        assert re.fullmatch(r"P\d{4}", row["patient_id"])
        assert re.fullmatch(r"P\d{4}-E\d{2}", row["embryo_id"])
        assert row["day"] in ("3", "5") and row["focal_plane"] == "0"
        with Image.open(tmp_path / row["path"]) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write


def test_focal_planes_group_by_embryo(tmp_path: Path) -> None:
    assert focal_plane_offsets(3) == [-15, 0, 15]
    assert focal_plane_offsets(1) == [0]
    rows = _rows(generate_dataset(tmp_path, n=20, size=64, seed=1, focal_planes=3))
    assert len(rows) == 20
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[row["embryo_id"]].append(row)
    assert len(groups) == 7  # ceil(20 / 3); the last one keeps the 2 planes nearest focus
    planes = [sorted(int(r["focal_plane"]) for r in g) for g in groups.values()]
    assert planes[:-1] == [[-15, 0, 15]] * 6 and planes[-1] == [-15, 0]
    for group in groups.values():
        for key in ("label", "patient_id", "day", "grade"):
            assert len({r[key] for r in group}) == 1, key
    blur = {}
    for r in next(iter(groups.values())):
        im = np.asarray(Image.open(tmp_path / r["path"]), np.float32)
        blur[int(r["focal_plane"])] = cv2.Laplacian(im, cv2.CV_32F).var()
    assert blur[0] > blur[15] and blur[0] > blur[-15]


def test_patients_hold_cohorts_of_mixed_quality(set400) -> None:
    _, rows = set400
    patient_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        patient_of[row["embryo_id"]].add(row["patient_id"])
        assert row["embryo_id"].startswith(row["patient_id"] + "-")
    assert all(len(p) == 1 for p in patient_of.values())  # no embryo spans two patients
    cohorts: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        cohorts[row["patient_id"]].append(row["label"])
    sizes = [len(v) for _, v in sorted(cohorts.items())]
    assert all(2 <= s <= 6 for s in sizes[:-1]) and 1 <= sizes[-1] <= 6
    multi = [set(v) for v in cohorts.values() if len(v) >= 2]
    assert sum(len(s) == 2 for s in multi) > 0.5 * len(multi)


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_good_fraction(tmp_path: Path, fraction: float) -> None:
    rows = _rows(generate_dataset(tmp_path, n=200, size=64, seed=4, good_fraction=fraction))
    assert abs(_labels(rows).mean() - fraction) <= 0.1


def test_each_day_is_about_half_good(set400) -> None:
    _, rows = set400
    for day in ("3", "5"):
        sub = [r for r in rows if r["day"] == day]
        assert 0.35 * 400 < len(sub) < 0.65 * 400
        assert 0.35 < _labels(sub).mean() < 0.65


def test_invalid_arguments(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        sample_embryo(rng, "excellent", 3, "P0001-E01", "P0001")
    with pytest.raises(ValueError):
        sample_embryo(rng, "good", 4, "P0001-E01", "P0001")
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, n=0)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, n=4, focal_planes=0)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, n=4, embryos_per_patient=(3, 2))


def test_manifest_reads_with_project_reader(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    from embryo_ml.data.manifest import read_manifest

    table = read_manifest(generate_dataset(tmp_path, n=6, size=64, seed=0))
    assert list(table.columns)[:7] == COLUMNS and len(table) == 6
    assert all(Path(p).is_file() for p in table["path"])


def test_progress_bar(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    rows = _rows(generate_dataset(tmp_path, n=3, size=64, progress=True))
    assert len(rows) == 3


# --- labels follow morphology ----------------------------------------------------------------


def test_grades_follow_the_label_rule(set400) -> None:
    rng = np.random.default_rng(11)
    specs = [sample_embryo(rng, CLASSES[i % 2], (3, 5)[i // 2 % 2], f"P0001-E{i:02d}", "P0001")
             for i in range(400)]
    _, rows = set400
    graded = [(s.label, s.day, s.grade) for s in specs]
    graded += [(r["label"], int(r["day"]), r["grade"]) for r in rows]
    for label, day, grade in graded:
        if day == 3:
            assert grade == ""
            continue
        match = GRADE.fullmatch(grade)
        assert match, grade
        expansion, letters = int(match.group(1)), match.group(2) or ""
        assert bool(letters) == (expansion >= 3), grade
        good = expansion >= 3 and set(letters) <= {"A", "B"}
        assert good == (label == "good"), (label, grade)
    day5 = [s for s in specs if s.day == 5]
    assert {s.grade[0] for s in day5} >= {"1", "2", "3", "4", "5"}
    for s in day5:  # the grade is what gets drawn: its fields drive the renderer
        letters = s.icm_grade + s.te_grade
        assert s.grade == f"{s.expansion}{letters}" and (len(letters) == 2) == (s.expansion >= 3)
    thin = np.mean([s.zona_thickness for s in day5 if s.expansion >= 4])
    thick = np.mean([s.zona_thickness for s in day5 if s.expansion <= 2])
    assert thin < 0.8 * thick


def test_cleavage_morphology_matches_label() -> None:
    rng = np.random.default_rng(12)
    for i in range(200):
        s = sample_embryo(rng, CLASSES[i % 2], 3, f"P0001-E{i:02d}", "P0001")
        assert 2 <= len(s.cells) <= 10
        if s.label == "good":
            assert len(s.cells) >= 6 and s.size_cv < 0.15 and s.fragmentation <= 0.10
        else:
            assert s.size_cv >= 0.25 or s.fragmentation >= 0.15


def test_global_intensity_does_not_predict_label(set400) -> None:
    root, rows = set400
    x, y = _images(root, rows), _labels(rows)
    for name, score in (("mean", x.mean(axis=(1, 2))), ("std", x.std(axis=(1, 2)))):
        auc = _auc(y, score)
        assert 0.3 < auc < 0.7, f"{name} intensity alone separates the classes (AUC {auc:.3f})"


def test_morphology_is_learnable_from_generic_features(set400) -> None:
    """16-bin histogram of gradient magnitude (relative to the image's median) in the central
    disk: nothing embryo-specific, yet it should see fragments, cell walls and cavities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root, rows = set400
    x, y = _images(root, rows), _labels(rows)
    size = x.shape[1]
    yy, xx = np.mgrid[:size, :size]
    disk = (xx - size / 2 + 0.5) ** 2 + (yy - size / 2 + 0.5) ** 2 < (0.3 * size) ** 2
    feats = []
    for im in x:
        im = cv2.GaussianBlur(im, (0, 0), 0.7)
        mag = np.hypot(cv2.Sobel(im, cv2.CV_32F, 1, 0), cv2.Sobel(im, cv2.CV_32F, 0, 1))[disk]
        hist, _ = np.histogram(mag / max(float(np.median(mag)), 1e-6), bins=16, range=(0, 8))
        feats.append(hist / hist.sum())
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    p = cross_val_predict(model, np.array(feats), y, cv=folds, method="predict_proba")[:, 1]
    assert _auc(y, p) > 0.75


def test_focal_blur_lowers_sharpness() -> None:
    for seed, label, day in [(1, "good", 3), (2, "poor", 3), (3, "good", 5), (4, "poor", 5)]:
        spec = _spec(seed, label, day)
        sharp = [cv2.Laplacian(render_embryo(spec, 128, p).astype(np.float32), cv2.CV_32F).var()
                 for p in (0, 15, 45, -45)]
        assert sharp[2] < 0.6 * sharp[0] and sharp[3] < 0.6 * sharp[0]
        assert sharp[2] < sharp[1] < sharp[0]


@pytest.mark.slow
def test_speed_1000_images_at_128px(tmp_path: Path) -> None:
    start = time.perf_counter()
    manifest = generate_dataset(tmp_path, n=1000, size=128, seed=0)
    elapsed = time.perf_counter() - start
    assert len(_rows(manifest)) == 1000
    assert elapsed < 20.0, f"1000 images took {elapsed:.1f} s"
