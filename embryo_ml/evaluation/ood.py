"""Feature-space out-of-distribution score: how far an image's features lie from the training
images' features.

The exported model has a `features` output beside `logits`: the pooled penultimate features, the
vector the classifier reads. The bundle keeps those of (a sample of) the training images,
L2-normalised, in `ood_reference.npz` (one array per model file: `fp32`, and `int8` when the bundle
has an int8 model, since its features differ a little). An image's score is the cosine distance to
its k-th nearest reference vector (deep nearest neighbours, Sun et al. 2022): no assumption about
the features' distribution, and it works with the few hundred images a clinic trains on, where a
512-dimensional covariance for Mahalanobis is poorly determined.

The flag limit is a conformal quantile of the same score on the validation images, which are not
in the reference: with n of them, the ceil((n + 1)(1 - alpha))-th smallest. For a new image
exchangeable with the validation ones, P(score > limit) = 1 - rank / (n + 1) <= alpha, the
`expected_rate` a scoring run's flagged share is tested against (`embryo_ml.score.shift`). With
fewer than 1 / alpha - 1 validation images the limit is their largest score and the expected rate
1 / (n + 1), larger than alpha: more validation images give a tighter guarantee.

numpy only: the scoring path imports neither torch nor onnxruntime here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embryo_ml.errors import BundleError

__all__ = [
    "FEATURE_OUTPUT",
    "METHOD",
    "REFERENCE_FILE",
    "FeatureReference",
    "conformal_limit",
    "knn_distance",
    "normalise",
]

FEATURE_OUTPUT = "features"
REFERENCE_FILE = "ood_reference.npz"
METHOD = "knn-cosine"


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def knn_distance(features: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Cosine distance (1 - cosine similarity) of each row of `features` to its k-th nearest row
    of `reference` (already normalised, as stored); higher = less like the training images."""
    if not 1 <= k <= len(reference):
        raise ValueError(f"k must be in [1, {len(reference)}], got {k}")
    similarity = normalise(features) @ reference.T
    # The k-th largest similarity is the k-th nearest neighbour.
    kth = np.partition(similarity, similarity.shape[1] - k, axis=1)[:, similarity.shape[1] - k]
    return (1.0 - kth).astype(np.float64)


def conformal_limit(scores: np.ndarray, alpha: float) -> tuple[float, float]:
    """(limit, expected false-alarm rate) from calibration scores: the ceil((n + 1)(1 - alpha))-th
    smallest score (the largest when that rank exceeds n) and 1 - rank / (n + 1)."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = values.size
    if n == 0:
        raise ValueError("no calibration scores")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rank = min(math.ceil((n + 1) * (1.0 - alpha)), n)
    return float(values[rank - 1]), 1.0 - rank / (n + 1)


@dataclass(frozen=True)
class FeatureReference:
    """One model's reference vectors and flag limit, as scoring uses them."""

    vectors: np.ndarray  # (n_reference, D) float32, unit rows
    k: int
    limit: float
    expected_rate: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        return knn_distance(features, self.vectors, self.k)

    def flags(self, features: np.ndarray) -> list[list[str]]:
        """Per row: ["out_of_distribution"] when its distance exceeds the limit, else []."""
        return [["out_of_distribution"] if s > self.limit else [] for s in self.scores(features)]

    @classmethod
    def load(cls, folder: Path, record: dict, precision: str) -> FeatureReference:
        """The reference of `precision` ("fp32" or "int8") from the bundle's `ood` record; the
        file's hash was checked when the bundle was read. BundleError when it does not fit."""
        path = folder / str(record.get("file", ""))
        try:
            with np.load(path, allow_pickle=False) as stored:
                vectors = np.asarray(stored[precision], dtype=np.float32)
        except (OSError, KeyError, ValueError) as error:
            raise BundleError(f"bundle {folder}: cannot read the {precision} out-of-distribution "
                              f"reference in {path.name} ({error})") from None
        try:
            limit = float(record["limits"][precision])
            rate = float(record["expected_rate"][precision])
            k = int(record["k"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"bundle {folder}: 'ood' needs k, limits and expected_rate for "
                              f"{precision}, got {record}") from None
        if vectors.ndim != 2 or not 1 <= k <= len(vectors) or not math.isfinite(limit):
            raise BundleError(f"bundle {folder}: out-of-distribution reference of shape "
                              f"{vectors.shape} does not fit k={k}, limit={limit}")
        return cls(vectors, k, limit, rate)
