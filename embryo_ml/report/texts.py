"""The report's plain words: what each quality flag means and what to do, the banners a reader
must see first, the intended use and the note on the embryologist's judgement.

Kept apart from the HTML so that tests, the CLI and translators read one list; every text is
escaped where it is rendered (`embryo_ml.report.markup`).
"""

from __future__ import annotations

from embryo_ml.data.quality import FLAG_NAMES

# Plain words for each quality flag: what it means and what to do.
FLAG_TEXT = {
    "blurry": "blurry: image out of focus — check the image before relying on the score",
    "under_exposed": "under-exposed: image too dark — check the image before relying on "
                     "the score",
    "over_exposed": "over-exposed: image too bright — check the image before relying on "
                    "the score",
    "no_embryo": "no embryo found: no embryo-shaped outline in the image — check that it "
                 "shows an embryo",
    "out_of_distribution": "unusual image: unlike the images the model was validated on — "
                           "the score may not be reliable",
    "uncertain": "uncertain: the model cannot settle on one class for this image at its "
                 "stated confidence level — judge this embryo yourself",
    "day_mismatch": "day does not match: the embryo does not look like one of the day the "
                    "manifest gives, and the score used that day — check the day",
}
JUDGEMENT_NOTE = ("This report supports, and does not replace, the embryologist's judgement. "
                  "Every decision stays with the embryologist.")
# What a reader must know first when the model did not pass its validation check ({reason}:
# the check's own sentence). No banner for "passed" or for bundles from before the check.
VALIDATION_BANNER = {
    "failed": "This model did not pass its validation check: {reason}. Do not use these scores "
              "to choose embryos.",
    "inconclusive": "This model's validation check was inconclusive: {reason}. Use these scores "
                    "with extra caution, and check every embryo yourself before relying on "
                    "them.",
}
# What a reader must know first when the run's images as a whole look unlike the validation
# images (`embryo_ml.score.shift`): {n_flagged} of {n_scored} scored images flagged
# out_of_distribution, {expected} the share expected on images like the validation ones.
SHIFT_BANNER = ("These images do not look like the images the model was trained and validated "
                "on ({n_flagged} of {n_scored} flagged, expected about {expected}); its "
                "validation figures do not apply; validate it on this clinic's images first.")
SHIFT_COHORTS_TITLE = ("Patients whose images mostly do not look like the images the model was "
                       "trained and validated on:")
SHIFT_COHORT = ("Patient {patient}: {n_flagged} of {n_scored} images ({share}) flagged as "
                "unusual \u2014 check this cohort's images before relying on its scores")
INTENDED_USE = (
    "To help an embryologist review and order the embryos of one patient's cohort from still "
    "images. The score is the model's calibrated probability that an image shows an embryo of "
    "class \u201c{positive}\u201d, as the training images were labelled; it is not a "
    "probability of implantation, pregnancy or live birth. Use it together with the "
    "embryo's morphology, development timing and the patient's history; flagged images "
    "should be checked by eye first.")


def flag_text(flag: str) -> str:
    """The plain-word explanation of a flag (an unknown flag is shown as it is)."""
    return FLAG_TEXT.get(flag, f"{flag}: (no description)")


def flag_order(flag: str) -> tuple[int, str]:
    """Sort key of flags: FLAG_NAMES order, then unknown flags by name."""
    return (FLAG_NAMES.index(flag) if flag in FLAG_NAMES else len(FLAG_NAMES), flag)
