"""The embryo detector's second look, for close crops whose zona touches or leaves the frame.

Clinics often store the embryo cropped close: it fills the frame, no well ring, the zona
touching or leaving the frame, a grey background. The first look then fails twice over: the
embryo's textured inside raises the median gradient, so the zona's faint outline no longer
counts as strong, and the rays where the zona leaves the frame count as misses (on the shared
samples cropped close, 30-70% were flagged). The second look asks the same question, an
outline facing the centre all the way round, of such images only: one large ring about the
middle of the frame (radius 35-65% of the shorter side, centre within 25% of it of the
middle), the edge floor at twice the lower quartile of the gradient instead of twice the
median, and support counted only on the rays that fall inside the frame (at least half of
them must). Lowering the floor lets noise and clutter meet rings by chance too, so a ring
must also show two things chance rarely gives together:
  - ring evidence: at least CLOSE_SUPPORT of its seen rays meet it, the outline there is an
    edge, not a slope (`_sharp`: a vignette or a blurred blob has a ring of steepest slope),
    and the support plus its support on thin connected edges (Canny, hysteresis) reaches
    RING_EVIDENCE (clutter meets a ring in scattered crumbs, a zona as one line); or
  - arc evidence: a long smooth round arc (a connected Canny edge fitting a circle within
    1.5 px, its gradients facing that circle's centre, `_arc_circles`) covers ARC_COVER of
    its circle, and ring support plus that cover reach ARC_EVIDENCE. This is what a zona
    squeezed against the frame on all sides leaves: arcs in the corners.
Renderings of 150 overlapping shapes, blurred and noisy, remain the hardest case: 4% of them
still pass (2.4% passed the first look alone before), against none of the flat, noise, grid,
text, stripe or gradient renderings (benchmarks/no_embryo_real.py, 8 seeds).

numpy, OpenCV and the standard library only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np

from embryo_ml.data.detector_edges import N_VOTERS, _Grads, _grid_like
from embryo_ml.data.detector_rays import _COS, _SIN, _centres, _Field, _field, _offsets

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
