"""Grad-CAM from a training run's PyTorch checkpoint: a research tool (needs torch).

The scoring path and the report never need this: their heatmaps come from the bundle's ONNX
class activation map (`embryo_ml.score.explain`). Grad-CAM (Selvaraju et al. 2017) is for
looking inside a model from a notebook: any layer, any model, gradients instead of the head's
structure.

For a feature map A (C, h, w) and a target y, Grad-CAM weighs each channel by the spatial mean
of dy/dA and keeps the positive part of the weighted sum: ReLU(sum_c mean(dy/dA_c) * A_c). The
target here is the same quantity the ONNX heatmap shows, the class's logit minus the mean of the
main classes' logits. With the last feature map and a global-average-pool + linear head,
dy/dA_c is the constant (W_y,c - mean_k W_k,c) / (h w), so Grad-CAM is then the ONNX evidence
map divided by h w, up to the bias, which Grad-CAM leaves out: the two agree in shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from embryo_ml.data.preprocess import preprocess


def grad_cam(
    model: nn.Module, batch: torch.Tensor, class_index: int, n_classes: int,
    layer: nn.Module | None = None, relu: bool = True,
) -> np.ndarray:
    """(N, 3, S, S) preprocessed images -> (N, h, w) Grad-CAM maps (not normalised; >= 0 unless
    `relu` is False) for class `class_index` of the first `n_classes` logits, at `layer`'s
    output (default: the model's last feature map, `forward_features`)."""
    model.eval()
    captured: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["features"] = output

    with torch.enable_grad():
        images = batch.detach().clone().requires_grad_(True)  # gradients flow to every layer
        if layer is None:
            features = model.forward_features(images)
            features.retain_grad()
            captured["features"] = features
            logits = model.forward_head(features)
        else:
            handle = layer.register_forward_hook(keep)
            try:
                logits = model(images)
            finally:
                handle.remove()
        main = logits[:, :n_classes]
        target = main[:, class_index] - main.mean(dim=1)
        target.sum().backward()
    features = captured["features"]
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = (weights * features).sum(dim=1)
    return (torch.relu(cam) if relu else cam).detach().float().numpy()


def grad_cam_images(
    run_dir: str | Path, images: list[np.ndarray], class_name: str | None = None,
    layer: str | None = None,
) -> list[np.ndarray]:
    """Grad-CAM heatmaps of RGB uint8 images with the model of `run_dir/best.pt`, each upsampled
    to its image's size and divided by its maximum ([0, 1], zeros when nothing is positive),
    like `embryo_ml.score.explain.heatmap`. `class_name` defaults to the positive class;
    `layer` is a module name from `model.named_modules()` (default: the last feature map)."""
    import cv2

    from embryo_ml.export.onnx_export import load_run_model
    from embryo_ml.score.explain import normalise

    model, checkpoint = load_run_model(run_dir)
    classes = list(checkpoint["classes"])
    index = classes.index(class_name or checkpoint["positive_class"])
    size = int(checkpoint["image_size"])
    batch = torch.from_numpy(np.stack([preprocess(image, size, checkpoint["mean"],
                                                  checkpoint["std"]) for image in images]))
    module = dict(model.named_modules())[layer] if layer else None
    maps = grad_cam(model, batch, index, len(classes), module)
    return [normalise(cv2.resize(m, (image.shape[1], image.shape[0]),
                                 interpolation=cv2.INTER_LINEAR))
            for m, image in zip(maps, images, strict=True)]
