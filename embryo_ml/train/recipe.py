"""Which training rules apply: fine-tuning loaded weights, or training from scratch.

One config (`configs/default.yaml`) must work in both worlds, so the rules that only make sense
for loaded weights follow what was actually loaded (`train.adapt_to_weights`, default true):

| | weights loaded (hub or `model.pretrained_file`) | none loaded (random init) |
|---|---|---|
| backbone learning rate | `train.lr` | `train.scratch_lr` (None: `head_lr`, else `lr`) |
| head learning rate | `train.head_lr` (None: `lr`) | the same as the backbone |
| `freeze_backbone_epochs` | applied | ignored: freezing random features teaches nothing |

Why: a small backbone rate protects features that already work (fine-tuning); a random backbone
has nothing to protect, and at a fine-tuning rate (1e-4) it barely moves in a short run. With
`adapt_to_weights: false` every setting applies as written (the behaviour before this rule).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from embryo_ml.config import TrainConfig

WEIGHT_SOURCES = ("hub", "file", "none")


@dataclass(frozen=True)
class Recipe:
    weights: str  # hub | file | none: where the starting weights came from
    backbone_lr: float
    head_lr: float
    freeze_backbone_epochs: int
    rule: str  # fine-tune | from-scratch | as-written

    def describe(self) -> str:
        """One log line: which case applied and what it set."""
        source = {"hub": "pretrained weights from the timm hub",
                  "file": "pretrained weights from model.pretrained_file",
                  "none": "no pretrained weights (random init)"}[self.weights]
        freeze = (f", backbone frozen for {self.freeze_backbone_epochs} epoch(s)"
                  if self.freeze_backbone_epochs else ", nothing frozen")
        return (f"recipe: {self.rule} ({source}): backbone lr {self.backbone_lr:g}, head lr "
                f"{self.head_lr:g}{freeze}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_recipe(train: TrainConfig, weights: str) -> Recipe:
    """The learning rates and freezing for a run that started from `weights`."""
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights must be one of {WEIGHT_SOURCES}, got {weights!r}")
    head_lr = train.head_lr or train.lr
    if not train.adapt_to_weights:
        return Recipe(weights, train.lr, head_lr, train.freeze_backbone_epochs, "as-written")
    if weights == "none":
        rate = train.scratch_lr or head_lr
        return Recipe(weights, rate, rate, 0, "from-scratch")
    return Recipe(weights, train.lr, head_lr, train.freeze_backbone_epochs, "fine-tune")
