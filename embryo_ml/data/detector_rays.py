"""Rays from a centre: the ray geometry and ray search both looks of the embryo detector share,
and the Hough-style vote that proposes centres (`embryo_ml.data.embryo_detector`).

At 128 px numpy's cost per call outweighs the arithmetic, so the search makes few calls: the
ray geometry is tabled once per image size, all centres (or all refinements) share one ray
search, and the vote reuses its arrays from image to image (`_scratch`). The vote and the ring
checks compute what they did before, bit for bit.

numpy, OpenCV and the standard library only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

import functools
import math
import threading

import cv2
import numpy as np

_N_ANGLES = 64
_SECTORS = 16  # 4 rays each
_ANGLES = np.linspace(0.0, 2 * math.pi, _N_ANGLES, endpoint=False)
_COS, _SIN = np.cos(_ANGLES).astype(np.float32), np.sin(_ANGLES).astype(np.float32)
SECTOR_SHARE = 0.5  # share of a sector's rays that must meet the outline
COHERENCE = 0.9  # |cos| between an edge's gradient and the ray (within ~25 degrees)
N_CENTRES = 4

# The gradients as a ray search reads them: gx and gy, flat; per pixel the least radial gradient
# that makes a hit, flat, with one never-hit element after the last pixel that takes the ray
# points off the image; the width; and the limits (w, h) as a (2, 1, 1, 1) uint32 array.
_Field = tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]


def _field(gx: np.ndarray, gy: np.ndarray, mag: np.ndarray, strong: np.ndarray) -> _Field:
    """The gradients as the ray search reads them (see `_Field`); `strong` is flat."""
    h, w = mag.shape
    # The least radial gradient that makes a hit: COHERENCE x magnitude on a strong edge, inf
    # (nan where the magnitude is 0) elsewhere. Dividing by the mask is several times faster
    # than np.where with a mask that has no pattern.
    least = np.empty(h * w + 1, np.float32)
    least[-1] = math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(COHERENCE * mag.ravel(), strong, out=least[:-1])
    return gx.ravel(), gy.ravel(), least, w, np.array([w, h], np.uint32).reshape(2, 1, 1, 1)


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised array for this thread, reused from image to image. The vote's arrays
    (~0.2 MB) allocated afresh for each image can make the allocator hand memory back to the
    system and fault it in again on the next image, which costs more than the vote itself."""
    size = math.prod(shape)
    store = _SCRATCH.__dict__
    buf = store.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = store[name] = np.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


@functools.lru_cache(maxsize=16)
def _vote_steps(rmin: float, rmax: float) -> np.ndarray:
    """Half the vote distances, float32, shaped (steps, 1): see `_centres`."""
    steps = np.arange(rmin, rmax, 2.0, dtype=np.float32) * np.float32(0.5)
    steps.flags.writeable = False
    return steps[:, None]


def _centres(
    w: int, h: int, pool: np.ndarray, unit: np.ndarray, rmin: float, rmax: float
) -> list[tuple[float, float]]:
    """Likely circle centres: the edge pixels `pool` (flat indices; unit gradients `unit`, x
    and y rows) vote along their gradient, both ways, at every embryo-sized distance (a Hough
    transform for circles) on a half-resolution grid."""
    ys, xs = np.divmod(pool, w)
    # Vote cell trunc((x +- step * u) / 2) (u in float32, the sum in float64), computed as
    # x / 2 +- (step / 2) * u, truncated on output: halving and negating are exact in float32
    # (u = gradient / magnitude is 0 or far from subnormal) and halving commutes with float64
    # rounding, so the cells are bit for bit the same. They lie within +-(127 + 0.6 x 128) / 2
    # and fit int8; read as uint8, those left of or above the grid are over 127, so a 2-D
    # histogram of the (y, x) cells over the grid counts exactly the votes on it. Arrays are
    # (x|y, +|-, steps, voters).
    half = _vote_steps(rmin, rmax)
    k, n = half.shape[0], pool.size
    along = _scratch("along", (2, k, n), np.float32)
    cells = _scratch("cells", (2, 2, k, n), np.int8)
    np.multiply(half, unit[:, None, :], out=along)
    at = np.array([xs, ys])[:, None, :] * 0.5
    np.add(at, along, out=cells[:, 0], dtype=np.float64, casting="unsafe")
    np.subtract(at, along, out=cells[:, 1], dtype=np.float64, casting="unsafe")
    hw, hh = (w + 1) // 2, (h + 1) // 2
    votes = cells.view(np.uint8).reshape(2, 2 * k, n)
    acc = cv2.calcHist([votes[1], votes[0]], [0, 1], None, [hh, hw], [0, hh, 0, hw])
    acc = cv2.GaussianBlur(acc, (0, 0), 1.5)
    out = []
    for _ in range(N_CENTRES):
        _, peak, _, (px, py) = cv2.minMaxLoc(acc)
        if peak <= 0:
            break
        cv2.circle(acc, (px, py), max(2, int(rmin / 4)), 0.0, -1)
        out.append((2.0 * px + 0.5, 2.0 * py + 0.5))
    return out


def _offsets(radii: np.ndarray, step: int = 1) -> np.ndarray:
    """(2, C, rays, R) float32 x and y offsets of the ray points from their centre, for radii
    (C, R): radius x cos and x sin, the products the ray points are made of. `step` 2 takes
    every other ray (32)."""
    r = radii[:, None, :]
    return np.stack([r * _COS[::step, None], r * _SIN[::step, None]])


@functools.lru_cache(maxsize=16)
def _ray_table(rmin: float, rmax: float) -> tuple[list[float], np.ndarray]:
    """The ring search's radii (1 px apart) and their ray offsets: the same for every image of
    one size."""
    radii = np.arange(rmin, rmax, 1.0, dtype=np.float32)
    offsets = _offsets(radii[None, :])
    offsets.flags.writeable = False
    return radii.tolist(), offsets


def _edge_hits(field: _Field, centres: np.ndarray, offsets: np.ndarray,
               step: int = 1) -> np.ndarray:
    """(centres, rays, radii) bool: a strong edge whose gradient lies along the ray there.
    centres (C, 2) float32; offsets (2, C or 1, rays, R) from `_offsets` (with `step`)."""
    gx, gy, least, w, lim = field
    xy = (centres.T[:, :, None, None] + offsets).astype(np.int32).view(np.uint32)
    idx = xy[1] * np.uint32(w)
    idx += xy[0]
    # Off the image (negative coordinates wrap round to huge ones): the never-hit element.
    np.putmask(idx, (xy >= lim).any(axis=0), least.size - 1)
    radial = gx.take(idx, mode="clip") * _COS[::step, None]
    radial += gy.take(idx, mode="clip") * _SIN[::step, None]
    return np.abs(radial, out=radial) >= least.take(idx)


def _sector_counts(hit: np.ndarray) -> np.ndarray:
    """Per centre and radius: in how many sectors enough rays meet an edge within 1 px (support
    = count / _SECTORS). Counting sectors rather than rays asks for an outline all the way
    round, not one arc."""
    band = hit.copy()
    band[..., 1:] |= hit[..., :-1]
    band[..., :-1] |= hit[..., 1:]
    rays = band.reshape(hit.shape[0], _SECTORS, -1, hit.shape[-1])
    # A share of 4 rays is exact in binary: count >= 0.5 x 4 is share >= 0.5.
    per_sector = rays.view(np.uint8).sum(axis=2, dtype=np.uint8)
    return (per_sector >= SECTOR_SHARE * rays.shape[2]).sum(axis=1)
