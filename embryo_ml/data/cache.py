"""Decoded-image cache: decode and resize each (file content, size) once, then memory-map.

Decoding a PNG/JPEG costs far more than training a small model on it at 64-224 px, so epochs
after the first read memory-mapped `uint8` arrays (`np.memmap`) instead.

An entry is a 32-byte header (a magic word, the dtype, the shape and the CRC32 of the pixels),
then the pixels. Every hit checks the header, the file size and the checksum (CRC32 runs at
several GB/s: tens of microseconds for a 224 px image, whose pixels the augmentation reads next
anyway), so an entry that is empty, truncated, zero-filled or otherwise damaged (a crash or a
power cut while it was written) is never served: it is rebuilt from the image, with one warning.
Entries are therefore written atomically but not fsync'ed (`embryo_ml.fileio`, `durable=False`).

Keys are the file's content hash plus the target size: duplicates share an entry, and a changed
file gets a new entry (the old one is orphaned, never served). To avoid re-hashing every epoch,
each process remembers path -> hash, keyed by the file's (size, mtime); a changed file is
re-hashed. Entries are written to a temporary name and renamed into place, so several DataLoader
workers may fill the cache at once: the worst case is the same image decoded twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from embryo_ml.data.images import DEFAULT_MAX_PIXELS, read_image
from embryo_ml.data.preprocess import load_square
from embryo_ml.fileio import atomic_open

CACHE_FORMAT = "v3"  # bump when the stored array layout or resize policy changes
ENTRY_SUFFIX = ".u8"
# magic, dtype ("|u1"), height, width, channels, CRC32 of the pixels; padded to 32 bytes
_HEADER = struct.Struct("<8s4sIIII4x")
_MAGIC = b"EMLCACHE"
_DTYPE = np.dtype(np.uint8).str.encode()

log = logging.getLogger(__name__)


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
        return self.root / digest[:2] / f"{digest}{ENTRY_SUFFIX}"

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """The image at model size as (size, size, 3) uint8; decoded at most once per content."""
        path = str(path)
        try:
            digest, data = self._digest(path)  # the bytes too, when they had to be read
        except FileNotFoundError:
            return read_image(path, self.max_pixels)  # the reader's one clear error
        entry = self.root / digest[:2] / f"{digest}{ENTRY_SUFFIX}"
        array, problem = self._read_entry(entry)
        if array is not None:
            self.hits += 1
            return array
        if problem is not None:
            log.warning("decoded-image cache: entry %s for %s is %s; rebuilding it from the "
                        "image", entry, path, problem)
        self.misses += 1
        array = np.ascontiguousarray(load_square(path, self.size, self.max_pixels, data=data))
        entry.parent.mkdir(exist_ok=True)
        header = _HEADER.pack(_MAGIC, _DTYPE, *array.shape, zlib.crc32(array))
        with atomic_open(entry, "wb", durable=False) as handle:  # checked on every read
            handle.write(header)
            handle.write(array.data)
        return array

    def _read_entry(self, entry: Path) -> tuple[np.ndarray | None, str | None]:
        """(the memory-mapped pixels, None) for a whole entry; (None, None) when there is none;
        (None, what is wrong) for an entry that must be rebuilt."""
        shape = (self.size, self.size, 3)
        try:
            with open(entry, "rb") as handle:
                head = handle.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    return None, "truncated" if head else "empty"
                magic, dtype, *found, crc = _HEADER.unpack(head)
                if magic != _MAGIC or dtype.rstrip(b"\0") != _DTYPE or tuple(found) != shape:
                    return None, "not an entry of this cache (bad header)"
                if os.fstat(handle.fileno()).st_size != _HEADER.size + int(np.prod(shape)):
                    return None, "truncated"
                array = np.memmap(handle, dtype=np.uint8, mode="r", offset=_HEADER.size,
                                  shape=shape)
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as error:
            return None, f"unreadable ({error})"
        if zlib.crc32(array) != crc:
            return None, "damaged (its checksum does not match its pixels)"
        return array, None
