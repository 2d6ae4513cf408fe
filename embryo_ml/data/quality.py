"""Plain-word quality flags for scored images: when a score should not be trusted, say why.

A score is always reported; the flags tell the embryologist when the image behind it is
`blurry`, `under_exposed`, `over_exposed`, shows `no_embryo`, or drew logits unlike anything the
model met in validation (`out_of_distribution`). Pixel flags come from cheap measurements on one
small grey copy of the image (they run in the scorer's decoding threads, about 1 ms for a 500 px
image, about twice that for a close crop that needs the second look); the out-of-distribution
flag comes from the logits. Thresholds are learned from training images and validation logits
(`fit_thresholds`) and are kept in bundle.json as a plain dict.

`no_embryo` means no embryo-sized round outline (the zona pellucida) was found, in two looks
on the same gradients: the first for whole wells and loosely framed embryos (a Hough vote and
a full ring), the second for close crops whose zona touches or leaves the frame. Images whose
edges are mostly ruler-straight (drawn shapes, text) or only smooth slopes (vignettes, blobs)
are ruled out first. The search lives in `embryo_ml.data.embryo_detector` (its `find_embryo` is
re-exported here); the grey working image both read, in `embryo_ml.data.working_image`. On the
shared real samples, whole and cropped close at 0-15% margins and off-centre, at most 0.2% of
the images are flagged (`benchmarks/no_embryo_real.py`, `tests/test_no_embryo_real.py`).

numpy, OpenCV and the standard library only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from embryo_ml.data.embryo_detector import _has_embryo, find_embryo
from embryo_ml.data.working_image import WORK_SIDE as WORK_SIDE
from embryo_ml.data.working_image import _detection_image, _gray, _working

__all__ = [
    "FLAG_NAMES",
    "QualityThresholds",
    "energy_score",
    "exposure",
    "find_embryo",
    "fit_thresholds",
    "image_flags",
    "join_flags",
    "laplacian_variance",
    "logit_flags",
]

FLAG_NAMES = ("blurry", "under_exposed", "over_exposed", "no_embryo", "out_of_distribution",
              "uncertain", "day_mismatch")

DARK_LEVEL = 5  # grey levels <= this count as clipped black
BRIGHT_LEVEL = 250  # grey levels >= this count as clipped white
BLUR_MARGIN = 0.5  # blur_min = this x the `blur_quantile` of the training images' focus


@dataclass(frozen=True)
class QualityThresholds:
    """The limits behind the flags; stored in bundle.json under "quality" (`to_dict`).

    The exposure defaults are set for well images. In the shared real samples (STORK, a
    time-lapse incubator, EmbryoScope-like wells) the black corners round the well put up to
    37% of pixels at <= 5 and the mean grey goes down to 26, so the limits sit beyond what
    normal clinic images reach; a synthetic embryo darkened to 12% (mean ~16) is flagged.
    """

    blur_min: float  # `laplacian_variance` below this -> blurry (learned by fit_thresholds)
    dark_max_mean: float = 20.0  # mean grey below this -> under_exposed
    bright_min_mean: float = 220.0  # mean grey above this -> over_exposed
    clipped_fraction: float = 0.5  # more than this share <= 5 (>= 250) -> under (over) exposed
    ood_energy_max: float | None = None  # energy above this -> out_of_distribution; None = unfit

    def __post_init__(self) -> None:
        if not self.blur_min >= 0.0:
            raise ValueError(f"blur_min must be >= 0, got {self.blur_min}")
        if not 0.0 <= self.clipped_fraction <= 1.0:
            raise ValueError(f"clipped_fraction must be in [0, 1], got {self.clipped_fraction}")
        if not self.dark_max_mean < self.bright_min_mean:
            raise ValueError("dark_max_mean must be below bright_min_mean")

    def to_dict(self) -> dict[str, float | None]:
        return {k: (None if v is None else float(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> QualityThresholds:
        """Inverse of `to_dict`; missing optional keys take their defaults, unknown keys are an
        error (a typo must not silently fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quality threshold(s): {', '.join(unknown)}")
        if data.get("blur_min") is None:
            raise ValueError("quality thresholds need a numeric 'blur_min'")
        return cls(**{k: (None if v is None else float(v)) for k, v in data.items()})


# --------------------------------------------------------------------------------------------
# Pixel measurements



def laplacian_variance(gray: np.ndarray) -> float:
    """Focus measure: variance of the 4-neighbour Laplacian of the grey image shrunk to about
    128 px on its longer side (see `_working`), grey levels scaled to a mean of 128.

    The Laplacian responds to the finest edges, which defocus removes first, so its variance
    falls steeply with blur while staying cheap (one 3x3 filter). Measuring at a near-fixed
    size makes the value nearly independent of the file's resolution; scaling to a fixed mean
    keeps a dim but sharp image from reading as blurry (exposure has flags of its own).
    """
    return _focus(_working(_gray(gray)))


def _focus(work: np.ndarray, mean: float | None = None) -> float:
    """`laplacian_variance` of the working image. `mean`, its mean grey where known, saves a
    pass; `_exposure`'s equals work.mean() exactly (both divide the exact sum by the count)."""
    if mean is None:
        mean = float(work.mean())
    if mean < 1.0:
        return 0.0
    _, std = cv2.meanStdDev(cv2.Laplacian(work, cv2.CV_16S, ksize=1))
    return float(std[0, 0] ** 2 * (128.0 / mean) ** 2)


def exposure(gray: np.ndarray) -> tuple[float, float, float]:
    """(mean grey, share of pixels <= 5, share of pixels >= 250), on the image shrunk to about
    128 px (see `_working`)."""
    return _exposure(_working(_gray(gray)))


_LEVELS = np.arange(256, dtype=np.float64)


def _exposure(work: np.ndarray) -> tuple[float, float, float]:
    hist = cv2.calcHist([work], [0], None, [256], [0, 256]).ravel()
    total = float(work.size)  # = hist.sum(), exactly
    mean = float(np.dot(hist, _LEVELS) / total)
    dark = float(hist[: DARK_LEVEL + 1].sum() / total)
    return mean, dark, float(hist[BRIGHT_LEVEL:].sum() / total)


# --------------------------------------------------------------------------------------------
# Logits and flags


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy score -T * logsumexp(logits / T) per row (Liu et al. 2020); higher = less like
    the data the model was trained on.

    Rather than the maximum softmax probability: softmax only sees differences between logits,
    so an input that excites no class at all (all logits small) can still look confident;
    the energy keeps the logits' overall size, which is what drops off away from the training
    data. A 1-D array is one row.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[None, :]
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"expected logits of shape (N, C), got {z.shape}")
    z = z / temperature
    top = z.max(axis=1)
    return -temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def fit_thresholds(
    train_grays: Iterable[np.ndarray],
    val_logits: np.ndarray | None = None,
    blur_quantile: float = 0.01,
    ood_quantile: float = 0.99,
) -> QualityThresholds:
    """Learn the data-dependent limits; the exposure limits keep their defaults.

    blur_min = 0.5 x the `blur_quantile` quantile of the training images' `laplacian_variance`:
    the sharpness a clinic's own training images reach, with a factor-2 margin so that the
    softest accepted images are not flagged (one focal step of blur lowers it 2-3x).
    ood_energy_max = the `ood_quantile` quantile of the validation energy scores at T = 1
    (flag with `logit_flags` at the same temperature); None without validation logits.
    """
    for name, q in (("blur_quantile", blur_quantile), ("ood_quantile", ood_quantile)):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {q}")
    focus = np.array([laplacian_variance(g) for g in train_grays], dtype=np.float64)
    if focus.size == 0:
        raise ValueError("fit_thresholds needs at least one training image")
    ood = None
    if val_logits is not None:
        energy = energy_score(val_logits)
        if energy.size == 0:
            raise ValueError("val_logits has no rows")
        ood = float(np.quantile(energy, ood_quantile))
    return QualityThresholds(
        blur_min=BLUR_MARGIN * float(np.quantile(focus, blur_quantile)), ood_energy_max=ood
    )


def image_flags(rgb: np.ndarray, thresholds: QualityThresholds) -> list[str]:
    """Pixel flags of one decoded image (RGB or grey uint8), in FLAG_NAMES order. All four
    measurements share one grey copy of about 128 px: about 1 ms for a 500x500 RGB image of a
    well, a sixth of it the grey conversion; a close crop that takes the second look for its
    embryo (see `_close_ring`) about twice that."""
    gray = _gray(rgb)
    work = _working(gray)
    mean, dark, bright = _exposure(work)
    detect = _detection_image(work)
    flags = []
    if _focus(work, mean) < thresholds.blur_min:
        flags.append("blurry")
    if mean < thresholds.dark_max_mean or dark > thresholds.clipped_fraction:
        flags.append("under_exposed")
    if mean > thresholds.bright_min_mean or bright > thresholds.clipped_fraction:
        flags.append("over_exposed")
    if not _has_embryo(detect):
        flags.append("no_embryo")
    return flags


def logit_flags(
    logits: np.ndarray, thresholds: QualityThresholds, temperature: float = 1.0
) -> list[list[str]]:
    """Per row: ["out_of_distribution"] when its energy exceeds `ood_energy_max`, else [].
    Nothing is flagged while the threshold is unfit (None)."""
    energy = energy_score(logits, temperature)
    limit = thresholds.ood_energy_max
    if limit is None:
        return [[] for _ in energy]
    return [["out_of_distribution"] if e > limit else [] for e in energy]


def join_flags(flags: Iterable[str]) -> str:
    """One CSV cell: "blurry;no_embryo" (FLAG_NAMES order, no duplicates), "" when none."""
    present = set(flags)
    unknown = present - set(FLAG_NAMES)
    if unknown:
        raise ValueError(f"unknown quality flag(s): {', '.join(sorted(unknown))}")
    return ";".join(name for name in FLAG_NAMES if name in present)
