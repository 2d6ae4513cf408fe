"""albumentations pipelines: embryo-appropriate training augmentation and the eval pipeline.

An embryo has no "up": any-angle rotation and both flips are label-preserving. Microscopes differ
in illumination, focus and sensor noise, so brightness/contrast/gamma, blur and noise are too.
The eval pipeline resizes and normalises with `embryo_ml.data.preprocess`, the code the ONNX scorer
runs, so validation numbers carry over to scoring exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

from embryo_ml.data.preprocess import resize_square


def _resizer(size: int) -> A.Lambda:
    def resize(image: np.ndarray, **_: Any) -> np.ndarray:
        return resize_square(image, size)

    return A.Lambda(image=resize, p=1.0)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], seed: int | None = None
) -> A.Compose:
    """Resize to a square and normalise; returns HWC float32 (the Dataset makes it CHW)."""
    return A.Compose(
        [
            _resizer(image_size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        ],
        strict=True,
        seed=seed,
    )


def build_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    seed: int | None = None,
) -> A.Compose:
    """Resize first (augmenting at model size is cheaper), then geometric and photometric noise.

    `seed` makes the augmentation sequence repeatable (DataLoader workers reseed per worker)."""
    if not augment:
        return build_eval_transform(image_size, mean, std, seed)
    return A.Compose(
        [
            _resizer(image_size),
            A.Affine(
                rotate=(-180, 180), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05),
                border_mode=cv2.BORDER_REFLECT_101, p=0.9,
            ),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.RandomGamma(gamma_limit=(85, 115), p=0.3),
            A.GaussianBlur(blur_limit=(3, 5), p=0.15),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.15),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        ],
        strict=True,
        seed=seed,
    )
