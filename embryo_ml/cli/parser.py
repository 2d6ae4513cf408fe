"""The `embryo-ml` argument parser: the command tree, the house's error line, defaults in help.

Each command's options are filled in by its own `add_*` function, which reads its defaults from
the library function the command calls. `build_parser(command)` fills in only the command being
run, so `embryo-ml score` imports the scoring stack for its defaults and nothing of the training
stack; `build_parser()` fills in every command (tests, the docs' CLI reference).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeAlias

from embryo_ml.cli import (
    bundle_commands,
    data_commands,
    pretrain_commands,
    score_commands,
    train_commands,
)
from embryo_ml.cli.common import EXIT_USER_ERROR, add_run_options

AddArguments = Callable[[argparse.ArgumentParser], None]
# name -> (one-line help, the function that adds its options, or a group of subcommands)
CommandTree: TypeAlias = "dict[str, tuple[str, AddArguments | CommandTree]]"

COMMANDS: CommandTree = {
    "synth": ("write a synthetic embryo data set with a manifest", train_commands.add_synth),
    "pretrain": ("self-supervised pretraining on unlabelled images (weights for "
                 "model.pretrained_file); tracked in MLflow", pretrain_commands.add_pretrain),
    "train": ("train a model; tracked in MLflow", train_commands.add_train),
    "cv": ("grouped k-fold cross-validation (MLflow parent + fold runs)", train_commands.add_cv),
    "evaluate": ("metrics, subgroups, shortcut baselines and plots of a scored set with known "
                 "labels", train_commands.add_evaluate),
    "augment-preview": ("grid of training augmentations (PNG)",
                        train_commands.add_augment_preview),
    "export": ("export a run's best checkpoint as a scoring bundle", bundle_commands.add_export),
    "keygen": ("make an Ed25519 key pair for signing bundles", bundle_commands.add_keygen),
    "sign": ("sign an existing bundle (e.g. with a new key)", bundle_commands.add_sign),
    "score": ("score a folder (recursive) or a manifest CSV of images", score_commands.add_score),
    "explain": ("heatmap of what the model looked at, for one image (PNG)",
                score_commands.add_explain),
    "report": ("HTML report of a scores file (self-contained, offline)",
               score_commands.add_report),
    "data": ("build manifests, split, check a data set", {
        "manifest": ("manifest CSV from a folder (regex on paths) or CSV",
                     data_commands.add_manifest),
        "split": ("grouped, stratified test split + k folds", data_commands.add_split),
        "check": ("counts, duplicates, unreadable files, leakage", data_commands.add_check),
    }),
    "demo": ("synth -> train -> export -> score on built-in data", train_commands.add_demo),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where there is none to show (not given,
    a flag, an empty list) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "%(default)" in (
                action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported as the house's one `error:` line
    and exit status 2 (not the usage block; `--help` shows that). Subcommands inherit it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """The installed package's version (importlib.metadata), or the source tree's where the
    package is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embryo-ml")
    except PackageNotFoundError:
        from embryo_ml import __version__

        return __version__


def command_path(argv: Sequence[str]) -> list[str]:
    """The command words of a command line: `["score"]`, `["data", "check"]`, or `[]` when it
    names no command. The first words that are not options: nothing before a command (nor
    between `data` and its action) takes a value."""
    path: list[str] = []
    tree: CommandTree | AddArguments = COMMANDS
    for word in (arg for arg in argv if not arg.startswith("-")):
        if not isinstance(tree, dict) or word not in tree:
            break
        path.append(word)
        tree = tree[word][1]
    return path


def _add_commands(parser: argparse.ArgumentParser, tree: CommandTree,
                  only: Sequence[str] | None, dest: str, metavar: str) -> None:
    """One subparser per command of `tree`; options filled in for `only`'s first word (every
    command when `only` is None)."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar,
                                help=f"see `{parser.prog} {metavar} --help` for its options")
    common = _Parser(add_help=False)
    add_run_options(common, default=argparse.SUPPRESS)
    for name, (summary, content) in tree.items():
        child = sub.add_parser(name, help=summary, description=summary, parents=[common])
        if only is not None and list(only[:1]) != [name]:
            continue
        if isinstance(content, dict):
            _add_commands(child, content, None if only is None else only[1:],
                          dest=f"{name}_command", metavar="ACTION")
        else:
            content(child)


def build_parser(command: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `embryo-ml` parser. `command` (from `command_path`): fill in that command's options
    only, importing only what its defaults come from; None: every command's."""
    parser = _Parser(prog="embryo-ml",
                     description="Train, export and run IVF embryo image classifiers.")
    parser.add_argument("--version", action="version", version=f"embryo-ml {_version()}")
    add_run_options(parser, default=False)
    _add_commands(parser, COMMANDS, command, dest="command", metavar="COMMAND")
    return parser
