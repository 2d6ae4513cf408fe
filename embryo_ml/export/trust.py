"""Fit what a bundle knows about its own limits, at export: the feature-space
out-of-distribution reference (`embryo_ml.evaluation.ood` has the score and its guarantee) and the
conformal prediction sets behind the `uncertain` flag (`embryo_ml.evaluation.conformal`).

Conformal sets are fit on `val_predictions.csv` (true label and calibrated probabilities).

Both the reference (training images, `train_images.csv`) and the limit's calibration images (the
validation images, `val_predictions.csv`) are run through the exported ONNX models themselves,
decoded exactly as the scorer decodes them, so the stored vectors and limits are those scoring
will meet; the int8 model gets its own. Without a `features` output, training images or enough
readable validation images there is no reference: export goes on, says why in a log line, and
the bundle's `ood` stays None (the energy of the logits is then the only signal).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embryo_ml.config import TrustConfig
from embryo_ml.data.preprocess import preprocess, read_for_model
from embryo_ml.errors import ImageReadError
from embryo_ml.evaluation.conformal import fit_conformal
from embryo_ml.evaluation.day_check import fit_day_check
from embryo_ml.evaluation.ood import (
    FEATURE_OUTPUT,
    METHOD,
    REFERENCE_FILE,
    conformal_limit,
    knn_distance,
    normalise,
)
from embryo_ml.evaluation.prior import prior_value
from embryo_ml.export.bundle import file_sha256
from embryo_ml.export.quantize import cpu_session, validation_images
from embryo_ml.fileio import atomic_open
from embryo_ml.train.run_folder import (
    METRICS_FILE,
    TRAIN_IMAGES_FILE,
    VAL_PREDICTIONS_FILE,
    listed_images,
)

log = logging.getLogger(__name__)

MIN_CALIBRATION = 20  # fewer readable validation images: no reference (the limit means nothing)
BATCH = 32


def training_images(run_dir: Path) -> list[str]:
    """Paths of the run's training images, [] for a run from before train_images.csv."""
    return listed_images(run_dir, TRAIN_IMAGES_FILE)


def _spread(paths: Sequence[str], limit: int, seed: int) -> list[str]:
    """At most `limit` of `paths`, a random sample (seeded) in the original order."""
    if len(paths) <= limit:
        return list(paths)
    chosen = np.random.default_rng(seed).choice(len(paths), limit, replace=False)
    return [paths[i] for i in sorted(chosen)]


class ImageFeatures:
    """The `features` output of each exported model ("fp32", "int8") for images decoded exactly
    as the scorer decodes them. Each image is read and run once per export: the
    out-of-distribution reference and the day check read the same training and validation
    images. `sessions`: precision -> an ONNX Runtime session (or anything with its `run`)."""

    def __init__(self, sessions: dict[str, Any], size: int, mean: Sequence[float],
                 std: Sequence[float], input_name: str) -> None:
        self.sessions, self.size, self.mean, self.std = sessions, size, mean, std
        self.input_name = input_name
        self._done: dict[str, dict[str, np.ndarray] | None] = {}  # path -> None: unreadable

    @classmethod
    def of_models(cls, staging: Path, models: dict[str, str], size: int, mean: Sequence[float],
                  std: Sequence[float], input_name: str) -> ImageFeatures | None:
        """For `models` (precision -> model file in `staging`); None when the model has no
        features output (checked once, on the fp32 model)."""
        if not has_feature_output(staging / models["fp32"]):
            return None
        return cls({name: cpu_session(staging / file) for name, file in models.items()}, size,
                   mean, std, input_name)

    def _run(self, paths: Sequence[str]) -> None:
        batch: list[tuple[str, np.ndarray]] = []
        for path in paths:
            try:
                batch.append((path, preprocess(read_for_model(path, self.size), self.size,
                                               self.mean, self.std)))
            except ImageReadError:
                self._done[path] = None
            if len(batch) == BATCH or (batch and path == paths[-1]):
                pixels = np.stack([x for _, x in batch])
                found = {name: session.run([FEATURE_OUTPUT], {self.input_name: pixels})[0]
                         for name, session in self.sessions.items()}
                for row, (done, _) in enumerate(batch):
                    self._done[done] = {name: f[row] for name, f in found.items()}
                batch = []

    def of(self, paths: Sequence[str]) -> tuple[dict[str, np.ndarray], list[int]]:
        """(precision -> (n, D) features of the readable images among `paths`, their indices
        in `paths`); unreadable images are left out."""
        self._run(list(dict.fromkeys(p for p in paths if p not in self._done)))
        kept = [i for i, p in enumerate(paths) if self._done[p] is not None]
        return ({name: (np.stack([self._done[paths[i]][name] for i in kept])  # type: ignore[index]
                        if kept else np.zeros((0, 0), np.float32))
                 for name in self.sessions}, kept)


def has_feature_output(model_path: Path) -> bool:
    import onnx

    return FEATURE_OUTPUT in {o.name for o in onnx.load(str(model_path),
                                                         load_external_data=False).graph.output}


def build_reference(
    staging: Path, run_dir: Path, features: ImageFeatures | None, *, trust: TrustConfig,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Write `staging/REFERENCE_FILE` and return the bundle's `ood` record, or None (logged).

    `features`: the export's shared `ImageFeatures` of its models (`ImageFeatures.of_models`),
    None when the model has no features output."""
    if features is None:
        log.warning("no feature-space out-of-distribution check: the model has no '%s' output",
                    FEATURE_OUTPUT)
        return None
    train = training_images(run_dir)
    if not train:
        log.warning("no feature-space out-of-distribution check: %s has no %s (a run from an "
                    "older version); out_of_distribution falls back to the logits' energy",
                    run_dir, TRAIN_IMAGES_FILE)
        return None
    reference = features.of(_spread(train, trust.ood_reference_images, seed))[0]
    calibration = features.of(validation_images(run_dir))[0]
    n_ref, n_cal = len(reference["fp32"]), len(calibration["fp32"])
    if n_ref < trust.ood_k or n_cal < MIN_CALIBRATION:
        log.warning("no feature-space out-of-distribution check: %d readable training and %d "
                    "validation images (need %d and %d)", n_ref, n_cal, trust.ood_k,
                    MIN_CALIBRATION)
        return None
    vectors = {name: normalise(x) for name, x in reference.items()}
    limits, rates = {}, {}
    for name in features.sessions:
        scores = knn_distance(calibration[name], vectors[name], trust.ood_k)
        limits[name], rates[name] = conformal_limit(scores, trust.ood_alpha)
    refit = _is_refit(run_dir)
    if refit:
        log.warning("out-of-distribution limit: this run was refit on its validation images "
                    "(train.refit), so they are not new to the model; the limit may be tight "
                    "and flag more than %.0f%% of images like them", 100 * trust.ood_alpha)
    path = staging / REFERENCE_FILE
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **vectors)
    log.info("out-of-distribution reference: %d training images, limit %.4f (fp32) from %d "
             "validation images, expected false-alarm rate %.3f", n_ref, limits["fp32"], n_cal,
             rates["fp32"])
    return {"method": METHOD, "file": REFERENCE_FILE, "sha256": file_sha256(path),
            "feature_output": FEATURE_OUTPUT, "k": trust.ood_k, "alpha": trust.ood_alpha,
            "shift_p": trust.shift_p, "n_reference": n_ref, "n_calibration": n_cal,
            "feature_dim": int(vectors["fp32"].shape[1]), "limits": limits,
            "expected_rate": rates, "calibration_seen_in_training": refit}


def _column_values(run_dir: Path, table_file: str, column: str) -> tuple[list[str], list[str]]:
    """(paths, normalised values of `column`) of a run table; ([], []) without the column."""
    path = run_dir / table_file
    if not path.is_file():
        return [], []
    table = pd.read_csv(path, dtype="string", keep_default_na=False)
    if column not in table.columns:
        return [], []
    table = table[table["path"] != ""]
    return table["path"].tolist(), [prior_value(v) for v in table[column]]


def build_day_check(
    run_dir: Path, prior: dict[str, Any] | None, features: ImageFeatures | None, *,
    trust: TrustConfig, seed: int = 0,
) -> dict[str, Any] | None:
    """The bundle's `day_check` record (`embryo_ml.evaluation.day_check`), for a run with a day
    prior whose model has a features output (`features` not None); None (logged) otherwise.
    The training images are the same sample as the out-of-distribution reference's, so the
    shared `features` runs each image once."""
    if prior is None or features is None:
        return None
    column = str(prior["column"])
    train_paths, train_days = _column_values(run_dir, TRAIN_IMAGES_FILE, column)
    val_paths, val_days = _column_values(run_dir, VAL_PREDICTIONS_FILE, column)
    if not train_paths or not val_paths:
        log.warning("no day check: the run folder does not list the '%s' of its training and "
                    "validation images (a run from an older version)", column)
        return None
    chosen = _spread(list(range(len(train_paths))), trust.ood_reference_images, seed)
    train, kept = features.of([train_paths[i] for i in chosen])
    calibration, val_kept = features.of(val_paths)
    record, note = fit_day_check(train, [train_days[chosen[i]] for i in kept], calibration,
                                 [val_days[i] for i in val_kept], column, trust.ood_alpha)
    (log.info if record else log.warning)("%s", note)
    return record


def _is_refit(run_dir: Path) -> bool:
    """Whether best.pt was refit on train + validation (`metrics.json` has "refit")."""
    try:
        return bool(json.loads((run_dir / METRICS_FILE).read_text()).get("refit"))
    except (OSError, ValueError):
        return False


def conformal_record(run_dir: Path, classes: Sequence[str], alpha: float) -> dict[str, Any] | None:
    """The bundle's `conformal` record from the run's validation predictions, or None (logged)
    when there are none or they lack a class's probability column."""
    table_path = run_dir / VAL_PREDICTIONS_FILE
    columns = [f"p_{c}" for c in classes]
    if not table_path.is_file():
        log.warning("no conformal 'uncertain' flag: %s has no %s", run_dir,
                    VAL_PREDICTIONS_FILE)
        return None
    table = pd.read_csv(table_path, dtype={"label": "string"}, keep_default_na=False)
    if "label" not in table.columns or not set(columns) <= set(table.columns):
        log.warning("no conformal 'uncertain' flag: %s lacks label or %s", table_path,
                    ", ".join(columns))
        return None
    known = table["label"].isin(list(classes)).to_numpy()
    targets = np.array([list(classes).index(v) for v in table["label"][known]], dtype=int)
    record = fit_conformal(table.loc[known, columns].to_numpy(np.float64), targets, classes,
                           alpha)
    thin = [c for c, n in record["n_calibration"].items()
            if math.ceil((n + 1) * (1 - alpha)) > n]
    if thin:
        log.warning("conformal sets: too few validation images of %s for alpha %.2f: that "
                    "class is in every prediction set (more images are flagged uncertain)",
                    ", ".join(thin), alpha)
    return record
