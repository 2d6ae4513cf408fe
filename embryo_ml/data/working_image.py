"""The small grey copy of an image that every pixel measurement reads.

An image is made grey (`_gray`), shrunk by a whole factor to about WORK_SIDE px on its longer
side (`_working`: the focus and exposure measures), and for the embryo search resized to exactly
WORK_SIDE (`_detection_image`). Shared by `embryo_ml.data.quality` (the flags) and
`embryo_ml.data.embryo_detector` (the round-outline search), so neither imports the other's
internals for it.

numpy and OpenCV only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

import cv2
import numpy as np

WORK_SIDE = 128  # pixel measurements are made with the longer side shrunk to about this


def _gray(image: np.ndarray) -> np.ndarray:
    """uint8 single-channel copy (or view) of a grey, RGB or RGBA array."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        image = cv2.cvtColor(image, code)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a grey or RGB image, got shape {image.shape}")
    return image


def _working(gray: np.ndarray) -> np.ndarray:
    """The grey image shrunk by the smallest whole factor that brings its longer side to at most
    WORK_SIDE (500 -> 125, 256 -> 128, 1024 -> 128 px; smaller images stay as they are).

    A near-fixed size makes the focus measure mean the same for a 256 px and a 2000 px image;
    a whole factor keeps it exact and fast (OpenCV's area averaging by a whole factor takes
    0.02 ms at 500 px, by a fractional one 0.3 ms). Enlarging would add no detail, so the focus
    measure would only see the interpolation. Up to factor-1 edge pixels are dropped.
    """
    k = -(-max(gray.shape) // WORK_SIDE)
    while k > 1:
        step = 2 if k % 2 == 0 else k  # halving is OpenCV's fastest path of all
        h, w = max(1, gray.shape[0] // step), max(1, gray.shape[1] // step)
        gray = cv2.resize(gray[: h * step, : w * step], (w, h), interpolation=cv2.INTER_AREA)
        k //= step
    return gray


def _detection_image(work: np.ndarray) -> np.ndarray:
    """The working image resized (bilinear) to exactly WORK_SIDE on its longer side: the circle
    search counts in pixels, and it smooths the image first anyway."""
    h, w = work.shape
    if max(h, w) == WORK_SIDE:
        return work
    scale = WORK_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(work, size, interpolation=cv2.INTER_LINEAR)
