"""SimSiam (Chen & He 2021) around a timm backbone: the method `embryo-ml pretrain` uses.

Why SimSiam: on a CPU the batch is small (tens of images). Contrastive methods (SimCLR) learn
from the negatives in a batch and lose much of their accuracy at small batches; BYOL needs a
momentum copy of the network (a third forward pass per step). SimSiam needs neither: two views
through one network, a predictor on one side and a stop-gradient on the other, which the paper
shows working at batch 64. Its failure mode is collapse (every image mapped to one point); the
spread of the normalised outputs (`output_spread`, 1/sqrt(dim) when healthy, 0 when collapsed)
is logged every epoch and a collapse is reported in one plain warning.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def projector(features: int, width: int) -> nn.Sequential:
    """Three linear layers with BatchNorm, the last without an affine part (as in the paper)."""
    return nn.Sequential(
        nn.Linear(features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width, affine=False))


def predictor(width: int, bottleneck: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, bottleneck, bias=False), nn.BatchNorm1d(bottleneck),
                         nn.ReLU(inplace=True), nn.Linear(bottleneck, width))


class SimSiam(nn.Module):
    """`backbone` must return pooled features (a timm model built with num_classes=0)."""

    def __init__(self, backbone: nn.Module, projection_dim: int = 512,
                 predictor_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        features = int(backbone.num_features)
        self.projector = projector(features, projection_dim)
        self.predictor = predictor(projection_dim, predictor_dim)

    def forward(self, first: torch.Tensor, second: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the projections of `first`): one forward pass of both views together, so
        BatchNorm sees one batch, as in a single-GPU run of the paper."""
        z = self.projector(self.backbone(torch.cat([first, second])))
        p = self.predictor(z)
        z1, z2 = z.chunk(2)
        p1, p2 = p.chunk(2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        return loss, z1.detach()


def negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SimSiam's loss: minus the cosine similarity, the target behind a stop-gradient."""
    return -F.cosine_similarity(prediction, target.detach(), dim=-1).mean()


def output_spread(projections: torch.Tensor) -> float:
    """The mean per-dimension std of the l2-normalised projections, times sqrt(dim): about 1
    for healthy outputs spread over the sphere, 0 for a collapsed network."""
    normalised = F.normalize(projections.float(), dim=1)
    return float(normalised.std(dim=0).mean()) * math.sqrt(normalised.shape[1])
