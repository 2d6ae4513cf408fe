"""The HTML scoring report: escaping, summary, cohort order, placeholders, formats, CLI, and a
real browser (headless Chromium) rendering it.

Most tests use the hand-built linear bundle (tests/fake_bundle.py) and score files written by
hand, so counts and orders are known in advance; the browser test scores real synthetic images
with the session's trained bundle.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embryo_ml.cli import main
from embryo_ml.export.bundle import read_bundle, write_bundle_json
from embryo_ml.report.html import FLAG_TEXT, JUDGEMENT_NOTE, write_report
from embryo_ml.score.scorer import score_columns, score_images
from tests.conftest import write_image
from tests.fake_bundle import make_fake_bundle, uniform_image

HOSTILE = "<img src=x onerror=alert(1)>.png"
HOSTILE_TEXT = "&lt;img src=x onerror=alert(1)&gt;"
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers ----


class _Page(HTMLParser):
    """Image rows (attributes and text), every element's attributes, script texts, <dl> facts."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.facts: dict[str, str] = {}
        self.ids: dict[str, str] = {}  # id -> text of that element (one level of text only)
        self._row: dict | None = None
        self._raw: str | None = None
        self._dt: str | None = None
        self._capture: tuple[str, str] | None = None  # (what, key)
        self._buffer: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values))
        if tag == "tr" and "data-image-row" in values:
            self._row = {"attrs": values, "text": []}
        if tag in ("script", "style"):
            self._raw = tag
            self._buffer = []
        if tag in ("dt", "dd") or "id" in values:
            self._capture = (tag, values.get("id", ""))
            self._buffer = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self._row["text"] = " ".join(self._row["text"])
            self.rows.append(self._row)
            self._row = None
        if tag in ("script", "style") and self._raw == tag:
            (self.scripts if tag == "script" else self.styles).append("".join(self._buffer))
            self._raw = None
        if self._capture is not None and tag == self._capture[0]:
            text = "".join(self._buffer).strip()
            if tag == "dt":
                self._dt = text
            elif tag == "dd" and self._dt is not None:
                self.facts[self._dt] = text
                self._dt = None
            if self._capture[1]:
                self.ids[self._capture[1]] = text
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._row is not None:
            self._row["text"].append(data)
        if self._raw is not None or self._capture is not None:
            self._buffer.append(data)

    def row(self, path: str) -> dict:
        found = [r for r in self.rows if r["attrs"]["data-path"] == path]
        assert len(found) == 1, f"{path}: {len(found)} rows"
        return found[0]


def _write_scores(path: Path, rows: list[dict], classes: tuple[str, ...] = ("good", "poor")
                  ) -> Path:
    columns = score_columns(list(classes))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def _row(path: str, patient: str, embryo: str, score: float | None, rank: int | None,
         flags: str = "") -> dict:
    ok = score is not None
    return {"path": path, "status": "ok" if ok else "unreadable: truncated file",
            "score": f"{score:.6f}" if ok else "", "display_score": "",
            "label_pred": ("good" if score >= 0.5 else "poor") if ok else "",
            "p_good": f"{score:.6f}" if ok else "", "p_poor": f"{1 - score:.6f}" if ok else "",
            "flags": flags, "embryo_id": embryo, "patient_id": patient,
            "rank_in_cohort": "" if rank is None else str(rank)}


# Written out of order on purpose; the report must show each patient's cohort in rank order.
HAND_ROWS = [
    _row("p2/b.png", "P2", "E2", 0.30, 2, "blurry"),
    _row("p1/c.png", "P1", "E3", 0.20, 3),
    _row("loose/z.png", "", "", 0.95, None, "no_embryo;out_of_distribution"),
    _row("p1/a.png", "P1", "E1", 0.90, 1, "blurry;under_exposed"),
    _row("p2/a.png", "P2", "E1", 0.80, 1),
    _row("p1/broken.png", "P1", "E4", None, None),
    _row("p1/b1.png", "P1", "E2", 0.50, 2),
    _row("p1/b2.png", "P1", "E2", 0.70, 2),
]


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle",
                            np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


@pytest.fixture
def hand_scores(tmp_path: Path) -> Path:
    for i, row in enumerate(HAND_ROWS):
        if row["status"] == "ok":
            uniform_image(tmp_path / "images" / row["path"], (40 * i % 255, 120, 200))
    (tmp_path / "images" / "p1" / "broken.png").write_bytes(b"\x89PNG truncated")
    return _write_scores(tmp_path / "scores.csv", HAND_ROWS)


# ------------------------------------------------------------------- pure Python tests ----


def test_summary_counts_flags_in_plain_words_and_model_facts(
    hand_scores: Path, fake_bundle: Path, tmp_path: Path
) -> None:
    out = write_report(hand_scores, fake_bundle, tmp_path / "r.html", images=tmp_path / "images")
    page = _Page(out.read_text(encoding="utf-8"))
    facts = page.facts
    assert facts["Images"] == "8" and facts["Scored"] == "7"
    assert facts["Not scored"].startswith("1")
    assert facts["Patients"] == "2"
    assert facts["Embryos"] == "7"  # P1: E1-E4, P2: E1-E2, and the loose image
    assert facts["Flagged images"] == "3 of 8"
    assert facts["Predicted good"] == "5" and facts["Predicted poor"] == "2"
    assert facts["Model"] == "fake-linear"
    assert facts["Model version (SHA-256)"] == read_bundle(fake_bundle).sha256[:12]
    text = out.read_text(encoding="utf-8")
    counts = dict(re.findall(r'data-flag-count="(\w+)"><td>(\d+)</td>', text))
    assert counts == {"blurry": "2", "under_exposed": "1", "no_embryo": "1",
                      "out_of_distribution": "1"}
    assert JUDGEMENT_NOTE.replace("'", "&#x27;") in text
    assert "not a probability of implantation" in page.ids["intended-use"]
    row = page.row("p1/a.png")
    assert FLAG_TEXT["blurry"] in row["text"] and FLAG_TEXT["under_exposed"] in row["text"]
    assert "none" in page.row("p1/c.png")["text"]
    assert "not scored: unreadable: truncated file" in page.row("p1/broken.png")["text"]
    assert page.row("p1/a.png")["attrs"]["data-flags"] == "blurry;under_exposed"


def test_cohorts_in_rank_order_then_images_without_patient(
    hand_scores: Path, fake_bundle: Path, tmp_path: Path
) -> None:
    out = write_report(hand_scores, fake_bundle, tmp_path / "r.html", images=tmp_path / "images")
    page = _Page(out.read_text(encoding="utf-8"))
    order = [r["attrs"]["data-path"] for r in page.rows]
    assert order == ["p1/a.png", "p1/b2.png", "p1/b1.png", "p1/c.png", "p1/broken.png",
                     "p2/a.png", "p2/b.png", "loose/z.png"]
    assert [r["attrs"]["data-order"] for r in page.rows] == [str(i) for i in range(8)]
    sections = [a.get("data-patient") for tag, a in page.elements
                if tag == "section" and "cohort" in a.get("class", "")]
    assert sections == ["P1", "P2", ""]


def test_every_value_is_escaped(fake_bundle: Path, tmp_path: Path) -> None:
    """Hostile file names, ids, flags and bundle metadata come out as text, never markup."""
    bundle = read_bundle(fake_bundle)
    evil = '"><script>alert(1)</script>'
    hostile_bundle = tmp_path / "bundle"
    shutil.copytree(fake_bundle, hostile_bundle)
    write_bundle_json(dataclasses.replace(
        bundle, architecture="net" + evil, run_id="run" + evil,
        val_metrics={"val_auc": 0.91, "note" + evil: "x" + evil},
        versions={"embryo-ml": "0.1" + evil}, created="today" + evil), hostile_bundle)
    uniform_image(tmp_path / "images" / HOSTILE, (200, 100, 50))
    rows = [_row(HOSTILE, "P<b>1</b>", "E'1\"", 0.7, 1, "blurry;<i>weird</i>"),
            _row("plain.png", "P<b>1</b>", "E2", 0.2, 2)]
    uniform_image(tmp_path / "images" / "plain.png", (10, 100, 50))
    scores = _write_scores(tmp_path / "scores.csv", rows)
    out = write_report(scores, hostile_bundle, tmp_path / "r.html", images=tmp_path / "images")
    text = out.read_text(encoding="utf-8")
    page = _Page(text)

    assert HOSTILE_TEXT in text and HOSTILE not in text
    assert "<script>alert" not in text and "<b>1</b>" not in text and "<i>weird" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert len(page.scripts) == 1 and "alert" not in page.scripts[0]
    images = [a for tag, a in page.elements if tag == "img"]
    assert images and all(a["src"].startswith("data:image/jpeg;base64,") for a in images)
    handlers = [(tag, k) for tag, a in page.elements for k in a if k.startswith("on")]
    assert handlers == []
    row = page.row(HOSTILE)  # the parser unescapes attributes: the name survives intact
    assert row["attrs"]["data-patient"] == "P<b>1</b>" and row["attrs"]["data-embryo"] == "E'1\""
    assert HOSTILE in row["text"] and "<i>weird</i>: (no description)" in row["text"]
    assert page.facts["Model"] == "net" + evil and page.facts["Training run"] == "run" + evil


def test_a_metric_the_validation_could_not_give_reads_not_measured(
    hand_scores: Path, fake_bundle: Path, tmp_path: Path
) -> None:
    """No validation patient with both classes leaves the within-patient AUC NaN: an
    embryologist reads "not measured" in the metrics table, not "nan"."""
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(fake_bundle, bundle_dir)
    write_bundle_json(dataclasses.replace(
        read_bundle(fake_bundle),
        val_metrics={"val_auc": 0.91, "val_within_patient_auc": float("nan"), "best_epoch": 3}),
        bundle_dir)
    out = write_report(hand_scores, bundle_dir, tmp_path / "r.html", images=tmp_path / "images")
    table = _Page(out.read_text(encoding="utf-8")).ids["val-metrics"]
    assert "val_within_patient_aucnot measured" in table
    assert "val_auc0.910" in table and "nan" not in table


def test_csp_admits_exactly_the_inline_script_and_style(
    hand_scores: Path, fake_bundle: Path, tmp_path: Path
) -> None:
    out = write_report(hand_scores, fake_bundle, tmp_path / "r.html", images=tmp_path / "images")
    page = _Page(out.read_text(encoding="utf-8"))
    csp = next(a["content"] for tag, a in page.elements
               if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy")

    def digest(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

    assert f"script-src 'sha256-{digest(page.scripts[0])}'" in csp
    assert f"style-src 'sha256-{digest(page.styles[0])}'" in csp
    assert "default-src 'none'" in csp and "img-src data:" in csp
    # nothing to fetch: every source is a data: URI, and there are no links or imports
    assert all(a["src"].startswith("data:") for _, a in page.elements if "src" in a)
    assert not any("href" in a for _, a in page.elements)


def test_missing_and_unreadable_images_get_placeholders(
    hand_scores: Path, fake_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "images" / "p2" / "a.png").unlink()
    out = write_report(hand_scores, fake_bundle, tmp_path / "r.html", images=tmp_path / "images")
    page = _Page(out.read_text(encoding="utf-8"))
    assert len(page.rows) == 8
    assert "image not found" in page.row("p2/a.png")["text"]
    assert "image could not be read" in page.row("p1/broken.png")["text"]
    assert sum(1 for tag, a in page.elements if tag == "img") == 6
    notes = out.read_text(encoding="utf-8")
    assert "1 image file(s) were not found under" in notes
    assert any("not found" in r.getMessage() for r in caplog.records)
    # the wrong root: every picture is a placeholder, nothing crashes
    out = write_report(hand_scores, fake_bundle, tmp_path / "r2.html", images=tmp_path)
    assert "7 image file(s) were not found" in out.read_text(encoding="utf-8")


def test_default_root_is_the_scores_folder_and_a_manifest_stands_for_its_folder(
    fake_bundle: Path, tmp_path: Path
) -> None:
    uniform_image(tmp_path / "a.png", (200, 100, 50))
    scores = _write_scores(tmp_path / "s.csv", [_row("a.png", "P", "E", 0.6, 1)])
    (tmp_path / "m.csv").write_text("path\na.png\n")
    for images in (None, tmp_path / "m.csv"):
        page = _Page(write_report(scores, fake_bundle, tmp_path / "r.html", images=images)
                     .read_text(encoding="utf-8"))
        assert sum(1 for tag, _ in page.elements if tag == "img") == 1


def test_thumbnail_cap_lists_every_row(hand_scores: Path, fake_bundle: Path,
                                       tmp_path: Path) -> None:
    out = write_report(hand_scores, fake_bundle, tmp_path / "r.html", images=tmp_path / "images",
                       max_thumbnails=2)
    page = _Page(out.read_text(encoding="utf-8"))
    assert len(page.rows) == 8
    assert sum(1 for tag, _ in page.elements if tag == "img") == 2
    assert "the first 2 of 8 images only" in out.read_text(encoding="utf-8")
    assert "not embedded" in page.row("loose/z.png")["text"]


def test_gardner_grades_shown_when_the_scores_have_them(fake_bundle: Path,
                                                         tmp_path: Path) -> None:
    heads = {"expansion": {}, "icm": {}, "te": {}}
    columns = score_columns(["good", "poor"], heads)
    assert "grade_pred" in columns
    rows = [{**_row("a.png", "P", "E1", 0.8, 1), "expansion_pred": "4", "icm_pred": "A",
             "te_pred": "B", "grade_pred": "4AB"},
            {**_row("b.png", "P", "E2", 0.3, 2), "expansion_pred": "2", "icm_pred": "C",
             "te_pred": "C", "grade_pred": "2"}]
    scores = tmp_path / "s.csv"
    pd.DataFrame(rows, columns=columns).to_csv(scores, index=False)
    text = write_report(scores, fake_bundle, tmp_path / "r.html").read_text(encoding="utf-8")
    page = _Page(text)
    assert "<th>Gardner grade</th>" in text
    assert "4AB" in page.row("a.png")["text"] and "expansion 4, icm A, te B" in text
    assert "2" in page.row("b.png")["text"]
    plain = write_report(_write_scores(tmp_path / "p.csv", [_row("a.png", "P", "E", 0.6, 1)]),
                         fake_bundle, tmp_path / "p.html").read_text(encoding="utf-8")
    assert "Gardner" not in plain


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_report_reads_jsonl_and_parquet_like_csv(fake_bundle: Path, tmp_path: Path,
                                                 suffix: str) -> None:
    folder = tmp_path / "images"
    for i, colour in enumerate([(250, 10, 10), (10, 250, 10), (128, 128, 128)]):
        uniform_image(folder / f"img{i}.png", colour)
    (folder / "manifest.csv").write_text(
        "path,patient_id,embryo_id\nimg0.png,P1,E1\nimg1.png,P1,E2\nimg2.png,P2,E1\n")
    pages = {}
    for ext in (".csv", suffix):
        scores = tmp_path / f"scores{ext}"
        score_images(folder / "manifest.csv", fake_bundle, scores, progress=False)
        report = write_report(scores, fake_bundle, tmp_path / f"r{ext}.html",
                              images=folder / "manifest.csv")
        pages[ext] = _Page(report.read_text(encoding="utf-8"))
    csv_rows, other_rows = pages[".csv"].rows, pages[suffix].rows
    assert len(csv_rows) == 3
    assert [r["attrs"] for r in other_rows] == [r["attrs"] for r in csv_rows]
    assert [r["text"] for r in other_rows] == [r["text"] for r in csv_rows]


def test_scores_of_another_bundle_are_refused(fake_bundle: Path, tmp_path: Path) -> None:
    scores = _write_scores(tmp_path / "s.csv", [_row("a.png", "P", "E", 0.6, 1)])
    other = make_fake_bundle(tmp_path / "other", np.zeros((3, 3)), classes=["a", "b", "c"])
    assert main(["-q", "report", str(scores), "--bundle", str(other),
                 "--out", str(tmp_path / "r.html")]) == 2
    assert main(["-q", "report", str(tmp_path / "none.csv"), "--bundle", str(fake_bundle),
                 "--out", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()


def test_cli_score_report_and_report_subcommand(
    fake_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "day5"
    for i in range(3):
        uniform_image(folder / f"e{i}.png", (60 * i + 40, 90, 160))
    out, report = tmp_path / "scores.csv", tmp_path / "report.html"
    assert main(["-q", "score", str(folder), "--bundle", str(fake_bundle), "--out", str(out),
                 "--report", str(report)]) == 0
    assert f"report -> {report}" in capsys.readouterr().out
    first = _Page(report.read_text(encoding="utf-8"))
    assert len(first.rows) == 3 and sum(tag == "img" for tag, _ in first.elements) == 3
    assert "heatmap" in first.rows[0]["text"]  # a note: the fake bundle has no CAM output

    again = tmp_path / "again.html"
    assert main(["-q", "report", str(out), "--bundle", str(fake_bundle), "--out", str(again),
                 "--images", str(folder), "--no-heatmaps", "--max-thumbnails", "1"]) == 0
    second = _Page(again.read_text(encoding="utf-8"))
    assert [r["attrs"] for r in second.rows] == [r["attrs"] for r in first.rows]
    assert sum(tag == "img" for tag, _ in second.elements) == 1
    assert "turned off" in again.read_text(encoding="utf-8")
    assert main(["-q", "score", str(folder), "--bundle", str(fake_bundle), "--out", str(out),
                 "--report", str(tmp_path)]) == 2  # a folder: refused before scoring


def test_writing_a_report_loads_neither_torch_nor_mlflow(
    hand_scores: Path, fake_bundle: Path, tmp_path: Path
) -> None:
    """House rule 2 at run time, not only at import: the whole `report` command."""
    argv = ["-q", "report", str(hand_scores), "--bundle", str(fake_bundle),
            "--out", str(tmp_path / "r.html"), "--images", str(tmp_path / "images")]
    code = (f"import sys; from embryo_ml.cli import main; rc = main({argv!r}); "
            "print(rc, ','.join(m for m in ('torch', 'mlflow', 'albumentations') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.split("\n")[-2].strip() == "0"
    assert (tmp_path / "r.html").is_file()


# ------------------------------------------------------------------- headless Chromium ----


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser, or a skip before the session's bundle is trained for nothing."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless browser test: chromium is not installed and could not be installed "
                "here (Debian: apt-get install chromium; `make test` tries this first)")


def _browser(binary: str, profile: Path, url: str, *args: str) -> str:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-extensions", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", *args, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_in_headless_chromium(chromium: str, bundle_dir: Path, synth_data: Path,
                                     tmp_path: Path) -> None:
    binary = chromium
    manifest = pd.read_csv(synth_data, dtype=str, keep_default_na=False)
    patients = sorted(manifest["patient_id"].unique())[:3]
    chosen = manifest[manifest["patient_id"].isin(patients)]
    folder = tmp_path / "clinic"
    folder.mkdir()
    rows = []
    for i, item in enumerate(chosen.itertuples()):
        name = HOSTILE if i == 0 else Path(item.path).name  # a valid image, a hostile name
        shutil.copy(synth_data.parent / item.path, folder / name)
        rows.append({"path": name, "patient_id": item.patient_id, "embryo_id": item.embryo_id})
    write_image(folder / "black.png", np.zeros((64, 64, 3), np.uint8))
    rows.append({"path": "black.png", "patient_id": patients[0], "embryo_id": "dark-1"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)

    scores = tmp_path / "scores.csv"
    score_images(folder / "manifest.csv", bundle_dir, scores, progress=False)
    table = pd.read_csv(scores, dtype=str, keep_default_na=False)
    black_flags = table.set_index("path").loc["black.png", "flags"].split(";")
    assert "under_exposed" in black_flags, black_flags
    report = write_report(scores, bundle_dir, tmp_path / "report.html",
                          images=folder / "manifest.csv")
    url = report.resolve().as_uri()
    n = len(rows)

    dom = _browser(binary, tmp_path / "profile", url, "--dump-dom")
    page = _Page(dom)
    assert len(page.rows) == n  # one row per image
    assert not any("hidden" in r["attrs"] for r in page.rows)
    assert page.ids["shown-count"] == f"Showing {n} of {n} images"  # the script ran
    black = page.row("black.png")
    for flag in black_flags:
        assert FLAG_TEXT[flag] in black["text"]
    assert HOSTILE_TEXT in dom  # the file name is text ...
    assert HOSTILE in page.row(HOSTILE)["text"]
    assert not any(tag == "img" and a.get("src") == "x" for tag, a in page.elements)  # ... not
    assert not any(k.startswith("on") for _, a in page.elements for k in a)  # an element
    assert JUDGEMENT_NOTE in " ".join(page.ids.values())
    heat = [a for tag, a in page.elements if tag == "img" and a["alt"].startswith("heatmap ")]
    has_cam = (importlib.util.find_spec("embryo_ml.score.explain") is not None
               and getattr(read_bundle(bundle_dir), "cam_output", None))
    if has_cam:  # one overlay per scored image
        assert len(heat) == int((table["status"] == "ok").sum())
    else:
        assert not heat and "no heatmap" in black["text"]

    # the inline script reads the URL fragment: only flagged images stay visible
    dom = _browser(binary, tmp_path / "profile", url + "#flag=flagged", "--dump-dom")
    page = _Page(dom)
    flagged = {p for p, f in zip(table["path"], table["flags"]) if f}
    visible = {r["attrs"]["data-path"] for r in page.rows if "hidden" not in r["attrs"]}
    assert visible == flagged and "black.png" in visible
    assert page.ids["shown-count"] == f"Showing {len(flagged)} of {n} images"

    # ... and sorts: by score, highest first, within each patient's table
    page = _Page(_browser(binary, tmp_path / "profile", url + "#sort=score", "--dump-dom"))
    assert len(page.rows) == n
    for patient in patients:
        mine = [float(r["attrs"]["data-score"]) for r in page.rows
                if r["attrs"]["data-patient"] == patient and r["attrs"]["data-score"]]
        assert mine == sorted(mine, reverse=True)
        assert len(mine) > 1 or patient != patients[0]  # black.png joined the first cohort

    shot = tmp_path / "report.png"
    _browser(binary, tmp_path / "profile", url, f"--screenshot={shot}",
             "--window-size=1280,2000", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    target = os.environ.get("EMBRYO_ML_TEST_ARTIFACTS")
    if target:
        folder = REPO / "test-artifacts" if target in ("1", "true", "yes") else Path(target)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / "report.png")
