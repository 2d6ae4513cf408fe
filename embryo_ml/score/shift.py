"""Dataset shift: do a scoring run's images, as a whole, look unlike the ones the model knows?

Each scored image may carry the `out_of_distribution` flag. Its limit was set on the validation
images, so the share of images like those that it flags (the expected false-alarm rate) is
known: `Bundle.ood["expected_rate"][precision]` for a bundle with a feature-space reference
(`embryo_ml.evaluation.ood`; its nominal `alpha` when the scoring model's own rate is missing),
0.01 for an older bundle whose only signal is the logits' energy (limit: the 0.99 quantile of
the validation energies, `embryo_ml.data.quality.fit_thresholds`). A bundle with neither has
no such flag and no shift test: the record says `"available": false` and why.

The test (`dataset_shift`): with n ok images scored, k of them flagged and expected rate r, the
p-value is P(X >= k) under the count's law for images like the validation ones, exact
(log-space sums; no scipy on the scoring path). For a feature-space reference that law is
beta-binomial: the limit is an order statistic of a finite calibration set, so the bundle's
true false-alarm rate is itself random, Beta(n + 1 - rank, rank) for n calibration images
(mean about r, spread about sqrt(r / n)); a binomial with the mean rate would call a clinic's
own images shifted whenever its few calibration images happened to give a tight limit. For the
energy limit (older bundles), X ~ Binomial(n, r). A run is **shifted** when all three hold:

- p < `p_limit` (`trust.shift_p` at training time, kept in `Bundle.ood["shift_p"]`; 0.001 by
  default): runs of images like the validation ones are flagged this often less than once in
  1/p_limit runs;
- the flagged share is at least twice the expected one: with thousands of images a tiny,
  harmless excess is "significant"; a warning needs a practically large one;
- at least 3 images are flagged: 2 of 2 images cannot describe a clinic's images.

Images that were not scored (`status` other than `ok`) are not counted. What to do when
shifted: the model's validation figures do not describe these images; validate the model on
this clinic's own labelled images before using its scores.

`mostly_flagged_cohorts` is the same question for each patient's cohort (as
`embryo_ml.score.cohort` defines it: the images of one `patient_id`; images without one belong
to no cohort): those with at least 2 flagged images that make up at least half of the cohort's
scored images. The report lists them even when the run as a whole is not shifted.

Standard library only: this module is on the scoring path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from embryo_ml.export.bundle import Bundle

__all__ = ["DEFAULT_SHIFT_P", "ENERGY_EXPECTED_RATE", "OOD_FLAG", "beta_binomial_tail",
           "binomial_tail", "calibration_null", "count_flagged", "count_flags", "dataset_shift",
           "expected_ood_rate", "format_percent", "mostly_flagged_cohorts", "shift_p_limit",
           "shift_record", "shift_record_of", "shift_warning"]

OOD_FLAG = "out_of_distribution"
ENERGY_EXPECTED_RATE = 0.01  # the energy limit is the 0.99 quantile of validation energies
DEFAULT_SHIFT_P = 0.001  # `trust.shift_p`'s default
MIN_FLAGGED = 3  # a shifted run has at least this many flagged images ...
MIN_EXCESS = 2.0  # ... and at least this multiple of the expected share
COHORT_MIN_SHARE = 0.5  # a cohort is "mostly flagged" from this share of its scored images ...
COHORT_MIN_FLAGGED = 2  # ... and this many flagged images
BETA_BINOMIAL_EXACT = 20000  # runs up to this many images get the exact beta-binomial tail
_NEGLIGIBLE = 60.0  # binomial terms below exp(-60) x the largest one add nothing to a double


def _rate(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if 0.0 < value < 1.0 else None


def expected_ood_rate(bundle: Bundle, precision: str) -> float | None:
    """The share of images like the validation ones that the bundle's `out_of_distribution`
    flag marks, for the model that scored ("fp32" or "int8"); None = the bundle has no such
    flag (no feature-space reference, and no energy limit in its quality thresholds)."""
    if bundle.ood is not None:
        rates = bundle.ood.get("expected_rate")
        measured = _rate(rates.get(precision)) if isinstance(rates, Mapping) else None
        if measured is not None:
            return measured
        nominal = _rate(bundle.ood.get("alpha"))
        if nominal is not None:
            return nominal
    if bundle.quality is None or bundle.quality.get("ood_energy_max") is None:
        return None
    return ENERGY_EXPECTED_RATE


def shift_p_limit(bundle: Bundle) -> float:
    """The p-value below which a run may be called shifted (`trust.shift_p` at training)."""
    limit = _rate((bundle.ood or {}).get("shift_p"))
    return DEFAULT_SHIFT_P if limit is None else limit


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact up to floating point: the binomial terms are
    summed in log space (`math.lgamma`) from k upwards, or, when k is below the mean, 1 minus
    the terms from k - 1 downwards (the tail beyond the mode is then at least about one half,
    so nothing is lost); either sum stops once its terms no longer change a double. Costs a few
    standard deviations' worth of terms, whatever n."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    mean = n * p
    if k > mean:
        return min(1.0, _sum_terms(n, p, range(k, n + 1)))
    return min(1.0, max(0.0, 1.0 - _sum_terms(n, p, range(k - 1, -1, -1))))


def _sum_terms(n: int, p: float, indices: range) -> float:
    """The sum of the binomial probabilities P(X = i) for i in `indices`, which must run away
    from the mode (so that the terms only shrink once past it)."""
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    mode = (n + 1) * p
    terms: list[float] = []
    peak = -math.inf
    for i in indices:
        term = log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        terms.append(term)
        peak = max(peak, term)
        beyond = i > mode if indices.step > 0 else i < mode
        if beyond and term < peak - _NEGLIGIBLE:
            break
    return math.exp(peak) * math.fsum(math.exp(t - peak) for t in terms)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_binomial_tail(k: int, m: int, a: int, b: int) -> float:
    """P(K >= k) for K ~ BetaBinomial(m, a, b): the count of m new images above a conformal
    limit, whose false-alarm rate is itself Beta(a, b)-distributed over calibration sets.

    Exact (log-space terms from k up, stopping once they no longer change a double) for m up
    to BETA_BINOMIAL_EXACT; beyond, K / m is the rate itself to within 1 / sqrt(m), and
    P(rate >= k / m) = P(Binomial(a + b - 1, k / m) <= a - 1) (integer a, b), a short sum."""
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    if m > BETA_BINOMIAL_EXACT:
        x = k / m
        return 1.0 - binomial_tail(a, a + b - 1, x) if x < 1.0 else 0.0
    base = math.lgamma(m + 1) - _log_beta(a, b)
    terms: list[float] = []
    peak = -math.inf
    mode = max(0.0, (m * (a - 1)) / max(a + b - 2, 1))
    for i in range(k, m + 1):
        term = (base - math.lgamma(i + 1) - math.lgamma(m - i + 1)
                + _log_beta(i + a, m - i + b))
        terms.append(term)
        peak = max(peak, term)
        if i > mode and term < peak - _NEGLIGIBLE:
            break
    return min(1.0, math.exp(peak) * math.fsum(math.exp(t - peak) for t in terms))


def calibration_null(bundle: Bundle, precision: str) -> tuple[int, int] | None:
    """(a, b) of the Beta law of the flag's false-alarm rate over calibration sets, for a
    feature-space reference whose limit is the rank-th smallest of n calibration scores:
    a = n + 1 - rank, b = rank (`embryo_ml.evaluation.ood.conformal_limit`); None otherwise."""
    ood = bundle.ood or {}
    n, alpha = ood.get("n_calibration"), _rate(ood.get("alpha"))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or alpha is None:
        return None
    if precision not in (ood.get("limits") or {}):
        return None
    rank = min(math.ceil((n + 1) * (1.0 - alpha)), n)
    return n + 1 - rank, rank


def dataset_shift(n_flagged: int, n_scored: int, expected_rate: float,
                  p_limit: float = DEFAULT_SHIFT_P,
                  calibration: tuple[int, int] | None = None) -> dict[str, Any]:
    """The shift test of a run (module docstring): a JSON-safe record with `shifted`, the
    counts, the flagged and expected shares, the one-sided p-value and its limit.

    `calibration` (a, b from `calibration_null`): the limit came from a finite calibration
    set, so the false-alarm rate of this bundle is not exactly `expected_rate` but
    Beta(a, b)-distributed around it; the p-value is then the beta-binomial tail, which keeps
    a bundle whose few calibration images happened to give a tight limit from calling its own
    clinic's images shifted. Without it (energy limits), the binomial tail."""
    if not 0 <= n_flagged <= n_scored:
        raise ValueError(f"need 0 <= n_flagged <= n_scored, got {n_flagged} of {n_scored}")
    if not 0.0 < expected_rate < 1.0:
        raise ValueError(f"expected_rate must be in (0, 1), got {expected_rate}")
    if not 0.0 < p_limit < 1.0:
        raise ValueError(f"p_limit must be in (0, 1), got {p_limit}")
    share = n_flagged / n_scored if n_scored else 0.0
    if calibration is None:
        p_value, null = binomial_tail(n_flagged, n_scored, expected_rate), "binomial"
    else:
        p_value = beta_binomial_tail(n_flagged, n_scored, *calibration)
        null = f"beta-binomial (a={calibration[0]}, b={calibration[1]})"
    shifted = (p_value < p_limit and share >= MIN_EXCESS * expected_rate
               and n_flagged >= MIN_FLAGGED)
    return {"shifted": bool(shifted), "n_scored": int(n_scored), "n_flagged": int(n_flagged),
            "share_flagged": share, "expected_share": float(expected_rate),
            "p_value": p_value, "p_limit": float(p_limit), "null": null}


def _flags(value: object) -> Sequence[str]:
    if isinstance(value, str):
        return value.split(";")
    return list(value) if isinstance(value, Iterable) else []


def _scored(row: Mapping[str, Any]) -> bool:
    """Whether a row was scored (status `ok`): only those count towards flag shares."""
    return str(row.get("status") or "") == "ok"


def _counted(row: Mapping[str, Any]) -> tuple[bool, bool]:
    """(scored, flagged out_of_distribution) of a row: "flags" is ";"-joined text or a list."""
    if not _scored(row):
        return False, False
    return True, OOD_FLAG in _flags(row.get("flags"))


def count_flags(rows: Iterable[Mapping[str, Any]], names: Sequence[str]
                ) -> tuple[dict[str, int], int]:
    """(per flag of `names`: the `ok` rows carrying it, the `ok` rows), in one pass."""
    counts = dict.fromkeys(names, 0)
    n_scored = 0
    for row in rows:
        if not _scored(row):
            continue
        n_scored += 1
        flags = _flags(row.get("flags"))
        for name in names:
            counts[name] += name in flags
    return counts, n_scored


def count_flagged(rows: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(flagged out_of_distribution, scored) over the `ok` rows."""
    counts, n_scored = count_flags(rows, (OOD_FLAG,))
    return counts[OOD_FLAG], n_scored


def shift_record(bundle: Bundle, precision: str, rows: Iterable[Mapping[str, Any]]
                 ) -> dict[str, Any]:
    """The run's record: `dataset_shift` of its rows plus `"available": true`, or
    `{"available": false, "reason": ...}` when the bundle has no out_of_distribution flag."""
    return shift_record_of(bundle, precision, *count_flagged(rows))


def shift_record_of(bundle: Bundle, precision: str, n_flagged: int, n_scored: int
                    ) -> dict[str, Any]:
    """`shift_record` from the counts: `n_flagged` of `n_scored` rows out_of_distribution."""
    rate = expected_ood_rate(bundle, precision)
    if rate is None:
        return {"available": False, "shifted": False,
                "reason": "the bundle has no out_of_distribution flag (no feature-space "
                          "reference and no energy limit), so dataset shift cannot be tested"}
    return {"available": True, **dataset_shift(n_flagged, n_scored, rate, shift_p_limit(bundle),
                                               calibration_null(bundle, precision))}


def mostly_flagged_cohorts(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Patients (`patient_id`) whose scored images are at least half (and at least 2)
    flagged out_of_distribution, in patient order: {"patient_id", "n_scored", "n_flagged",
    "share_flagged"} each."""
    counts: dict[str, list[int]] = {}
    for row in rows:
        patient = str(row.get("patient_id") or "")
        scored, flagged = _counted(row)
        if patient and scored:
            tally = counts.setdefault(patient, [0, 0])
            tally[0] += flagged
            tally[1] += 1
    return [{"patient_id": patient, "n_scored": n_scored, "n_flagged": n_flagged,
             "share_flagged": n_flagged / n_scored}
            for patient, (n_flagged, n_scored) in sorted(counts.items())
            if n_flagged >= COHORT_MIN_FLAGGED and n_flagged >= COHORT_MIN_SHARE * n_scored]


def format_percent(share: float) -> str:
    """0.9156 -> "91.6%", 0.01 -> "1.0%", 0.0005 -> "0.05%"."""
    percent = 100.0 * share
    return f"{percent:.1f}%" if percent == 0 or percent >= 0.1 else f"{percent:.2g}%"


def shift_warning(record: Mapping[str, Any] | None) -> str | None:
    """The one warning (without the `warning: ` prefix) for a shifted run; None otherwise."""
    if not record or record.get("shifted") is not True:
        return None
    return (f"dataset shift: {record['n_flagged']} of {record['n_scored']} images "
            f"({format_percent(record['share_flagged'])}) look unlike the images this model was "
            f"trained and validated on (expected about {format_percent(record['expected_share'])}"
            "); its validation figures do not apply to them: validate the model on this "
            "clinic's images before using its scores")
