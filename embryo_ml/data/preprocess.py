"""Model-input preprocessing shared by training (eval pipeline) and the ONNX scorer.

Torch-free on purpose: the scorer runs it on a hospital PC without the training stack, and the
eval transform in `transforms.py` is tested to give the same numbers, so a bundle scores images
exactly as the model saw them in validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

RESIZE_POLICY = "squash-inter-area"  # whole image to a square, cv2 INTER_AREA (see README)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the whole image to size x size. Embryo crops are square or nearly so; squashing
    keeps the whole zona in view, where a centre crop could cut off fragments at the rim."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def normalize_chw(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x/255 - mean) / std per channel."""
    scale = np.float32(1.0 / 255.0)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    inv_std = (1.0 / np.asarray(std, dtype=np.float32)).reshape(3, 1, 1)
    chw = image.transpose(2, 0, 1).astype(np.float32) * scale
    return (chw - mean_arr) * inv_std


def preprocess(
    image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """RGB uint8 image -> the float32 (3, size, size) tensor the model expects."""
    return normalize_chw(resize_square(image, size), mean, std)
