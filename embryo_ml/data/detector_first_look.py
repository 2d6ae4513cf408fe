"""The embryo detector's first look, for whole wells and loosely framed embryos.

Centres come from a Hough-style vote of edge pixels along their gradients
(`embryo_ml.data.detector_rays._centres`); each candidate is then checked ray by ray for an edge
that faces the centre all the way round (radius 15-60% of the shorter side, found in at least
MIN_SUPPORT of the sectors). A blank field has no edges, noise has edges facing every way, a
grid has edges in two directions only; a zona has one facing the centre in every direction.
Rings found about the coarse vote grid's centres are re-centred on their own edge points
(`_refine`). `image_flags`, which only asks whether there is an embryo, stops at the first
well-supported ring (`_first_look`).

numpy, OpenCV and the standard library only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from embryo_ml.data.detector_edges import _gradients, _Grads, _grid_like, _Voters, _voters
from embryo_ml.data.detector_rays import (
    _COS,
    _SECTORS,
    _SIN,
    _centres,
    _edge_hits,
    _Field,
    _field,
    _offsets,
    _ray_table,
    _sector_counts,
)

MIN_RADIUS, MAX_RADIUS = 0.15, 0.60  # embryo-sized: radius as a share of the shorter side
MIN_SUPPORT = 0.7  # share of sectors the outline must be found in
REFINE_FROM = 0.4  # rings supported this well are re-centred and kept as candidates

# What the ray checks need: the field, the centres, the radii and the ray offsets.
_Search = tuple[_Field, list[tuple[float, float]], list[float], np.ndarray]


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


def _first_look(search: _Search | None) -> Iterator[bool]:
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


def _search(
    work: np.ndarray, grads: _Grads | None = None, voters: _Voters | None = None
) -> _Search | None:
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
