"""What trains the model: loaders, optimizer groups, schedule, EMA, and the epoch loop.

`build_trainer` turns a model, its training images and the `Recipe` (which learning rates and
freezing apply, see `embryo_ml.train.recipe`) into a `Trainer`; `Trainer.run_epoch` is one
epoch of `train_one_epoch`. `fit` uses it for the validation run and, with `train.refit`, for the
retraining on all images, so both train exactly the same way.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from embryo_ml.config import Config
from embryo_ml.data.heads import Heads, output_width
from embryo_ml.train.distributed import DistContext, mean_across_ranks
from embryo_ml.train.ema import WarmupEma
from embryo_ml.train.loop import Precision, train_one_epoch
from embryo_ml.train.losses import MultiHeadLoss, build_criterion
from embryo_ml.train.recipe import Recipe
from embryo_ml.train.resolution import schedule_for


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """LR multiplier per step: linear warmup, then cosine decay to 1% of the base rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def worker_init(worker_id: int) -> None:
    """Give each DataLoader worker its own, repeatable augmentation stream."""
    info = torch.utils.data.get_worker_info()
    seed = int(info.seed % 2**31) if info else worker_id
    random.seed(seed)
    np.random.seed(seed)
    if info is not None:
        info.dataset.transform.set_random_seed(seed)


def worker_count(cfg: Config, device: torch.device) -> int:
    """`data.num_workers`, with `auto` resolved: 0 on a CPU, min(8, cores) with CUDA.

    On a CPU the training threads already use every core, and worker processes take cores
    from them: with the decoded cache (later epochs read memory-mapped pixels), 2 cores,
    resnet18 at 128 px, the whole train command was 11% faster without workers than with 2,
    in fp32 and bf16 (docs/benchmarks.md). Without workers a resumed run also continues the
    exact augmentation stream (fresh workers after a resume would draw another). With CUDA
    the CPU's cores are free to decode and augment for the GPU."""
    if cfg.data.num_workers != "auto":
        return int(cfg.data.num_workers)
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def loader_args(cfg: Config, device: torch.device) -> dict[str, Any]:
    workers = worker_count(cfg, device)
    return {"batch_size": cfg.train.batch_size, "num_workers": workers,
            "pin_memory": device.type == "cuda", "worker_init_fn": worker_init,
            "persistent_workers": workers > 0}


def parameter_groups(model: nn.Module, recipe: Recipe) -> tuple[list[dict], list[nn.Parameter]]:
    """Backbone and head as two optimizer groups (the recipe's learning rates); returns the
    groups and the backbone parameters (frozen during the recipe's freeze epochs)."""
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": backbone, "lr": recipe.backbone_lr},
              {"params": head, "lr": recipe.head_lr}]
    return [g for g in groups if g["params"]], backbone


def _train_sampler(
    targets: np.ndarray, n_classes: int, generator: torch.Generator
) -> WeightedRandomSampler:
    """Each class drawn equally often in expectation (with replacement)."""
    counts = np.bincount(targets, minlength=n_classes).astype(float)
    weights = 1.0 / counts[targets]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(targets),
                                 replacement=True, generator=generator)


def constant_prediction_loss(criterion: nn.Module, item_targets: np.ndarray, width: int,
                             n_classes: int, main_targets: np.ndarray) -> float:
    """The training loss of the best input-blind prediction (uniform, or the class prior):
    a model whose loss stays there has learned nothing from the images."""
    targets = torch.as_tensor(item_targets)
    uniform = torch.zeros(len(targets), width)
    prior = np.bincount(main_targets, minlength=n_classes) / max(len(main_targets), 1)
    with_prior = uniform.clone()
    with_prior[:, :n_classes] = torch.as_tensor(np.log(np.clip(prior, 1e-6, None)))
    with torch.no_grad():
        return min(float(criterion(uniform, targets)), float(criterion(with_prior, targets)))


def adamw(groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these parameters: on CPU the
    default per-tensor loop cost 0.07-0.8 s a step for resnet18 (2 cores), fused 0.02-0.04 s,
    the same update."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


@dataclass
class Trainer:
    model: nn.Module  # the unwrapped model (what the optimizer updates)
    trained: nn.Module  # `model`, or its DistributedDataParallel wrapper
    scored: nn.Module  # what is evaluated and exported: the EMA copy, or `model`
    loader: DataLoader
    sampler: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: WarmupEma | None
    criterion: nn.Module
    backbone: list[nn.Parameter]
    recipe: Recipe
    generator: torch.Generator
    baseline_loss: float
    sides: list[int]  # the training side of each epoch (`embryo_ml.train.resolution`)

    def side(self, epoch: int) -> int:
        return self.sides[min(epoch, len(self.sides) - 1)]

    def run_epoch(self, epoch: int, device: torch.device, precision: Precision,
                  context: DistContext, progress: bool) -> float:
        """One epoch (backbone frozen while the recipe says so, at the epoch's side); returns
        the mean loss."""
        for parameter in self.backbone:
            parameter.requires_grad_(epoch >= self.recipe.freeze_backbone_epochs)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        loss = train_one_epoch(self.trained, self.loader, self.optimizer, self.criterion, device,
                               self.scheduler, epoch, progress, self.ema, precision,
                               self.side(epoch))
        return mean_across_ranks(loss, 1, context)

    def state(self) -> dict[str, Any]:
        """What `last.pt` needs of the trainer to continue exactly."""
        return {"model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_trainer(
    cfg: Config, model: nn.Module, recipe: Recipe, train_set: torch.utils.data.Dataset,
    main_targets: np.ndarray, n_classes: int, heads: Heads, device: torch.device,
    context: DistContext, epochs: int,
) -> Trainer:
    """Loader, loss, optimizer, warm-up + cosine schedule and EMA for `epochs` epochs of
    `train_set` (`main_targets`: its main-class indices, for class weights and the sampler)."""
    sides = schedule_for(model, cfg.data.image_size, epochs, cfg.train.progressive_resize)
    generator = torch.Generator().manual_seed(cfg.seed)
    drop_last = len(train_set) > cfg.train.batch_size * context.world_size
    if context.enabled:
        sampler = DistributedSampler(train_set, context.world_size, context.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=drop_last)
    else:
        sampler = (_train_sampler(main_targets, n_classes, generator)
                   if cfg.train.weighted_sampler else None)
    loader = DataLoader(train_set, shuffle=sampler is None, sampler=sampler,
                        drop_last=drop_last, generator=generator, **loader_args(cfg, device))
    # DDP averages gradients across ranks; frozen-backbone epochs leave some parameters unused.
    trained = (DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=recipe.freeze_backbone_epochs > 0)
        if context.enabled else model)
    criterion = build_criterion(cfg.loss, main_targets, n_classes)
    if heads:
        criterion = MultiHeadLoss(criterion, n_classes, heads, cfg.loss.grade_weight)
    groups, backbone = parameter_groups(model, recipe)
    optimizer = adamw(groups, cfg.train.weight_decay)
    total_steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total_steps, cfg.train.warmup_epochs * len(loader)))
    ema = (WarmupEma(model, cfg.train.ema_decay, total_steps, cfg.train.ema_warmup)
           if cfg.train.ema else None)
    baseline = constant_prediction_loss(criterion, train_set.targets,
                                        output_width(n_classes, heads), n_classes, main_targets)
    return Trainer(model, trained, ema.module if ema else model, loader, sampler, optimizer,
                   scheduler, ema, criterion.to(device), backbone, recipe, generator, baseline,
                   sides)
