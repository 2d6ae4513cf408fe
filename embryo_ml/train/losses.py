"""Losses for imbalanced embryo data: class weights, focal loss, label smoothing.

Clinics transfer few embryos and discard many, so `good` is often the minority class. Class
weights (`auto` = inverse frequency on the training split) or a focal loss (down-weights easy,
confidently right examples) keep the minority from being ignored; label smoothing softens the
targets where grades are noisy between embryologists.

The Gardner multi-task loss (`MultiHeadLoss`) adds to that main-class loss a cross-entropy per
grade head (expansion, ICM, TE), each averaged over the rows where that grade was assessable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embryo_ml.config import LossConfig
from embryo_ml.data.heads import Heads, head_logits, head_targets, main_logits, main_targets
from embryo_ml.errors import ConfigError

IGNORE = -1  # target index of a grade that is not assessable


def class_weights(
    setting: str | Sequence[float], train_targets: np.ndarray, n_classes: int
) -> torch.Tensor | None:
    """`none` -> None; `auto` -> n / (k * count_c) on the training split; a list -> as given."""
    if isinstance(setting, str):
        if setting == "none":
            return None
        counts = np.bincount(train_targets, minlength=n_classes).astype(float)
        if (counts == 0).any():
            raise ConfigError("loss.class_weights=auto: a class has no training images")
        return torch.tensor(len(train_targets) / (n_classes * counts), dtype=torch.float32)
    if len(setting) != n_classes:
        raise ConfigError(f"loss.class_weights has {len(setting)} values for {n_classes} classes")
    return torch.tensor(list(setting), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 - p_true)^gamma; gamma=0 is plain (weighted) cross-entropy."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, targets, reduction="none",
                                     label_smoothing=self.label_smoothing)
        p_true = torch.softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        loss = (1.0 - p_true).clamp(min=0.0) ** self.gamma * per_sample
        if self.weight is None:
            return loss.mean()
        w = self.weight[targets]
        return (loss * w).sum() / w.sum()


def build_criterion(cfg: LossConfig, train_targets: np.ndarray, n_classes: int) -> nn.Module:
    weight = class_weights(cfg.class_weights, train_targets, n_classes)
    if cfg.focal_gamma > 0:
        return FocalLoss(cfg.focal_gamma, weight, cfg.label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not `IGNORE` (-1); exactly 0 (with zero
    gradient) when there is none, where a plain mean would give NaN and poison the step."""
    summed = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return summed / (targets != IGNORE).sum().clamp(min=1)


class MultiHeadLoss(nn.Module):
    """`main` (the configured criterion: class weights, focal, smoothing) on the main classes,
    plus `grade_weight` x masked cross-entropy on each head. Targets are the (N, 4) gardner
    rows (`embryo_ml.data.labels.GARDNER_TARGET_COLUMNS`)."""

    def __init__(self, main: nn.Module, n_classes: int, heads: Heads,
                 grade_weight: float = 1.0) -> None:
        super().__init__()
        self.main = main
        self.n_classes = n_classes
        self.heads = dict(heads)
        self.grade_weight = grade_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.main(main_logits(logits, self.n_classes), main_targets(targets))
        for name, head in self.heads.items():
            term = masked_cross_entropy(head_logits(logits, head), head_targets(targets, name))
            loss = loss + self.grade_weight * term
        return loss
