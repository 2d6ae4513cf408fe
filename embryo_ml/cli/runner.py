"""`main`: parse, run one command, and turn a user's problem into one `error:` line."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
import traceback
from collections.abc import Sequence
from contextlib import suppress

from embryo_ml.cli.common import DEBUG_ENV, EXIT_INTERRUPTED, EXIT_USER_ERROR
from embryo_ml.cli.parser import build_parser, command_path
from embryo_ml.errors import EmbryoMLError
from embryo_ml.extras import missing_extra_message


def _error_line(error: BaseException) -> str:
    """One line for a user's problem: the message of an `EmbryoMLError` (lines joined), or for
    a file-system error (`OSError`: a missing or read-only folder, a full disk, no permission)
    what the system said and the file(s), `No such file or directory (out/x.csv)`."""
    if isinstance(error, OSError) and error.strerror:
        files = [os.fsdecode(f) for f in (error.filename, error.filename2) if f is not None]
        text = error.strerror + (f" ({', '.join(files)})" if files else "")
    else:
        text = str(error) or error.__class__.__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(args.debug) or os.environ.get(DEBUG_ENV, "").strip().lower() in (
        "1", "true", "yes", "on")


def _missing_extra(error: ModuleNotFoundError, command: str, debug: bool) -> int:
    """A package of an optional install is missing: one line naming the extra to install
    (`embryo_ml.extras`); any other missing module is a bug and keeps its traceback."""
    message = missing_extra_message(error, command or None)
    if message is None:
        raise error
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user's problem (`EmbryoMLError`, raised where user input is read, and
    any `OSError` from the file system) ends as one `error:` line on stderr and exit status 2;
    `--debug` or EMBRYO_ML_DEBUG=1 prints its traceback first. Anything else is a bug and keeps
    its traceback (exit status 1)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:  # the chosen command's options come from its modules: an extra may be missing here
        args = build_parser(command_path(arguments)).parse_args(arguments)
    except ModuleNotFoundError as error:
        return _missing_extra(error, " ".join(command_path(arguments)), debug=False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("embryo_ml").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (EmbryoMLError, OSError) as error:
        if _debug_requested(args):
            traceback.print_exc()
        print(f"error: {_error_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as error:
        return _missing_extra(error, " ".join(command_path(arguments)),
                              debug=_debug_requested(args))
    except KeyboardInterrupt:
        print("interrupted: rows and checkpoints finished so far are kept", file=sys.stderr)
        return EXIT_INTERRUPTED


def console_main() -> None:
    """The `embryo-ml` console script and `python -m embryo_ml.cli`: `main`, then leave without
    tearing the interpreter down. Finalising the modules a training run loads (torch, timm,
    mlflow, ...) took 2.2-2.8 s after the last line was printed, on 2 cores, for nothing: every
    output is written, closed and renamed into place by then (`embryo_ml.fileio`). What a normal
    exit does that matters still happens, in its order: waiting for non-daemon threads, the
    `atexit` handlers (MLflow, logging, multiprocessing's clean-up of DataLoader workers), flushing
    stdout and stderr. A bug's traceback (an exception out of `main`) exits the normal way."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe (`| head`): nothing left to tell
            stream.flush()
    os._exit(int(code or 0))
