"""Embryo detection: is there an embryo-sized round outline (the zona pellucida)?

`find_embryo` returns the outline's circle (or None); `_has_embryo` answers only whether there
is one, as cheaply as it can, for the `no_embryo` flag (`embryo_ml.data.quality.image_flags`).
Both read one grey copy of the image resized to WORK_SIDE px (`embryo_ml.data.working_image`).

How it decides, in two looks on the same gradients:

- Ruled out first (`_no_embryo_edges`): images whose strong edges are mostly ruler-straight
  (drawn shapes, text) or only smooth slopes (vignettes, blobs); a ring of straight pieces (a
  polygon) can face a centre too.
- The first look, for whole wells and loosely framed embryos: centres come from a Hough-style
  vote of edge pixels along their gradients; each candidate is then checked ray by ray for an
  edge that faces the centre all the way round (radius 15-60% of the shorter side, found in at
  least MIN_SUPPORT of the sectors). A blank field has no edges, noise has edges facing every
  way, a grid has edges in two directions only; a zona has one facing the centre in every
  direction.
- The second look, for close crops whose zona touches or leaves the frame (`_close_ring`): one
  large ring about the middle of the frame, a lower edge floor, support counted only on the rays
  inside the frame, and besides support either ring evidence (a sharp edge on thin connected
  Canny edges) or arc evidence (long smooth round arcs, as a zona squeezed against the frame
  leaves in the corners).

On the shared real samples, whole and cropped close at 0-15% margins and off-centre, at most
0.2% of the images are flagged (`benchmarks/no_embryo_real.py`, `tests/test_no_embryo_real.py`).

numpy, OpenCV and the standard library only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator

import cv2
import numpy as np

from embryo_ml.data.working_image import _detection_image, _gray, _working

__all__ = ["MAX_RADIUS", "MIN_RADIUS", "find_embryo"]

MIN_RADIUS, MAX_RADIUS = 0.15, 0.60  # embryo-sized: radius as a share of the shorter side


# --------------------------------------------------------------------------------------------
# Embryo detection: is there an embryo-sized round outline (the zona pellucida)?
#
# The first look. Centres come from a Hough-style vote of edge pixels along their gradients;
# each candidate is then checked ray by ray for an edge that faces the centre all the way
# round. A blank field has no edges, noise has edges facing every way, a grid has edges in two
# directions only; a zona has one facing the centre in every direction. Before any ring is
# looked for, images whose strong edges are mostly ruler-straight or mere slopes are ruled out
# (`_no_embryo_edges`); a ring of straight pieces (a polygon) can face a centre too.
#
# At 128 px numpy's cost per call outweighs the arithmetic, so the search makes few calls: the
# ray geometry is tabled once per image size, all centres (or all refinements) share one ray
# search, and `image_flags`, which only asks whether there is an embryo, stops at the first
# well-supported ring. The vote and the ring checks compute what they did before, bit for bit.

_N_ANGLES = 64
_SECTORS = 16  # 4 rays each
_ANGLES = np.linspace(0.0, 2 * math.pi, _N_ANGLES, endpoint=False)
_COS, _SIN = np.cos(_ANGLES).astype(np.float32), np.sin(_ANGLES).astype(np.float32)
MIN_SUPPORT = 0.7  # share of sectors the outline must be found in
SECTOR_SHARE = 0.5  # share of a sector's rays that must meet the outline
COHERENCE = 0.9  # |cos| between an edge's gradient and the ray (within ~25 degrees)
REFINE_FROM = 0.4  # rings supported this well are re-centred and kept as candidates
N_VOTERS = 500
N_CENTRES = 4
GRID_MAX = 0.4

# The gradients as a ray search reads them: gx and gy, flat; per pixel the least radial gradient
# that makes a hit, flat, with one never-hit element after the last pixel that takes the ray
# points off the image; the width; and the limits (w, h) as a (2, 1, 1, 1) uint32 array.
_Field = tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]
_Grads = tuple[np.ndarray, np.ndarray, np.ndarray]  # gx, gy, magnitude (2-D float32)
_Voters = tuple[np.ndarray, np.ndarray, np.ndarray]  # strong (flat), pool, unit: see _voters

# Straight edges: an edge pixel is straight when the edge goes on STRAIGHT_STEP px either way
# turning less than 3 degrees. A zona even in a frame-filling crop (radius up to 83 px here, 65%
# of 128) turns over 4 degrees in 6 px, cells far more; ruler-straight edges are drawn.
STRAIGHT_STEP = 6
STRAIGHT_COS = math.cos(math.radians(3.0))
STRAIGHT_MAX = 0.08  # a larger share of straight edges: made by hand or machine, no embryo
SLOPE_MIN = 1.8  # strong edges less steep than this: slopes, not edges (see _no_embryo_edges)

# The second look, for close crops (see `_close_ring`). Lengths in px at WORK_SIDE.
CLOSE_RADII = (0.35, 0.65)  # ring radius as a share of the shorter side
CLOSE_CENTRE = 0.25  # ring centre at most this share of the shorter side off the image centre
CLOSE_GRID = (-0.12, -0.06, 0.0, 0.06, 0.12)  # extra centres about the middle, share of w, h
CLOSE_QUANTILE = 0.25  # the edge floor is 2 x this quantile of the gradient magnitude
CLOSE_RINGS = 6  # best-voted centres refined and polished ...
CLOSE_COARSE = 0.55  # ... where their coarse support reaches this (accepted rings' >= 0.61)
BORDER = 4  # ray points nearer the frame than this are unseen (smoothing blurs the frame)
MIN_SEEN = 32  # a ring must fall inside the frame on this many of the 64 rays
MIN_ARC_SEEN = 24  # ... an arc's circle on this many
CLOSE_SUPPORT = 0.72  # share of the seen rays that must meet the ring ...
SHARP_RATIO = 1.65  # ... at an edge: the gradient there this much above 4 px either side
RING_EVIDENCE = 1.3  # ... and its support plus its thin-edge (Canny) support reach this
ARC_COVER = 0.35  # a smooth round arc whose circle meets this share of its seen rays ...
ARC_EVIDENCE = 1.0  # ... is enough where ring support + arc cover reach this
ARC_RADII = (0.3, 0.8)
ARC_CENTRE = 0.3
ARC_MIN_PIXELS = 12
ARC_MAX_RMS = 1.5  # px from the fitted circle
ARC_MIN_SPAN = 6  # of 64 angular bins (about 34 degrees)
ARC_COHERENCE = 0.85  # mean |cos| between the arc's gradients and its circle's radii
ARC_LIMIT = 4  # longest arcs whose circles are checked


def find_embryo(gray: np.ndarray) -> tuple[float, float, float] | None:
    """(cx, cy, r) in input pixels of the best-supported embryo-sized circle, or None: None
    exactly where `image_flags` says `no_embryo`.

    Embryo-sized: radius 15-60% of the shorter side (first look). Where several outlines
    qualify (cells, a cavity, the zona's two edges) the outermost well-supported one is
    returned, normally the zona; in a close crop that can be a large cell, and where only the
    second look finds an outline (a zona cut by the frame) it is that ring, 35-65% of the
    shorter side. In images of a culture well the well's rim often qualifies too and may be
    returned: it is round and embryo-sized, so an empty well is not reported as `no_embryo`.
    """
    g = _gray(gray)
    return _find(_detection_image(_working(g)), g.shape)


def _find(work: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float, float] | None:
    grads = _gradients(work)
    voters = _voters(grads)
    if _no_embryo_edges(grads, voters):
        return None
    circle, support = _best_circle(work, grads, voters)
    if circle is None or support < MIN_SUPPORT:
        circle = _close_ring(work, grads)
    if circle is None:
        return None
    sx, sy = shape[1] / work.shape[1], shape[0] / work.shape[0]
    cx, cy, r = circle
    return (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5, r * (sx + sy) / 2.0


def _best_circle(
    work: np.ndarray, grads: _Grads | None = None, voters: _Voters | None = None
) -> tuple[tuple[float, float, float] | None, float]:
    """The first look's chosen circle in working-image pixels and its support (share of
    sectors)."""
    search = _search(work, grads, voters)
    if search is None:
        return None, 0.0
    field, centres, radii, offsets = search
    counts = _sector_counts(_edge_hits(field, np.array(centres, np.float32), offsets))
    per_centre = [[(*centre, r, cover) for r, cover in _runs(n, radii)]
                  for centre, n in zip(centres, counts.tolist(), strict=True)]
    todo = []  # (centre, index of its best ring: the first of the best supported)
    for i, found in enumerate(per_centre):
        covers = [f[3] for f in found]
        if covers and max(covers) < 1.0:
            todo.append((i, covers.index(max(covers))))
    refined = _refine(field, [(centres[i], per_centre[i][k][2]) for i, k in todo])
    for (i, k), better in zip(todo, refined, strict=True):
        if better is not None and better[3] > per_centre[i][k][3]:
            per_centre[i][k] = better
    rings = [ring for found in per_centre for ring in found]
    good = [f for f in rings if f[3] >= MIN_SUPPORT]
    if not good:
        return None, max((f[3] for f in rings), default=0.0)
    # The zona encloses the embryo's other round outlines: among the nearly best supported
    # rings (within two sectors), the largest.
    best = max(f[3] for f in good)
    pick = max((f for f in good if f[3] >= best - 0.13), key=lambda f: f[2])
    return pick[:3], pick[3]


def _has_embryo(work: np.ndarray) -> bool:
    """Whether `_find` would return a circle: all `image_flags` needs, found as cheaply as the
    image allows. The first look's unrefined rings (`_first_look`) settle most well images; a
    close crop goes on to the second look (`_close_ring`, on the same gradients), and only an
    image that fails it too gets the first look's refinements."""
    grads = _gradients(work)
    voters = _voters(grads)
    if _no_embryo_edges(grads, voters):
        return False
    first = _first_look(_search(work, grads, voters))
    return next(first) or next(first) or _close_ring(work, grads) is not None or next(first)


def _first_look(
    search: tuple[_Field, list[tuple[float, float]], list[float], np.ndarray] | None,
) -> Iterator[bool]:
    """Whether `_best_circle` would find a ring supported at least MIN_SUPPORT, in three answers,
    each settling more: about the best-voted centre alone, about all centres, all centres with
    their rings refined. Refining only ever raises a ring's support, so a ring that qualifies
    unrefined settles it; a clear embryo costs one ray search about the best-voted centre
    instead of four and their refinements."""
    if search is None:
        yield from (False, False, False)
        return
    field, centres, radii, offsets = search
    n = _sector_counts(_edge_hits(field, np.array(centres[:1], np.float32), offsets))
    found = int(n.max()) / _SECTORS >= MIN_SUPPORT
    yield found
    if found:
        yield from (True, True)
        return
    counts = n.tolist()
    if centres[1:]:
        n = _sector_counts(_edge_hits(field, np.array(centres[1:], np.float32), offsets))
        if int(n.max()) / _SECTORS >= MIN_SUPPORT:
            yield from (True, True)
            return
        counts += n.tolist()
    yield False
    jobs = []  # below MIN_SUPPORT (< 1.0) each: refine every centre's best ring, as _best_circle
    for centre, c in zip(centres, counts, strict=True):
        rings = _runs(c, radii)
        if rings:
            jobs.append((centre, max(rings, key=lambda f: f[1])[0]))
    yield any(b is not None and b[3] >= MIN_SUPPORT for b in _refine(field, jobs))


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


def _search(
    work: np.ndarray, grads: _Grads | None = None, voters: _Voters | None = None
) -> tuple[_Field, list[tuple[float, float]], list[float], np.ndarray] | None:
    """What the ray checks need (field, centres, radii, ray offsets), or None where the image
    plainly holds no circle: too small, too few strong edges, grid-like, or no votes.
    `grads`, `voters`: `_gradients(work)` and `_voters(grads)` where already computed."""
    h, w = work.shape
    short = min(h, w)
    if short < 16:
        return None
    gx, gy, mag = _gradients(work) if grads is None else grads
    if voters is None:
        voters = _voters((gx, gy, mag))
        if voters is None:
            return None
    strong, pool, unit = voters
    if _grid_like(unit[0], unit[1]):
        return None
    rmin, rmax = MIN_RADIUS * short, MAX_RADIUS * short
    centres = _centres(w, h, pool, unit, rmin, rmax)
    if not centres:
        return None
    radii, offsets = _ray_table(rmin, rmax)
    return _field(gx, gy, mag, strong), centres, radii, offsets


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


def _runs(counts: list[int], radii: list[float]) -> list[tuple[float, float]]:
    """(radius, support) of each ring about one centre: the best radius (outermost on ties) of
    each run of radii supported at least REFINE_FROM."""
    found = []
    best, at = -1.0, -1
    for j, n in enumerate(counts):
        cover = n / _SECTORS
        if cover >= REFINE_FROM:
            if cover >= best:
                best, at = cover, j
        elif at >= 0:
            found.append((radii[at], best))
            best, at = -1.0, -1
    if at >= 0:
        found.append((radii[at], best))
    return found


def _grouped(
    field: _Field, centres: list[tuple[float, float]], radii: list[np.ndarray]
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(members, hits) per group of equal-length radius lists: one ray search per group (in
    practice one for all; radii differ in length only for rings under 4 px)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(radii):
        groups.setdefault(r.size, []).append(i)
    for members in groups.values():
        offsets = _offsets(np.stack([radii[i] for i in members]))
        yield members, _edge_hits(field, np.array([centres[i] for i in members], np.float32),
                                  offsets)


def _refine(
    field: _Field, rings: list[tuple[tuple[float, float], float]]
) -> list[tuple[float, float, float, float] | None]:
    """Re-centre rings ((centre, r) each) on their own edge points (least-squares circle): the
    vote grid is coarse, and a circle 2 px off centre meets a thin zona on only part of its way
    round. Per ring (cx, cy, r, support), or None where the fit fails."""
    first = [np.arange(max(r - 3.0, 1.0), r + 3.5, 1.0, dtype=np.float32) for _, r in rings]
    fits: list[tuple[float, float]] = []
    second: list[np.ndarray] = []
    which: list[int] = []
    for members, hits in _grouped(field, [c for c, _ in rings], first):
        # Per ring and ray, the hit nearest the ring's radius, all rings at once; the fit
        # itself, ring by ring.
        radii = np.stack([first[i] for i in members])
        r = np.array([rings[i][1] for i in members], np.float32)
        nearest = np.where(hits, np.abs(radii - r[:, None])[:, None, :], np.inf).argmin(axis=2)
        on = np.take_along_axis(radii, nearest, axis=1)
        centre = np.array([rings[i][0] for i in members], np.float32)
        x = centre[:, :1] + on * _COS
        y = centre[:, 1:] + on * _SIN
        designs = np.stack([x, y, np.ones_like(x)], axis=2).astype(np.float64)
        targets = -(x * x + y * y).astype(np.float64)
        for i, design, target, rays in zip(members, designs, targets, hits.any(axis=2),
                                           strict=True):
            rays = np.flatnonzero(rays)
            if rays.size < 12:
                continue
            design, target = design[rays], target[rays]
            try:  # x^2 + y^2 + d x + e y + f = 0, by the normal equations (Kasa's fit)
                d, e, f = np.linalg.solve(design.T @ design, design.T @ target)
            except np.linalg.LinAlgError:
                continue
            (x0, y0), r0 = rings[i]
            cx, cy = -d / 2.0, -e / 2.0
            r2 = cx * cx + cy * cy - f
            if r2 <= 0.0 or math.hypot(cx - x0, cy - y0) > 0.25 * r0:
                continue
            fits.append((cx, cy))
            second.append(np.arange(max(math.sqrt(r2) - 2.0, 1.0), math.sqrt(r2) + 2.5, 1.0,
                                    dtype=np.float32))
            which.append(i)
    out: list[tuple[float, float, float, float] | None] = [None] * len(rings)
    for members, hits in _grouped(field, fits, second):
        for m, n in zip(members, _sector_counts(hits).tolist(), strict=True):
            j = len(n) - 1 - n[::-1].index(max(n))  # the outermost of the best
            cx, cy = fits[m]
            out[which[m]] = float(cx), float(cy), float(second[m][j]), n[j] / _SECTORS
    return out


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


# --------------------------------------------------------------------------------------------
# The second look: close crops
#
# Clinics often store the embryo cropped close: it fills the frame, no well ring, the zona
# touching or leaving the frame, a grey background. The first look then fails twice over: the
# embryo's textured inside raises the median gradient, so the zona's faint outline no longer
# counts as strong, and the rays where the zona leaves the frame count as misses (on the shared
# samples cropped close, 30-70% were flagged). The second look asks the same question, an
# outline facing the centre all the way round, of such images only: one large ring about the
# middle of the frame (radius 35-65% of the shorter side, centre within 25% of it of the
# middle), the edge floor at twice the lower quartile of the gradient instead of twice the
# median, and support counted only on the rays that fall inside the frame (at least half of
# them must). Lowering the floor lets noise and clutter meet rings by chance too, so a ring
# must also show two things chance rarely gives together:
#   - ring evidence: at least CLOSE_SUPPORT of its seen rays meet it, the outline there is an
#     edge, not a slope (`_sharp`: a vignette or a blurred blob has a ring of steepest slope),
#     and the support plus its support on thin connected edges (Canny, hysteresis) reaches
#     RING_EVIDENCE (clutter meets a ring in scattered crumbs, a zona as one line); or
#   - arc evidence: a long smooth round arc (a connected Canny edge fitting a circle within
#     1.5 px, its gradients facing that circle's centre, `_arc_circles`) covers ARC_COVER of
#     its circle, and ring support plus that cover reach ARC_EVIDENCE. This is what a zona
#     squeezed against the frame on all sides leaves: arcs in the corners.
# Renderings of 150 overlapping shapes, blurred and noisy, remain the hardest case: 4% of them
# still pass (2.4% passed the first look alone before), against none of the flat, noise, grid,
# text, stripe or gradient renderings (benchmarks/no_embryo_real.py, 8 seeds).


def _close_ring(work: np.ndarray, grads: _Grads) -> tuple[float, float, float] | None:
    """(cx, cy, r) in working pixels of a frame-filling embryo's outline, or None."""
    h, w = work.shape
    short = min(h, w)
    if short < 16:
        return None
    gx, gy, mag = grads
    flat = mag.ravel()
    k = int(flat.size * CLOSE_QUANTILE)
    strong = flat >= max(2.0 * float(np.partition(flat, k)[k]), 0.05)
    pool = np.flatnonzero(strong)
    if pool.size < 16:
        return None
    if pool.size > N_VOTERS:
        pool = pool[:: -(-pool.size // N_VOTERS)]
    unit = np.array([gx.ravel()[pool], gy.ravel()[pool]]) / flat[pool]
    if _grid_like(unit[0], unit[1]):
        return None
    rmin, rmax = CLOSE_RADII[0] * short, CLOSE_RADII[1] * short
    limit = CLOSE_CENTRE * short
    centres = [c for c in _centres(w, h, pool, unit, rmin, rmax)
               if math.hypot(c[0] - w / 2, c[1] - h / 2) <= limit]
    centres += [(w / 2 + dx * w, h / 2 + dy * h) for dx in CLOSE_GRID for dy in CLOSE_GRID]
    field = _field(gx, gy, mag, strong)
    support, tried, thin = 0.0, [], None
    for share, circle, met in _close_candidates(field, w, h, centres, rmin, rmax, limit):
        support = max(support, share)
        if share < CLOSE_SUPPORT or any(_same_ring(circle, t) for t in tried):
            continue
        tried.append(circle)
        if _sharp(mag, circle, met) < SHARP_RATIO:
            continue
        thin = _canny_field(grads) if thin is None else thin
        if share + _fit_radius(thin, w, h, circle, MIN_SEEN)[0] >= RING_EVIDENCE:
            return circle
    arcs = _arc_circles(grads, short)
    if arcs and thin is None:
        thin = _canny_field(grads)
    for circle in arcs:
        cover, fitted, met = _fit_radius(thin, w, h, circle, MIN_ARC_SEEN)
        if (cover >= ARC_COVER and support + cover >= ARC_EVIDENCE
                and _sharp(mag, fitted, met) >= SHARP_RATIO):
            return fitted
    return None


def _support(
    field: _Field, w: int, h: int, centres: np.ndarray, radii: np.ndarray, min_seen: int,
    step: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(share, hit, seen) for rings about `centres` (C, 2) float32 with radii (C or 1, R)
    float32: per centre and radius the share of the rays inside the frame (at least BORDER px
    in) that meet an edge within 1 px, 0 where fewer than `min_seen` are inside; and the
    (C, rays, R) hit and inside masks. `step` 2: every other ray."""
    gx, gy, least, _, lim = field
    xy = (centres.T[:, :, None, None] + _offsets(radii, step)).astype(np.int32)
    # As _edge_hits, sharing the ray points with the inside test: x - BORDER read as unsigned
    # is below w - 2 BORDER exactly where BORDER <= x < w - BORDER (x truncated, as the points).
    at = xy.view(np.uint32)
    idx = at[1] * np.uint32(w)
    idx += at[0]
    np.putmask(idx, (at >= lim).any(axis=0), least.size - 1)
    radial = gx.take(idx, mode="clip") * _COS[::step, None]
    radial += gy.take(idx, mode="clip") * _SIN[::step, None]
    hit = np.abs(radial, out=radial) >= least.take(idx)
    xy -= BORDER
    seen = at[0] < np.uint32(w - 2 * BORDER)
    seen &= at[1] < np.uint32(h - 2 * BORDER)
    band = hit.copy()
    band[..., 1:] |= hit[..., :-1]
    band[..., :-1] |= hit[..., 1:]
    n_seen = seen.sum(axis=1)
    met = (band & seen).sum(axis=1)
    share = np.where(n_seen >= min_seen // step, met / np.maximum(n_seen, 1), 0.0)
    return share, hit, seen


def _close_candidates(
    field: _Field, w: int, h: int, centres: list[tuple[float, float]], rmin: float,
    rmax: float, limit: float,
) -> Iterator[tuple[float, tuple[float, float, float], np.ndarray]]:
    """(share, (cx, cy, r), met) of up to CLOSE_RINGS rings, one per centre (met: the rays
    meeting the ring within 1 px inside the frame, as `_polish`): a coarse pass (32 rays,
    radii 2 px apart: the 1 px band still covers every radius) picks each centre's radius; the
    rings with a coarse support of at least CLOSE_COARSE are then re-centred twice on their own
    edge points and polished by trying the centres and radii within 2 px, on all 64 rays. Lazy,
    best coarse support first: the best ring alone (it is the one accepted in 97% of the real
    close crops), then the others together, best polished first."""
    radii = np.arange(rmin, rmax, 2.0, dtype=np.float32)
    at = np.array(centres, np.float32)
    coarse, _, _ = _support(field, w, h, at, radii[None, :], MIN_SEEN, step=2)
    best = coarse.max(axis=1)
    order = [i for i in np.argsort(-best, kind="stable")[:CLOSE_RINGS]
             if best[i] >= CLOSE_COARSE]
    rings = [(float(at[i, 0]), float(at[i, 1]), float(radii[coarse[i].argmax()]))
             for i in order]
    if not rings:
        return
    first = _recentre(field, w, h, rings[:1], limit)
    yield from _polish(field, w, h, first)
    others = _recentre(field, w, h, rings[1:], limit) if len(rings) > 1 else []
    distinct: list[tuple[float, float, float]] = []
    for ring in others:  # rings re-centred onto one already tried are not polished again
        if not any(_same_ring(ring, done) for done in first + distinct):
            distinct.append(ring)
    if distinct:
        yield from sorted(_polish(field, w, h, distinct), key=lambda t: -t[0])


def _same_ring(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    return math.hypot(a[0] - b[0], a[1] - b[1]) <= 1.5 and abs(a[2] - b[2]) <= 1.5


_POLISH = np.arange(-2.0, 2.5, 1.0, dtype=np.float32)
_POLISH_SHIFTS = np.array([(dx, dy) for dx in _POLISH for dy in _POLISH], np.float32)


def _polish(
    field: _Field, w: int, h: int, rings: list[tuple[float, float, float]]
) -> list[tuple[float, tuple[float, float, float], np.ndarray]]:
    """(share, ring, met) for each ring moved to the best supported of the centres within 2 px
    (whole px) and radii within 2 px of its own (one ray search for all); met: the rays that
    meet it within 1 px inside the frame."""
    k = _POLISH_SHIFTS.shape[0]
    centres = np.concatenate([_POLISH_SHIFTS + np.array([x, y], np.float32) for x, y, _ in rings])
    radii = np.repeat(np.array([r + _POLISH for _, _, r in rings], np.float32), k, axis=0)
    share, hit, seen = _support(field, w, h, centres, radii, MIN_SEEN)
    out = []
    for n in range(len(rings)):
        block = share[n * k:(n + 1) * k]
        i, j = np.unravel_index(int(block.argmax()), block.shape)
        row = n * k + i
        c = centres[row]
        out.append((float(block[i, j]), (float(c[0]), float(c[1]), float(radii[row, j])),
                    _met(hit[row], seen[row], j)))
    return out


def _met(hit: np.ndarray, seen: np.ndarray, j: int) -> np.ndarray:
    """(rays,) bool: the rays meeting radius column `j` within 1 px (columns 1 px apart), inside
    the frame."""
    near = slice(max(j - 1, 0), j + 2)
    return (hit[:, near] & seen[:, near]).any(axis=1)


def _recentre(
    field: _Field, w: int, h: int, rings: list[tuple[float, float, float]], limit: float,
    times: int = 2,
) -> list[tuple[float, float, float]]:
    """Each ring (cx, cy, r) re-centred `times` times on the edge points it meets within 3 px
    inside the frame (Kasa's least-squares circle; one ray search for all rings each time);
    unchanged where under 12 rays meet it, the fit fails, or the centre would move over r/4 or
    beyond `limit` of the image centre."""
    step = np.arange(-3.0, 3.5, 1.0, dtype=np.float32)
    for _ in range(times):
        centres = np.array([(x, y) for x, y, _ in rings], np.float32)
        radii = np.array([r + step for _, _, r in rings], np.float32)
        _, hit, seen = _support(field, w, h, centres, radii, 0)
        hit &= seen
        rings = [_kasa(ring, hit[n], radii[n], step, w, h, limit) for n, ring in enumerate(rings)]
    return rings


def _kasa(ring: tuple[float, float, float], hit: np.ndarray, radii: np.ndarray,
          step: np.ndarray, w: int, h: int, limit: float) -> tuple[float, float, float]:
    """One `_recentre` step for one ring: `hit` (rays, radii) about it."""
    x0, y0, r0 = ring
    rays = np.flatnonzero(hit.any(axis=1))
    if rays.size < 12:
        return ring
    on = radii[np.where(hit[rays], np.abs(step), np.inf).argmin(axis=1)]
    x = x0 + on * _COS[rays]
    y = y0 + on * _SIN[rays]
    design = np.stack([x, y, np.ones_like(x)], axis=1).astype(np.float64)
    target = -(x * x + y * y).astype(np.float64)
    try:
        d, e, f = np.linalg.solve(design.T @ design, design.T @ target)
    except np.linalg.LinAlgError:
        return ring
    cx, cy = -d / 2.0, -e / 2.0
    r2 = cx * cx + cy * cy - f
    if (r2 <= 0.0 or math.hypot(cx - x0, cy - y0) > 0.25 * r0
            or math.hypot(cx - w / 2, cy - h / 2) > limit):
        return ring
    return float(cx), float(cy), math.sqrt(r2)


def _sharp(mag: np.ndarray, circle: tuple[float, float, float], met: np.ndarray) -> float:
    """How much steeper the outline is than its surroundings: on the rays meeting `circle`
    (`met`, from `_met`), the mean gradient at the circle (the most of r - 1, r, r + 1) over the
    mean of the lower of the gradients 4 px further in and out. An edge stands out (real zonas
    >= 1.8, mostly > 2.5); a vignette or a blurred blob has a ring of steepest slope but no
    edge (<= 1.5)."""
    rays = np.flatnonzero(met)
    if rays.size == 0:
        return 0.0
    h, w = mag.shape
    cx, cy, r = circle
    radii = np.array([r - 4.0, r - 1.0, r, r + 1.0, r + 4.0], np.float32)
    x = (cx + np.outer(_COS[rays], radii)).astype(np.intp)
    y = (cy + np.outer(_SIN[rays], radii)).astype(np.intp)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    at = np.where(inside, mag[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)], 0.0)
    return float(at[:, 1:4].max(axis=1).mean() / (np.minimum(at[:, 0], at[:, 4]).mean() + 1e-6))


def _canny_field(grads: _Grads) -> _Field:
    """The ray-search field of `grads` with thin edges: Canny (hysteresis at 1 and 2 x the
    median gradient) grown by 1 px."""
    gx, gy, mag = grads
    return _field(gx, gy, mag, cv2.dilate(_canny(grads), np.ones((3, 3), np.uint8)).ravel() > 0)


def _canny(grads: _Grads) -> np.ndarray:
    gx, gy, mag = grads
    flat = mag.ravel()
    half = flat.size // 2  # the median's upper element, found as in `_voters`
    median = float(np.partition(flat.view(np.int32), half)[half : half + 1].view(np.float32)[0])
    # Canny takes 16-bit gradients; x 4 keeps a quarter grey level of precision.
    dx, dy = (np.clip(4.0 * g, -32767, 32767).astype(np.int16) for g in (gx, gy))
    return cv2.Canny(dx, dy, 4.0 * median, 8.0 * median, L2gradient=True)


def _arc_circles(grads: _Grads, short: int) -> list[tuple[float, float, float]]:
    """Circles (cx, cy, r) of the longest smooth round arcs, longest first (at most ARC_LIMIT):
    connected Canny edges of at least ARC_MIN_PIXELS px that fit a circle of radius ARC_RADII
    x the shorter side, centred within ARC_CENTRE of the middle, within ARC_MAX_RMS px, whose
    gradients face its centre (mean |cos| >= ARC_COHERENCE), spanning >= ARC_MIN_SPAN of 64
    directions. All arcs are fitted at once (Kasa's circle from per-arc sums)."""
    gx, gy, mag = grads
    h, w = mag.shape
    n, labels = cv2.connectedComponents(_canny(grads), connectivity=8)
    ys, xs = np.nonzero(labels)
    if xs.size == 0:
        return []
    count = np.bincount(labels[ys, xs], minlength=n)
    count[0] = 0
    long_ = np.flatnonzero(count >= ARC_MIN_PIXELS)
    if long_.size == 0:
        return []
    index = np.zeros(n, np.intp)  # edge labels renumbered 0..K-1 over the long arcs, K others
    index[:] = long_.size
    index[long_] = np.arange(long_.size)
    lab = index[labels[ys, xs]]
    keep = lab < long_.size
    lab, xs, ys = lab[keep], xs[keep], ys[keep]
    x, y = xs.astype(np.float64), ys.astype(np.float64)
    z = x * x + y * y

    def total(v: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=v, minlength=long_.size)

    count = count[long_].astype(np.float64)
    sx, sy, sxx, syy, sxy, sz, sxz, syz = (total(v) for v in (x, y, x * x, y * y, x * y, z,
                                                                 x * z, y * z))
    a = np.stack([np.stack([sxx, sxy, sx], -1), np.stack([sxy, syy, sy], -1),
                  np.stack([sx, sy, count], -1)], -2)
    usable = np.abs(np.linalg.det(a)) > 1e-6
    a[~usable] = np.eye(3)
    d, e, f = np.linalg.solve(a, -np.stack([sxz, syz, sz], -1)[..., None])[..., 0].T
    cx, cy = -d / 2.0, -e / 2.0
    r = np.sqrt(np.maximum(cx * cx + cy * cy - f, 0.0))
    usable &= (r >= ARC_RADII[0] * short) & (r <= ARC_RADII[1] * short)
    usable &= np.hypot(cx - w / 2, cy - h / 2) <= ARC_CENTRE * short
    if not usable.any():
        return []
    keep = usable[lab]
    lab, x, y, xs, ys = lab[keep], x[keep], y[keep], xs[keep], ys[keep]
    dx, dy = x - cx[lab], y - cy[lab]
    dist = np.hypot(dx, dy)
    rms = np.sqrt(total((dist - r[lab]) ** 2) / count)
    g = np.array([gx[ys, xs], gy[ys, xs]], np.float64)
    facing = np.abs(g[0] * dx + g[1] * dy) / (np.hypot(g[0], g[1]) * dist + 1e-9)
    coherence = total(facing) / count
    bins = ((np.arctan2(dy, dx) + math.pi) / (2 * math.pi) * 64).astype(np.intp) % 64
    span = np.bincount(np.unique(lab * 64 + bins) // 64, minlength=long_.size)
    arcs = np.flatnonzero(usable & (rms <= ARC_MAX_RMS) & (coherence >= ARC_COHERENCE)
                          & (span >= ARC_MIN_SPAN))
    arcs = arcs[np.argsort(-span[arcs], kind="stable")][:ARC_LIMIT]
    return [(float(cx[i]), float(cy[i]), float(r[i])) for i in arcs]


def _fit_radius(field: _Field, w: int, h: int, circle: tuple[float, float, float],
                min_seen: int) -> tuple[float, tuple[float, float, float], np.ndarray]:
    """The best support within 2 px of `circle`'s radius, that circle, and the rays meeting it
    (`_met`)."""
    cx, cy, r = circle
    radii = np.arange(r - 2.0, r + 2.5, 1.0, dtype=np.float32)
    share, hit, seen = _support(field, w, h, np.array([[cx, cy]], np.float32), radii[None, :],
                                min_seen)
    j = int(share[0].argmax())
    return float(share[0, j]), (cx, cy, float(radii[j])), _met(hit[0], seen[0], j)
