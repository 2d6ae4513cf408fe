"""The model-quality gate: did this run learn something, beyond chance, that ranks embryos?

`validation_verdict(evaluation, cfg)` reads the final validation `Evaluation` and returns the
verdict stored as `validation` in `metrics.json` and the bundle:

- **failed**: the 95% patient-bootstrap interval of the validation ROC AUC does not exclude 0.5,
  or, for each column of `eval.gate_within` the data has (default `day`), the interval of the
  mean within-group AUC does not (the model ranks no better than chance among embryos of the
  same day: predicting the day is not selecting embryos).
- **inconclusive**: too few validation images to decide (fewer than `eval.gate_min_per_class`
  of a class, no bootstrap with `eval.n_boot=0`, or no group of a gate column with both
  classes): said plainly, exported with a warning.
- **passed**: every check's interval lies above 0.5.

Not beating a shortcut baseline overall stays a warning (`evaluation.shortcut`), not a failure.
`export` refuses a failed run unless `--allow-failed-validation`; `--register` never registers
one; `score` and the report warn about a bundle exported that way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module is also the verdict vocabulary the (light) bundle reader uses
    from embryo_ml.config import EvalConfig
    from embryo_ml.evaluation.report import Evaluation

PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"
VERDICTS = (PASSED, FAILED, INCONCLUSIVE)
PASSED_FOR_VERDICT = {PASSED: True, FAILED: False, INCONCLUSIVE: None}  # the record's `passed`


def _check(name: str, label: str, value: float, ci: tuple[float, float]) -> dict[str, Any]:
    """One interval check: passed when the interval lies above 0.5, failed when it does not,
    None when there is no interval to judge."""
    low, high = ci
    judged = all(math.isfinite(x) for x in (value, low, high))
    return {"name": name, "label": label, "value": value, "ci": [low, high],
            "passed": bool(low > 0.5) if judged else None}


def _text(check: dict[str, Any]) -> str:
    low, high = check["ci"]
    if check["passed"] is None:
        return f"{check['label']} has no interval"
    return f"{check['label']} {check['value']:.3f} [{low:.3f}, {high:.3f}]"


def validation_verdict(evaluation: Evaluation, cfg: EvalConfig) -> dict[str, Any]:
    """The verdict (see the module text): `{"verdict", "passed", "reason", "checks"}`."""
    overall = evaluation.overall
    checks = [_check("auc", "validation AUC", overall["auc"],
                     (overall["auc_ci_low"], overall["auc_ci_high"]))]
    for column in cfg.gate_within:
        if column in evaluation.within:
            summary = evaluation.within[column]
            checks.append(_check(f"within_{column}_auc", f"mean within-{column} AUC",
                                 summary["auc"], tuple(summary["ci"])))
    n_pos, n_neg = overall["n_positive"], overall["n_negative"]
    failed = [c for c in checks if c["passed"] is False]
    unjudged = [c for c in checks if c["passed"] is None]
    if min(n_pos, n_neg) < cfg.gate_min_per_class:
        verdict = INCONCLUSIVE
        reason = (f"too few validation images to decide: {n_pos} {evaluation.positive_class} "
                  f"and {n_neg} other (at least {cfg.gate_min_per_class} of each are needed)")
    elif evaluation.n_boot == 0:
        verdict, reason = INCONCLUSIVE, "no confidence intervals (eval.n_boot=0)"
    elif failed:
        verdict = FAILED
        reason = ("ranks no better than chance: " + "; ".join(_text(c) for c in failed)
                  + " (the 95% interval does not lie above 0.5)")
    elif unjudged:
        verdict = INCONCLUSIVE
        reason = ("cannot be judged: " + "; ".join(_text(c) for c in unjudged)
                  + " (no group with both classes and enough images)")
    else:
        verdict = PASSED
        reason = "better than chance: " + "; ".join(_text(c) for c in checks)
    return {"verdict": verdict, "passed": PASSED_FOR_VERDICT[verdict], "reason": reason,
            "checks": checks, "n_positive": n_pos, "n_negative": n_neg,
            "bootstrap_unit": evaluation.unit}


def verdict_line(validation: dict[str, Any]) -> str:
    """The line `train` ends with."""
    word = {PASSED: "PASSED", FAILED: "FAILED", INCONCLUSIVE: "INCONCLUSIVE"}
    return f"validation check: {word[validation['verdict']]}: {validation['reason']}"
