"""Model-input preprocessing shared by training (eval pipeline) and the ONNX scorer.

Torch-free on purpose: the scorer runs it on a hospital PC without the training stack, and the
eval transform in `transforms.py` is tested to give the same numbers, so a bundle scores images
exactly as the model saw them in validation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import cv2
import numpy as np

from embryo_ml.data.images import DEFAULT_MAX_PIXELS, read_image, read_image_bytes

# JPEG decoded at reduced scale (>= decode_side), then the whole image to a square: INTER_AREA
# when shrinking 2x or more, else bilinear (see resize_square)
RESIZE_POLICY = "reduced-decode-squash-area-or-linear"
DECODE_MIN_SIDE = 128  # never decode below this: the quality flags measure at ~128 px


def decode_side(size: int) -> int:
    """The smallest side an image is decoded at for a model of input `size` px.

    Training (cache and dataset), validation and scoring all decode through this, so the model
    is scored on exactly the pixels it was validated on. A 500 px JPEG for a 64-224 px model is
    decoded at 250 px (DCT scale 1/2) instead of 500: 3-4x less decoding time. The floor of 128
    px keeps the quality flags' working image (`embryo_ml.data.quality`, ~128 px) the same as
    from a full decode."""
    return max(int(size), DECODE_MIN_SIDE)


def load_square(
    path: str | os.PathLike[str], size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> np.ndarray:
    """The image file as the model sees it before normalising: (size, size, 3) uint8. `data`:
    the file's bytes, when the caller has already read them (decoded from memory, errors still
    naming `path`); empty or None reads the file."""
    if data:
        return resize_square(read_for_model(None, size, max_pixels, data=data, name=str(path)),
                             size)
    return resize_square(read_for_model(path, size, max_pixels), size)


def read_for_model(
    path: str | os.PathLike[str] | None, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None, name: str = "<bytes>",
) -> np.ndarray:
    """The decoded image (not yet resized) at the reduced size the model pipeline uses, from a
    file or from encoded bytes (`data`, named `name` in errors); callers that also measure the
    image (quality flags) resize it with `resize_square` afterwards."""
    if data is not None:
        return read_image_bytes(data, max_pixels, name=name, min_side=decode_side(size))
    return read_image(path, max_pixels, min_side=decode_side(size))  # type: ignore[arg-type]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the whole image to size x size. Embryo crops are square or nearly so; squashing
    keeps the whole zona in view, where a centre crop could cut off fragments at the rim.

    Shrinking by 2x or more averages areas (INTER_AREA: no aliasing); by less than 2x, as after
    a reduced JPEG decode (250 -> 224 px), bilinear, where every source pixel still counts and
    OpenCV takes 0.13 ms instead of 0.9 ms for the fractional area weights."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    longer = max(image.shape[0], image.shape[1])
    interpolation = cv2.INTER_AREA if longer >= 2 * size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 1, 256) float32: (v/255 - mean[c]) / std[c] for every grey level v of channel c."""
    scale = np.float32(1.0 / 255.0)
    levels = np.arange(256, dtype=np.float32)[None, :] * scale
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(3, 1)
    inv_std = (1.0 / np.asarray(std, dtype=np.float32)).reshape(3, 1)
    table = ((levels - mean_arr) * inv_std)[:, None, :]
    table.flags.writeable = False
    return table


def normalize_chw(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x/255 - mean) / std per channel.

    By table look-up (256 values per channel; OpenCV's LUT writes each channel's plane in
    place), 2.5x faster than the arithmetic on every pixel with the same numbers: this runs
    once per scored image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    table = _normalize_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    out = np.empty((3, *image.shape[:2]), dtype=np.float32)
    for channel, plane in enumerate(cv2.split(image)):
        cv2.LUT(plane, table[channel], dst=out[channel])
    return out


def preprocess(
    image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """RGB uint8 image -> the float32 (3, size, size) tensor the model expects."""
    return normalize_chw(resize_square(image, size), mean, std)
