"""Data-parallel training under `torchrun` (DDP): process group, sharding, and gathering results.

`torchrun --nproc_per_node=N -m embryo_ml.train --config ... --out RUN` starts N processes; each
trains on its shard of the training images (DistributedSampler), gradients are averaged by
DistributedDataParallel, and every process evaluates a disjoint slice of the validation images
whose logits are then gathered, so every rank computes the same metrics, takes the same
early-stopping decision and ends with the same weights. Only rank 0 talks to MLflow and writes
files. gloo on CPU, nccl on CUDA (one GPU per process, `LOCAL_RANK`).

`train.batch_size` is per process (as in torchvision's reference scripts): the effective batch is
N x batch_size. Without torchrun (no `WORLD_SIZE` > 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(use_cuda: bool) -> DistContext:
    """Join the process group torchrun describes in the environment (or stay single-process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world_size, local_rank)


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def shard_indices(n: int, context: DistContext) -> list[int]:
    """This rank's slice of n evaluation items: every world_size-th, no padding, no repeats."""
    return list(range(context.rank, n, context.world_size))


def gather_rows(array: np.ndarray, context: DistContext) -> np.ndarray:
    """Reassemble per-rank slices made by `shard_indices` into the original order."""
    if not context.enabled:
        return array
    parts: list[np.ndarray | None] = [None] * context.world_size
    dist.all_gather_object(parts, array)
    total = sum(len(p) for p in parts if p is not None)
    out = np.empty((total, *array.shape[1:]), dtype=array.dtype)
    for rank, part in enumerate(parts):
        out[rank::context.world_size] = part
    return out


def mean_across_ranks(total: float, count: int, context: DistContext) -> float:
    """A sample-weighted mean over all ranks (e.g. the epoch's training loss)."""
    if not context.enabled:
        return total / max(count, 1)
    values = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(values)
    return float(values[0] / max(values[1].item(), 1.0))
