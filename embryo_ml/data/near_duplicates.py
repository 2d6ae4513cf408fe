"""Perceptual hashes of images and near-duplicate groups among them (torch-free).

Real embryo data holds re-saved, resized or brightened copies of one picture under several
names; byte hashes miss them. A 64-bit DCT hash finds candidates cheaply and a 256-bit one
confirms them, so wells that look alike (bright ring, dark corners) are not taken for copies.
`embryo_ml.data.check` uses both for its duplicate and leakage checks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import cv2
import numpy as np


def _dct_bits(image: np.ndarray, side: int, keep: int) -> np.ndarray:
    """Shrink to side x side gray, 2-D DCT, keep x keep lowest frequencies vs their median."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or 0 in array.shape[:2]:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.dtype} {array.shape}")
    if array.ndim == 3:
        if array.shape[2] != 3:
            raise ValueError(f"expected 3 channels, got shape {array.shape}")
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(array, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:keep, :keep].ravel()
    bits = low > np.median(low[1:])
    bits[0] = False  # the DC term is mean brightness: not structure
    return np.packbits(bits).view(">u8").astype(np.uint64)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT hash of an RGB (or grayscale) uint8 image: near copies differ in few bits.

    Gray, shrink to 32x32 (INTER_AREA), 2-D DCT, keep the 8x8 lowest frequencies and set a bit
    where a coefficient exceeds the median of the 63 non-DC ones; the DC bit is always 0, so a
    brightness shift, re-encoding or resizing leaves the hash (almost) unchanged while unrelated
    images differ in about half the bits. Every hash has the same number of set bits, so
    distances between hashes are even.
    """
    return int(_dct_bits(image, 32, 8)[0])


def detail_hash(image: np.ndarray) -> np.ndarray:
    """256-bit hash (4 x uint64) like `perceptual_hash` but from a 64x64 shrink.

    The 64-bit hash sees mostly the layout of the frame; in EmbryoScope-like wells (bright ring,
    dark corners) different embryos share it within 2-4 bits. This one also sees the embryo,
    so it confirms which 64-bit matches are the same picture.
    """
    return _dct_bits(image, 64, 16)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in; older numpy counts byte by byte)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def detail_threshold(threshold: int) -> int:
    """Bits allowed between 256-bit detail hashes for a pair within `threshold` 64-bit bits.

    3x, not 4x, the 64-bit allowance: re-saved, resized, blurred or brightened copies stay
    within about 12 of 256 bits, while different embryos in one kind of well start near 18.
    """
    return 3 * threshold


def near_duplicate_groups(hashes: Sequence[int] | np.ndarray, threshold: int,
                          details: np.ndarray | None = None,
                          block: int = 2048) -> list[list[int]]:
    """Indices grouped by 64-bit hamming distance <= `threshold`, chained (A~B, B~C: one group).

    With `details` ((N, 4) uint64 from `detail_hash`), a pair must also be within
    `detail_threshold(threshold)` bits there. All pairs are compared, O(N^2), in numpy blocks:
    about a minute at 100k images; identical hashes are merged first, so many copies of one
    blank frame cost nothing extra. Beyond a few 100k images this wants an index (multi-index
    hashing or a BK-tree).
    """
    if len(hashes) < 2:
        return []
    coarse = np.asarray(hashes, dtype=np.uint64).reshape(-1, 1)
    keys = coarse if details is None else np.hstack([coarse, np.asarray(details, np.uint64)])
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    codes, fine = unique[:, 0], unique[:, 1:]
    fine_limit = detail_threshold(threshold)
    sets = _UnionFind(len(unique))
    for start in range(0, len(unique), block):
        for col in range(start, len(unique), block):
            distance = _popcount(codes[start:start + block, None] ^ codes[None, col:col + block])
            rows, cols = np.nonzero(distance <= threshold)
            rows, cols = rows + start, cols + col
            keep = rows < cols
            rows, cols = rows[keep], cols[keep]
            if fine.shape[1] and len(rows):
                close = _popcount(fine[rows] ^ fine[cols]).sum(axis=1) <= fine_limit
                rows, cols = rows[close], cols[close]
            for a, b in zip(rows.tolist(), cols.tolist()):
                sets.union(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for index, code in enumerate(inverse.ravel().tolist()):
        members[sets.find(code)].append(index)
    return [group for group in members.values() if len(group) > 1]
