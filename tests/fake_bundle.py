"""A hand-built scoring bundle for tests: an ONNX graph whose logits are a fixed linear function
of the image's mean colour, so every score can be computed by hand.

    logits = mean_rgb(normalised image) @ weights + bias     (normalised: (v/255 - 0.5) / 0.5)

A uniform image of colour (r, g, b) has mean_rgb = (v / 127.5 - 1 for v in (r, g, b)).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embryo_ml.data.preprocess import RESIZE_POLICY
from embryo_ml.export.bundle import (
    BUNDLE_FILE,
    IDENTITY_FIELD,
    Bundle,
    bundle_identity,
    file_sha256,
    write_bundle_json,
)


def make_fake_bundle(
    folder: Path,
    weights: np.ndarray,
    bias: np.ndarray | None = None,
    classes: list[str] | None = None,
    heads: dict[str, dict[str, Any]] | None = None,
    temperature: float = 1.0,
    size: int = 16,
    declared_width: int | str | None = None,
    resize_policy: str = RESIZE_POLICY,
) -> Path:
    """Write model.onnx (GlobalAveragePool -> Flatten -> MatMul -> Add) and bundle.json."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.asarray(weights, dtype=np.float32)
    width = weights.shape[1]
    bias = np.zeros(width, np.float32) if bias is None else np.asarray(bias, np.float32)
    classes = classes or ["good", "poor"]
    folder.mkdir(parents=True, exist_ok=True)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                           ["N", declared_width or width])
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["product"]),
        helper.make_node("Add", ["product", "b"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "fake", [image], [logits], initializer=[
        numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime this project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    bundle = Bundle(architecture="fake-linear", classes=classes, positive_class=classes[0],
                    input_size=size, mean=[0.5] * 3, std=[0.5] * 3,
                    sha256=file_sha256(folder / "model.onnx"), temperature=temperature,
                    heads=heads, resize_policy=resize_policy)
    write_bundle_json(bundle, folder)
    return folder


def rewrite_bundle_json(folder: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Edit `folder/bundle.json` as a person would (`change` edits the loaded object in place,
    may delete keys or write values no `Bundle` holds) and record the edited object's identity,
    as `write_bundle_json` does. For tests that need such a bundle.json (a key missing, as in
    bundles from older versions, or a malformed record): a hand edit without the new identity
    is refused as a modified bundle. Prefer `dataclasses.replace` + `write_bundle_json`."""
    path = folder / BUNDLE_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    data[IDENTITY_FIELD] = bundle_identity(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


def features(rgb: tuple[int, int, int]) -> np.ndarray:
    """What the fake model sees of a uniform image of colour `rgb` (float32 like the scorer)."""
    scale = np.float32(1.0 / 255.0)
    return np.array([(np.float32(v) * scale - np.float32(0.5)) / np.float32(0.5) for v in rgb],
                    dtype=np.float64)


def uniform_image(path: Path, rgb: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path
