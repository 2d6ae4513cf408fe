"""Decoded-image cache: decode and resize each (file content, size) once, then memory-map.

Decoding a PNG/JPEG costs far more than training a small model on it at 64-224 px, so epochs
after the first read `uint8` arrays from `.npy` files with `mmap_mode="r"` instead.

Keys are the file's content hash plus the target size: duplicates share an entry, and a changed
file gets a new entry (the old one is orphaned, never served). To avoid re-hashing every epoch,
each process remembers path -> hash, keyed by the file's (size, mtime); a changed file is
re-hashed. Entries are written to a temporary name and renamed into place, so several DataLoader
workers may fill the cache at once: the worst case is the same image decoded twice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from embryo_ml.data.images import DEFAULT_MAX_PIXELS, read_image
from embryo_ml.data.preprocess import load_square

CACHE_FORMAT = "v2"  # bump when the stored array layout or resize policy changes


class DecodedCache:
    def __init__(
        self, root: str | os.PathLike[str], size: int, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.root = Path(root) / f"{CACHE_FORMAT}-{size}px"
        self.root.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.max_pixels = max_pixels
        self._digests: dict[str, tuple[int, int, str]] = {}
        self.hits = 0
        self.misses = 0

    def _digest(self, path: str) -> tuple[str, bytes | None]:
        """Content hash of `path`; also the bytes when they had to be read (a decode follows)."""
        stat = os.stat(path)
        known = self._digests.get(path)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2], None
        data = Path(path).read_bytes()
        digest = hashlib.blake2b(data, digest_size=20).hexdigest()
        self._digests[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest, data

    def entry(self, path: str | os.PathLike[str]) -> Path:
        digest, _ = self._digest(str(path))
        return self.root / digest[:2] / f"{digest}.npy"

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """The image at model size as (size, size, 3) uint8; decoded at most once per content."""
        path = str(path)
        try:
            digest, _ = self._digest(path)
        except FileNotFoundError:
            return read_image(path, self.max_pixels)  # the reader's one clear error
        entry = self.root / digest[:2] / f"{digest}.npy"
        if entry.is_file():
            try:
                array = np.load(entry, mmap_mode="r", allow_pickle=False)
                if array.shape == (self.size, self.size, 3) and array.dtype == np.uint8:
                    self.hits += 1
                    return array
            except (OSError, ValueError):
                pass  # a damaged entry is rebuilt below
        self.misses += 1
        array = np.ascontiguousarray(load_square(path, self.size, self.max_pixels))
        entry.parent.mkdir(exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp, entry)
        return array
