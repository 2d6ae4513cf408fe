"""`embryo-ml augment-preview`: a grid of training augmentations, to see what the model sees.

Row i shows one image: the original (eval pipeline) first, then `n_aug` draws of the training
pipeline, all de-normalised back to pixels. Too strong an augmentation (a fragment blurred
away, a zona cut off) is obvious at a glance.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from embryo_ml.config import Config
from embryo_ml.data.images import read_image
from embryo_ml.data.manifest import load_table
from embryo_ml.data.transforms import build_eval_transform, build_train_transform
from embryo_ml.errors import DataError
from embryo_ml.fileio import atomic_path


def _to_pixels(normalised: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    pixels = (normalised * np.asarray(std) + np.asarray(mean)) * 255.0
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def augment_preview(
    cfg: Config, data: str | os.PathLike[str], out: str | os.PathLike[str],
    n_images: int = 6, n_aug: int = 7,
) -> Path:
    table = load_table(data)
    if table.empty:
        raise DataError(f"{data}: no images")
    mean = tuple(cfg.data.mean or (0.485, 0.456, 0.406))
    std = tuple(cfg.data.std or (0.229, 0.224, 0.225))
    size = cfg.data.image_size
    train = build_train_transform(size, mean, std, cfg.augment, seed=cfg.seed)
    plain = build_eval_transform(size, mean, std)
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(len(table), min(n_images, len(table)), replace=False)
    rows = []
    for index in sorted(chosen):
        image = read_image(table["path"].iloc[index], cfg.data.max_pixels)
        tiles = [plain(image=image)["image"]] + [train(image=image)["image"]
                                                 for _ in range(n_aug)]
        rows.append(np.concatenate([_to_pixels(t, mean, std) for t in tiles], axis=1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # the format follows out's extension, kept by tmp
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    return out
