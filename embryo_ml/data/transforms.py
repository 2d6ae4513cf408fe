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

from embryo_ml.config import AugmentConfig
from embryo_ml.data.preprocess import resize_square


def _resizer(size: int) -> A.Lambda:
    def resize(image: np.ndarray, **_: Any) -> np.ndarray:
        return resize_square(image, size)

    return A.Lambda(name="resize_square", image=resize, p=1.0)


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
    augment: AugmentConfig | None = None,
    seed: int | None = None,
) -> A.Compose:
    """Resize first (augmenting at model size is cheaper), then geometric and photometric noise.

    `augment=None` means no augmentation (the eval pipeline). `seed` makes the augmentation
    sequence repeatable (DataLoader workers reseed per worker)."""
    if augment is None:
        return build_eval_transform(image_size, mean, std, seed)
    steps: list[A.BasicTransform] = [_resizer(image_size)]
    if augment.rotate_p or augment.scale or augment.shift:
        steps.append(A.Affine(
            rotate=(-180, 180) if augment.rotate_p else 0.0,
            scale=(1 - augment.scale, 1 + augment.scale),
            translate_percent=(-augment.shift, augment.shift),
            border_mode=cv2.BORDER_REFLECT_101,
            p=max(augment.rotate_p, 0.5),
        ))
    if augment.flip:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if augment.rot90:  # exact (no interpolation): keeps small fragments crisp at low resolution
        steps.append(A.RandomRotate90(p=0.75))
    if augment.brightness or augment.contrast:
        steps.append(A.RandomBrightnessContrast(
            brightness_limit=augment.brightness, contrast_limit=augment.contrast, p=0.5))
    if augment.gamma:
        low, high = round(100 * (1 - augment.gamma)), round(100 * (1 + augment.gamma))
        steps.append(A.RandomGamma(gamma_limit=(low, high), p=0.3))
    if augment.blur_p:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=augment.blur_p))
    if augment.noise_p:
        steps.append(A.GaussNoise(std_range=(0.01, 0.04), p=augment.noise_p))
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps, strict=True, seed=seed)
