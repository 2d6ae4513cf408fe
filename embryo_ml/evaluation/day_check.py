"""The day check: does the image look like an embryo of the day its manifest gives?

Why: with the day prior (`embryo_ml.evaluation.prior`) a typed day moves the score, by nearly a
logit between day 3 and day 5 on real images. A day-3 embryo entered as day 5 gets a day-5
embryo's head start, and nothing in the score shows it. The model's own features usually tell
a cleavage-stage embryo from a blastocyst, so the bundle carries a small linear read-out of the
day from those features, and `score` flags `day_mismatch` where the manifest's day is far less
likely than the image says.

Fit at export (`fit_day_check`, scikit-learn): a multinomial logistic regression of the day on
the standardised features of the training images, one per model precision (the int8 model's
features differ a little), its regularisation strength chosen from `C_GRID` as the one that
flags the most wrong days of the validation images at the limit below. Its score for an image
and a given day is -ln p(day | features). The
flag limit is the larger of the split-conformal limit of the validation images' scores with
their true days (`embryo_ml.evaluation.ood.conformal_limit` at `alpha`: an image whose day is
right is flagged at most at rate `alpha`, the bound the record keeps) and -ln `MAX_P_FLAGGED`
(a day the read-out gives 2% or more is never called wrong). The check is kept only when it can
catch something: given each validation image's other days in turn, at least `MIN_CAUGHT` of
those wrong days must be flagged (on the images the limit and the strength were chosen on, so a
little optimistic). A model whose features do not tell the days apart gets no check, and export
says so.

Scoring is numpy only (`day_scores`, `day_flags`): an image without a day, or with a day the
check has not seen, is never flagged. The flag does not change the score: it says that the
score used a day the image does not look like, so check the day.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FLAG = "day_mismatch"
# Inverse regularisation strengths tried, chosen on the validation images, not the training
# ones: the network fit the training images' features, which separate the days better than new
# images' do. Chosen by log-loss instead, on real day-3/day-5 images, it took C = 0.01, at
# which 12% of held-out wrong days fell below p = 0.02, against 81% at C = 1 (docs/scoring.md).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MIN_PER_DAY = 5  # training images of a day below this: the day is left out of the check
MIN_CALIBRATION = 10  # validation images with a known day below this: no check
MIN_CAUGHT = 0.3  # share of wrong days the check must flag on the validation images
# Never flag a day the read-out gives 2% or more: with ~50 validation images the conformal
# limit is their largest score, a noisy statistic, and on real held-out images it alone flagged
# 5-7% of right days (docs/scoring.md).
MAX_P_FLAGGED = 0.02


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _log_probs(model: Mapping[str, Any], features: np.ndarray) -> np.ndarray:
    """(N, days) ln p(day | features) of one precision's read-out."""
    x = (np.asarray(features, np.float64) - np.asarray(model["mean"])) / np.asarray(
        model["scale"])
    return _log_softmax(x @ np.asarray(model["coef"]).T + np.asarray(model["intercept"]))


def day_scores(record: Mapping[str, Any], precision: str, features: np.ndarray,
               days: Sequence[str]) -> np.ndarray:
    """-ln p(given day | features) per image; NaN where the day is "" or not one the check
    knows."""
    classes = list(record["classes"])
    log_p = _log_probs(record["models"][precision], features)
    out = np.full(len(days), np.nan)
    for i, day in enumerate(days):
        if day in classes:
            out[i] = -log_p[i, classes.index(day)]
    return out


def day_flags(record: Mapping[str, Any] | None, precision: str, features: np.ndarray | None,
              days: Sequence[str]) -> list[list[str]]:
    """[FLAG] for each image whose given day scores above the precision's limit, else []."""
    if record is None or features is None or precision not in record["models"]:
        return [[] for _ in days]
    limit = float(record["models"][precision]["limit"])
    scores = day_scores(record, precision, features, days)
    return [[FLAG] if np.isfinite(s) and s > limit else [] for s in scores]


def _read_out(features: np.ndarray, days: np.ndarray, classes: list[str], c: float
              ) -> dict[str, Any]:
    """The standardised logistic regression of `days` on `features`, as plain lists; with two
    days the single logit becomes the softmax pair (0, w.x + b)."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    fitted = LogisticRegression(C=c, max_iter=5000).fit((features - mean) / scale, days)
    order = [list(fitted.classes_).index(c) for c in classes]
    coef, intercept = fitted.coef_, fitted.intercept_
    if len(classes) == 2:
        coef = np.vstack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, intercept[0]])
    return {"C": c, "mean": mean.tolist(), "scale": scale.tolist(),
            "coef": coef[order].tolist(), "intercept": np.asarray(intercept)[order].tolist()}


def fit_day_check(
    train: Mapping[str, np.ndarray], train_days: Sequence[str],
    calibration: Mapping[str, np.ndarray], calibration_days: Sequence[str],
    column: str, alpha: float,
) -> tuple[dict[str, Any] | None, str]:
    """The bundle's `day_check` record and a log line, or (None, why not).

    `train` / `calibration`: precision -> (N, D) features of the training / validation images
    whose days (already `prior_value`-normalised, "" = unknown) are `train_days` /
    `calibration_days`."""
    from embryo_ml.evaluation.ood import conformal_limit

    t_days = np.asarray(train_days, dtype=object)
    counts = {d: int((t_days == d).sum()) for d in sorted(set(t_days) - {""})}
    classes = [d for d, n in counts.items() if n >= MIN_PER_DAY]
    if len(classes) < 2:
        return None, (f"no day check: the training images have {len(classes)} value(s) of "
                      f"'{column}' with at least {MIN_PER_DAY} images (need 2)")
    c_days = np.asarray(calibration_days, dtype=object)
    fit_rows, cal_rows = np.isin(t_days, classes), np.isin(c_days, classes)
    if cal_rows.sum() < MIN_CALIBRATION:
        return None, (f"no day check: {int(cal_rows.sum())} validation images with a known "
                      f"'{column}' (need {MIN_CALIBRATION})")
    truth = np.array([classes.index(d) for d in c_days[cal_rows]])
    models: dict[str, Any] = {}
    caught = 0.0
    for precision in train:
        held = np.asarray(calibration[precision])[cal_rows]
        best: dict[str, Any] | None = None
        for c in C_GRID:  # the strength that catches most wrong days at the limit it implies
            candidate = _read_out(np.asarray(train[precision], np.float64)[fit_rows],
                                  t_days[fit_rows].astype(str), classes, c)
            log_p = _log_probs(candidate, held)
            right = -log_p[np.arange(len(truth)), truth]
            limit, rate = conformal_limit(right, alpha)
            limit = max(limit, -math.log(MAX_P_FLAGGED))
            wrong = (-log_p)[np.arange(log_p.shape[1])[None, :] != truth[:, None]]  # other days
            candidate.update(limit=limit, expected_rate=rate,
                             caught_on_validation=float(np.mean(wrong > limit)))
            if best is None or candidate["caught_on_validation"] > best["caught_on_validation"]:
                best = candidate
        models[precision] = best
        if precision == "fp32":
            caught = best["caught_on_validation"]
    if caught < MIN_CAUGHT:
        return None, (f"no day check: the model's features tell the values of '{column}' apart "
                      f"too poorly (a wrong day would be flagged for {caught:.0%} of the "
                      f"validation images, need {MIN_CAUGHT:.0%})")
    record = {"column": column, "classes": classes, "alpha": alpha,
              "n_fit": {d: counts[d] for d in classes},
              "n_calibration": int(cal_rows.sum()), "models": models}
    fp32 = models["fp32"]
    return record, (f"day check on '{column}' ({', '.join(classes)}): a right day is flagged "
                    f"at most at rate {fp32['expected_rate']:.3f}; a wrong one was flagged for "
                    f"{caught:.0%} of {int(cal_rows.sum())} validation images")
