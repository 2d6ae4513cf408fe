"""`python -m embryo_ml.train ...` = `embryo-ml train ...`; the form torchrun starts:

    torchrun --nproc_per_node=2 -m embryo_ml.train --config configs/demo.yaml --data M --out RUN
"""

import sys

from embryo_ml.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
