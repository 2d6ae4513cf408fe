"""The documentation: the site builds with `mkdocs build --strict` (a broken link, a missing page
or an API page whose module moved fails), the README stays a front door, and the generated CLI
reference names every command and option the parser has."""

from __future__ import annotations

import argparse
import html
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
SCREENSHOT_MAX_BYTES = 400_000


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.is_file(), f"{mkdocs} missing: install the dev extra (pip install -e '.[dev]')"
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--quiet", "-d", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    return out


def _built(site: Path, source: Path) -> Path:
    """Where mkdocs writes the page of docs/`source` (`data.md` -> `data/index.html`)."""
    page = source.relative_to(REPO / "docs").with_suffix("").as_posix()
    return site / ("index.html" if page == "index" else page.removesuffix("/index") + "/index.html")


def test_site_builds_strict_with_every_page(site: Path) -> None:
    for source in sorted((REPO / "docs").rglob("*.md")):
        assert _built(site, source).is_file(), f"{source} was not built"
    scorer = (site / "api" / "scorer" / "index.html").read_text(encoding="utf-8")
    assert "score_images" in scorer  # mkdocstrings rendered the module's docstrings


def test_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most 250)"


def test_report_screenshot_is_there_and_small() -> None:
    shot = REPO / "docs" / "assets" / "report.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size <= SCREENSHOT_MAX_BYTES, "re-run scripts/report_screenshot.py"


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every (sub)command parser, breadth first, walked independently of the docs hook."""
    pending = [parser]
    while pending:
        current = pending.pop(0)
        yield current
        pending += [child for action in current._actions
                    if isinstance(action, argparse._SubParsersAction)
                    for child in action.choices.values()]


def _section(page: str, prog: str) -> str:
    """The HTML of one command's section: from its heading to the next heading."""
    anchor = re.sub(r"\s+", "-", prog.lower())
    start = page.find(f'id="{anchor}"')
    assert start >= 0, f"the CLI page has no section for `{prog}`"
    following = re.compile(r"<h[1-6][ >]").search(page, start + 1)
    return page[start:following.start() if following else len(page)]


def test_cli_page_names_every_command_and_option(site: Path) -> None:
    from embryo_ml.cli import build_parser

    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    for parser in _commands(build_parser()):
        section = _section(page, parser.prog)
        assert "usage:" in section, parser.prog
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            names = action.option_strings or [action.metavar or action.dest]
            for name in names:
                assert f"<code>{name}" in section, f"`{parser.prog}`: {name} not on the page"
            if action.help and action.help is not argparse.SUPPRESS:
                first = html.escape(action.help.split()[0].strip("`"))
                assert first in section, f"`{parser.prog}` {names[0]}: its help is not there"


FENCE = re.compile(r"^```[a-z]*\s*$(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _documented_commands() -> Iterator[tuple[str, str]]:
    """(file, command line) of every `embryo-ml ...` line in a code block of the README and the
    docs; indented lines and lines after a trailing backslash continue the line above."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for block in FENCE.finditer(path.read_text(encoding="utf-8")):
            lines: list[str] = []
            for raw in block["body"].splitlines():
                text = raw.split(" #")[0].rstrip()
                if lines and (raw[:1].isspace() or lines[-1].endswith("\\")):
                    lines[-1] = lines[-1].rstrip("\\") + " " + text.strip()
                elif text:
                    lines.append(text)
            for line in lines:
                if line.startswith("embryo-ml "):
                    yield path.name, line


def test_commands_in_the_docs_use_real_options() -> None:
    """The hand-written examples cannot drift either: each option they show exists for the
    command they show it with."""
    from embryo_ml.cli import build_parser

    top = build_parser()
    subcommands = {parser.prog: parser for parser in _commands(top)}
    checked = 0
    for file, line in _documented_commands():
        words = [w for w in line.split()[1:] if w not in ("-q", "--quiet", "--debug")]
        prog = f"embryo-ml {words[0]}"
        if words[0] == "data" and len(words) > 1:
            prog += f" {words[1]}"
        assert prog in subcommands, f"{file}: `{line}`: no command {prog}"
        known = {o for a in [*subcommands[prog]._actions, *top._actions] for o in a.option_strings}
        for option in OPTION.findall(line):
            assert option in known, f"{file}: `{line}`: {prog} has no option {option}"
        checked += 1
    assert checked > 20


def test_readme_links_lead_somewhere(site: Path) -> None:
    """The README is not built by mkdocs: check its links into docs/ (files and anchors) here."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)|src=\"(docs/[^\"]+)\"", text)
    assert links
    for target, anchor, image in links:
        path = REPO / (target or image)
        assert path.is_file(), f"README.md links to {target or image}, which does not exist"
        if anchor:
            assert f'id="{anchor}"' in _built(site, path).read_text(encoding="utf-8"), (
                f"README.md links to {target}#{anchor}: no such section")
