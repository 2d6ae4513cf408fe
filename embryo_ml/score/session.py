"""The ONNX Runtime session of a verified bundle: which of its models scores, and what it gives.

`OnnxScorer` is what everything that runs the model shares: the scoring run
(`embryo_ml.score.scorer`), heatmaps (`embryo_ml.score.explain`), the report and the served
model (`embryo_ml.serving.pyfunc`). It decodes an image as training did, runs the model on a
batch and flags images the model cannot be trusted on.

Test-time augmentation (`tta=True`) scores the 8 symmetries of the square (4 rotations by 90
degrees, each with and without a mirror flip) of the preprocessed image, averages their logits,
then applies the bundle's temperature. Logits, not probabilities, are averaged so the result is
again one logit vector and the calibration step stays the one fitted in validation,
softmax(logits / T); averaging calibrated probabilities would instead feed the temperature's
correction through a second, non-linear averaging. T was fitted on single-view logits and an
average of views is usually a little less extreme, so TTA scores may be slightly under-confident;
the `out_of_distribution` flag uses the unaugmented view, the one its threshold was fitted on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embryo_ml.data.heads import layout_problem, main_logits, output_width
from embryo_ml.data.images import DEFAULT_MAX_PIXELS
from embryo_ml.data.preprocess import RESIZE_POLICY, preprocess, read_for_model
from embryo_ml.data.quality import QualityThresholds, image_flags, logit_flags
from embryo_ml.errors import BundleError, ConfigError
from embryo_ml.evaluation.conformal import conformal_flags
from embryo_ml.evaluation.ood import FeatureReference
from embryo_ml.export.bundle import Bundle
from embryo_ml.numeric import softmax
from embryo_ml.score.items import ScoreItem

PRECISIONS = ("auto", "fp32", "int8")  # the choices of `--precision`
logger = logging.getLogger(__name__)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def choose_model(bundle: Bundle, precision: str = "auto") -> tuple[Path, str]:
    """(model file, "fp32" or "int8"): "auto" takes the bundle's int8 model when it has one
    (it passed its parity check at export), "int8" insists on it, "fp32" never uses it."""
    check_precision(precision)
    int8 = bundle.int8_path
    if precision == "int8" and int8 is None:
        raise BundleError(f"bundle {bundle.path} has no int8 model (export builds one when it "
                          "agrees with fp32 on the validation images); use --precision fp32")
    if int8 is not None and precision != "fp32":
        return int8, "int8"
    return bundle.model_path, "fp32"


def dihedral_views(batch: np.ndarray) -> Iterator[np.ndarray]:
    """The 8 symmetries of the square of an NCHW batch: rotations by 0, 90, 180, 270 degrees,
    then the same of the mirror image. The identity comes first."""
    for mirrored in (batch, batch[..., ::-1]):
        for k in range(4):
            yield np.ascontiguousarray(np.rot90(mirrored, k, axes=(2, 3)))


def _session_options(threads: int | None) -> Any:  # -> onnxruntime.SessionOptions
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle ORT threads would otherwise spin for a while after each run, burning the cores
    # the decoding threads need; measured 10-25% more images/s on 2 cores without it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _logit_width(bundle: Bundle) -> int:
    """Columns the `logits` output must have: the main classes, then every head's block."""
    problem = layout_problem(bundle.heads, len(bundle.classes))
    if problem:
        raise BundleError(f"bundle {bundle.path}: {problem}")
    return output_width(len(bundle.classes), bundle.heads or {})


class OnnxScorer:
    """An ONNX Runtime session for a verified bundle, with deliberate session options.

    `precision`: see `choose_model`; the class activation map (heatmaps) always comes from the
    fp32 model, so `explain` asks for "fp32"."""

    def __init__(
        self, bundle: Bundle, threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        tta: bool = False, precision: str = "auto",
    ) -> None:
        import onnxruntime as ort

        options = _session_options(threads)
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.tta = tta
        if bundle.resize_policy != RESIZE_POLICY:
            logger.warning(
                "bundle %s was validated on images prepared as %r; this version prepares them "
                "as %r (pixels a few grey levels apart), so scores may differ slightly from its "
                "validation figures; export the run again to validate it on the same pixels",
                bundle.path, bundle.resize_policy, RESIZE_POLICY)
        self.quality = QualityThresholds.from_dict(bundle.quality) if bundle.quality else None
        model_path, self.precision = choose_model(bundle, precision)
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.width = _logit_width(bundle)
        outputs = {o.name: o for o in self.session.get_outputs()}
        if bundle.output_name not in outputs:
            raise BundleError(f"bundle {bundle.path}: model has no output {bundle.output_name!r} "
                              f"(outputs: {sorted(outputs)})")
        declared = outputs[bundle.output_name].shape[-1]
        if isinstance(declared, int):
            self.check_width(declared)
        self.reference, self._fetch = self._ood_reference(outputs)

    def _ood_reference(self, outputs: dict[str, Any]) -> tuple[FeatureReference | None, list[str]]:
        """The feature-space out-of-distribution reference of the model that scores, and the
        outputs one run fetches; without one (older bundles) the logits' energy is the
        out-of-distribution signal."""
        bundle = self.bundle
        if bundle.ood is None:
            return None, [bundle.output_name]
        feature_output = str(bundle.ood.get("feature_output", ""))
        if feature_output not in outputs:
            raise BundleError(f"bundle {bundle.path}: 'ood' reads the model output "
                              f"{feature_output!r}, which the model does not have")
        reference = FeatureReference.load(bundle.path, bundle.ood, self.precision)
        return reference, [bundle.output_name, feature_output]

    def check_width(self, actual: int) -> None:
        """`BundleError` when the model gives other logits per image than the bundle describes
        (more are allowed with heads: columns no head reads)."""
        bundle = self.bundle
        if actual < self.width or (not bundle.heads and actual != self.width):
            raise BundleError(f"bundle {bundle.path}: the model gives {actual} logits per image, "
                              f"the bundle describes {self.width} ({len(bundle.classes)} classes"
                              f"{' + heads' if bundle.heads else ''})")

    def read(self, item: ScoreItem) -> np.ndarray:
        """The item's image decoded as training and validation decoded it (reduced JPEG scale,
        see `embryo_ml.data.preprocess.decode_side`), not yet resized."""
        return read_for_model(item.file, self.bundle.input_size, self.max_pixels,
                              data=item.data, name=item.path)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        b = self.bundle
        return preprocess(image, b.input_size, b.mean, b.std)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) raw logits of one view (no TTA)."""
        return self.session.run([self.bundle.output_name], {self.bundle.input_name: batch})[0]

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled features or None without a reference) of one view, one ONNX run."""
        found = self.session.run(self._fetch, {self.bundle.input_name: batch})
        return found[0], (found[1] if len(found) > 1 else None)

    def tta_logits(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean logits over the 8 `dihedral_views`, logits of the unaugmented view), float64."""
        mean, plain, _ = self.tta_outputs(batch)
        return mean, plain

    def tta_outputs(
        self, batch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(mean logits over the 8 `dihedral_views`, logits and features of the unaugmented
        view): the flags are judged on the view their limits were fitted on."""
        total, plain, features = None, None, None
        for view in dihedral_views(batch):
            if plain is None:
                logits, features = self.outputs(view)
                plain = logits.astype(np.float64)
                total = plain.copy()
            else:
                total += self.logits(view).astype(np.float64)
        return total / 8.0, plain, features  # type: ignore[operator,return-value]

    def image_flags(self, image: np.ndarray) -> list[str]:
        return image_flags(image, self.quality) if self.quality else []

    def logit_flags(self, logits: np.ndarray) -> list[list[str]]:
        if self.quality is None:
            return [[] for _ in logits]
        return logit_flags(logits, self.quality)

    def model_flags(self, logits: np.ndarray, features: np.ndarray | None) -> list[list[str]]:
        """`out_of_distribution` (feature distance, or the logits' energy for bundles without
        a reference) and `uncertain` (conformal sets), per row, from one view's raw outputs."""
        main = main_logits(logits, len(self.bundle.classes))
        if self.reference is not None and features is not None:
            ood = self.reference.flags(features)
        else:
            ood = self.logit_flags(main)
        probs = softmax(main, self.bundle.temperature)
        uncertain = conformal_flags(probs, self.bundle.conformal, self.bundle.classes)
        return [a + b for a, b in zip(ood, uncertain, strict=True)]
