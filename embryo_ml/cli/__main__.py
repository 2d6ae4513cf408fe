"""`python -m embryo_ml.cli ...` = `embryo-ml ...`."""

import sys

from embryo_ml.cli.runner import main

sys.exit(main())
