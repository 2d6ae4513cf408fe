"""The command line's conventions, checked on the parser itself: every argument says what it is
for, `-q`/`--debug` work before and after the command, `--version` prints the package version,
`--help` shows the defaults, the defaults are the library's own, and one option name keeps one
meaning across commands."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from embryo_ml.cli import build_parser, main
from embryo_ml.cli.parser import command_path

# One name, two forms of one meaning: "continue an interrupted job". `train --resume RUN_DIR`
# names the run to continue; `score --resume` continues the scores file given by --out.
SAME_MEANING_TWO_FORMS = {"--resume"}


Leaf = tuple[tuple[str, ...], argparse.ArgumentParser]


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """(command words, parser) of every command that runs something: `score`, `data check`."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, child in group.choices.items():
            yield from leaf_commands(child, (*path, name))


def every_parser(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from every_parser(child)


def minimal_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """The shortest argument list the parser accepts: a value for each positional and for each
    required option."""
    words: list[str] = []
    for action in parser._actions:
        if not action.option_strings:
            words.append("x")
        elif action.required:
            words += [action.option_strings[-1], "x"]
    return words


def kind(action: argparse.Action) -> str:
    """What an option takes: a flag, or a value of one type (Path, int, float, text)."""
    if action.nargs == 0:
        return "flag"
    convert: Callable[[str], object] | None = action.type  # type: ignore[assignment]
    if convert is None:
        return "text"
    if convert in (Path, int, float):
        return convert.__name__
    return type(convert("1")).__name__  # the house's whole-number types give an int


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture(scope="module")
def leaves(parser: argparse.ArgumentParser) -> list[Leaf]:
    return list(leaf_commands(parser))


def test_every_argument_of_every_command_has_help(parser: argparse.ArgumentParser) -> None:
    missing = [f"{p.prog}: {'/'.join(a.option_strings) or a.dest}"
               for p in every_parser(parser) for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing


def test_every_command_is_there(leaves: list[Leaf]) -> None:
    names = {" ".join(path) for path, _ in leaves}
    assert {"score", "report", "explain", "train", "export", "data check", "data split",
            "data manifest", "augment-preview", "synth", "demo"} <= names


def test_quiet_and_debug_before_or_after_every_command(parser: argparse.ArgumentParser,
                                                       leaves: list[Leaf]) -> None:
    for path, leaf in leaves:
        rest = minimal_arguments(leaf)
        plain = parser.parse_args([*path, *rest])
        assert plain.quiet is False and plain.debug is False, path
        for argv in ([*path, "-q", *rest], ["-q", *path, *rest], [*path, *rest, "--quiet"]):
            assert parser.parse_args(argv).quiet is True, argv
        assert parser.parse_args([*path, *rest, "--debug"]).debug is True, path
        assert parser.parse_args(["--debug", *path, *rest]).debug is True, path


def test_quiet_after_the_command_really_silences_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a person at a terminal
    assert main(["synth", str(tmp_path / "loud"), "--n", "2", "--size", "32"]) == 0
    assert "synthetic embryos" in capsys.readouterr().err  # the progress bar
    assert main(["synth", str(tmp_path / "quiet"), "--n", "2", "--size", "32", "-q"]) == 0
    assert "synthetic embryos" not in capsys.readouterr().err


def test_no_progress_bars_into_a_log_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Standard error redirected (a log, CI): no bars, whose carriage-return redraws would fill
    the file, but the command's own lines still come."""
    assert not sys.stderr.isatty()
    assert main(["synth", str(tmp_path / "logged"), "--n", "2", "--size", "32"]) == 0
    captured = capsys.readouterr()
    assert "synthetic embryos" not in captured.err and "\r" not in captured.err
    assert (tmp_path / "logged" / "manifest.csv").is_file()


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"embryo-ml {version('embryo-ml')}"


def test_help_shows_every_default(leaves: list[Leaf]) -> None:
    for path, leaf in leaves:
        text = " ".join(leaf.format_help().split())
        for action in leaf._actions:
            default = action.default
            if (not action.option_strings or default in (None, [], argparse.SUPPRESS)
                    or default is False):
                continue
            assert f"(default: {default})" in text, (path, action.option_strings)


def test_no_option_name_has_two_meanings(leaves: list[Leaf]) -> None:
    kinds: dict[str, set[str]] = defaultdict(set)
    for _, leaf in leaves:
        for action in leaf._actions:
            for option in action.option_strings:
                kinds[option].add(kind(action))
    assert kinds["--images"] == {"Path"}  # a folder (or manifest) wherever it appears
    assert kinds["--count"] == {"int"}
    mixed = {option: found for option, found in kinds.items()
             if len(found) > 1 and option not in SAME_MEANING_TWO_FORMS}
    assert not mixed, mixed


def test_augment_preview_takes_a_count_not_images(parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args(["augment-preview", "c.yaml", "--data", "m.csv", "--count", "3"])
    assert args.count == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["augment-preview", "c.yaml", "--data", "m.csv", "--images", "3"])


def _defaults(leaf: argparse.ArgumentParser) -> dict[str, object]:
    return {a.dest: a.default for a in leaf._actions}


def test_defaults_are_the_library_functions_own(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.data.check import check_data
    from embryo_ml.data.splits import make_splits
    from embryo_ml.data.synthetic import generate_dataset
    from embryo_ml.report.html import write_report
    from embryo_ml.report.preview import augment_preview
    from embryo_ml.score.scorer import score_images

    def default(function: Callable[..., object], name: str) -> object:
        return inspect.signature(function).parameters[name].default

    leaves = dict(leaf_commands(parser))
    expected = {
        ("score",): {"batch_size": default(score_images, "batch_size"),
                     "max_pixels": default(score_images, "max_pixels"),
                     "aggregate": default(score_images, "aggregate"),
                     "precision": default(score_images, "precision"),
                     "max_thumbnails": default(write_report, "max_thumbnails")},
        ("report",): {"max_thumbnails": default(write_report, "max_thumbnails")},
        ("synth",): {"size": default(generate_dataset, "size"),
                     "seed": default(generate_dataset, "seed"),
                     "focal_planes": default(generate_dataset, "focal_planes")},
        ("augment-preview",): {"count": default(augment_preview, "n_images"),
                               "draws": default(augment_preview, "n_aug")},
        ("data", "split"): {"folds": default(make_splits, "folds"),
                            "test_fraction": default(make_splits, "test_fraction"),
                            "seed": default(make_splits, "seed")},
        ("data", "check"): {"near_threshold": default(check_data, "near_threshold")},
    }
    for path, values in expected.items():
        found = _defaults(leaves[path])
        assert {k: found[k] for k in values} == values, path


def test_a_run_fills_in_only_its_own_command(parser: argparse.ArgumentParser) -> None:
    """`main` builds the parser for the command being run; each command's options are the same
    as in the full parser."""
    full = dict(leaf_commands(parser))
    for path, leaf in full.items():
        only = dict(leaf_commands(build_parser(list(path))))
        assert _defaults(only[path]) == _defaults(leaf), path
        for other in (p for p in only if p != path):  # left empty: only -h, -q, --debug
            assert {a.dest for a in only[other]._actions} == {"help", "quiet", "debug"}, other


@pytest.mark.parametrize(("argv", "path"), [
    (["score", "images", "--bundle", "b"], ["score"]),
    (["-q", "--debug", "data", "-q", "check", "folder"], ["data", "check"]),
    (["data"], ["data"]),
    (["--version"], []),
    (["scroe", "x"], []),
    ([], []),
])
def test_command_path(argv: list[str], path: list[str]) -> None:
    assert command_path(argv) == path


def test_an_unknown_command_is_still_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["scroe", "x"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: embryo-ml: argument COMMAND: invalid")


def test_a_missing_extra_is_one_line_naming_the_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A command whose optional install is absent ends in one `error:` line (exit 2) naming
    `pip install 'embryo-ml[EXTRA]'`; a missing module that is not ours stays a bug."""
    from embryo_ml.cli import train_commands

    def no_timm(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'timm'", name="timm")

    monkeypatch.setattr(train_commands, "run_synth", no_timm)
    assert main(["synth", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: embryo-ml synth needs the 'train' extra (timm is not installed): "
                     "pip install 'embryo-ml[train]'"]

    def not_ours(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'nonexistent'", name="nonexistent")

    monkeypatch.setattr(train_commands, "run_synth", not_ours)
    with pytest.raises(ModuleNotFoundError):
        main(["synth", str(tmp_path)])


def test_console_exit_keeps_outputs_exit_codes_and_exit_handlers(tmp_path: Path) -> None:
    """`python -m embryo_ml.cli` (the console script's path) leaves with `os._exit` after
    `main`: the command's files and output are whole, its exit status is kept, and the atexit
    handlers registered before it (MLflow's, logging's) still ran."""
    import subprocess
    import sys

    marker = tmp_path / "atexit-ran"
    script = ("import atexit, runpy, sys; "
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes')); "
              "sys.argv = ['embryo-ml', *sys.argv[1:]]; "
              "runpy.run_module('embryo_ml.cli', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script, "-q", "synth", str(tmp_path / "s"),
                           "--n", "6", "--size", "32"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "s" / "manifest.csv").read_text().splitlines()) == 7
    assert marker.read_text() == "yes"
    failed = subprocess.run([sys.executable, "-m", "embryo_ml.cli", "train", "--config",
                             str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode == 2 and failed.stderr.startswith("error:"), failed.stderr
