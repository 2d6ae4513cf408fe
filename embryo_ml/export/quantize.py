"""8-bit integer copy of a bundle's model for fast CPU scoring, kept only if it agrees with fp32.

Why: on a CPU a ResNet spends nearly all its time in convolutions, and int8 convolutions (VNNI,
AMX) run 2-3x faster than float32 ones: resnet18 at 224 px went from 72 to 160 images/s on 2
cores. Scoring a clinic's archive on an ordinary PC is the use this serves.

How: post-training static quantization with ONNX Runtime (QDQ format, weights int8 per output
channel, activations uint8 per tensor, the combination x86 int8 kernels are built for). The
activation ranges are calibrated on the run's own validation images (min-max), decoded and
preprocessed exactly as the scorer does. ONNX Runtime's pre-processing (shape inference, graph
clean-up) runs first.

Trust: the int8 model is then run next to the fp32 one on the validation images (up to
`PARITY_IMAGES`) and compared on what is reported: the calibrated probabilities of the main
classes (with the bundle's temperature) and each grade head's probabilities. It is kept only if
no probability moves by more than `INT8_TOLERANCE` (0.02: at most one step of the 1-10 display
score, and only next to a step's edge). The measured agreement is written into bundle.json.
Any failure (no validation images on this machine, an operator the quantizer cannot handle,
disagreement) leaves a bundle with the fp32 model only and a log line saying why: the bundle is
never lost for the sake of speed. The scorer uses the int8 model when the bundle has one, unless
asked for fp32 (`embryo-ml score --precision fp32`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embryo_ml.data.heads import blockwise_softmax
from embryo_ml.data.preprocess import preprocess, read_for_model
from embryo_ml.errors import ImageReadError
from embryo_ml.train.run_folder import VAL_PREDICTIONS_FILE, listed_images

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
INT8_TOLERANCE = 0.02  # max |p_int8 - p_fp32| on validation images for the int8 model to stay
CALIBRATION_IMAGES = 64
PARITY_IMAGES = 512
MIN_IMAGES = 8  # fewer readable validation images than this: no int8 model
BATCH = 16


def validation_images(run_dir: Path) -> list[str]:
    """Paths of the run's validation images (val_predictions.csv), [] when there is none."""
    return listed_images(run_dir, VAL_PREDICTIONS_FILE)


def load_tensors(paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float],
                 limit: int) -> np.ndarray:
    """Up to `limit` images (evenly spread over `paths`) as the scorer feeds them to the model;
    unreadable files are skipped. (N, 3, size, size) float32."""
    step = max(1, len(paths) // limit) if limit else 1
    tensors = []
    for path in paths[::step]:
        if len(tensors) >= limit:
            break
        try:
            tensors.append(preprocess(read_for_model(path, size), size, mean, std))
        except ImageReadError:
            continue
    if not tensors:
        return np.zeros((0, 3, size, size), np.float32)
    return np.stack(tensors)  # float32 already: no second copy of up to ~300 MB


def quantize_onnx(source: Path, target: Path, calibration: np.ndarray, input_name: str) -> None:
    """Write `target`, the int8 (QDQ) version of `source`, calibrated on `calibration`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i:i + BATCH]
                                for i in range(0, len(calibration), BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )


def cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(fp32: Path, int8: Path, images: np.ndarray, input_name: str, output_name: str,
            n_classes: int, positive_index: int, threshold: float, temperature: float,
            heads: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Agreement of the two models on `images`: max and mean abs difference of the reported
    probabilities, and the share of images given the same label."""
    outputs = []
    for path in (fp32, int8):
        session = cpu_session(path)
        logits = np.concatenate([
            session.run([output_name], {input_name: images[i:i + BATCH]})[0]
            for i in range(0, len(images), BATCH)]).astype(np.float64)
        # what the scorer reports: calibrated main classes, then each head
        outputs.append(blockwise_softmax(logits, n_classes, heads, temperature))
    reference, quantized = outputs
    difference = np.abs(reference - quantized)

    def labels(p: np.ndarray) -> np.ndarray:
        if n_classes == 2:
            return p[:, positive_index] >= threshold
        return p[:, :n_classes].argmax(axis=1)

    return {"max_abs_diff": float(difference.max()), "mean_abs_diff": float(difference.mean()),
            "label_agreement": float(np.mean(labels(reference) == labels(quantized)))}


def build_int8(
    staging: Path, fp32_file: str, run_dir: Path, *, size: int, mean: Sequence[float],
    std: Sequence[float], input_name: str, output_name: str, classes: Sequence[str],
    positive_index: int, threshold: float, temperature: float,
    heads: dict[str, dict[str, Any]] | None, tolerance: float = INT8_TOLERANCE,
) -> dict[str, Any] | None:
    """Quantize `staging/fp32_file` into `staging/INT8_FILE` and check it; returns the bundle's
    `int8` entry (without the hash), or None (with a log line) when no int8 model is kept."""
    paths = validation_images(run_dir)
    parity = load_tensors(paths, size, mean, std, PARITY_IMAGES)
    if len(parity) < MIN_IMAGES:
        log.warning("no int8 model: %d readable validation image(s) found via %s (need %d to "
                    "calibrate and check it); the bundle scores with the fp32 model",
                    len(parity), run_dir / VAL_PREDICTIONS_FILE, MIN_IMAGES)
        return None
    step = max(1, len(parity) // CALIBRATION_IMAGES)
    calibration = parity[::step][:CALIBRATION_IMAGES]
    target = staging / INT8_FILE
    try:
        quantize_onnx(staging / fp32_file, target, calibration, input_name)
        agreement = compare(staging / fp32_file, target, parity, input_name, output_name,
                            len(classes), positive_index, threshold, temperature, heads or {})
    except Exception as error:  # speed is optional: never lose the bundle for it
        target.unlink(missing_ok=True)
        log.warning("no int8 model: quantization failed (%s: %s); the bundle scores with the "
                    "fp32 model", error.__class__.__name__, error)
        return None
    if not agreement["max_abs_diff"] <= tolerance:
        target.unlink(missing_ok=True)
        log.warning("no int8 model: it moved a probability by %.3f on the validation images "
                    "(tolerance %.3f); the bundle scores with the fp32 model",
                    agreement["max_abs_diff"], tolerance)
        return None
    log.info("int8 model kept: max probability difference %.4f, label agreement %.3f on %d "
             "validation images", agreement["max_abs_diff"], agreement["label_agreement"],
             len(parity))
    return {"file": INT8_FILE, "calibration_images": len(calibration),
            "parity_images": len(parity), **agreement, "tolerance": tolerance}
