"""The gradients both looks of the embryo detector read, their strong edges, and the screen
that rules an embryo out before any ring is looked for (`embryo_ml.data.embryo_detector`).

Ruled out: images whose strong edges are mostly ruler-straight (drawn shapes, text), run in two
square directions only (a grid), or are only smooth slopes (vignettes, blobs); a ring of
straight pieces (a polygon) can face a centre too.

numpy, OpenCV and the standard library only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

N_VOTERS = 500  # strong edges that vote for centres, at most (an even spread)
GRID_MAX = 0.4

_Grads = tuple[np.ndarray, np.ndarray, np.ndarray]  # gx, gy, magnitude (2-D float32)
_Voters = tuple[np.ndarray, np.ndarray, np.ndarray]  # strong (flat), pool, unit: see _voters

# Straight edges: an edge pixel is straight when the edge goes on STRAIGHT_STEP px either way
# turning less than 3 degrees. A zona even in a frame-filling crop (radius up to 83 px here, 65%
# of 128) turns over 4 degrees in 6 px, cells far more; ruler-straight edges are drawn.
STRAIGHT_STEP = 6
STRAIGHT_COS = math.cos(math.radians(3.0))
STRAIGHT_MAX = 0.08  # a larger share of straight edges: made by hand or machine, no embryo
SLOPE_MIN = 1.8  # strong edges less steep than this: slopes, not edges (see _no_embryo_edges)


def _gradients(work: np.ndarray) -> _Grads:
    """(gx, gy, magnitude) of the working image smoothed with sigma 1.5: what both looks read."""
    blur = cv2.GaussianBlur(work.astype(np.float32), (0, 0), 1.5)
    gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)
    return gx, gy, cv2.magnitude(gx, gy)


def _voters(grads: _Grads) -> _Voters | None:
    """(strong, pool, unit) of the first look: the flat mask of strong edges, an even spread of
    at most N_VOTERS of them (flat indices) and their unit gradients (x and y rows); None where
    fewer than 16 edges are strong."""
    gx, gy, mag = grads
    flat = mag.ravel()
    # An edge is "strong" relative to the image's own typical gradient, so a dim image is
    # judged like a bright one; the tiny absolute floor only keeps a flat field edgeless.
    # The median is taken on the bit patterns: non-negative floats sort like them, and integers
    # partition twice as fast.
    half = flat.size // 2
    median = np.partition(flat.view(np.int32), half)[half : half + 1].view(np.float32)[0]
    floor = max(2.0 * float(median), 0.05)
    strong = flat >= floor
    pool = np.flatnonzero(strong)
    if pool.size < 16:
        return None
    if pool.size > N_VOTERS:  # an even spread, so a long faint outline outvotes a bright blob
        pool = pool[:: -(-pool.size // N_VOTERS)]
    return strong, pool, np.array([gx.ravel()[pool], gy.ravel()[pool]]) / flat[pool]


def _grid_like(ux: np.ndarray, uy: np.ndarray) -> bool:
    """Edges running mostly in two square directions (a grid, a checkerboard, text) are made
    by hand or machine, not by a microscope looking at an embryo, whose outlines curve every
    way. Measured as the 4-fold circular moment of the strong edges' directions (unit gradient
    vectors): 0 for directions spread evenly, 1 for horizontal and vertical only. Synthetic
    embryos stay below 0.13 and the real samples below 0.16 (bar one time-lapse frame showing
    no embryo, 0.72); checkerboards with visible squares score 0.5-1."""
    c2, s2 = ux * ux, uy * uy
    diff = c2 - s2
    cos4 = _mean32(diff**2 - 4.0 * c2 * s2)
    sin4 = _mean32(4.0 * ux * uy * diff)
    return math.hypot(cos4, sin4) > GRID_MAX


def _mean32(values: np.ndarray) -> float:
    """np.mean of a float32 vector without its Python-level overhead, step for step: the
    float32 (pairwise) sum, divided in float64, rounded to float32."""
    return float(np.float32(float(np.add.reduce(values)) / values.size))


def _no_embryo_edges(grads: _Grads, voters: _Voters | None) -> bool:
    """Whether the image's strong edges (the first look's `voters`) rule an embryo out whatever
    rings they make: over STRAIGHT_MAX of them are ruler-straight, or they are no edges but
    slopes (steepness under SLOPE_MIN); see `_edge_shape`. Even a frame-filling zona curves too
    much to count as straight: in the real samples, whole or cropped close, under 6.5% of the
    edges do (the well's rim, gently curved, most of them), in renderings of overlapping shapes
    10-30%. Their steepness is >= 2.1 (synthetic embryos' >= 1.9, also a focal step off),
    smooth renderings' (a vignette, a blob) <= 1.65."""
    if voters is None:
        return False
    straight, steepness = _edge_shape(grads, *voters)
    return straight > STRAIGHT_MAX or steepness < SLOPE_MIN


def _edge_shape(grads: _Grads, strong: np.ndarray, pool: np.ndarray,
                unit: np.ndarray) -> tuple[float, float]:
    """(straight share, steepness) of the edge pixels `pool` (flat indices; `unit`: their unit
    gradients, x and y rows; `strong`: the flat mask of strong edges), from four probes each.
    Straight: the pixels STRAIGHT_STEP px away along the edge, both ways, are inside the image,
    strong, and have gradients within 3 degrees of the pixel's own. Steepness: the mean gradient
    at the pixels over the mean of the lower gradient 4 px away across the edge, either side
    (clamped to the image): an edge is a ridge of gradient, a slope is not."""
    gx, gy, mag = (g.ravel() for g in grads)
    h, w = grads[2].shape
    ys, xs = np.divmod(pool, w)
    ux, uy = unit
    along, across = STRAIGHT_STEP * unit, 4.0 * unit
    x = np.rint(xs + np.stack([-along[1], along[1], across[0], -across[0]]))
    y = np.rint(ys + np.stack([along[0], -along[0], across[1], -across[1]]))
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    probe = (np.clip(y, 0, h - 1).astype(np.intp) * w + np.clip(x, 0, w - 1).astype(np.intp))
    near = mag[probe]
    turn_ok = np.abs(ux * gx[probe[:2]] + uy * gy[probe[:2]]) >= STRAIGHT_COS * near[:2]
    straight = (inside[:2] & strong[probe[:2]] & turn_ok).all(axis=0)
    steepness = float(mag[pool].mean() / (np.minimum(near[2], near[3]).mean() + 1e-6))
    return float(straight.mean()), steepness
