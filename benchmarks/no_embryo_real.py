#!/usr/bin/env python
"""False `no_embryo` flags on real embryo images, whole and cropped close, and how often the flag
still fires on images of other things; with the milliseconds `image_flags` takes per image.

Real images: the shared samples (`../shared/data`, see its README; `$EMBRYO_ML_SHARED_DATA`
overrides): STORK (98 JPEG), stage-grade (450 PNG EmbryoScope-like wells), time-lapse (100
grey frames, 8 of which show an empty well or no well at all: they are left out of the count).
Each is scored whole and as close crops, imitating clinics that store the embryo cropped: the
square round the embryo's circle with a margin of 0, 5, 10 or 15% of its diameter (`tight-0`
... `tight-15`), and off-centre (10% margin, the square shifted by 20% of the radius in a
direction that turns from image to image), clamped inside the image. The circles come from
`no_embryo_circles.csv` next to this script: a Hough-circle locator's output inside the well
(OpenCV `HoughCircles`, ranked by edge support, not the detector under test), checked by eye
on overlays and crop montages, five corrected by hand (`note` column). It tends to sit on the
zona's inner side, so `tight-0` often cuts the zona a little: the hardest set.

Other things: flat images at several grey levels, Gaussian, uniform and salt-and-pepper noise,
checkerboards, grids, stripes, linear and radial gradients, a vignette and a smooth blob, text
pages, random rectangles, random shapes and scenes of many overlapping shapes (blurred, noisy,
JPEG-compressed), at 64-1000 px, square and not (`non_embryo_images`); `no_embryo` should fire
on every one.

`--baseline FILE` also runs another version of `embryo_ml/data/quality.py` (for example
`git show HEAD:embryo_ml/data/quality.py > /tmp/quality_before.py`) on the same images.

    python benchmarks/no_embryo_real.py [--baseline /tmp/quality_before.py] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
from bench_common import median, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBRYO_ML_SHARED_DATA", REPO.parent / "shared" / "data"))
CIRCLES = Path(__file__).resolve().with_name("no_embryo_circles.csv")
REAL_SETS = {
    "stork": "stork/images/**/*.jpg",
    "stage-grade": "stage-grade/data/**/*.png",
    "timelapse": "timelapse/sample_data/embryo_dataset/**/*.jpeg",
}
CROPS = {  # name: (margin as a share of the diameter, shift as a share of the radius)
    "tight-0": (0.0, 0.0),
    "tight-5": (0.05, 0.0),
    "tight-10": (0.10, 0.0),
    "tight-15": (0.15, 0.0),
    "off-centre": (0.10, 0.20),
}
WORDS = ["embryo", "grade", "score", "report", "patient", "clinic", "well", "image", "the", "of",
         "and", "to", "in", "quality", "focal", "plane", "day", "blastocyst"]


def load_circles(path: Path = CIRCLES) -> dict[str, tuple[tuple[float, float, float] | None, str]]:
    """{path relative to the shared folder: ((cx, cy, r) in pixels or None, note)}."""
    out = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            circle = None if not row["r"] else (float(row["cx"]), float(row["cy"]), float(row["r"]))
            out[row["path"]] = (circle, row["note"])
    return out


def real_files(data: Path, name: str) -> list[Path]:
    return sorted(data.glob(REAL_SETS[name]))


def close_crop(image: np.ndarray, circle: tuple[float, float, float], margin: float,
               shift: float = 0.0, index: int = 0) -> np.ndarray:
    """The square round `circle` with `margin` x its diameter added, moved by `shift` x its
    radius in the direction 2.4 x `index` radians, shifted back inside the image if it sticks out
    (and no larger than the image's shorter side)."""
    h, w = image.shape[:2]
    cx, cy, r = circle
    side = int(round(min(2.0 * r * (1.0 + margin), h, w)))
    angle = 2.4 * index
    x0 = int(round(cx + shift * r * math.cos(angle) - side / 2))
    y0 = int(round(cy + shift * r * math.sin(angle) - side / 2))
    x0, y0 = min(max(x0, 0), w - side), min(max(y0, 0), h - side)
    return np.ascontiguousarray(image[y0:y0 + side, x0:x0 + side])


def _u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(values, np.float32) + 0.5, 0, 255).astype(np.uint8)


def _shapes(h: int, w: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """Random filled rectangles, triangles and lines on a flat background."""
    img = np.full((h, w), int(rng.integers(60, 200)), np.uint8)
    for _ in range(n):
        kind, grey = int(rng.integers(0, 3)), int(rng.integers(0, 256))
        p, q = rng.integers(0, (w, h), 2), rng.integers(0, (w, h), 2)
        if kind == 0:
            cv2.rectangle(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), grey,
                          -1 if rng.random() < 0.7 else 2)
        elif kind == 1:
            cv2.fillPoly(img, [rng.integers(0, (w, h), (3, 2)).astype(np.int32)], grey)
        else:
            cv2.line(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), grey,
                     int(rng.integers(1, 6)))
    return img


def _text(h: int, w: int, rng: np.random.Generator, scale: float, font: int) -> np.ndarray:
    img = np.full((h, w), int(rng.integers(200, 250)), np.uint8)
    step = max(8, int(28 * scale * w / 300))
    for y in range(step, h - 4, step):
        cv2.putText(img, " ".join(rng.choice(WORDS, 8)), (4, y), font, scale * w / 300,
                    int(rng.integers(0, 60)), max(1, w // 400), cv2.LINE_AA)
    return img


def non_embryo_images(sizes: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (256, 256),
                                                             (500, 500), (480, 640), (1000, 1000)),
                      seed: int = 0) -> dict[str, np.ndarray]:
    """{name: grey image} of things that are not embryos (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for h, w in sizes:
        tag = f"{w}x{h}"
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u, v = xx / max(h, w), yy / max(h, w)
        for level in (0, 40, 128, 220, 255):
            out[f"flat-{level} {tag}"] = np.full((h, w), level, np.uint8)
        for sd in (5, 20, 40, 80):
            out[f"gaussian-noise-{sd} {tag}"] = _u8(rng.normal(128.0, sd, (h, w)))
        out[f"uniform-noise {tag}"] = rng.integers(0, 256, (h, w)).astype(np.uint8)
        for p in (0.02, 0.1, 0.3):
            img = np.full((h, w), int(rng.integers(60, 200)), np.uint8)
            draw = rng.random((h, w))
            img[draw < p / 2], img[draw > 1 - p / 2] = 0, 255
            out[f"salt-pepper-{p} {tag}"] = img
        for sq in (2, 4, 8, 16, 32, 64):
            if sq < min(h, w) // 2:
                squares = (yy // sq + xx // sq) % 2
                out[f"checkerboard-{sq} {tag}"] = (squares * 255).astype(np.uint8)
        for sp in (6, 12, 24, 48):
            grid = np.full((h, w), 210, np.uint8)
            grid[::sp, :], grid[:, ::sp] = 40, 40
            out[f"grid-{sp} {tag}"] = grid
            out[f"stripes-{sp} {tag}"] = (((yy // sp) % 2) * 200 + 30).astype(np.uint8)
            out[f"diagonal-stripes-{sp} {tag}"] = ((((xx + yy) // sp) % 2) * 200 + 30).astype(
                np.uint8)
            out[f"sine-{sp} {tag}"] = _u8(128 + 80 * np.sin(np.pi * xx / sp))
        out[f"gradient {tag}"] = _u8(255 * u)
        out[f"diagonal-gradient {tag}"] = _u8(127 * (u + v))
        out[f"radial-gradient {tag}"] = _u8(255 * np.clip(1 - 1.4 * np.hypot(u - 0.5, v - 0.5), 0,
                                                          1))
        out[f"vignette {tag}"] = _u8(40 + 120 * np.exp(-((u - 0.5) ** 2 + (v - 0.5) ** 2) / 0.1)
                                     + rng.normal(0, 3, (h, w)))
        out[f"blob {tag}"] = _u8(60 + 150 * np.exp(-((u - 0.5) ** 2 + (v - 0.5) ** 2) / 0.05))
        for k, (scale, font) in enumerate(((0.45, cv2.FONT_HERSHEY_SIMPLEX),
                                           (0.7, cv2.FONT_HERSHEY_DUPLEX),
                                           (1.1, cv2.FONT_HERSHEY_COMPLEX))):
            out[f"text-{k} {tag}"] = _text(h, w, rng, scale, font)
            rects = np.full((h, w), int(rng.integers(50, 200)), np.uint8)
            for _ in range((10, 40, 120)[k]):
                p = rng.integers(0, (w, h))
                q = p + rng.integers(5, max(h, w) // 3, 2)
                cv2.rectangle(rects, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])),
                              int(rng.integers(0, 256)), -1)
            out[f"rectangles-{k} {tag}"] = rects
            out[f"shapes-{k} {tag}"] = _shapes(h, w, rng, (8, 30, 80)[k])
            scene = cv2.GaussianBlur(_shapes(h, w, rng, 150).astype(np.float32), (0, 0), 1.0 + k)
            scene = _u8(scene + rng.normal(0, 6, (h, w)))
            out[f"scene-{k} {tag}"] = scene
            _, jpeg = cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, 70])
            out[f"scene-jpeg-{k} {tag}"] = cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)
    return out


def load_quality(path: Path | None) -> ModuleType:
    """embryo_ml.data.quality, or the version in the file `path`."""
    if path is None:
        from embryo_ml.data import quality

        return quality
    spec = importlib.util.spec_from_file_location("quality_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def measure(flags: Callable[[np.ndarray], list[str]],
            images: list[np.ndarray]) -> tuple[int, float]:
    """(images flagged no_embryo, median ms per image)."""
    flagged, times = 0, []
    for image in images:
        start = time.perf_counter()
        found = flags(image)
        times.append(time.perf_counter() - start)
        flagged += "no_embryo" in found
    return flagged, 1000.0 * median(times)


def real_image_sets(data: Path, circles: dict) -> dict[str, list[np.ndarray]]:
    """{set name: images}: each real set whole (without the images that show no embryo) and as
    each close crop."""
    from embryo_ml.data.images import read_image

    sets: dict[str, list[np.ndarray]] = {}
    for name in REAL_SETS:
        whole, crops = [], {crop: [] for crop in CROPS}
        for index, path in enumerate(real_files(data, name)):
            circle, note = circles.get(path.relative_to(data).as_posix(), (None, ""))
            if note.startswith("no embryo"):
                continue
            image = read_image(path)
            whole.append(image)
            if circle is not None:
                for crop, (margin, shift) in CROPS.items():
                    crops[crop].append(close_crop(image, circle, margin, shift, index))
        if whole:
            sets[f"{name} whole"] = whole
            sets.update({f"{name} {crop}": images for crop, images in crops.items()})
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared samples folder")
    parser.add_argument("--circles", type=Path, default=CIRCLES)
    parser.add_argument("--baseline", type=Path, help="another quality.py to compare with")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    versions = {"now": load_quality(None)}
    if args.baseline is not None:
        versions = {"before": load_quality(args.baseline), **versions}
    groups = {}
    if args.data.is_dir():
        groups = real_image_sets(args.data, load_circles(args.circles))
    else:
        print(f"no shared samples under {args.data}: real sets skipped")
    others: dict[str, list[np.ndarray]] = {}
    for name, image in non_embryo_images().items():
        others.setdefault(name.split(" ")[0].rstrip("-0123456789.") or name, []).append(image)
    headers = ["set", "images"]
    for tag in versions:
        headers += [f"{tag} false", f"{tag} rate %", f"{tag} ms/image"]
    record: dict[str, dict] = {"real": {}, "other": {}}
    for title, table, kind in (("real embryo images: false no_embryo", groups, "real"),
                               ("not embryos: no_embryo missing", others, "other")):
        rows = []
        for name, images in table.items():
            row: list = [name, len(images)]
            for tag, module in versions.items():
                limits = module.QualityThresholds(blur_min=0.0)
                flagged, ms = measure(lambda im, m=module, t=limits: m.image_flags(im, t), images)
                wrong = flagged if kind == "real" else len(images) - flagged
                row += [wrong, 100.0 * wrong / len(images), ms]
                record[kind].setdefault(name, {"images": len(images)})[tag] = {
                    "wrong": wrong, "ms_per_image": ms}
            rows.append(row)
        print(f"\n{title}")
        print_table(headers, rows)
    write_json(args.json, {"benchmark": "no_embryo_real", "results": record})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
