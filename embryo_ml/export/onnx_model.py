"""The model as ONNX: the export wrapper (logits, class activation map, pooled features), the
dynamo export, and the parity checks of ONNX Runtime against PyTorch.

Class activation map. Where the model's head allows it, the ONNX model has a second output `cam`,
(N, K, h, w) for the K main classes: the classifier applied to the feature vector at each of the
h x w locations of the last feature map, before pooling (CAM, Zhou et al. 2016). For a head that
is global average pooling then a linear layer (timm ResNets, EfficientNets, RegNets, ...) this is
exact: cam[n, k] = W_k . f(x, y) + b_k, and its spatial mean is logits[n, k]. For a head with
per-vector layers between pooling and the linear layer (ConvNeXt: pool -> LayerNorm -> Linear)
those layers are applied at each location instead of to the mean, an approximation whose spatial
mean is close to, not equal to, the logit. A head that fits neither (attention pooling, max
pooling, a convolution after the pool) gets no `cam`: the export goes on without it, says so in
a log line, and `Bundle.cam_output` stays None. The parity check covers `cam` too.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from embryo_ml.data.heads import Heads, blockwise_softmax
from embryo_ml.errors import BundleError
from embryo_ml.evaluation.ood import FEATURE_OUTPUT

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
CAM_OUTPUT = "cam"
CAM_PARITY_TOLERANCE = 1e-3  # max abs difference relative to the map's largest magnitude
CAM_IDENTITY_TOLERANCE = 1e-4  # exact heads: |spatial mean of cam - logits|, relative

LocalHead = Callable[[torch.Tensor], torch.Tensor]  # (N, C, h, w) features -> (N, K, h, w)


def _linear_per_location(features: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """Apply per-vector layers (Linear, activations, ...) to each location's channel vector."""
    return fc(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _is_average_pool(pool: object) -> bool:
    return getattr(pool, "pool_type", None) == "avg" and not getattr(pool, "flatten_first", False)


def local_classifier(model: nn.Module) -> tuple[LocalHead, bool] | None:
    """The model's classifier applied at every location of a feature map, and whether that is
    exact (its spatial mean equals the logits); None when the head is not one we understand.

    Understood: timm's `NormMlpClassifierHead` (ConvNeXt: avg pool -> norm -> pre_logits -> fc;
    exact only when norm and pre_logits are identities) and an average pool then one linear
    layer, as `model.global_pool` + `model.get_classifier()` or a `ClassifierHead`. The caller
    still checks the claim on a real input (`_probe_cam`): a model whose `forward_head` does
    more than its attributes suggest is caught there."""
    from timm.layers import ClassifierHead, NormMlpClassifierHead

    head = getattr(model, "head", None)
    if isinstance(head, NormMlpClassifierHead):
        if not _is_average_pool(head.global_pool) or not isinstance(head.fc, nn.Linear):
            return None
        if not isinstance(head.norm, nn.LayerNorm | nn.Identity):  # LayerNorm2d is a LayerNorm
            return None

        def norm_mlp(features: torch.Tensor) -> torch.Tensor:
            x = head.norm(features)  # LayerNorm2d normalises each location's channels
            return _linear_per_location(x, nn.Sequential(head.pre_logits, head.fc))

        exact = isinstance(head.norm, nn.Identity) and isinstance(head.pre_logits, nn.Identity)
        return norm_mlp, exact
    if isinstance(head, ClassifierHead):
        pool, fc = head.global_pool, head.fc
    else:
        pool, fc = getattr(model, "global_pool", None), model.get_classifier()
    if not _is_average_pool(pool) or not isinstance(fc, nn.Linear):
        return None
    return (lambda features: _linear_per_location(features, fc)), True


class ExportModel(nn.Module):
    """`image -> (logits[, cam][, features])`: the model's logits, computed as before; with a
    `local_head`, the class activation map of the first `n_classes` outputs from the same
    feature map; with `features`, the pooled penultimate features the classifier reads (timm's
    `forward_head(pre_logits=True)`), for the out-of-distribution score
    (`embryo_ml.evaluation.ood`).
    """

    def __init__(self, model: nn.Module, local_head: LocalHead | None, n_classes: int,
                 features: bool = False) -> None:
        super().__init__()
        self.model, self.local_head, self.n_classes = model, local_head, n_classes
        self.features = features

    @property
    def output_names(self) -> list[str]:
        return (["logits"] + [CAM_OUTPUT] * (self.local_head is not None)
                + [FEATURE_OUTPUT] * self.features)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature_map = self.model.forward_features(image)
        outputs = [self.model.forward_head(feature_map)]
        if self.local_head is not None:
            outputs.append(self.local_head(feature_map)[:, :self.n_classes])
        if self.features:
            outputs.append(self.model.forward_head(feature_map, pre_logits=True))
        return tuple(outputs)


class CamModel(ExportModel):
    """`image -> (logits, cam)`."""

    def __init__(self, model: nn.Module, local_head: LocalHead, n_classes: int) -> None:
        super().__init__(model, local_head, n_classes)


def has_pooled_features(model: nn.Module, image_size: int) -> bool:
    """Whether `forward_head(..., pre_logits=True)` gives one finite vector per image (timm
    models do); logged when not, and the bundle then has no feature-space OOD score."""
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    try:
        with torch.inference_mode():
            pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    except Exception as error:
        log.info("%s: no pooled features (%s); exporting without a '%s' output",
                 type(model).__name__, error, FEATURE_OUTPUT)
        return False
    ok = pooled.ndim == 2 and pooled.shape[0] == 2 and bool(torch.isfinite(pooled).all())
    if not ok:
        log.info("%s: pooled features have shape %s; exporting without a '%s' output",
                 type(model).__name__, tuple(pooled.shape), FEATURE_OUTPUT)
    return ok


def cam_model(model: nn.Module, n_classes: int, image_size: int) -> CamModel | None:
    """`CamModel` for `model`, or None (logged) when its head gives no class activation map."""
    found = local_classifier(model)
    if found is None:
        log.info("%s: head not supported for class activation maps; exporting without a "
                 "'cam' output (no heatmaps from this bundle)", type(model).__name__)
        return None
    local_head, exact = found
    wrapped = CamModel(model, local_head, n_classes).eval()
    problem = _probe_cam(model, wrapped, image_size, exact)
    if problem:
        log.info("%s: %s; exporting without a 'cam' output (no heatmaps from this bundle)",
                 type(model).__name__, problem)
        return None
    if not exact:
        log.info("%s: 'cam' applies the head's per-vector layers at each location: an "
                 "approximation (its spatial mean is close to, not equal to, the logits)",
                 type(model).__name__)
    return wrapped


def _probe_cam(model: nn.Module, wrapped: CamModel, image_size: int, exact: bool) -> str:
    """'' when the wrapped model reproduces `model`'s logits and gives a (N, K, h, w) map whose
    spatial mean is the logits (checked only for heads claimed exact); else what went wrong."""
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            expected = model(images)
            logits, cam = wrapped(images)
    except Exception as error:  # a head whose shapes do not fit the feature map
        return f"class activation map failed ({error.__class__.__name__}: {error})"
    if cam.ndim != 4 or cam.shape[:2] != (2, wrapped.n_classes):
        return f"class activation map has shape {tuple(cam.shape)}"
    scale = max(1.0, float(expected.abs().max()))
    if not torch.allclose(logits, expected, atol=1e-5 * scale, rtol=0):
        return "forward_features + forward_head do not reproduce the model's logits"
    gap = (cam.float().mean(dim=(2, 3)) - expected[:, :wrapped.n_classes]).abs().max()
    if exact and gap > CAM_IDENTITY_TOLERANCE * scale:
        return "the class activation map's spatial mean differs from the logits"
    return ""


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> None:
    """Dynamo export with a dynamic batch dimension; input `image`, output `logits`, and those
    of an `ExportModel` (`cam`, `features`)."""
    model = model.eval()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    outputs = model.output_names if isinstance(model, ExportModel) else ["logits"]
    chatter = io.StringIO()  # the exporter narrates each step on stdout
    with contextlib.redirect_stdout(chatter), torch.inference_mode(False):
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["image"], output_names=outputs,
            dynamic_shapes=({0: batch},), verbose=False,
        )
        if program is None:
            raise BundleError("torch.onnx.export returned no program")
        program.save(str(path))


def check_parity(
    model: torch.nn.Module, onnx_path: Path, image_size: int, seed: int = 0,
    tolerance: float = PARITY_TOLERANCE, n_classes: int | None = None, heads: Heads | None = None,
) -> float:
    """Max abs difference of class probabilities, PyTorch vs ONNX Runtime, on random input.

    With `heads`, probabilities are compared per block (main classes, then each head), as they
    are read; `n_classes` = None means the whole row is one block."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    heads = heads or {}

    def probabilities(logits: np.ndarray) -> np.ndarray:
        return blockwise_softmax(logits, n_classes or logits.shape[1], heads)

    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 5):
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.inference_mode():
            expected = probabilities(model(images).float().numpy())
        got = session.run(["logits"], {"image": images.numpy()})[0]
        if got.shape != expected.shape:
            raise BundleError(f"ONNX output has shape {got.shape}, PyTorch {expected.shape}")
        got = probabilities(got)
        worst = max(worst, float(np.abs(expected - got).max()))
    if worst > tolerance:
        raise BundleError(f"ONNX Runtime disagrees with PyTorch: max probability difference "
                          f"{worst:.2e} > {tolerance:.0e}; bundle not written")
    return worst


def check_output_parity(
    wrapped: ExportModel, onnx_path: Path, image_size: int, output: str, seed: int = 0,
    tolerance: float = CAM_PARITY_TOLERANCE,
) -> float:
    """Max abs difference of one extra output (`cam`, `features`), PyTorch vs ONNX Runtime on
    random input, relative to its largest magnitude (at least 1); BundleError above
    `tolerance`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    index = wrapped.output_names.index(output)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 3):
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.inference_mode():
            expected = wrapped(images)[index].float().numpy()
        got = session.run([output], {"image": images.numpy()})[0]
        if got.shape != expected.shape:
            raise BundleError(f"ONNX '{output}' has shape {got.shape}, PyTorch {expected.shape}")
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(expected - got).max()) / scale)
    if worst > tolerance:
        raise BundleError(f"ONNX Runtime disagrees with PyTorch on '{output}': relative max "
                          f"difference {worst:.2e} > {tolerance:.0e}")
    return worst


def check_cam_parity(wrapped: ExportModel, onnx_path: Path, image_size: int) -> float:
    """`check_output_parity` of the class activation map."""
    return check_output_parity(wrapped, onnx_path, image_size, CAM_OUTPUT)
