"""`python -m embryo_ml.cli ...` = `embryo-ml ...`."""

from embryo_ml.cli.runner import console_main

console_main()
