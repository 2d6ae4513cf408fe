"""Per-embryo aggregation and ranking within a patient's cohort.

Several images of one embryo (focal planes, time points) give one embryo score, the mean of its
images' calibrated probabilities; embryos are ranked within each patient, 1 = best. An embryo with
no scorable image gets no rank.
"""

from __future__ import annotations

import pandas as pd


def embryo_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (patient_id, embryo_id): mean score of its `ok` images and the image count.

    Rows without an embryo id stand for themselves (keyed by path)."""
    ok = scores[scores["status"] == "ok"].copy()
    ok["embryo_key"] = ok["embryo_id"].where(ok["embryo_id"].astype(str) != "", ok["path"])
    grouped = ok.groupby(["patient_id", "embryo_key"], dropna=False, sort=False)
    return grouped["score"].agg(embryo_score="mean", n_images="size").reset_index()


def rank_in_cohort(scores: pd.DataFrame) -> pd.Series:
    """For each image row, the rank of its embryo within its patient (1 = highest score);
    empty where the patient id is missing or the image was not scored."""
    ranks = pd.Series([""] * len(scores), index=scores.index, dtype=object)
    has_patient = scores["patient_id"].astype(str) != ""
    if not has_patient.any():
        return ranks
    embryos = embryo_scores(scores[has_patient])
    embryos["rank"] = (
        embryos.groupby("patient_id")["embryo_score"].rank(ascending=False, method="min")
        .astype(int)
    )
    lookup = {(p, e): r for p, e, r in zip(embryos["patient_id"], embryos["embryo_key"],
                                          embryos["rank"])}
    for index, row in scores[has_patient & (scores["status"] == "ok")].iterrows():
        key = row["embryo_id"] if str(row["embryo_id"]) != "" else row["path"]
        ranks[index] = lookup.get((row["patient_id"], key), "")
    return ranks
