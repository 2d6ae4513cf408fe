"""The day prior: a per-day logit offset beside the temperature, for two-class models.

Why: in a clinic the day predicts the outcome (day-5 blastocysts are good far more often than
day-3 embryos), and a model trained from scratch on a few hundred images under-uses it: on real
images its overall AUC stays at or below the day's alone even when it ranks the embryos of one
day better than chance (docs/training.md). Knowing the day, the calibrated probability is

    p = sigmoid(margin / T + offset[day]),   margin = logit[positive] - logit[other],

with T the day-free temperature. Each day's offset makes the mean calibrated probability of the
validation images of that day equal that day's share of the positive class among all labelled
images of the run (training and validation, with one pseudo-count of each class): calibration
in the large per day, the condition a per-day intercept meets at its maximum likelihood, but
with the day's rate taken from five times as many labels as the validation split holds. (Fitting
the offsets on the validation labels alone was measured too: noisier, and a smaller gain on
real images; docs/training.md.) The offset is what the model's own scores lack of the day; a
model that already scores day-5 embryos higher gets a smaller one. Within a day nothing is
re-ranked: the within-day AUC and a patient's same-day ranking are the model's.

When it applies: `calibration.prior_column` (default `day`) names the column; the run must
have two classes, at least two values of it with `MIN_PER_VALUE` validation images each, and
labelled images in which the positive share clearly depends on the value (G-test p below
`MAX_P_VALUE`): where it does not (a set balanced per day, synthetic data), offsets would only
add noise, and there is no prior.
A value with fewer gets no offset: an image of such a day, or without a day, is scored with the
day-free calibration (the bundle's `temperature` and `threshold`), and `embryo-ml score` says
how many were. The bundle's one decision threshold applies to both: it is a level of calibrated
probability, whichever facts the probability was computed from.

Kept torch- and scipy-free on the scoring side (`prior_value`, `apply_prior`); the fit imports
scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MIN_PER_VALUE = 5  # validation images of a day below this: no offset for that day
MAX_P_VALUE = 0.01  # the day must predict the label this clearly in the labelled images


def prior_value(value: object) -> str:
    """A day as the prior looks it up: text, trimmed, `5.0` -> `5`; "" when missing."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    text = str(value).strip()
    if text.lower() in {"", "nan", "none", "na", "<na>"}:
        return ""
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for any finite z


def _offset(margin: np.ndarray, rate: float) -> float:
    """The b with mean(sigmoid(margin + b)) == rate. The margins are clipped to +-40 (a
    probability of 1 - 4e-18 either way), so the root lies in [-80, 80] for any rate in (0, 1)
    (the pseudo-counts keep it there)."""
    from scipy.optimize import brentq

    clipped = np.clip(margin, -40.0, 40.0)
    return float(brentq(lambda b: float(np.mean(_sigmoid(clipped + b))) - rate, -80.0, 80.0,
                        xtol=1e-6))


def independence_p(values: np.ndarray, positive: np.ndarray, kept: Sequence[str]) -> float:
    """p-value of the G-test that the positive share is the same for every value in `kept`
    (rows of other values ignored); 1.0 when a class is absent."""
    from scipy.stats import chi2

    rows = np.isin(values, list(kept))
    table = np.array([[int((positive[rows] & (values[rows] == k)).sum()),
                       int((~positive[rows] & (values[rows] == k)).sum())] for k in kept], float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / max(table.sum(), 1)
    if (table.sum(0) == 0).any():
        return 1.0
    observed = table > 0
    g = 2.0 * float((table[observed] * np.log(table[observed] / expected[observed])).sum())
    return float(chi2.sf(g, len(kept) - 1))


def fit_prior(
    scaled_margin: np.ndarray, values: Sequence[object], labelled_values: Sequence[object],
    labelled_positive: np.ndarray, column: str, temperature: float,
) -> tuple[dict[str, Any] | None, str]:
    """Per-day offsets; (record, note), the record None (and the note saying why) when the
    prior cannot be fit.

    `scaled_margin`: margin / T of each validation image, `values` its day; `labelled_values`
    and `labelled_positive`: the day and whether positive of every labelled image of the run
    (training and validation), for the days' rates."""
    keys = np.array([prior_value(v) for v in values], dtype=object)
    counts = {k: int((keys == k).sum()) for k in sorted(set(keys) - {""})}
    kept = [k for k, n in counts.items() if n >= MIN_PER_VALUE]
    if len(kept) < 2:
        return None, (f"no day prior: the validation images have {len(kept)} value(s) of "
                      f"'{column}' with at least {MIN_PER_VALUE} images (need 2)")
    labelled = np.array([prior_value(v) for v in labelled_values], dtype=object)
    positive = np.asarray(labelled_positive, dtype=bool)
    p_value = independence_p(labelled, positive, kept)
    if not p_value < MAX_P_VALUE:
        return None, (f"no day prior: the share of the positive class does not differ between "
                      f"the values of '{column}' in the labelled images (G-test p = "
                      f"{p_value:.2g}): the day tells nothing the image does not")
    margin = np.asarray(scaled_margin, dtype=np.float64)
    offsets, rates, n_labelled = {}, {}, {}
    for key in kept:
        members = labelled == key
        n_labelled[key] = int(members.sum())
        rates[key] = (float(positive[members].sum()) + 1.0) / (members.sum() + 2.0)
        offsets[key] = _offset(margin[keys == key], rates[key])
    record = {"column": column, "method": "per-day calibration in the large", "p_value": p_value,
              "temperature": float(temperature), "offsets": offsets, "rates": rates,
              "n_calibration": {k: counts[k] for k in kept}, "n_labelled": n_labelled}
    shown = ", ".join(f"{k}: {offsets[k]:+.2f} (rate {rates[k]:.2f})" for k in kept)
    return record, (f"day prior on '{column}': logit offsets {shown}, from "
                    f"{sum(n_labelled.values())} labelled and {sum(counts[k] for k in kept)} "
                    f"validation images")


def apply_prior(probs: np.ndarray, margin: np.ndarray, values: Sequence[str],
                prior: Mapping[str, Any], positive_index: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, used): rows whose value has an offset get the day-aware probabilities
    of the two classes, the others keep `probs` (the day-free calibration)."""
    offsets = prior["offsets"]
    used = np.array([v in offsets for v in values], dtype=bool)
    out = np.array(probs, dtype=np.float64, copy=True)
    if used.any():
        shift = np.array([offsets[v] for v, u in zip(values, used, strict=True) if u])
        z = np.asarray(margin, dtype=np.float64)[used] / float(prior["temperature"]) + shift
        p = _sigmoid(z)
        out[used, positive_index] = p
        out[used, 1 - positive_index] = 1.0 - p
    return out, used


def two_class_margin(logits: np.ndarray, positive_index: int) -> np.ndarray:
    """logit[positive] - logit[other] of two-class logits."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[:, positive_index] - logits[:, 1 - positive_index]
