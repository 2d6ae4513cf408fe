"""Atomic file writes: a temporary name beside the target, then a rename.

A reader (or an interrupted run) sees either the old file or the whole new one, never half a
file (house rule 5). Torch-free, so the scorer and the bundle module use it too.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
