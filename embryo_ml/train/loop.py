"""One epoch of training and one evaluation pass: plain functions, torchvision-reference style."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from embryo_ml.errors import EmbryoMLError
from embryo_ml.train.resolution import resize_batch


class NonFiniteLossError(EmbryoMLError):
    """The loss became NaN/inf: training stops, the last good checkpoint is kept."""


@dataclass
class Precision:
    """How tensors meet the model: autocast dtype (None = float32) and memory format.

    `scaler` is a GradScaler for float16 on CUDA (bfloat16 needs none)."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    def autocast(self, device: torch.device):  # noqa: ANN201 - a context manager
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def to_input(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


FLOAT32 = Precision()


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Is the loss finite on this process and, under DDP, on every other one? All ranks must
    stop together: one rank raising alone would leave the others waiting in all-reduce."""
    bad = torch.tensor([0.0 if math.isfinite(loss.item()) else 1.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            bad = bad.to(loss.device)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int = 0,
    progress: bool = True,
    ema: nn.Module | None = None,
    precision: Precision = FLOAT32,
    side: int | None = None,
) -> float:
    """Train for one pass over `loader`; the scheduler (and the EMA, if any) step per batch.
    Returns the mean loss. `model` may be wrapped in DistributedDataParallel; the EMA follows
    the unwrapped module. `side`: train on batches resized to side x side (progressive
    resizing, `embryo_ml.train.resolution`); None = as the loader gives them."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    for images, targets in bar:
        if side is not None:
            images = resize_batch(images, side)
        images = precision.to_input(images, device)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            loss = criterion(model(images).float(), targets)
        if not _finite_everywhere(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch}; lower train.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update(getattr(model, "module", model))
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(targets)
        count += len(targets)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


@dataclass
class EvalOutput:
    logits: np.ndarray  # (N, C) float32
    targets: np.ndarray  # (N,) int
    loss: float


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    criterion: nn.Module | None = None,
    progress: bool = False,
    precision: Precision = FLOAT32,
) -> EvalOutput:
    """Logits and targets for every sample in `loader` (metrics are computed by the caller)."""
    model.eval()
    all_logits, all_targets, total = [], [], 0.0
    for images, targets in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        with precision.autocast(device):
            logits = model(precision.to_input(images, device)).float()
        if criterion is not None:
            total += criterion(logits, targets.to(device)).item() * len(targets)
        all_logits.append(logits.cpu().numpy())
        all_targets.append(targets.numpy())
    logits = np.concatenate(all_logits) if all_logits else np.zeros((0, 0), np.float32)
    targets = np.concatenate(all_targets) if all_targets else np.zeros(0, np.int64)
    return EvalOutput(logits, targets, total / max(len(targets), 1))
