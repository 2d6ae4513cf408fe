"""Export a training run's best checkpoint to an ONNX scoring bundle, checked against PyTorch.

The bundle is assembled in a temporary folder beside the target and renamed into place only after
ONNX Runtime reproduces PyTorch's probabilities (max abs difference <= `tolerance`), so a failed
or mismatching export never leaves a bundle that looks usable.

A Gardner multi-task checkpoint (`heads` in best.pt) exports the same single `logits` output,
wider (main classes, then the grade heads); the layout goes into bundle.json as `heads`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from embryo_ml.config import ModelConfig
from embryo_ml.data.preprocess import RESIZE_POLICY
from embryo_ml.errors import BundleError, DataError
from embryo_ml.export.bundle import (
    BUNDLE_FILE,
    MODEL_FILE,
    Bundle,
    file_sha256,
    read_bundle,
    write_bundle_json,
)
from embryo_ml.models import build_model
from embryo_ml.train.heads import Heads, blockwise_softmax, output_width
from embryo_ml.train.state import CHECKPOINT_NAME, load_checkpoint
from embryo_ml.versions import package_versions

PARITY_TOLERANCE = 1e-4


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> None:
    """Dynamo export with a dynamic batch dimension; input `image`, output `logits`."""
    model = model.eval()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()  # the exporter narrates each step on stdout
    with contextlib.redirect_stdout(chatter), torch.inference_mode(False):
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
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


def export_bundle(run_dir: str | Path, out_dir: str | Path) -> Bundle:
    """Write `out_dir/model.onnx` + `bundle.json` from `run_dir/best.pt`; return the bundle."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        raise DataError(f"{run_dir}: no {CHECKPOINT_NAME}; is this a training run folder?")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / BUNDLE_FILE).exists():
        raise BundleError(f"{out_dir} exists and is not a bundle; choose an empty or new folder")
    checkpoint = load_checkpoint(checkpoint_path)
    classes = list(checkpoint["classes"])
    heads: Heads = dict(checkpoint.get("heads") or {})  # Gardner grade heads after the classes
    model_cfg = ModelConfig.model_validate(
        {**checkpoint["config"]["model"], "pretrained": False, "pretrained_file": None})
    model = build_model(model_cfg, num_classes=output_width(len(classes), heads))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    size = int(checkpoint["image_size"])
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    quality_path = run_dir / "quality.json"
    quality = json.loads(quality_path.read_text()) if quality_path.is_file() else None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        export_onnx(model, size, staging / MODEL_FILE)
        difference = check_parity(model, staging / MODEL_FILE, size, n_classes=len(classes),
                                  heads=heads)
        bundle = Bundle(
            architecture=checkpoint["model_name"], classes=classes,
            positive_class=checkpoint["positive_class"], input_size=size,
            mean=[float(x) for x in checkpoint["mean"]], std=[float(x) for x in checkpoint["std"]],
            sha256=file_sha256(staging / MODEL_FILE), resize_policy=RESIZE_POLICY,
            temperature=float(metrics.get("temperature", 1.0)),
            threshold=float(metrics.get("threshold", 0.5)), run_id=checkpoint.get("run_id"),
            val_metrics={k: v for k, v in metrics.items() if k.startswith("val_")}
            | {"parity_max_abs_diff": difference, "best_epoch": checkpoint["epoch"]},
            quality=quality, heads=heads or None, versions=package_versions(),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        write_bundle_json(bundle, staging)
        read_bundle(staging)  # what we wrote must pass the same check the scorer applies
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_bundle(out_dir)
