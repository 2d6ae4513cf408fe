"""Temperature scaling, calibration error and threshold choice on hand-checkable data."""

import numpy as np
import pytest

from embryo_ml.evaluation.calibration import (
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from embryo_ml.numeric import softmax


def _calibrated_logits(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction: y ~ Bernoulli(sigmoid(z))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)  # class 1 with prob sigmoid(z)
    return np.stack([np.zeros(n), z], axis=1), y


def test_temperature_recovers_overconfidence() -> None:
    logits, y = _calibrated_logits()
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.1)
    overconfident = logits * 4.0
    temperature = fit_temperature(overconfident, y)
    assert temperature == pytest.approx(4.0, rel=0.15)
    before = expected_calibration_error(y, softmax(overconfident)[:, 1])
    after = expected_calibration_error(y, softmax(overconfident, temperature)[:, 1])
    assert after < before / 2
    assert brier_score(y, softmax(overconfident, temperature)[:, 1]) < brier_score(
        y, softmax(overconfident)[:, 1])


def test_temperature_with_one_class_is_identity() -> None:
    assert fit_temperature(np.array([[0.0, 3.0], [0.0, 1.0]]), np.array([1, 1])) == 1.0


def test_ece_and_brier_by_hand() -> None:
    y = np.array([1, 0, 1, 1])
    p = np.array([0.95, 0.95, 0.05, 0.05])
    # bin 9: mean p 0.95, observed 0.5 -> 0.45; bin 0: mean p 0.05, observed 1.0 -> 0.95
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.95)
    assert brier_score(y, p) == pytest.approx((0.05**2 + 0.95**2 + 0.95**2 + 0.95**2) / 4)
    predicted, observed, counts = reliability_bins(y, p)
    assert list(counts) == [2, 2] and list(observed) == [1.0, 0.5]


def test_threshold_choices() -> None:
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    assert choose_threshold(y, p, "youden") == pytest.approx(0.6)  # sens 0.75, spec 1.0
    assert choose_threshold(y, p, "sensitivity", target_sensitivity=1.0) == pytest.approx(0.35)
    assert choose_threshold(y, p, "fixed", fixed=0.42) == 0.42
    assert choose_threshold(np.ones(3), p[:3], "youden", fixed=0.5) == 0.5
