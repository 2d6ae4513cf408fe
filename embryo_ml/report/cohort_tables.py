"""The report's cohort tables: one table per patient in rank order, then the images without a
patient id, and the controls above them that sort and filter the rows.

A row shows the thumbnail, the heatmap overlay, the embryo (and its embryo score), the
calibrated score with its 1-10 display value, the predicted class, Gardner grades when the
bundle has them, the flags in plain words and the file name. Every value goes through
`escape`; the rows' `data-` attributes are what the inline script sorts and filters on.
"""

from __future__ import annotations

from embryo_ml.report.markup import escape as _e
from embryo_ml.report.rows import ReportRow
from embryo_ml.report.texts import flag_order, flag_text


def controls_html(rows: list[ReportRow]) -> str:
    """Find, filter and sort controls (the inline script reads them); the rows' flags as filters."""
    present = sorted({f for r in rows for f in r.flags},
                     key=flag_order)
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
    """An embedded picture, or a placeholder that says why there is none."""
    if uri:
        return f'<img src="{uri}" alt="{_e(alt)}" loading="lazy" decoding="async">'
    return f'<div class="placeholder">{_e(note)}</div>'


def _row_html(row: ReportRow, head_columns: list[str],
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


def _grades_html(row: ReportRow, head_columns: list[str]) -> str:
    grade = row.grades.get("grade_pred", "")
    parts = [f"{c[:-5]} {row.grades.get(c, '')}" for c in head_columns
             if c != "grade_pred" and row.grades.get(c)]
    main = f"<strong>{_e(grade)}</strong>" if grade else ""
    detail = f'<br><span class="small-text">{_e(", ".join(parts))}</span>' if parts else ""
    return (main + detail) or "—"


def cohort_html(patient: str, rows: list[ReportRow], head_columns: list[str],
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
