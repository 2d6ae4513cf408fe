#!/usr/bin/env python
"""Score a folder of embryo images with a bundle: a plain-script form of `embryo-ml score`.

    python scripts/score_folder.py IMAGES --bundle BUNDLE_DIR --out scores.csv \
        [--resume] [--tta] [--aggregate mean|max] [--embryo-pattern REGEX]

Every option of `embryo-ml score` works here (`--help` lists them).
"""

import sys

from embryo_ml.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
