"""One epoch of training and one evaluation pass: plain functions, torchvision-reference style."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from embryo_ml.errors import EmbryoMLError


class NonFiniteLossError(EmbryoMLError):
    """The loss became NaN/inf: training stops, the last good checkpoint is kept."""


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
) -> float:
    """Train for one pass over `loader`; the scheduler (and the EMA, if any) step per batch.
    Returns the mean loss."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = criterion(model(images), targets)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch}; lower train.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
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
) -> EvalOutput:
    """Logits and targets for every sample in `loader` (metrics are computed by the caller)."""
    model.eval()
    all_logits, all_targets, total = [], [], 0.0
    for images, targets in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        logits = model(images.to(device, non_blocking=True)).float()
        if criterion is not None:
            total += criterion(logits, targets.to(device)).item() * len(targets)
        all_logits.append(logits.cpu().numpy())
        all_targets.append(targets.numpy())
    logits = np.concatenate(all_logits) if all_logits else np.zeros((0, 0), np.float32)
    targets = np.concatenate(all_targets) if all_targets else np.zeros(0, np.int64)
    return EvalOutput(logits, targets, total / max(len(targets), 1))
