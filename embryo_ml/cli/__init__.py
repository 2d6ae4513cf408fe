"""`embryo-ml` command line. Thin: parse, call one library function, print the outcome.

Heavy modules are imported inside each command (`*_commands.py`), so `embryo-ml score` never
loads torch or mlflow. Every user-caused problem ends as one line on stderr and exit status 2
(`main`, in `runner.py`); `--debug` or EMBRYO_ML_DEBUG=1 shows its traceback too. The parser
(`parser.py`) fills in only the options of the command being run.
"""

from embryo_ml.cli.common import DEBUG_ENV, EXIT_INTERRUPTED, EXIT_USER_ERROR
from embryo_ml.cli.parser import build_parser
from embryo_ml.cli.runner import main

__all__ = ["DEBUG_ENV", "EXIT_INTERRUPTED", "EXIT_USER_ERROR", "build_parser", "main"]
