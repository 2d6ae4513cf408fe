"""An exponential moving average of the weights that means something in short runs too.

A fixed decay of 0.998 averages over the last ~500 optimizer steps. A clinic set of 600 images
trains for ~15 steps an epoch, so after 10 epochs (~150 steps) such an EMA is still ~75% the
random initialisation, and evaluating or exporting it exports noise. Two rules fix that:

- **warm-up**: step t uses decay min(decay_max, (1 + t) / (10 + t)), so the first updates follow
  the trained weights closely (0.1, 0.18, 0.25, ...) and the average lengthens as training goes;
- **horizon cap**: decay_max = min(train.ema_decay, 1 - 10 / total_steps), so the average never
  spans more than a tenth of the whole run (a 150-step run: decay <= 0.933; 5,000 steps: 0.998).

Floating-point buffers (BatchNorm running statistics) are averaged like the weights; integer
buffers (`num_batches_tracked`) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_cap(decay: float, total_steps: int) -> float:
    """The largest decay a run of `total_steps` optimizer steps uses (the horizon cap)."""
    return min(decay, max(0.0, 1.0 - 10.0 / max(total_steps, 1)))


class WarmupEma:
    """`update(model)` after every optimizer step; `module` is the averaged copy (eval mode)."""

    def __init__(self, model: nn.Module, decay: float, total_steps: int,
                 warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.warmup = warmup
        self.max_decay = ema_decay_cap(decay, total_steps) if warmup else decay
        self.updates = 0

    def decay(self) -> float:
        """The decay of the next update (`warmup=False`: always the configured decay)."""
        if not self.warmup:
            return self.max_decay
        return min(self.max_decay, (1.0 + self.updates) / (10.0 + self.updates))

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(averaged floats, model floats, averaged others, model others), matched by name,
        built once per model: one fused lerp per update instead of a Python loop over
        tensors (0.2 s a step for resnet18 on 2 CPU cores)."""
        if getattr(self, "_source", None) is not model:
            averaged, current = self.module.state_dict(), model.state_dict()
            floats = [n for n, t in averaged.items() if t.is_floating_point()]
            others = [n for n in averaged if n not in set(floats)]
            self._cached = ([averaged[n] for n in floats], [current[n] for n in floats],
                            [averaged[n] for n in others], [current[n] for n in others])
            self._source = model
        return self._cached

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay()
        averaged, current, averaged_other, current_other = self._pairs(model)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        for target, value in zip(averaged_other, current_other):
            target.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Either form: `{"module", "updates"}` (this class) or a bare module state dict
        (checkpoints written before the warm-up existed: the step count restarts)."""
        if "module" in state and "updates" in state:
            self.module.load_state_dict(state["module"])
            self.updates = int(state["updates"])
        else:
            self.module.load_state_dict(state)
