"""Progressive resizing: the first epochs train on smaller images, the last ones at full size.

A convolution's cost grows with the pixel count, so an epoch at 0.625 of the side costs about
40% of a full one. Early epochs learn coarse features, which a smaller image still shows (the
idea of FFCV's ResNet recipes and fast.ai's progressive resizing). The side grows linearly from
`start * image_size` at epoch 0 to the full size at 85% of the run (the last epochs at full
size), in steps of 8 px; validation, calibration and the exported model always use the full
size. So the model that is chosen and shipped is judged at the side it will score at.

The batch is shrunk in the loop (`resize_batch`: bilinear with antialiasing on the normalised
tensor, a linear map, so normalisation is unchanged) rather than in the dataset: the decoded
cache, the augmentation and persistent DataLoader workers stay the same for every epoch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

SIDE_STEP = 8  # px; sides are multiples of this (convolution strides divide them evenly)
RAMP_END = 0.85  # fraction of the run after which every epoch is at full size


def training_sides(image_size: int, epochs: int, start: float) -> list[int]:
    """The training side of each epoch: `start` (a fraction of `image_size`; 1 = off) at epoch
    0, linearly up to `image_size` at epoch round(0.85 * (epochs - 1)), full size after it. A
    one-epoch run, or a start at or above the full size, trains at full size throughout."""
    if epochs <= 1 or start >= 1.0:
        return [image_size] * epochs
    ramp = max(1, round(RAMP_END * (epochs - 1)))
    low = start * image_size
    sides = []
    for epoch in range(epochs):
        side = low + (image_size - low) * min(1.0, epoch / ramp)
        stepped = int(round(side / SIDE_STEP)) * SIDE_STEP
        sides.append(min(image_size, max(SIDE_STEP * 4, stepped)))
    return sides


def resize_batch(images: torch.Tensor, side: int) -> torch.Tensor:
    """`images` (N, C, H, W) at `side` x `side`; unchanged when already that size."""
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)


def accepts_side(model: nn.Module, side: int, channels: int = 3) -> bool:
    """Does `model` run on side x side inputs? Some models are built for one size (a ViT with a
    fixed patch grid raises on any other): one image's forward pass, in eval mode (running
    statistics untouched) and without gradients; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, channels, side, side, device=device))
        return True
    except Exception:  # noqa: BLE001 - any refusal of the size means "not this size"
        return False
    finally:
        model.train(was_training)


def schedule_for(model: nn.Module, image_size: int, epochs: int, start: float) -> list[int]:
    """`training_sides`, or full size throughout (with a log line) when `model` does not run on
    the smallest side."""
    sides = training_sides(image_size, epochs, start)
    if sides[0] != image_size and not accepts_side(model, sides[0]):
        log.info("progressive resizing off: the model does not accept %d px inputs; every "
                 "epoch trains at %d px", sides[0], image_size)
        return [image_size] * epochs
    return sides
