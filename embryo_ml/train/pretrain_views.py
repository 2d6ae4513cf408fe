"""Embryo-aware views for self-supervised pretraining: two random looks at one embryo.

A view is one affine warp of the source image (a crop that keeps the detected embryo in view,
rotated by any angle, maybe mirrored: an embryo has no "up") followed by what differs between
acquisitions of one embryo: focus blur (another focal plane), brightness/contrast and sensor
noise. Colour jitter is left out: embryo images are grey, often stored as RGB.

Every random draw comes from a generator seeded by (seed, epoch, index), so a view depends on
nothing else: an interrupted run that resumes sees the views it would have seen, whatever the
number of DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from embryo_ml.config import PretrainConfig
from embryo_ml.data.cache import DecodedCache
from embryo_ml.data.embryo_detector import find_embryo
from embryo_ml.data.preprocess import load_square

SOURCE_SCALE = 2  # views are cut from images at twice the model's side, so crops stay sharp
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels


@dataclass(frozen=True)
class ViewSettings:
    """The view settings of `PretrainConfig` (its defaults are the only ones), for a model
    input of `size` px normalised with `mean`/`std`."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_crop: float
    blur_p: float
    brightness: float
    contrast: float
    noise_p: float

    @classmethod
    def from_config(cls, cfg: PretrainConfig, size: int, mean: Sequence[float],
                    std: Sequence[float]) -> ViewSettings:
        return cls(size, tuple(mean), tuple(std), cfg.min_crop, cfg.blur_p, cfg.brightness,
                   cfg.contrast, cfg.noise_p)


def embryo_box(image: np.ndarray) -> Box | None:
    """The detected embryo's bounding box (`find_embryo`), clipped to the image, or None."""
    circle = find_embryo(image)
    if circle is None:
        return None
    cx, cy, r = circle
    h, w = image.shape[:2]
    return max(0.0, cx - r), max(0.0, cy - r), min(float(w), cx + r), min(float(h), cy + r)


def _crop_window(rng: np.random.Generator, side: int, box: Box | None, min_crop: float
                 ) -> tuple[float, float, float]:
    """(centre x, centre y, crop side) of a square crop of a `side` px image that contains
    `box` (the embryo) when given: never smaller than the embryo, nor than min_crop x side."""
    smallest = min_crop * side
    if box is not None:
        smallest = max(smallest, min(float(side), max(box[2] - box[0], box[3] - box[1])))
    crop = float(rng.uniform(smallest, side))
    if box is None:
        low, high = np.array([0.0, 0.0]), np.array([side - crop, side - crop])
    else:  # the crop's corner may move as far as the embryo stays inside it
        low = np.maximum(0.0, np.array([box[2], box[3]]) - crop)
        high = np.minimum(side - crop, np.array([box[0], box[1]]))
        high = np.maximum(high, low)
    corner = rng.uniform(low, high)
    return float(corner[0] + crop / 2), float(corner[1] + crop / 2), crop


def make_view(image: np.ndarray, box: Box | None, settings: ViewSettings,
              rng: np.random.Generator) -> np.ndarray:
    """One random view of `image` (HxWx3 uint8, square): CHW float32, normalised."""
    side = image.shape[0]
    cx, cy, crop = _crop_window(rng, side, box, settings.min_crop)
    scale = crop / settings.size
    angle = rng.uniform(0.0, 2 * math.pi)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    half = (settings.size - 1) / 2
    # output pixel (u, v) -> source point: centre + scale * rotation * mirrored offset
    matrix = np.array([[cos * mirror, -sin, cx - 0.5 - half * (cos * mirror - sin)],
                       [sin * mirror, cos, cy - 0.5 - half * (sin * mirror + cos)]])
    view = cv2.warpAffine(image, matrix, (settings.size, settings.size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101).astype(np.float32)
    if settings.blur_p and rng.random() < settings.blur_p:  # another focal plane
        sigma = rng.uniform(0.2, 1.2) * settings.size / 128  # mild: grades live in detail
        view = cv2.GaussianBlur(view, (0, 0), sigma)
    if rng.random() < 0.8:
        gain = 1 + rng.uniform(-settings.contrast, settings.contrast)
        offset = 255 * rng.uniform(-settings.brightness, settings.brightness) / 2
        view = (view - view.mean()) * gain + view.mean() + offset
    if settings.noise_p and rng.random() < settings.noise_p:
        view = view + rng.normal(0.0, rng.uniform(2.0, 10.0), view.shape).astype(np.float32)
    view = np.clip(view, 0.0, 255.0) / 255.0
    view = (view - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    return np.ascontiguousarray(view.transpose(2, 0, 1), dtype=np.float32)


def neighbour_index(groups: Sequence[Sequence[int]], window: int, n: int) -> list[list[int]]:
    """For each of `n` images, the other images of its embryo at most `window` places away in
    its group (the embryo's images in focal-plane or frame order); empty for a lone image."""
    partners: list[list[int]] = [[] for _ in range(n)]
    for members in groups:
        for place, image in enumerate(members):
            near = members[max(0, place - window):place + window + 1]
            partners[image] = [m for m in near if m != image]
    return partners


class PretrainImages(Dataset):
    """Yields two views (two CHW tensors) per image. The second view is cut from a
    neighbouring image of the same embryo with probability `pair_p` where one exists."""

    def __init__(self, paths: Sequence[str], partners: Sequence[Sequence[int]],
                 settings: ViewSettings, seed: int, pair_p: float = 0.0,
                 cache: DecodedCache | None = None, max_pixels: int | None = None) -> None:
        self.paths = list(paths)
        self.partners = [list(p) for p in partners] or [[] for _ in self.paths]
        self.settings = settings
        self.seed = seed
        self.pair_p = pair_p
        self.cache = cache
        self.max_pixels = max_pixels
        self.epoch = 0
        self._boxes: dict[int, Box | None] = {}

    @property
    def source_side(self) -> int:
        return SOURCE_SCALE * self.settings.size

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, index: int) -> np.ndarray:
        """The image at the source side, uint8 HxWx3 (from the decoded cache when there)."""
        if self.cache is not None:
            return np.asarray(self.cache.load(self.paths[index]))
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        return load_square(self.paths[index], self.source_side, **kwargs)

    def box(self, index: int, image: np.ndarray) -> Box | None:
        if index not in self._boxes:
            self._boxes[index] = embryo_box(image)
        return self._boxes[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        first = self.source(index)
        second_index = index
        if self.partners[index] and rng.random() < self.pair_p:
            second_index = int(rng.choice(self.partners[index]))
        second = first if second_index == index else self.source(second_index)
        views = (make_view(first, self.box(index, first), self.settings, rng),
                 make_view(second, self.box(second_index, second), self.settings, rng))
        return torch.from_numpy(views[0]), torch.from_numpy(views[1])
