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

Where the parts live: the rows and cohorts in `embryo_ml.report.rows`, the pictures in
`embryo_ml.report.pictures`, the scoring sidecar's record in `embryo_ml.report.sidecar`, the
sections in `banners`, `summary` and `cohort_tables`, the plain words in `texts`. This module
reads, checks and puts the page together.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from datetime import datetime
from importlib.resources import files
from pathlib import Path

from embryo_ml.errors import DataError
from embryo_ml.export.bundle import Bundle, read_bundle
from embryo_ml.fileio import atomic_write_text
from embryo_ml.report.banners import prior_banner, shift_banners, validation_banner
from embryo_ml.report.cohort_tables import cohort_html, controls_html
from embryo_ml.report.markup import escape as _e
from embryo_ml.report.pictures import DEFAULT_THUMBNAIL_SIZE, Heatmaps, add_pictures
from embryo_ml.report.rows import ReportRow, embryo_scores, group_cohorts, read_rows
from embryo_ml.report.sidecar import check_scored_by, run_prior_warning, run_shift
from embryo_ml.report.summary import shift_note, summary_html
from embryo_ml.report.texts import (
    FLAG_TEXT,
    INTENDED_USE,
    JUDGEMENT_NOTE,
    SHIFT_BANNER,
    SHIFT_COHORT,
    SHIFT_COHORTS_TITLE,
    VALIDATION_BANNER,
    flag_text,
)

__all__ = ["DEFAULT_MAX_THUMBNAILS", "FLAG_TEXT", "INTENDED_USE", "JUDGEMENT_NOTE",
           "SHIFT_BANNER", "SHIFT_COHORT", "SHIFT_COHORTS_TITLE", "VALIDATION_BANNER",
           "flag_text", "write_report"]

log = logging.getLogger(__name__)

DEFAULT_MAX_THUMBNAILS = 1000


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
    rows, head_columns = read_rows(scores, bundle)
    check_scored_by(scores, bundle)  # before any picture is made
    cohorts = group_cohorts(rows)
    root = _image_root(images, scores)
    maker = Heatmaps(bundle, heatmaps, threads)
    add_pictures(rows, root, maker, max_thumbnails, thumbnail_size, progress)
    notes = _picture_notes(rows, root, maker, max_thumbnails, bundle.positive_class)
    shift = run_shift(scores, bundle, rows)
    notes.append(shift_note(shift))
    sections = [validation_banner(bundle), prior_banner(run_prior_warning(scores)),
                shift_banners(shift, rows), _header(scores, bundle),
                summary_html(rows, cohorts, bundle, scores, root, notes), controls_html(rows),
                _cohorts_html(scores, cohorts, head_columns)]
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, _document(scores, sections))


def _image_root(images: str | os.PathLike[str] | None, scores: Path) -> Path:
    """The folder the rows' relative paths start from: the scored folder (a manifest stands for
    its folder), else the scores file's folder."""
    if images is None:
        return scores.resolve().parent
    root = Path(images)
    if root.is_file():  # a manifest stands for its folder (its paths are relative to it)
        return root.resolve().parent
    return root.resolve()


def _picture_notes(rows: list[ReportRow], root: Path, maker: Heatmaps,
                   max_thumbnails: int, positive: str) -> list[str]:
    """The lines "About this report" says about the pictures: what the heatmaps show (or why
    there are none), rows past the cap, images not found or not readable (logged too)."""
    notes = []
    if maker.note:
        notes.append(f"Heatmaps: {maker.note}.")
    else:
        notes.append("Heatmaps: each shows the parts of the image that support the class "
                     "predicted for it (class activation map): for an embryo predicted "
                     f"“{positive}”, what raised its score; for one predicted otherwise, what "
                     "lowered it. The brighter the colour, the stronger, relative within one "
                     "image; no colour: nothing in the image stands out.")
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
    return notes


def _header(scores: Path, bundle: Bundle) -> str:
    """The page's title block, with the time the report was made."""
    created = datetime.now().astimezone().isoformat(timespec="seconds")
    return f"""<header>
<h1>Embryo scoring report</h1>
<p class="meta">Created {_e(created)} from {_e(scores.name)} with model
{_e(bundle.architecture)} ({_e(bundle.sha256[:12])}).</p>
</header>"""


def _cohorts_html(scores: Path, cohorts: list[tuple[str, list[ReportRow]]],
                  head_columns: list[str]) -> str:
    """Every cohort's table, with the embryo scores of the embryos table beside the scores."""
    known = embryo_scores(scores)
    body = "".join(cohort_html(p, group, head_columns, known) for p, group in cohorts)
    return f"""<main id="cohorts">
{body}
</main>"""


def _document(scores: Path, sections: list[str]) -> str:
    """The whole page: head (policy, style), the sections in order, the script."""
    body = "\n".join(sections)
    return f"""<!DOCTYPE html>
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
{body}
<script>{_SCRIPT}</script>
</body>
</html>
"""
