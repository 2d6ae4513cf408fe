"""Heatmaps of what a model looked at, from the scoring bundle alone (numpy, OpenCV, ONNX Runtime).

A bundle exported by this version has a second ONNX output, the class activation map `cam`
(`Bundle.cam_output`): for each main class, the classifier applied to the feature vector at each
location of the last feature map (h x w, e.g. 7 x 7 at 224 px for a stride-32 network). For a
global-average-pool + linear head its spatial mean is exactly the class's logit, so the map says
how much each location added to the logit (see `embryo_ml.export.onnx_export`).

`explain` turns it into one image-sized heatmap per image:

1. Which class: `class_name`, or by default the class the model predicts for that image (the
   scorer's `label_pred` rule: the bundle's threshold on the calibrated score with two classes,
   else the most probable class). The heatmap then shows why the model said what it said.
   The default is not "always the positive class": with good/poor, evidence for "good" is
   mostly the absence of what makes an embryo poor, which the empty culture medium also shows,
   so the good-class map of a poor embryo lights up the background (measured on synthetic
   embryos: docs/scoring.md, tests/test_explain.py).
2. Evidence for the class: cam[c] minus the mean of the main classes' maps. Softmax ignores
   what all logits share, so only this difference moves the probability; with two classes it
   is half the map of the log-odds logit[c] - logit[other]. With two classes the decision also
   has a threshold t on the calibrated probability, i.e. on the log-odds at T * ln(t / (1 - t))
   (T the temperature); that margin is taken off the class's map, spread evenly over it, so
   the map's mean is >= 0 exactly when the class is the predicted one: the predicted class's
   heatmap always shows some heat.
3. Refinement: a stride-32 map of a small image is coarse (2 x 2 at 64 px). The map is sampled
   more densely by shift and stitch: the model also runs on the image shifted by fractions of
   the stride (the edge reflected into the gap) and the maps are interleaved, so a 2 x 2 map
   becomes 8 x 8 from 16 runs. Each shifted map is moved to the unshifted map's spatial mean
   first: a shift changes the whole image's score a little, which would otherwise show as
   stripes, and so the refined map's mean stays the logit. `refine=None` picks the smallest
   factor (1, 2, 4 or 8) giving at least `MIN_CELLS` cells a side; `refine=1` is the single
   unshifted map.
4. Positive part, as in Grad-CAM: heat is where the model found evidence *for* the class, not
   where it found the least evidence against it.
5. Upsampled bilinearly to the image's own size: the scorer squashes the whole image onto the
   model's square input and the map's cells tile that square, so the map is stretched back the
   same way.
6. Divided by its maximum: heat in [0, 1], *relative within one image* (1 is this image's
   strongest evidence, not a level comparable between images). A map with no positive evidence
   is all zeros: nothing stands out, and the overlay shows no heat.

`overlay` blends a heatmap onto the image with a perceptually ordered colormap (viridis: dark
blue = no heat, yellow = most); `explain_image` is `embryo-ml explain`: one image in, a PNG of
the image and its overlay side by side out (the original stays visible next to the heat).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from embryo_ml.data.images import read_image
from embryo_ml.errors import BundleError, ConfigError
from embryo_ml.evaluation.prior import prior_value
from embryo_ml.export.bundle import read_bundle
from embryo_ml.fileio import atomic_write_bytes
from embryo_ml.score.batch import calibrated
from embryo_ml.score.session import OnnxScorer

MIN_CELLS = 8  # refine until the map has at least this many cells a side
FACTORS = (1, 2, 4, 8)
MIN_SHIFT_PX = 2  # ... unless the shifts between stitched maps would be smaller than this


@dataclass(frozen=True)
class Explanation:
    """One image's heatmap ((H, W) float32 in [0, 1]), the class it shows evidence for, and the
    image's score: the calibrated probability of `positive_class`, as `embryo-ml score` gives."""

    heat: np.ndarray
    class_name: str
    score: float
    positive_class: str


def has_cam(scorer: OnnxScorer) -> bool:
    """Whether the bundle's model gives a class activation map (exported by this version)."""
    return scorer.bundle.cam_output is not None


def auto_refine(map_side: int, input_size: int) -> int:
    """Smallest factor in FACTORS giving >= MIN_CELLS cells a side, without shifting by less
    than MIN_SHIFT_PX pixels."""
    chosen = 1
    for factor in FACTORS:
        if input_size / (map_side * factor) < MIN_SHIFT_PX:
            break
        chosen = factor
        if map_side * factor >= MIN_CELLS:
            break
    return chosen


def _run(scorer: OnnxScorer, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
    return scorer.session.run(names, {scorer.bundle.input_name: np.ascontiguousarray(batch)})


def class_activation(
    scorer: OnnxScorer, batch: np.ndarray, refine: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, S, S) preprocessed images -> (logits (N, C), class activation maps
    (N, K, h * f, w * f)), refined by shift and stitch with factor f (None = `auto_refine`)."""
    bundle = scorer.bundle
    if bundle.cam_output is None:
        raise BundleError(f"bundle {bundle.path} has no class activation map output; "
                          "re-export it with this version of embryo-ml")
    logits, cam = _run(scorer, batch, [bundle.output_name, bundle.cam_output])
    n, k, h, w = cam.shape
    size = batch.shape[-1]
    factor = auto_refine(min(h, w), size) if refine is None else int(refine)
    if factor < 1:
        raise ValueError(f"refine must be >= 1, got {refine}")
    if factor == 1:
        return logits, cam
    stride_y, stride_x = size / h, size / w
    pad = math.ceil(max(stride_y, stride_x) / 2)
    padded = np.pad(batch, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    dense = np.empty((n, k, h * factor, w * factor), dtype=np.float32)
    level = cam.mean(axis=(2, 3), keepdims=True)
    for ky in range(factor):
        # Sample k of f sits (k + 1/2) / f of the way across its cell: shift the content so the
        # cell's centre lands there. Viewing padded[pad + d:] shows the image moved by -d.
        dy = round((ky + 0.5) * stride_y / factor - stride_y / 2)
        for kx in range(factor):
            dx = round((kx + 0.5) * stride_x / factor - stride_x / 2)
            view = padded[:, :, pad + dy:pad + dy + size, pad + dx:pad + dx + size]
            shifted = _run(scorer, view, [bundle.cam_output])[0]
            shifted = shifted - shifted.mean(axis=(2, 3), keepdims=True) + level
            dense[:, :, ky::factor, kx::factor] = shifted
    return logits, dense


def evidence(cam: np.ndarray, index: int, margin: float = 0.0) -> np.ndarray:
    """(K, h, w) maps -> (h, w) evidence for class `index`: its map minus the mean of all the
    main classes' maps (the part softmax responds to), minus `margin`."""
    return cam[index] - cam.mean(axis=0) - margin


def decision_margins(scorer: OnnxScorer, offset: float = 0.0) -> np.ndarray:
    """Per main class, the evidence its map needs on average to be predicted: with two classes
    +-T (ln(t / (1 - t)) - offset) / 2 for the positive / the other class (threshold t,
    temperature T, `offset` the day prior's logit offset of the image's day, 0 without one),
    else 0 (the most probable class wins)."""
    bundle = scorer.bundle
    margins = np.zeros(len(bundle.classes))
    if len(bundle.classes) == 2:
        t = min(max(bundle.threshold, 1e-6), 1 - 1e-6)
        half = bundle.temperature * (math.log(t / (1 - t)) - offset) / 2
        margins[bundle.positive_index], margins[1 - bundle.positive_index] = half, -half
    return margins


def prior_offset(scorer: OnnxScorer, value: str) -> float:
    """The bundle's day-prior logit offset for a day (`prior_value`-normalised), 0.0 where the
    bundle has no prior or no offset for that day (scored from the image alone)."""
    prior = scorer.bundle.prior
    return float(prior["offsets"].get(value, 0.0)) if prior else 0.0


def normalise(heat: np.ndarray) -> np.ndarray:
    """Positive part divided by its maximum: [0, 1]; all zeros when nothing is positive."""
    heat = np.maximum(np.nan_to_num(heat.astype(np.float32), nan=0.0), 0.0)
    top = float(heat.max()) if heat.size else 0.0
    if not math.isfinite(top) or top <= 1e-12:
        return np.zeros_like(heat)
    return heat / top


def _predicted(scorer: OnnxScorer, logits: np.ndarray, prior_values: Sequence[str]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(class index per row by the scorer's label rule, calibrated positive-class score, with
    the day prior where the row's day has an offset: the scorer's own `calibrated`)."""
    bundle = scorer.bundle
    n_classes, positive = len(bundle.classes), bundle.positive_index
    probs = calibrated(bundle, logits[:, :n_classes], prior_values)
    scores = probs[:, positive]
    if n_classes == 2:
        return np.where(scores >= bundle.threshold, positive, 1 - positive), scores
    return probs.argmax(axis=1), scores


def explain(
    scorer: OnnxScorer, images: Sequence[np.ndarray], class_name: str | None = None,
    refine: int | None = None, image_classes: Sequence[str | None] | None = None,
    prior_values: Sequence[str] | None = None,
) -> list[Explanation] | None:
    """An `Explanation` per RGB uint8 image (heatmap at the image's own size), for `class_name`
    or each image's predicted class; None when the bundle has no class activation map. The whole
    batch goes through one ONNX run per refinement shift.

    `prior_values`: each image's day (`embryo_ml.evaluation.prior.prior_value`), for a bundle
    with a day prior: the score and the predicted class are then those `score` gives from a
    manifest with that day, and the class's map is judged against the threshold moved by the
    day's offset; "" or None = from the image alone.

    `image_classes`: one class per image instead (None = that image's predicted class). The
    report passes each row's `label_pred`, so that a heatmap always shows the evidence for the
    class printed beside it, also where the day prior, which this model run does not see,
    decided the label."""
    bundle = scorer.bundle
    if not has_cam(scorer):
        return None
    wanted = list(image_classes) if image_classes is not None else [class_name] * len(images)
    if len(wanted) != len(images):
        raise ValueError(f"{len(wanted)} classes for {len(images)} images")
    for name in {w for w in wanted if w is not None}:
        if name not in bundle.classes:
            raise BundleError(f"class {name!r} is not one of the bundle's classes "
                              f"{bundle.classes}")
    if not images:
        return []
    batch = np.stack([scorer.prepare(image) for image in images])
    logits, cams = class_activation(scorer, batch, refine)
    days = list(prior_values) if prior_values is not None else [""] * len(images)
    predicted, scores = _predicted(scorer, logits, days)
    out = []
    for image, cam, guess, score, name, day in zip(images, cams, predicted, scores, wanted, days,
                                                   strict=True):
        index = int(guess) if name is None else bundle.classes.index(name)
        margin = decision_margins(scorer, prior_offset(scorer, day))[index]
        height, width = image.shape[:2]
        raw = cv2.resize(evidence(cam, index, margin), (width, height),
                         interpolation=cv2.INTER_LINEAR)
        out.append(Explanation(normalise(raw), bundle.classes[index], float(score),
                               bundle.positive_class))
    return out


def heatmaps(
    scorer: OnnxScorer, images: Sequence[np.ndarray], class_name: str | None = None,
    refine: int | None = None, image_classes: Sequence[str | None] | None = None,
) -> list[np.ndarray] | None:
    """One (H, W) float32 heatmap in [0, 1] per image (see `explain`); None without a cam."""
    explained = explain(scorer, images, class_name, refine, image_classes)
    return None if explained is None else [e.heat for e in explained]


def heatmap(
    scorer: OnnxScorer, image: np.ndarray, class_name: str | None = None,
    refine: int | None = None,
) -> np.ndarray | None:
    """The (H, W) float32 heatmap in [0, 1] of one RGB image (see `explain`)."""
    maps = heatmaps(scorer, [image], class_name, refine)
    return None if maps is None else maps[0]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image with `heat` ([0, 1], same height and width) blended on top in viridis;
    where heat is 0 the image shows through, tinted with the colormap's dark blue."""
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} does not match the image {image.shape[:2]}")
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    levels = np.clip(np.nan_to_num(heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image and its `overlay`, left to right, with a 4-pixel white gap (RGB uint8)."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    gap = np.full((rgb.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([rgb, gap, overlay(rgb, heat, alpha)], axis=1)


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG, atomically and durably (`embryo_ml.fileio`)."""
    path = Path(path)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - only with a broken OpenCV build
        raise RuntimeError("OpenCV could not encode a PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, encoded.tobytes())


def explain_image(
    image_path: str | os.PathLike[str], bundle_dir: str | os.PathLike[str],
    out: str | os.PathLike[str], class_name: str | None = None, threads: int | None = None,
    day: str = "",
) -> Explanation:
    """`embryo-ml explain`: read one image, write `out` (PNG: the image | its heatmap overlay,
    at the image's own size), return the explanation. The bundle is verified first; a bundle
    without a class activation map or an unreadable image raises a one-line error. `day`: the
    image's day, used as `score` uses a manifest's (the bundle's day prior)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the overlay is written as PNG; name it *.png")
    bundle = read_bundle(bundle_dir)
    if bundle.cam_output is None:
        raise BundleError(f"bundle {bundle.path} has no class activation map (exported before "
                          "heatmaps existed); re-export it with this version: embryo-ml "
                          "export RUN_DIR --out BUNDLE")
    scorer = OnnxScorer(bundle, threads=threads, precision="fp32")
    image = read_image(image_path, scorer.max_pixels)
    explained = explain(scorer, [image], class_name, prior_values=[prior_value(day)])
    assert explained is not None  # the bundle has a cam output
    write_png(out, side_by_side(image, explained[0].heat))
    return explained[0]
