"""The CLI reference, rendered from `embryo_ml.cli.build_parser()` when the site is built.

Every command's usage, description and arguments (help, default, choices) are read from the
argparse parser itself, so the reference cannot drift from `embryo-ml COMMAND --help`.
`generated_pages.py` puts it in place of the marker in `docs/cli.md`; `tests/test_docs.py`
checks that every command and option made it into the built page.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass

from markup import code, inline_html

USAGE_WIDTH = 88  # the usage block's line width, fixed so the page does not depend on a terminal


@dataclass(frozen=True)
class Command:
    """One command of the parser tree: `embryo-ml`, `embryo-ml score`, `embryo-ml data split`."""

    prog: str
    summary: str  # the one-line help its parent lists it with ("" for the top level)
    parser: argparse.ArgumentParser
    depth: int  # 0 for `embryo-ml`, 1 for `embryo-ml score`, 2 for `embryo-ml data split`


def build_parser() -> argparse.ArgumentParser:
    """The package's parser, imported at build time (the docs build needs the package)."""
    from embryo_ml.cli import build_parser as package_parser

    return package_parser()


def _subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, child in action.choices.items():
                yield name, summaries.get(name, ""), child


def walk_commands(parser: argparse.ArgumentParser, summary: str = "",
                  depth: int = 0) -> Iterator[Command]:
    """Every command, parents before their subcommands, in the parser's own order."""
    yield Command(parser.prog, summary, parser, depth)
    for _, child_summary, child in _subcommands(parser):
        yield from walk_commands(child, child_summary, depth + 1)


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a reader passes: everything but -h/--help and the subcommand slot."""
    return [action for action in parser._actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))]


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own %(default)s style placeholders
        text = text % {**vars(action), "prog": prog}
    return text


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return code(action.metavar or action.dest)
    value = ""
    if action.nargs != 0:  # as argparse shows it: METAVAR, {a,b} for choices, else DEST
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices
            else action.dest.upper())
        value = " " + (metavar if isinstance(metavar, str) else " ".join(metavar))
    return ", ".join(code(option + value) for option in action.option_strings)


def _default(action: argparse.Action) -> str:
    """What happens when the argument is not given."""
    if not action.option_strings:
        return "required (positional)"
    if action.required:
        return "required"
    if isinstance(action, argparse._VersionAction):
        return "&mdash;"
    default = action.default
    if action.nargs == 0 or default in (None, [], argparse.SUPPRESS):
        return "off" if action.nargs == 0 else "none"
    return code(default)


def _extras(action: argparse.Action) -> str:
    notes = []
    repeatable = isinstance(action, argparse._AppendAction)
    if action.choices is not None and action.metavar is not None:  # else the name shows them
        notes.append("one of " + ", ".join(code(choice) for choice in action.choices))
    if repeatable and "repeatable" not in (action.help or ""):
        notes.append("repeatable")
    return (" (" + "; ".join(notes) + ")") if notes else ""


def arguments_table(command: Command) -> str:
    rows = [f"<tr><td>{_name(a)}</td><td>{inline_html(_help(a, command.prog))}{_extras(a)}</td>"
            f"<td>{_default(a)}</td></tr>" for a in arguments(command.parser)]
    if not rows:
        return ""
    return ("<table>\n<thead><tr><th>argument</th><th>what it does</th><th>default</th></tr>"
            "</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>")


def render_command(command: Command) -> str:
    """One command's section: heading, summary, description, usage block, arguments."""
    parser = command.parser
    parts = [f"{'#' * (command.depth + 2)} `{command.prog}`"]
    texts = dict.fromkeys(t for t in (command.summary, parser.description, parser.epilog) if t)
    parts += [inline_html(text) for text in texts]  # a description that repeats the summary once
    parts.append(f"```text\n{usage(parser)}\n```")
    table = arguments_table(command)
    if table:
        parts.append(table)
    children = [(name, summary) for name, summary, _ in _subcommands(parser)]
    if children:
        parts.append("\n".join(f"- [`{parser.prog} {name}`](#{_anchor(f'{parser.prog} {name}')})"
                               f": {inline_html(summary)}" for name, summary in children))
    return "\n\n".join(parts)


def _anchor(title: str) -> str:
    """The id Python-Markdown's toc gives a heading `title` (letters, digits, hyphens)."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", title).strip().lower())


def render_reference(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    return "\n\n".join(render_command(command) for command in walk_commands(parser))

