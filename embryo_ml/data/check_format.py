"""`data check` as text: the `CheckReport` of `check_data` in aligned sections for a terminal.

Long lists are capped at `LIST_CAP` lines; paths are printed relative to their common folder.
"""

from __future__ import annotations

import os

from embryo_ml.data.check import MISSING, CheckReport

LIST_CAP = 20  # longest list `format_report` prints before "... and N more"


def _table(rows: list[tuple[object, ...]], align: str = "") -> list[str]:
    """Columns padded to their widest cell; `align` per column: 'l' or 'r' (default 'l')."""
    if not rows:
        return []
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if align[i:i + 1] == "r" else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def _capped(lines: list[str], n_items: int | None = None) -> list[str]:
    total = len(lines) if n_items is None else n_items
    if len(lines) <= LIST_CAP:
        return lines
    return lines[:LIST_CAP] + [f"  ... and {total - LIST_CAP} more"]


def _count_table(counts: dict[str, int | float], total: int) -> list[str]:
    rows = [(k, v, f"{100 * v / total:.1f}%" if total else "-") for k, v in counts.items()]
    return _capped(_table(rows, "lrr"))


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root) if root else path


def _groups(groups: list[list[str]], root: str, labels: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for number, group in enumerate(groups[:LIST_CAP], 1):
        tags = {labels.get(p, MISSING) for p in group}
        note = f"  (labels differ: {', '.join(sorted(tags))})" if labels and len(tags) > 1 else ""
        lines.append(f"  group {number}: {len(group)} files{note}")
        lines += [f"    {_relative(p, root)}" for p in group]
    if len(groups) > LIST_CAP:
        lines.append(f"  ... and {len(groups) - LIST_CAP} more groups")
    return lines


def _root(report: CheckReport) -> str:
    """The common folder of every path printed, so listings stay short and readable."""
    paths = [p for p, _ in report.unreadable]
    paths += [p for g in report.exact_duplicates + report.near_duplicates for p in g]
    paths += [str(p) for leak in report.leakage for p in leak["paths"]]  # type: ignore[attr-defined]
    if not paths:
        return ""
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # different drives, or relative and absolute mixed
        return ""


def verdict(report: CheckReport) -> str:
    """One line: "OK" or "PROBLEMS: ..." (what fails `ok()`), then what deserves a look."""
    problems = []
    if report.unreadable:
        problems.append(f"{len(report.unreadable)} unreadable")
    if report.leakage:
        problems.append(f"{len(report.leakage)} leak" + ("s" if len(report.leakage) > 1 else ""))
    warnings = []
    if report.exact_duplicates:
        warnings.append(f"{len(report.exact_duplicates)} exact-duplicate group(s)")
    if report.near_duplicates:
        warnings.append(f"{len(report.near_duplicates)} near-duplicate group(s)")
    if report.label_conflicts:
        warnings.append(f"{len(report.label_conflicts)} duplicate group(s) with differing labels")
    line = f"PROBLEMS: {', '.join(problems)}" if problems else "OK"
    return f"{line}; to review: {', '.join(warnings)}" if warnings else line



def _leak_lines(report: CheckReport, root: str) -> list[str]:
    """Each leak: what is shared, between which splits, and (the first five of) its files."""
    lines: list[str] = []
    for leak in report.leakage[:LIST_CAP]:
        paths = list(leak["paths"])  # type: ignore[call-overload]
        if leak["kind"] == "group":
            what = f"{leak['column']} {leak['key']}"
        elif leak.get("match") == "exact":
            what = f"same file content (sha256 {str(leak['key'])[:12]})"
        else:
            what = f"near-duplicate group {str(leak['key']).removeprefix('near-')}"
        lines.append(f"  {what} in {' + '.join(leak['splits'])}: "  # type: ignore[arg-type]
                     f"{len(paths)} file(s)")
        lines += [f"    {_relative(p, root)}" for p in paths[:5]]
        if len(paths) > 5:
            lines.append(f"    ... and {len(paths) - 5} more")
    if len(report.leakage) > LIST_CAP:
        lines.append(f"  ... and {len(report.leakage) - LIST_CAP} more")
    return lines


def format_report(report: CheckReport) -> str:
    """The report as aligned plain-text sections for a terminal; long lists are capped."""
    root = _root(report)
    n_readable = report.n_images - len(report.unreadable)
    out: list[str] = ["Images", *_table([
        ("rows", report.n_images), ("unreadable", len(report.unreadable)),
        ("exact-duplicate groups", len(report.exact_duplicates)),
        ("near-duplicate groups", len(report.near_duplicates)),
    ], "lr")]
    if root:
        out.append(f"  (paths below are relative to {root})")

    def section(title: str, lines: list[str], empty: str = "none") -> None:
        out.extend(["", title, *(lines or [f"  {empty}"])])

    counts = report.counts
    section("Classes", _count_table(counts["label"], report.n_images) if "label" in counts else [],
            "no label column")
    section("Days", _count_table(counts["day"], report.n_images) if "day" in counts else [],
            "no day column")
    section("Patients", _table(list(counts["patient_id"].items()), "lr")
            if "patient_id" in counts else [], "no patient_id column")
    section("Images per embryo", _table(list(report.images_per_embryo.items()), "lr"),
            "no embryo_id column")
    section("Sizes", _count_table(report.sizes, n_readable))
    section("Modes", _count_table(report.modes, n_readable))
    section("Unreadable files", _capped(
        [f"  {_relative(p, root)}: {reason}" for p, reason in report.unreadable]))
    section("Exact duplicates", _groups(report.exact_duplicates, root, report.labels))
    section("Near duplicates", _groups(report.near_duplicates, root, report.labels))
    section("Leakage between splits", _leak_lines(report, root),
            "none" if report.split_column else "not checked (no split given)")
    out.extend(["", verdict(report)])
    return "\n".join(out)
