"""torch Dataset over a manifest table: the one image reader, then an albumentations pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from embryo_ml.data.cache import DecodedCache
from embryo_ml.data.images import DEFAULT_MAX_PIXELS, read_image


class EmbryoImageDataset(Dataset):
    """Yields (float32 CHW tensor, target). The target is an int class index when `targets` is
    (N,), and an int64 tensor row when it is (N, K) (the Gardner multi-task rows
    `[main, expansion, icm, te]`); a DataLoader batches either. A decode failure raises
    `ImageReadError` naming the file: training on silently skipped images would bias the class
    balance."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int] | np.ndarray,
        transform: A.Compose,
        cache: DecodedCache | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode_min_side: int | None = None,
    ):
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.ndim not in (1, 2):
            raise ValueError(f"targets must be (N,) or (N, K), got shape {self.targets.shape}")
        self.transform = transform
        self.cache = cache
        self.max_pixels = max_pixels
        self.decode_min_side = decode_min_side  # see embryo_ml.data.preprocess.decode_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        path = self.paths[index]
        if self.cache is not None:
            image = self.cache.load(path)
        else:
            image = read_image(path, self.max_pixels, min_side=self.decode_min_side)
        out = self.transform(image=np.asarray(image))["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        if self.targets.ndim == 2:
            return tensor, torch.from_numpy(self.targets[index].copy())
        return tensor, int(self.targets[index])
