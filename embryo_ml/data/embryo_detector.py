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

The looks live in their own modules, on shared pieces: `embryo_ml.data.detector_edges` (the
gradients, the strong edges and the screen), `embryo_ml.data.detector_rays` (the ray geometry and
the centre vote), `embryo_ml.data.detector_first_look` and `embryo_ml.data.detector_close_look`.
This module puts them in order.

numpy, OpenCV and the standard library only: the scoring path imports neither torch nor mlflow.
"""

from __future__ import annotations

import numpy as np

from embryo_ml.data.detector_close_look import _close_ring
from embryo_ml.data.detector_edges import _gradients, _no_embryo_edges, _voters
from embryo_ml.data.detector_first_look import (
    MAX_RADIUS,
    MIN_RADIUS,
    MIN_SUPPORT,
    _best_circle,
    _first_look,
    _search,
)
from embryo_ml.data.working_image import _detection_image, _gray, _working

__all__ = ["MAX_RADIUS", "MIN_RADIUS", "find_embryo"]


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

