"""Bootstrap intervals that resample groups (patients), not images.

Images of one patient are not independent evidence (one dish, one stimulation, often one
embryo in several focal planes), so a resample draws patients with replacement and keeps all of
each drawn patient's rows. Resample b is held as counts: how many times each group was drawn;
a row's weight is its group's count. Metrics in `embryo_ml.evaluation.metrics` take those
weights directly, so B resamples cost one pass over a (B, n) matrix, done in chunks to bound
memory. Deterministic by seed. This module is the one owner of resampling: cross-validation's
intervals (`embryo_ml.train.cv.bootstrap_ci`) use it too.

Intervals are percentile intervals (2.5% and 97.5% of the resampled values), except for the
expected calibration error: an ECE is biased upward on resampled data (duplicated rows fill
the bins unevenly, and |observed - predicted| only grows with noise), so its percentile interval
can lie wholly above the ECE itself. Its interval is the normal one, ECE +- 1.96 x the
resamples' standard deviation, clipped at 0 (`normal_interval`): the spread is right even
though the resampled values are shifted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from statistics import NormalDist  # the standard library: no scipy on the report path

import numpy as np

LEVEL = 0.95
_CHUNK_CELLS = 4_000_000  # weights per chunk: B_chunk x n_rows floats (32 MB)


class GroupBootstrap:
    """`n_boot` resamples of the distinct values of `groups` (one per row)."""

    def __init__(self, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> None:
        groups = np.asarray(groups).astype(str)
        self.unique, self.codes = np.unique(groups, return_inverse=True)
        self.n_boot = n_boot
        rng = np.random.default_rng(seed)
        n_groups = len(self.unique)
        draws = rng.integers(0, max(n_groups, 1), size=(n_boot, n_groups))
        self.counts = np.zeros((n_boot, n_groups))  # times group g was drawn in resample b
        for b in range(n_boot):
            self.counts[b] = np.bincount(draws[b], minlength=n_groups)

    def weights(self, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Row weights of every resample, in chunks of shape (B_chunk, len(rows))."""
        codes = self.codes if rows is None else self.codes[rows]
        step = max(1, _CHUNK_CELLS // max(len(codes), 1))
        for start in range(0, self.n_boot, step):
            yield self.counts[start:start + step][:, codes]

    def values(self, statistic: Callable[[np.ndarray], np.ndarray],
               rows: np.ndarray | None = None) -> np.ndarray:
        """`statistic(weights)` -> (B_chunk,) values, over all resamples: shape (n_boot,)."""
        parts = [statistic(w) for w in self.weights(rows)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def interval(self, statistic: Callable[[np.ndarray], np.ndarray],
                 rows: np.ndarray | None = None) -> tuple[float, float]:
        return percentile_interval(self.values(statistic, rows))

    def group_values_interval(self, values: np.ndarray, group_index: np.ndarray
                              ) -> tuple[float, float]:
        """Interval of the mean of one value per group (e.g. each patient's AUC): each
        resample weighs group g's value by how often g was drawn. `group_index` maps each
        value to its position in `self.unique`."""
        if len(values) == 0:
            return math.nan, math.nan
        counts = self.counts[:, group_index]
        total = counts.sum(axis=1)
        means = np.full(self.n_boot, np.nan)
        np.divide(counts @ values, total, out=means, where=total > 0)
        return percentile_interval(means)

    def index_of(self, names: np.ndarray) -> np.ndarray:
        """Positions of group names in `self.unique` (all must be present)."""
        return np.searchsorted(self.unique, np.asarray(names).astype(str))


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite values; (nan, nan) when there are none (a resample
    that lost one class has no AUC and is left out)."""
    values = _finite(values)
    if len(values) == 0:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def normal_interval(values: np.ndarray, estimate: float, level: float = LEVEL,
                    floor: float = 0.0) -> tuple[float, float]:
    """estimate +- z x the standard deviation of the finite resampled values (low end clipped
    at `floor`); for statistics whose resamples are biased (the ECE, see the module text)."""
    values = _finite(values)
    if len(values) < 2 or not math.isfinite(estimate):
        return math.nan, math.nan
    half = NormalDist().inv_cdf(1 - (1 - level) / 2) * float(np.std(values, ddof=1))
    return max(floor, estimate - half), estimate + half
