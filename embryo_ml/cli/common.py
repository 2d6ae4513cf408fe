"""What every `embryo-ml` command shares: exit codes, the `warning:` line, argument types,
output-file checks, options several commands take, and defaults read from the library."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embryo_ml.errors import EmbryoMLError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "EMBRYO_ML_DEBUG"  # =1: tracebacks for user errors too, as --debug


def default_of(function: Callable[..., object], parameter: str) -> Any:
    """`function`'s default for `parameter`: an option offers the library's own default (and
    `--help` shows it), never a copy that could drift from it."""
    return inspect.signature(function).parameters[parameter].default


def add_library_options(parser: argparse.ArgumentParser, function: Callable[..., object],
                        *options: tuple[str, str, Callable[[str], Any], str]) -> None:
    """Options whose defaults are `function`'s own (`default_of`): (flag, parameter, type,
    help) each."""
    for flag, parameter, kind, text in options:
        parser.add_argument(flag, type=kind, default=default_of(function, parameter), help=text)


def warn(text: str | None) -> None:
    """One `warning:` line on stderr, the counterpart of the `error:` lines of `main`."""
    if text:
        print(f"warning: {text}", file=sys.stderr)


def output_file(path: Path, option: str) -> Path:
    """Before any work: `path` is not a folder and its folder exists, created when missing (as
    score, report and explain do for theirs); an impossible one is a one-line error."""
    if path.is_dir():
        raise EmbryoMLError(f"{option} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EmbryoMLError(f"{option} {path}: cannot create the folder {path.parent} "
                            f"({error.strerror or error})") from None
    return path


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
    return value


def count(text: str) -> int:
    """Argument type: a whole number >= 0."""
    return _whole(text, 0)


def positive(text: str) -> int:
    """Argument type: a whole number >= 1."""
    return _whole(text, 1)


def add_run_options(parser: argparse.ArgumentParser, default: object) -> None:
    """-q and --debug, before the command (`default` False) and after it (SUPPRESS, so that a
    command's parser never resets what was given before the command)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars (there are none anyway when standard error is "
                             "not a terminal)")
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback behind an error (also: {DEBUG_ENV}=1)")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person at a terminal: redrawn with carriage returns, a bar
    turns a log file or a CI transcript into thousands of partial lines, while the per-epoch
    and summary lines say the same once."""
    return not args.quiet and sys.stderr.isatty()


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable)")


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=count, default=None,
                        help="ONNX Runtime intra-op threads (0 or not given: one per core)")


def add_trusted_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-key", type=Path, action="append", default=[], metavar="PUB",
                        help="refuse a bundle that is not signed by this public key (a PEM "
                        "file, or a folder of *.pub/*.pem keys; repeatable)")


def add_report_options(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.report.html import write_report

    parser.add_argument("--no-heatmaps", action="store_true",
                        help="report without heatmaps (they cost extra model runs)")
    parser.add_argument("--max-thumbnails", type=count, metavar="N",
                        default=default_of(write_report, "max_thumbnails"),
                        help="embed pictures for at most N images in the report")
