"""The scoring report: one self-contained HTML file an embryologist opens in any browser.

`write_report(scores, bundle, out, images=...)` reads a scores file (`.csv`, `.jsonl` or
`.parquet`, as `embryo-ml score` writes it) and the bundle that scored it, and writes one HTML
file with everything inside it: thumbnails and heatmap overlays as `data:` URIs, the styles, and
a small inline script for sorting and filtering. No network, no CDN, no server.

What it shows, top to bottom:

- for a model that did not pass its validation check (`Bundle.validation`), a banner above
  everything else: red for `failed` (do not use these scores to choose embryos), amber for
  `inconclusive`; none for `passed` or a bundle from before the check;
- for a run whose images as a whole do not look like the validation images (dataset shift,
  `embryo_ml.score.shift`), a red banner saying so, and a list of the patients whose images
  are mostly flagged as unusual (shown even when the run as a whole is not shifted). The record
  is the one `embryo-ml score` wrote in the scoring sidecar (`<stem>.scoring.json`) when it
  belongs to these scores (same bundle, same counts); otherwise (no sidecar, an older one, or
  a scores file edited since) it is recomputed from the rows and the bundle, for the model the
  sidecar names (else the one `score` picks by default);
- a summary: image, patient and embryo counts, how many images are flagged and why (in plain
  words), the model (architecture, bundle folder, run id, model hash, embryo-ml version,
  creation date), its validation metrics, its intended use, a short summary of its model card
  (`MODEL_CARD.md` in the bundle: training data, validation AUC with interval, verdict), and
  the note that it supports and does not replace the embryologist's judgement;
- one table per patient (their cohort), in rank order (`rank_in_cohort`, 1 = best; an
  embryo's images together; images that could not be scored last), then the images without a
  patient id: thumbnail, heatmap overlay, embryo, calibrated score with its 1-10 display value,
  predicted class, Gardner grades when the bundle has them, flags in plain words, file name.

The bundle must be the one that scored: the scoring sidecar records its identity
(`bundle_sha256`, which covers bundle.json and every file in it) and a report with any other
bundle, or with this one changed since, is refused (`BundleError`, one line). Scores without a
sidecar (older outputs, or copied without it) cannot be checked: the report says so in a logged
warning and goes on.

Image paths: a row's `path` is read as written by the scorer: relative to the scored folder or
to the manifest's folder, or absolute. `images` is that folder (a manifest CSV stands for its
folder); without it, paths are resolved against the scores file's folder. An image that cannot
be found or read gets a placeholder that says why, and the summary counts them.

Size: thumbnails (`thumbnail_size` px on the longer side, JPEG) and heatmaps are embedded for
the first `max_thumbnails` images in report order (default 1000, about 5-10 KB each); rows
past that are still listed, without pictures, and the summary says so. A day's cohort
(hundreds of images) stays well under the cap; 10,000 rows made a 17 MB file in 12 s (500 px
noise images, which compress worse than embryos), and the page still sorts and filters them.
Heatmaps (`embryo_ml.score.explain`, when the bundle has a class activation map output) cost
extra model runs, batched over PICTURE_BATCH images; `heatmaps=False` skips them.

Safety: every value from the scores file or the bundle (file names, ids, flags, metadata) goes
through `html.escape`, in text and in attributes alike; the script (`assets/report.js`, inlined
like the style sheet `assets/report.css`) is static (it reads the
rows' escaped `data-` attributes, builds no HTML and sets no handlers from data), and a
Content-Security-Policy admits only that script and style (by hash) and `data:` images: even a
value that slipped through could neither run code nor load anything from the network.

The script also reads the URL's fragment, so a link can open the report pre-filtered or
pre-sorted: `report.html#flag=flagged`, `#q=P007`, `#sort=score&dir=desc`.

Torch- and mlflow-free (house rule 2): numpy, OpenCV, the one image reader, the bundle reader
and, for heatmaps, ONNX Runtime.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from embryo_ml.data.images import read_image
from embryo_ml.data.quality import FLAG_NAMES
from embryo_ml.data.scores_file import embryos_path, iter_file_rows, output_format, settings_path
from embryo_ml.errors import BundleError, DataError, ImageReadError
from embryo_ml.export.bundle import Bundle, identity, read_bundle, reason_text
from embryo_ml.export.model_card import MODEL_CARD_FILE, card_summary
from embryo_ml.fileio import atomic_write_text
from embryo_ml.score.shift import (
    count_flagged,
    format_percent,
    mostly_flagged_cohorts,
    shift_record,
)

__all__ = ["DEFAULT_MAX_THUMBNAILS", "FLAG_TEXT", "INTENDED_USE", "JUDGEMENT_NOTE",
           "SHIFT_BANNER", "VALIDATION_BANNER", "flag_text", "write_report"]

log = logging.getLogger(__name__)

DEFAULT_MAX_THUMBNAILS = 1000
DEFAULT_THUMBNAIL_SIZE = 128
JPEG_QUALITY = 85
HEAT_ALPHA = 0.45
PICTURE_BATCH = 16  # images decoded (and run through the model for heatmaps) at a time

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


def _e(value: object) -> str:
    """Escape for HTML text and quoted attribute values alike."""
    return html.escape("" if value is None else str(value), quote=True)


# ---------------------------------------------------------------------------- reading rows --


@dataclass
class _Row:
    path: str
    status: str
    score: float | None
    display: str
    label: str
    flags: list[str]
    patient: str
    embryo: str
    rank: int | None
    grades: dict[str, str]
    order: int = 0
    thumb: str = ""  # data URI
    thumb_note: str = ""
    heat: str = ""
    heat_note: str = ""
    missing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def embryo_key(self) -> tuple[str, str]:
        return self.patient, self.embryo or self.path


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None else int(number)


def _read_rows(scores: Path, bundle: Bundle) -> tuple[list[_Row], list[str]]:
    """The scores file's rows and its head columns (`*_pred` other than `label_pred`)."""
    if not scores.is_file():
        raise DataError(f"scores file not found: {scores}")
    output_format(scores)  # .csv, .jsonl or .parquet, else a clear error
    rows: list[_Row] = []
    columns: list[str] = []
    for i, raw in enumerate(iter_file_rows(scores)):
        if i == 0:
            columns = list(raw)
            missing = [c for c in ("path", "status", "score") if c not in raw]
            if missing:
                raise DataError(f"{scores}: not a scores file from `embryo-ml score` (no "
                                f"column {', '.join(missing)}; columns: {columns})")
            classes = sorted(c[2:] for c in columns if c.startswith("p_"))
            if classes != sorted(bundle.classes):
                raise DataError(
                    f"{scores} was not scored with bundle {bundle.path}: its classes "
                    f"{classes} differ from the bundle's {sorted(bundle.classes)}")
        heads = {c: _text(raw.get(c)) for c in columns
                 if c.endswith("_pred") and c != "label_pred"}
        rows.append(_Row(
            path=_text(raw.get("path")), status=_text(raw.get("status")) or "unknown",
            score=_float(raw.get("score")), display=_text(raw.get("display_score")),
            label=_text(raw.get("label_pred")),
            flags=[f for f in _text(raw.get("flags")).split(";") if f],
            patient=_text(raw.get("patient_id")), embryo=_text(raw.get("embryo_id")),
            rank=_int(raw.get("rank_in_cohort")), grades=heads))
    if not rows:
        raise DataError(f"{scores}: no rows")
    return rows, [c for c in columns if c.endswith("_pred") and c != "label_pred"]


def _embryo_scores(scores: Path) -> dict[tuple[str, str], tuple[float, str]]:
    """(patient, embryo) -> (embryo score, display score) from the embryos table, if any."""
    table = embryos_path(scores)
    if not table.is_file():
        return {}
    out = {}
    try:
        for raw in iter_file_rows(table):
            score = _float(raw.get("embryo_score"))
            if score is not None:
                key = (_text(raw.get("patient_id")), _text(raw.get("embryo_id")))
                out[key] = (score, _text(raw.get("display_score")))
    except Exception as error:  # the report does not depend on it
        log.warning("%s: embryos table not read (%s); embryo scores left out", table, error)
        return {}
    return out


def _cohorts(rows: list[_Row]) -> list[tuple[str, list[_Row]]]:
    """Patients in order (ids compared as text), each cohort in rank order: ranked embryos
    best first (an embryo's images together, best image first), then unranked images; images
    without a patient id last, best score first."""
    by_patient: dict[str, list[_Row]] = {}
    for row in rows:
        by_patient.setdefault(row.patient, []).append(row)

    def key(row: _Row) -> tuple:
        return (row.rank is None, row.rank or 0, row.embryo_key[1],
                -(row.score if row.score is not None else -1.0), row.path)

    out = [(patient, sorted(group, key=key))
           for patient, group in sorted(by_patient.items()) if patient]
    if "" in by_patient:
        out.append(("", sorted(by_patient[""], key=key)))
    order = 0
    for _, group in out:
        for row in group:
            row.order = order
            order += 1
    return out


# ------------------------------------------------------------------------------- pictures --


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale >= 1.0:
        return image
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, shape, interpolation=cv2.INTER_AREA)


def _data_uri(rgb: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


class _Heatmaps:
    """Heatmap overlays from `embryo_ml.score.explain`, when it exists and the bundle has a
    class activation map output; `note` says why there are none otherwise."""

    def __init__(self, bundle: Bundle, wanted: bool, threads: int | None) -> None:
        self.scorer = None
        self.note = ""
        if not wanted:
            self.note = "heatmaps not computed (turned off for this report)"
            return
        try:
            from embryo_ml.score import explain
        except ImportError:
            self.note = "no heatmap (this embryo-ml version cannot compute heatmaps)"
            return
        if not getattr(bundle, "cam_output", None):
            self.note = "no heatmap (bundle has no CAM output)"
            return
        from embryo_ml.score.scorer import OnnxScorer

        self.explain = explain
        self.scorer = OnnxScorer(bundle, threads, precision="fp32")  # the cam is fp32's

    def overlays(self, images: list[np.ndarray], thumbs: list[np.ndarray]
                 ) -> list[tuple[str, str]]:
        """(data URI, "") or ("", why not) per decoded image and its thumbnail; one batch of
        model runs for all of them."""
        if self.scorer is None or not images:
            return [("", self.note)] * len(images)
        try:
            heats = self.explain.heatmaps(self.scorer, images)
        except Exception as error:  # heatmaps must not stop the report: try one by one
            if len(images) > 1:
                return [self.overlays([i], [t])[0] for i, t in zip(images, thumbs)]
            return [("", f"heatmap failed: {error.__class__.__name__}: {error}")]
        if heats is None:
            self.scorer, self.note = None, "no heatmap (bundle has no CAM output)"
            return [("", self.note)] * len(images)
        out = []
        for heat, thumb in zip(heats, thumbs):
            heat = np.asarray(heat, dtype=np.float32)
            if heat.shape != thumb.shape[:2]:
                heat = cv2.resize(heat, (thumb.shape[1], thumb.shape[0]),
                                  interpolation=cv2.INTER_AREA)
            out.append((_data_uri(self.explain.overlay(thumb, heat, alpha=HEAT_ALPHA)), ""))
        return out


def _picture_batch(batch: list[_Row], root: Path, heatmaps: _Heatmaps, size: int) -> None:
    """Decode, thumbnail and (for scored images) overlay one batch of rows."""
    scored: list[tuple[_Row, np.ndarray, np.ndarray]] = []
    for row in batch:
        try:
            image = read_image(_resolve(root, row.path))
        except ImageReadError as error:
            row.missing = error.reason == "file not found"
            row.thumb_note = ("image not found" if row.missing
                              else f"image could not be read: {error.reason}")
            row.heat_note = "no image"
            continue
        except Exception as error:
            row.thumb_note = f"image could not be read: {error.__class__.__name__}: {error}"
            row.heat_note = "no image"
            continue
        thumb = _thumbnail(image, size)
        row.thumb = _data_uri(thumb)
        if row.ok:
            scored.append((row, image, thumb))
        else:
            row.heat_note = "not scored"
    results = heatmaps.overlays([i for _, i, _ in scored], [t for _, _, t in scored])
    for (row, _, _), (uri, note) in zip(scored, results):
        row.heat, row.heat_note = uri, note


def _add_pictures(rows: list[_Row], root: Path, heatmaps: _Heatmaps, max_thumbnails: int,
                  size: int, progress: bool) -> None:
    """Thumbnails (and overlays) for the first `max_thumbnails` rows in report order, in
    batches of PICTURE_BATCH images (decoded images are held for one batch only)."""
    ordered = sorted(rows, key=lambda r: r.order)
    todo = ordered[:max_thumbnails]
    for row in ordered[max_thumbnails:]:
        row.thumb_note = row.heat_note = (
            f"not embedded: the report embeds the first {max_thumbnails} images")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="report", unit="img")
    try:
        for start in range(0, len(todo), PICTURE_BATCH):
            batch = todo[start:start + PICTURE_BATCH]
            _picture_batch(batch, root, heatmaps, size)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------ rendering --

def _asset(name: str) -> str:
    """The text of a file in `embryo_ml/report/assets` (package data), read as bytes so that its
    newlines reach the report, and the Content-Security-Policy hash, unchanged."""
    return (files("embryo_ml.report") / "assets" / name).read_bytes().decode("utf-8")


# The report's only style sheet and script, inlined (a report is one self-contained file) and
# admitted by hash in _CSP. The leading newline keeps `<style>` and `<script>` on their own line.
_STYLE = "\n" + _asset("report.css")
_SCRIPT = "\n" + _asset("report.js")


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


_CSP = ("default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
        "base-uri 'none'; form-action 'none'")


def _format_metric(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return str(value)


def _facts(items: list[tuple[str, object]]) -> str:
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return f'<dl class="facts">{body}</dl>'


def _validation_banner(bundle: Bundle) -> str:
    """The banner above everything for a model that failed (red) or whose check was
    inconclusive (amber); "" otherwise."""
    text = VALIDATION_BANNER.get(bundle.verdict or "")
    if text is None or bundle.validation is None:
        return ""
    verdict = _e(bundle.verdict)
    return (f'<div class="validation-banner {verdict}" id="validation-banner" role="alert" '
            f'data-verdict="{verdict}"><strong>'
            f"{_e(text.format(reason=reason_text(bundle.validation)))}</strong></div>")


def _validation_fact(bundle: Bundle) -> str:
    if bundle.validation is None:
        return "not recorded (model exported before validation checks existed)"
    return f"{bundle.verdict}: {reason_text(bundle.validation)}"


def _model_card_html(bundle: Bundle) -> str:
    """A few lines of the bundle's model card and where the whole card is."""
    lines = card_summary(bundle.model_card)
    if not lines:
        return ('<h3>Model card</h3><p id="model-card">This bundle has no model card (exported '
                "before model cards existed).</p>")
    folder = str(bundle.path) if bundle.path else "the bundle folder"
    where = f"{MODEL_CARD_FILE} in the bundle folder ({folder})"
    return (f'<h3>Model card</h3><div id="model-card">{_facts(lines)}<p class="small-text">'
            f"The full model card (training data, subgroups, limitations): {_e(where)}.</p>"
            "</div>")


def _shift_rows(rows: list[_Row]) -> list[dict[str, Any]]:
    return [{"patient_id": r.patient, "status": r.status, "flags": r.flags} for r in rows]


def _scoring_settings(scores: Path) -> dict[str, Any]:
    """The scoring sidecar beside the scores file (`settings_path`); {} when absent or bad."""
    try:
        data = json.loads(settings_path(scores).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_scored_by(scores: Path, bundle: Bundle) -> None:
    """BundleError (one line) unless `bundle` is the bundle whose identity the scoring sidecar
    records; a logged warning when there is no sidecar to tell (or an older one, which records
    only the model's hash, and that hash matches)."""
    sidecar = settings_path(scores)
    recorded = _scoring_settings(scores).get("bundle_sha256")
    expected = identity(bundle)
    if recorded == expected:
        return
    if not sidecar.is_file() or not isinstance(recorded, str) or recorded == bundle.sha256:
        log.warning("report: %s has no scoring sidecar that records its bundle (%s: scores from "
                    "an older embryo-ml, or copied without it); cannot check that %s is the "
                    "bundle that scored them", scores.name, sidecar.name, bundle.path)
        return
    raise BundleError(f"{scores} was not scored with bundle {bundle.path}: {sidecar.name} "
                      f"records bundle {recorded[:12]}..., this one is {expected[:12]}... "
                      "(another bundle, or this one changed since); give the bundle that "
                      "scored it")


def _run_shift(scores: Path, bundle: Bundle, rows: list[_Row]) -> dict[str, Any]:
    """The run's dataset-shift record: the scoring sidecar's when it belongs to these scores
    (this bundle, the same counts), else recomputed from the rows and the bundle for the model
    the sidecar names (else the one `score` picks by default, as `choose_model` does)."""
    counted = _shift_rows(rows)
    settings = _scoring_settings(scores)
    record = settings.get("shift")
    if (isinstance(record, dict) and record.get("available") is True
            and settings.get("bundle_sha256") == identity(bundle)
            and (record.get("n_flagged"), record.get("n_scored")) == count_flagged(counted)):
        return record
    precision = settings.get("model")
    if precision not in ("fp32", "int8"):
        precision = "int8" if bundle.int8 is not None else "fp32"
    return shift_record(bundle, str(precision), counted)


def _shift_html(shift: dict[str, Any], rows: list[_Row]) -> str:
    """The red banner of a shifted run, then the patients whose images are mostly flagged
    (whether or not the run is shifted); "" when neither applies."""
    parts = []
    if shift.get("shifted") is True:
        text = SHIFT_BANNER.format(n_flagged=shift["n_flagged"], n_scored=shift["n_scored"],
                                   expected=format_percent(float(shift["expected_share"])))
        parts.append(f'<div class="shift-banner" id="shift-banner" role="alert" '
                     f'data-shifted="true"><strong>{_e(text)}</strong></div>')
    cohorts = mostly_flagged_cohorts(_shift_rows(rows))
    if cohorts:
        items = "".join(
            f'<li data-patient="{_e(c["patient_id"])}">' + _e(SHIFT_COHORT.format(
                patient=c["patient_id"], n_flagged=c["n_flagged"], n_scored=c["n_scored"],
                share=format_percent(c["share_flagged"]))) + "</li>" for c in cohorts)
        parts.append(f'<div class="shift-cohorts" id="shift-cohorts" role="note"><strong>'
                     f"{_e(SHIFT_COHORTS_TITLE)}</strong><ul>{items}</ul></div>")
    return "\n".join(parts)


def _shift_note(shift: dict[str, Any]) -> str:
    """One line for "About this report": what the dataset-shift check found."""
    if shift.get("available") is not True:
        return f"Dataset shift check: not available ({shift.get('reason', 'no record')})."
    found = (f"Dataset shift check: {shift['n_flagged']} of {shift['n_scored']} scored images "
             f"flagged as unusual, about {format_percent(float(shift['expected_share']))} "
             f"expected on images like the validation ones (p = {float(shift['p_value']):.2g})")
    if shift.get("shifted") is True:
        return f"{found}: these images do not look like the training images (see the top)."
    return (f"{found}: no sign of dataset shift (a warning needs p < "
            f"{float(shift['p_limit']):g}, at least twice the expected share and at least 3 "
            "flagged images).")


def _summary(rows: list[_Row], cohorts: list[tuple[str, list[_Row]]], bundle: Bundle,
             scores: Path, root: Path, notes: list[str]) -> str:
    n = len(rows)
    scored = [r for r in rows if r.ok]
    flagged = [r for r in rows if r.flags]
    flag_counts = Counter(f for r in rows for f in dict.fromkeys(r.flags))
    labels = Counter(r.label for r in scored if r.label)
    patients = [p for p, _ in cohorts if p]
    embryos = {r.embryo_key for r in rows}
    statuses = Counter(r.status for r in rows if not r.ok)

    counts = [
        ("Images", n),
        ("Scored", len(scored)),
        ("Not scored", f"{n - len(scored)}" + (" (see the rows marked “not scored”)"
                                                if n - len(scored) else "")),
        ("Patients", len(patients)),
        ("Embryos", len(embryos)),
        ("Flagged images", f"{len(flagged)} of {n}"),
        *[(f"Predicted {label}", count) for label, count in sorted(labels.items())],
    ]
    flag_rows = "".join(
        f'<tr data-flag-count="{_e(f)}"><td>{count}</td><td>{_e(flag_text(f))}</td></tr>'
        for f, count in sorted(flag_counts.items(),
                               key=lambda kv: (FLAG_NAMES.index(kv[0])
                                               if kv[0] in FLAG_NAMES else len(FLAG_NAMES),
                                               kv[0])))
    flags_html = (f'<table class="small" id="flag-counts"><tr><th>images</th><th>flag</th></tr>'
                  f"{flag_rows}</table>" if flag_rows else "<p>No image is flagged.</p>")
    not_scored_html = ""
    if statuses:
        items = "".join(f"<li>{count} × {_e(status)}</li>"
                        for status, count in statuses.most_common(10))
        not_scored_html = f"<h3>Why images were not scored</h3><ul>{items}</ul>"

    versions = bundle.versions or {}
    model = [
        ("Model", bundle.architecture),
        ("Bundle", bundle.path.name if bundle.path else ""),
        ("Model version (SHA-256)", bundle.sha256[:12]),
        ("Training run", bundle.run_id or "unknown"),
        ("Created", bundle.created or "unknown"),
        ("embryo-ml", versions.get("embryo-ml", "unknown")),
        ("Classes", ", ".join(bundle.classes)),
        ("Score", f"calibrated probability of “{bundle.positive_class}” "
                  f"(temperature {bundle.temperature:.3g}), shown 1-10 as ceil(10 × p)"),
        ("Decision threshold", f"{bundle.threshold:.3f}"),
        ("Validation check", _validation_fact(bundle)),
    ]
    if bundle.heads:
        model.append(("Extra heads", ", ".join(bundle.heads)))
    metrics = {k: v for k, v in (bundle.val_metrics or {}).items()
               if isinstance(v, int | float | str | bool)}
    metric_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_format_metric(v))}</td></tr>"
                          for k, v in metrics.items())
    metrics_html = (f'<table class="small" id="val-metrics">{metric_rows}</table>'
                    if metric_rows else "<p>The bundle records no validation metrics.</p>")
    notes_html = "".join(f"<li>{_e(note)}</li>" for note in notes)
    return f"""
<section id="summary">
<p class="judgement" id="judgement-note"><strong>{_e(JUDGEMENT_NOTE)}</strong></p>
<div class="summary-grid">
<div><h2>Summary</h2>{_facts(counts)}
<h3>Flags</h3>{flags_html}{not_scored_html}</div>
<div><h2>Model</h2>{_facts(model)}
<h3>Validation metrics</h3>{metrics_html}</div>
</div>
<h3>Intended use</h3><p id="intended-use">{_e(INTENDED_USE.format(positive=bundle.positive_class))}
</p>
{_model_card_html(bundle)}
<h3>About this report</h3>
<ul id="report-notes">
<li>Scores: {_e(scores.name)}; images from: {_e(str(root))}.</li>
<li>Each patient's embryos are listed in rank order (1 = highest embryo score); images of one
embryo share its rank. Click a column title, or use the controls, to sort and filter.</li>
{notes_html}
</ul>
</section>"""


def _controls(rows: list[_Row]) -> str:
    present = sorted({f for r in rows for f in r.flags},
                     key=lambda f: (FLAG_NAMES.index(f) if f in FLAG_NAMES else 99, f))
    options = [("all", "all images"), ("flagged", "flagged images"),
               ("unflagged", "scored, not flagged"), ("not-scored", "not scored"),
               *[(f, f"flag: {f}") for f in present]]
    flag_options = "".join(f'<option value="{_e(v)}">{_e(t)}</option>' for v, t in options)
    return f"""
<div class="controls" id="controls">
<label>Find <input type="search" id="filter-text" placeholder="file, patient or embryo"></label>
<label>Show <select id="filter-flag">{flag_options}</select></label>
<label>Sort by <select id="sort-key"><option value="rank">rank</option>
<option value="score">score</option><option value="path">file name</option>
<option value="flags">flags</option></select></label>
<span id="shown-count" aria-live="polite">Showing {len(rows)} of {len(rows)} images</span>
<noscript>Sorting and filtering need JavaScript; the rows are in rank order.</noscript>
</div>"""


def _picture(uri: str, note: str, alt: str) -> str:
    if uri:
        return f'<img src="{uri}" alt="{_e(alt)}" loading="lazy" decoding="async">'
    return f'<div class="placeholder">{_e(note)}</div>'


def _row_html(row: _Row, head_columns: list[str],
              embryo_scores: dict[tuple[str, str], tuple[float, str]]) -> str:
    classes = ["flagged" if row.flags else "", "" if row.ok else "not-scored"]
    attrs = {
        "data-image-row": "", "data-order": row.order, "data-path": row.path,
        "data-patient": row.patient, "data-embryo": row.embryo,
        "data-rank": "" if row.rank is None else row.rank,
        "data-score": "" if row.score is None else f"{row.score:.6f}",
        "data-flags": ";".join(row.flags), "data-status": row.status,
    }
    attr_html = " ".join(f'{k}="{_e(v)}"' for k, v in attrs.items())
    class_html = " ".join(c for c in classes if c)
    if row.ok and row.score is not None:
        score = (f'<span class="display" title="1-10 display value">{_e(row.display)}</span>'
                 f'<span class="small-text">/10</span><br>'
                 f'<span class="p">p = {row.score:.3f}</span>')
    else:
        score = '<span class="p">not scored</span>'
    embryo = _e(row.embryo or "—")
    known = embryo_scores.get(row.embryo_key)
    if known is not None:
        embryo += (f'<br><span class="small-text">embryo score {_e(known[1])}/10 '
                   f"(p = {known[0]:.3f})</span>")
    flags = [f'<li data-flag="{_e(f)}">{_e(flag_text(f))}</li>' for f in row.flags]
    if not row.ok:
        flags.insert(0, f'<li data-flag="not-scored">not scored: {_e(row.status)}</li>')
    flags_html = f"<ul>{''.join(flags)}</ul>" if flags else '<span class="small-text">none</span>'
    cells = [
        f'<td class="rank">{_e("—" if row.rank is None else row.rank)}</td>',
        f'<td class="pic thumb">{_picture(row.thumb, row.thumb_note, "image " + row.path)}</td>',
        f'<td class="pic heat">{_picture(row.heat, row.heat_note, "heatmap " + row.path)}</td>',
        f'<td class="embryo">{embryo}</td>',
        f'<td class="score">{score}</td>',
        f'<td class="label">{_e(row.label or "—")}</td>',
    ]
    if head_columns:
        cells.append(f'<td class="grades">{_grades_html(row, head_columns)}</td>')
    cells += [f'<td class="flags">{flags_html}</td>', f'<td class="path">{_e(row.path)}</td>']
    return f'<tr class="{class_html}" {attr_html}>{"".join(cells)}</tr>'


def _grades_html(row: _Row, head_columns: list[str]) -> str:
    grade = row.grades.get("grade_pred", "")
    parts = [f"{c[:-5]} {row.grades.get(c, '')}" for c in head_columns
             if c != "grade_pred" and row.grades.get(c)]
    main = f"<strong>{_e(grade)}</strong>" if grade else ""
    detail = f'<br><span class="small-text">{_e(", ".join(parts))}</span>' if parts else ""
    return (main + detail) or "—"


def _cohort_html(patient: str, rows: list[_Row], head_columns: list[str],
                 embryo_scores: dict[tuple[str, str], tuple[float, str]]) -> str:
    n_embryos = len({r.embryo_key for r in rows})
    flagged = sum(1 for r in rows if r.flags)
    if patient:
        title = f"Patient {_e(patient)}"
    else:
        title = "Images without a patient id (no cohort, not ranked)"
    heads = [("rank", "Rank"), (None, "Image"), (None, "Heatmap"), (None, "Embryo"),
             ("score", "Score (1-10)"), (None, "Predicted"),
             *([(None, "Gardner grade")] if head_columns else []),
             ("flags", "Flags"), ("path", "File")]
    head_html = "".join(
        f'<th><button type="button" data-sort="{key}">{label}</button></th>' if key
        else f"<th>{label}</th>" for key, label in heads)
    body = "".join(_row_html(r, head_columns, embryo_scores) for r in rows)
    return f"""
<section class="cohort" data-patient="{_e(patient)}">
<h2>{title}</h2>
<p class="meta">{n_embryos} embryo(s), {len(rows)} image(s), {flagged} flagged</p>
<table><thead><tr>{head_html}</tr></thead>
<tbody data-cohort-rows>{body}</tbody></table>
</section>"""


# ---------------------------------------------------------------------------------- entry --


def _image_root(images: str | os.PathLike[str] | None, scores: Path) -> Path:
    if images is None:
        return scores.resolve().parent
    root = Path(images)
    if root.is_file():  # a manifest stands for its folder (its paths are relative to it)
        return root.resolve().parent
    return root.resolve()


def write_report(
    scores: str | os.PathLike[str],
    bundle: str | os.PathLike[str] | Bundle,
    out: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    *,
    heatmaps: bool = True,
    max_thumbnails: int = DEFAULT_MAX_THUMBNAILS,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    threads: int | None = None,
    progress: bool = False,
) -> Path:
    """Write the HTML report of `scores` (written by `bundle`) to `out`; returns `out`.

    `images`: the folder that was scored, or its manifest (default: the scores file's folder).
    `heatmaps`: overlay where the model looked, when the bundle can (extra model runs).
    `max_thumbnails`: embed pictures for at most this many rows (in report order)."""
    scores, out = Path(scores), Path(out)
    if max_thumbnails < 0:
        raise DataError(f"max_thumbnails must be >= 0, got {max_thumbnails}")
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    rows, head_columns = _read_rows(scores, bundle)
    _check_scored_by(scores, bundle)  # before any picture is made
    cohorts = _cohorts(rows)
    root = _image_root(images, scores)
    maker = _Heatmaps(bundle, heatmaps, threads)
    _add_pictures(rows, root, maker, max_thumbnails, thumbnail_size, progress)

    notes = []
    if maker.note:
        notes.append(f"Heatmaps: {maker.note}.")
    else:
        notes.append("Heatmaps: the brighter the colour, the more that part of the image "
                     "raised the score (class activation map).")
    if len(rows) > max_thumbnails:
        notes.append(f"Pictures are embedded for the first {max_thumbnails} of {len(rows)} "
                     "images only, to keep the file small; the others are listed without.")
        log.warning("report: %d images; pictures embedded for the first %d only "
                    "(--max-thumbnails)", len(rows), max_thumbnails)
    missing = sum(r.missing and r.ok for r in rows)  # found when scored, not found now
    if missing:
        notes.append(f"{missing} image file(s) were not found under {root}: their rows show a "
                     "placeholder. Give the folder that was scored (--images).")
        log.warning("report: %d of %d image file(s) not found under %s (use --images)",
                    missing, len(rows), root)
    unreadable = sum(1 for r in rows if r.ok and not r.thumb and not r.missing
                     and r.thumb_note.startswith("image could not be read"))
    if unreadable:
        notes.append(f"{unreadable} image file(s) could not be read for a thumbnail.")

    shift = _run_shift(scores, bundle, rows)
    notes.append(_shift_note(shift))
    embryo_scores = _embryo_scores(scores)
    created = datetime.now().astimezone().isoformat(timespec="seconds")
    document = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">
<meta name="generator" content="embryo-ml">
<title>Embryo scoring report: {_e(scores.name)}</title>
<style>{_STYLE}</style>
</head>
<body>
{_validation_banner(bundle)}
{_shift_html(shift, rows)}
<header>
<h1>Embryo scoring report</h1>
<p class="meta">Created {_e(created)} from {_e(scores.name)} with model
{_e(bundle.architecture)} ({_e(bundle.sha256[:12])}).</p>
</header>
{_summary(rows, cohorts, bundle, scores, root, notes)}
{_controls(rows)}
<main id="cohorts">
{"".join(_cohort_html(p, group, head_columns, embryo_scores) for p, group in cohorts)}
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, document)
