"""Procedural embryo-like microscopy images: the built-in demo and test data set.

Every image shows a zona pellucida ring holding either a day-3 cleavage-stage embryo (round
blastomeres, fragments) or a day-5 blastocyst (blastocoel, inner cell mass, trophectoderm), drawn
in a Hoffman-modulation-contrast look on a grey culture medium, with focal blur, illumination
gradients, sensor noise, random placement and rotation.

The `good`/`poor` label follows visible morphology only (fragmentation, cell-size symmetry,
blastocyst expansion, ICM compactness, TE regularity). Everything else (brightness, illumination,
blur, noise, position, zona size, day) is drawn from the same distributions for both classes, and
the mean and spread of grey levels inside the zona are set to class-independent targets, so a
model cannot score well from global intensity. Embryos of one patient share a culture-medium tone
and illumination direction (derived from the patient id), as in one dish on one microscope.

Day-5 expansion is drawn from 1-5 (5 = hatching through a gap in the zona); 6 (fully hatched, no
zona around the embryo) is a valid grade but never drawn, since every image shows a zona.
Rendering is deterministic given (spec, size, focal plane) on one installation; float kernels in
OpenCV may differ in the last bit between CPU types or OpenCV versions.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from embryo_ml.fileio import atomic_open, atomic_write_bytes

__all__ = [
    "CLASSES",
    "FOCAL_STEP",
    "EmbryoSpec",
    "focal_plane_offsets",
    "gardner_grade",
    "generate_dataset",
    "render_embryo",
    "sample_embryo",
]

CLASSES = ("good", "poor")
DAYS = (3, 5)
_CONTRAST = {3: 14.5, 5: 9.0}  # reference grey-level std inside the zona, per day (class-free)
FOCAL_STEP = 15  # microns between focal planes, as on time-lapse incubators
MANIFEST_FIELDS = ("path", "label", "patient_id", "embryo_id", "day", "focal_plane", "grade")

Ellipse = tuple[float, float, float, float, float]  # x, y, semi-axis a, semi-axis b, angle
Circle = tuple[float, float, float]  # x, y, radius
Point = tuple[float, float]


@dataclass(frozen=True)
class EmbryoSpec:
    """Everything needed to redraw one embryo; shared by all of its focal planes.

    Lengths are in units of the zona's outer radius, positions relative to the zona centre and
    before the image rotation; grey levels are 8-bit units.
    """

    embryo_id: str
    patient_id: str
    label: str
    day: int
    grade: str
    seed: int
    # Imaging (same distributions for both classes).
    offset: Point = (0.0, 0.0)  # zona centre shift, fraction of the image side
    rotation: float = 0.0  # radians
    zona_radius: float = 0.4  # outer radius, fraction of the image side
    medium: float = 130.0  # culture-medium grey level
    interior_shift: float = 4.0  # mean grey inside the zona minus `medium`
    interior_contrast: float = 12.0  # grey-level std inside the zona (before blur and noise)
    zona_brightness: float = 18.0
    illumination: str = "linear"  # "linear" or "radial"
    illumination_strength: float = 0.1
    illumination_angle: float = 0.0
    blur: float = 0.4  # in-focus blur sigma, pixels at 128 px
    noise: float = 2.0  # sensor noise sigma at medium grey
    relief: float = 1.0  # strength of the modulation-contrast shading
    relief_angle: float = 0.0
    # Morphology.
    zona_thickness: float = 0.15
    zona_wobble: tuple[tuple[int, float, float], ...] = ()  # (order, amplitude, phase)
    zona_gap: tuple[float, float] | None = None  # (angle, half-width): hatching opening
    cells: tuple[Ellipse, ...] = ()  # day-3 blastomeres, drawn in order
    fragments: tuple[Circle, ...] = ()
    fragmentation: float = 0.0  # fragment area / embryo area
    size_cv: float = 0.0  # coefficient of variation of blastomere diameters
    expansion: int = 0  # Gardner expansion 1-6 on day 5, 0 on day 3
    icm_grade: str = ""
    te_grade: str = ""
    body: Circle = (0.0, 0.0, 0.0)  # blastocyst outline
    bulge: Circle | None = None  # part herniating through the zona (expansion 5)
    cavity: Circle = (0.0, 0.0, 0.0)  # blastocoel
    mass_cells: tuple[Point, ...] = ()  # compacting cell mass around a small cavity (exp. 1-2)
    icm_cells: tuple[Circle, ...] = ()  # inner-cell-mass cells (Voronoi seeds with a reach)
    te_cells: tuple[Circle, ...] = ()  # trophectoderm cells: seed on the outline, thickness
    te_gaps: tuple[tuple[float, float], ...] = ()  # (angle, half-width) arcs without TE
    collapse: float = 0.0  # how far the outline sinks at TE gaps, fraction of its radius


# --------------------------------------------------------------------------------------------
# Sampling


def _patient_style(patient_id: str) -> np.random.Generator:
    """One patient's embryos share a dish and a session: derive their common imaging style from
    the id, so patient-grouped splits see realistic between-patient shifts (class-free)."""
    return np.random.default_rng(zlib.crc32(patient_id.encode("utf-8")))


def _sample_imaging(rng: np.random.Generator, patient_id: str) -> dict[str, object]:
    style = _patient_style(patient_id)
    medium = style.uniform(112.0, 150.0) + rng.normal(0.0, 3.0)
    illum_angle = style.uniform(0.0, 2 * math.pi) + rng.normal(0.0, 0.3)
    radial = bool(style.random() < 0.4)
    return {
        "offset": (float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05))),
        "rotation": float(rng.uniform(0.0, 2 * math.pi)),
        "zona_radius": float(rng.uniform(0.37, 0.43)),
        "medium": float(medium),
        "interior_shift": float(rng.uniform(-3.0, 9.0)),
        "interior_contrast": float(rng.uniform(0.8, 1.25)),  # times the day's reference
        "zona_brightness": float(rng.uniform(12.0, 24.0)),
        "illumination": "radial" if radial else "linear",
        "illumination_strength": float(rng.uniform(0.04, 0.22)),
        "illumination_angle": float(illum_angle),
        "blur": float(rng.uniform(0.15, 0.6)),
        "noise": float(rng.uniform(0.6, 2.4)),
        "relief": float(rng.uniform(0.7, 1.3)),
        "relief_angle": float(style.uniform(0.0, 2 * math.pi) + rng.normal(0.0, 0.2)),
        "zona_thickness": float(rng.uniform(0.12, 0.17)),
        "zona_wobble": tuple(
            (int(k), float(rng.uniform(0.002, 0.012)), float(rng.uniform(0, 2 * math.pi)))
            for k in rng.choice(np.arange(2, 9), size=3, replace=False)
        ),
    }


def _relax(pos: np.ndarray, radii: np.ndarray, limit: float, overlap: float) -> np.ndarray:
    """Push discs apart until neighbours overlap by at most `overlap` of their radii, keeping each
    inside a disc of radius `limit`: a cheap stand-in for cells packed in the zona."""
    reach = np.maximum(limit - radii, 0.0)[:, None]
    target = (radii[:, None] + radii[None, :]) * (1 - overlap)
    np.fill_diagonal(target, 0.0)
    for _ in range(40):
        norm = np.sqrt(np.einsum("ij,ij->i", pos, pos))[:, None]
        pos = pos * np.minimum(1.0, reach / np.maximum(norm, 1e-9))
        delta = pos[:, None, :] - pos[None, :, :]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", delta, delta)) + 1e-6
        push = np.maximum(target - dist, 0.0)
        if push.max() < 1e-3:
            break
        pos = pos + 0.5 * np.einsum("ijk,ij->ik", delta, push / dist)
    norm = np.sqrt(np.einsum("ij,ij->i", pos, pos))[:, None]
    return pos * np.minimum(1.0, reach / np.maximum(norm, 1e-9))


def _disc_points(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    ang = rng.uniform(0, 2 * math.pi, n)
    rad = radius * np.sqrt(rng.uniform(0, 1, n))
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


def _sample_fragments(
    rng: np.random.Generator, area: float, inner: float, r_range: tuple[float, float]
) -> tuple[Circle, ...]:
    """Small anucleate blebs covering `area`, mostly clustered as in real fragmented embryos."""
    frags: list[Circle] = []
    covered = 0.0
    centres = _disc_points(rng, int(rng.integers(1, 4)), inner * 0.75)
    while covered < area:
        r = float(rng.uniform(*r_range))
        if rng.random() < 0.65:
            c = centres[rng.integers(len(centres))]
            p = c + rng.normal(0.0, inner * 0.22, 2)
        else:
            p = _disc_points(rng, 1, inner)[0]
        lim = inner * 0.96 - r
        norm = float(np.hypot(*p))
        if norm > lim:
            p = p * (lim / norm)
        frags.append((float(p[0]), float(p[1]), r))
        covered += math.pi * r * r
    return tuple(frags)


def _sample_cleavage(rng: np.random.Generator, label: str, zona_t: float) -> dict[str, object]:
    inner = 1.0 - zona_t
    if label == "good":
        n = int(rng.choice([6, 7, 8, 8, 8, 8, 9, 10]))
        cv = rng.uniform(0.02, 0.13)
        frag = 0.10 * rng.uniform(0.0, 1.0) ** 2
    else:
        mode = rng.choice(3)  # 0 uneven, 1 fragmented, 2 both
        n = int(rng.choice([2, 3, 3, 4, 4, 5, 5, 5, 6, 6, 7, 8]))
        uneven = mode in (0, 2)
        cv = rng.uniform(0.27, 0.5) if uneven else rng.uniform(0.03, 0.2)
        frag = 0.15 + 0.30 * math.sqrt(rng.uniform()) if mode in (1, 2) else rng.uniform(0.02, 0.12)
    embryo_r = inner * rng.uniform(0.82, 0.92)
    if n > 1:
        z = rng.normal(size=n)
        z = (z - z.mean()) / max(z.std(), 1e-6)
        factors = np.clip(1.0 + cv * z, 0.35, None)
    else:
        factors = np.ones(1)
    real_cv = float(factors.std() / factors.mean())
    # Cleavage divides a fixed volume; fragments take their share of it.
    scale = embryo_r * ((1.0 - 0.6 * frag) / (factors**3).sum()) ** (1 / 3)
    radii = factors * scale
    pos = _disc_points(rng, n, embryo_r * 0.6)
    pos = _relax(pos, radii, inner * 0.97, overlap=0.3 if n <= 4 else 0.45)
    cells = []
    for (x, y), r in zip(pos, radii, strict=True):
        aspect = rng.uniform(1.0, 1.18)
        cells.append((float(x), float(y), float(r * math.sqrt(aspect)),
                      float(r / math.sqrt(aspect)), float(rng.uniform(0, math.pi))))
    order = rng.permutation(n)
    frag_area = frag * math.pi * embryo_r**2
    r_range = (0.035, 0.075) if frag < 0.15 else (0.04, 0.10)
    fragments = _sample_fragments(rng, frag_area, inner, r_range) if frag_area > 0 else ()
    return {
        "cells": tuple(cells[i] for i in order),
        "fragments": fragments,
        "fragmentation": float(frag),
        "size_cv": real_cv,
    }


def _ring_seeds(
    rng: np.random.Generator, centre: Point, radius: float, count: int, jitter: float,
    thick: float, thick_range: tuple[float, float], skip: Circle | None = None,
) -> list[Circle]:
    """Seeds for flattened cells lining a circle (TE), optionally skipping a covered part."""
    start = rng.uniform(0, 2 * math.pi)
    step = 2 * math.pi / count
    seeds: list[Circle] = []
    for i in range(count):
        a = start + step * (i + rng.uniform(-jitter, jitter))
        x, y = centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a)
        if skip is not None and math.hypot(x - skip[0], y - skip[1]) < skip[2]:
            continue
        seeds.append((x, y, thick * float(rng.uniform(*thick_range))))
    return seeds


def _sample_gardner(rng: np.random.Generator, label: str) -> tuple[int, str, str]:
    """Expansion, ICM and TE grades: good = a full blastocyst graded A/B; poor = an early one
    (expansion 1-2, no letters) or a full one with a C somewhere."""
    if label == "good":
        expansion = int(rng.choice([3, 4, 5], p=[0.35, 0.45, 0.2]))
        icm, te = str(rng.choice(["A", "B"])), str(rng.choice(["A", "B"]))
    elif rng.random() < 0.45:
        expansion, icm, te = int(rng.choice([1, 2])), "", ""
    else:
        expansion = int(rng.choice([3, 4, 5], p=[0.5, 0.4, 0.1]))
        combo = rng.choice(3, p=[0.4, 0.25, 0.35])
        icm = "C" if combo in (0, 2) else str(rng.choice(["A", "B"]))
        te = "C" if combo in (1, 2) else str(rng.choice(["A", "B"]))
    return expansion, icm, te


@dataclass(frozen=True)
class _Body:
    """A blastocyst's outline and orientation, the frame every later draw is placed in."""

    centre: Point
    radius: float
    phi: float  # angle towards the ICM / cell mass
    towards_icm: Point  # unit vector at angle `phi`
    te_thickness: float


def _sample_body(rng: np.random.Generator, expansion: int, te: str, inner: float) -> _Body:
    fill = {1: (0.78, 0.88), 2: (0.86, 0.94), 3: (0.95, 0.99)}.get(expansion, (0.985, 1.0))
    body_r = inner * rng.uniform(*fill)  # how much of the zona the blastocyst fills
    shift = _disc_points(rng, 1, max(inner * 0.98 - body_r, 0.0))[0]
    cb = (float(shift[0]), float(shift[1]))
    phi = rng.uniform(0, 2 * math.pi)
    u = (math.cos(phi), math.sin(phi))
    te_t = body_r * (rng.uniform(0.07, 0.085) if te == "A" else rng.uniform(0.07, 0.095))
    return _Body(centre=cb, radius=body_r, phi=phi, towards_icm=u, te_thickness=te_t)


def _sample_hatching(rng: np.random.Generator, phi: float) -> tuple[Circle, tuple[float, float]]:
    """Expansion 5: the part herniating through the zona, away from the ICM, and the gap."""
    psi = phi + math.pi + rng.uniform(-1.2, 1.2)
    rb = float(rng.uniform(0.24, 0.36))
    dist = 1.0 + rb * rng.uniform(0.1, 0.4)
    bulge = (dist * math.cos(psi), dist * math.sin(psi), rb)
    return bulge, (float(psi), float(math.asin(min(0.95, rb * 0.85))))


def _sample_early_cavity(
    rng: np.random.Generator, expansion: int, body: _Body
) -> tuple[Circle, tuple[Point, ...]]:
    """Expansion 1-2: a small cavity beside a compacting mass of cells."""
    cb, u, body_r = body.centre, body.towards_icm, body.radius
    cav_r = body_r * (rng.uniform(0.32, 0.45) if expansion == 1 else rng.uniform(0.55, 0.68))
    d = body_r - body.te_thickness - cav_r
    cavity = (cb[0] - u[0] * d, cb[1] - u[1] * d, cav_r)
    n_mass = int(rng.integers(16, 26))
    pts = _disc_points(rng, n_mass, body_r * 0.95)
    return cavity, tuple((cb[0] + float(x), cb[1] + float(y)) for x, y in pts)


def _sample_icm(rng: np.random.Generator, icm: str, body: _Body) -> tuple[Circle, ...]:
    """Inner-cell-mass cells against the TE: many and tight (A), fewer (B), a few loose (C)."""
    cb, u, body_r = body.centre, body.towards_icm, body.radius
    if icm == "A":
        n, across, depth, reach = int(rng.integers(14, 21)), 0.30, 0.20, 1.45
    elif icm == "B":
        n, across, depth, reach = int(rng.integers(8, 13)), 0.40, 0.27, 1.05
    else:
        n, across, depth, reach = int(rng.integers(2, 6)), 0.55, 0.45, 0.0
    across *= body_r * rng.uniform(0.9, 1.1)
    depth *= body_r * rng.uniform(0.9, 1.1)
    centre_d = body_r - body.te_thickness - depth * 0.8
    ic = (cb[0] + u[0] * centre_d, cb[1] + u[1] * centre_d)
    spacing = math.sqrt(math.pi * across * depth / n)
    icm_cells: list[Circle] = []
    for _ in range(n):
        a, b = _disc_points(rng, 1, 1.0)[0]
        x = ic[0] + a * across * (-u[1]) + b * depth * u[0]
        y = ic[1] + a * across * u[0] + b * depth * u[1]
        r = spacing * reach * rng.uniform(0.85, 1.15) if reach else (
            body_r * rng.uniform(0.05, 0.085))
        icm_cells.append((float(x), float(y), float(r)))
    return tuple(icm_cells)


def _sample_te_layout(
    rng: np.random.Generator, te: str, phi: float, expansion: int
) -> tuple[int, float, tuple[float, float], dict[str, object]]:
    """Trophectoderm cell count, placement jitter and thickness range; grade C also gets gaps
    in the layer and a collapsing outline (returned as spec fields)."""
    if expansion <= 2:
        return int(rng.integers(10, 15)), 0.3, (0.8, 1.3), {}
    if te == "A":
        return int(rng.integers(17, 23)), 0.1, (0.9, 1.1), {}
    if te == "B":
        return int(rng.integers(11, 16)), 0.25, (0.75, 1.3), {}
    te_count, jitter, trange = int(rng.integers(6, 10)), 0.4, (0.35, 1.9)
    gaps = []
    for _ in range(int(rng.integers(2, 4))):
        gaps.append((float(phi + math.pi + rng.uniform(-2.4, 2.4)),
                     float(rng.uniform(0.3, 0.6))))
    return te_count, jitter, trange, {"te_gaps": tuple(gaps),
                                      "collapse": float(rng.uniform(0.06, 0.14))}


def _sample_te_cells(
    rng: np.random.Generator, body: _Body, bulge: Circle | None, count: int, jitter: float,
    thick_range: tuple[float, float],
) -> tuple[Circle, ...]:
    """TE seeds around the outline, and around the herniating part when there is one."""
    te_t = body.te_thickness
    te_cells = _ring_seeds(rng, body.centre, body.radius, count, jitter, te_t, thick_range,
                           skip=bulge)
    if bulge is not None:
        te_cells += _ring_seeds(rng, bulge[:2], bulge[2], max(4, count // 3), jitter,
                                te_t, thick_range,
                                skip=(body.centre[0], body.centre[1], body.radius))
    return tuple(te_cells)


def _sample_debris(rng: np.random.Generator, icm: str, inner: float) -> tuple[Circle, ...]:
    """A few fragments in every blastocyst, more when the ICM is falling apart."""
    n_frag = int(rng.integers(0, 3)) + (int(rng.integers(3, 9)) if icm == "C" else 0)
    frags = []
    for _ in range(n_frag):
        r = float(rng.uniform(0.03, 0.06))
        p = _disc_points(rng, 1, inner * 0.93 - r)[0]
        frags.append((float(p[0]), float(p[1]), r))
    return tuple(frags)


def _sample_blastocyst(rng: np.random.Generator, label: str, zona_t: float) -> dict[str, object]:
    """Day-5 morphology as spec fields: grades, then outline, hatching, cavity and ICM, TE,
    debris (in this order: each draw consumes `rng`)."""
    expansion, icm, te = _sample_gardner(rng, label)
    zona_t *= {1: 1.0, 2: 1.0, 3: 0.9, 4: 0.65, 5: 0.5}[expansion]
    inner = 1.0 - zona_t
    body = _sample_body(rng, expansion, te, inner)
    out: dict[str, object] = {"expansion": expansion, "icm_grade": icm, "te_grade": te}
    bulge: Circle | None = None
    if expansion == 5:
        bulge, out["zona_gap"] = _sample_hatching(rng, body.phi)
    if expansion <= 2:
        cavity, out["mass_cells"] = _sample_early_cavity(rng, expansion, body)
    else:
        cavity = (body.centre[0], body.centre[1], body.radius - body.te_thickness)
        out["icm_cells"] = _sample_icm(rng, icm, body)
    te_count, jitter, trange, te_fields = _sample_te_layout(rng, te, body.phi, expansion)
    out.update(te_fields)
    out["te_cells"] = _sample_te_cells(rng, body, bulge, te_count, jitter, trange)
    out["body"] = (body.centre[0], body.centre[1], float(body.radius))
    out["bulge"] = bulge
    out["cavity"] = tuple(float(v) for v in cavity)
    out["zona_thickness"] = float(zona_t)
    out["fragments"] = _sample_debris(rng, icm, inner)
    return out


def gardner_grade(expansion: int, icm: str, te: str) -> str:
    """Gardner string: ICM and TE letters only once there is a full blastocyst (expansion >= 3)."""
    return f"{expansion}{icm}{te}" if expansion >= 3 else f"{expansion}"


def sample_embryo(
    rng: np.random.Generator, label: str, day: int, embryo_id: str, patient_id: str
) -> EmbryoSpec:
    """Draw one embryo's morphology for its label and day, plus class-free imaging conditions."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    if day not in DAYS:
        raise ValueError(f"day must be one of {DAYS}, got {day!r}")
    fields = _sample_imaging(rng, patient_id)
    fields["interior_contrast"] = float(fields["interior_contrast"]) * _CONTRAST[day]
    if day == 3:
        fields.update(_sample_cleavage(rng, label, float(fields["zona_thickness"])))
        grade = ""
    else:
        fields.update(_sample_blastocyst(rng, label, float(fields["zona_thickness"])))
        grade = gardner_grade(int(fields["expansion"]), str(fields["icm_grade"]),
                              str(fields["te_grade"]))
    seed = int(rng.integers(0, 2**31 - 1))
    return EmbryoSpec(embryo_id=embryo_id, patient_id=patient_id, label=label, day=day,
                      grade=grade, seed=seed, **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate grids, cached per size (every image of a data set shares them)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-correlated noise: cytoplasm granules and medium texture."""
    field = rng.standard_normal((size, size), dtype=np.float32)
    if sigma > 0.1:
        field = cv2.GaussianBlur(field, (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def _low_noise(rng: np.random.Generator, size: int, cells: int = 5) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


class _Frame:
    """Maps embryo units (zona outer radius, unrotated) to pixels of one image."""

    def __init__(self, spec: EmbryoSpec, size: int) -> None:
        self.size = size
        self.cx = size / 2 + spec.offset[0] * size - 0.5
        self.cy = size / 2 + spec.offset[1] * size - 0.5
        self.unit = spec.zona_radius * size
        self.rot = spec.rotation
        self.cos, self.sin = math.cos(spec.rotation), math.sin(spec.rotation)

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + self.unit * (self.cos * x - self.sin * y),
                self.cy + self.unit * (self.sin * x + self.cos * y))

    def box(self, px: float, py: float, reach: float) -> tuple[slice, slice]:
        s = self.size
        x0, x1 = max(int(px - reach) - 1, 0), min(int(px + reach) + 2, s)
        y0, y1 = max(int(py - reach) - 1, 0), min(int(py + reach) + 2, s)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _line(dist_px: np.ndarray, width: float) -> np.ndarray:
    """Soft dark line profile: 1 on the line, falling off over `width` pixels."""
    return np.exp(-((dist_px / width) ** 2))


def _draw_blob(
    img: np.ndarray, height: np.ndarray, grain: np.ndarray, frame: _Frame, ell: Ellipse,
    level: float, texture: float, membrane: float, alpha: float, px: float,
) -> None:
    """Paint one cell (ellipse) over what is below: textured cytoplasm, dark membrane, a dome in
    the height map so the relief shading gives it volume."""
    x, y, a, b, ang = ell
    cx, cy = frame.pt(x, y)
    ap, bp = a * frame.unit, b * frame.unit
    ys, xs = frame.box(cx, cy, max(ap, bp) + 2.5 * px)
    if ys.start == ys.stop or xs.start == xs.stop:
        return
    xx, yy = _grid(frame.size)
    dx, dy = xx[ys, xs] - cx, yy[ys, xs] - cy
    t = ang + frame.rot
    c, s = math.cos(t), math.sin(t)
    u = (dx * c + dy * s) / ap
    v = (-dx * s + dy * c) / bp
    d = np.sqrt(u * u + v * v)
    r_px = math.sqrt(ap * bp)
    edge = (1.0 - d) * r_px  # signed distance in pixels, approximately
    inside = np.clip(edge + 0.5, 0.0, 1.0)
    sub = img[ys, xs]
    fill = level + texture * grain[ys, xs]
    w = alpha * inside
    sub += w * (fill - sub)
    sub -= membrane * _line(edge, 0.75 * px + 0.25)
    dome = np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0)) * r_px * 0.5
    np.maximum(height[ys, xs], dome, out=height[ys, xs])


def _voronoi(
    px: np.ndarray, py: np.ndarray, sx: np.ndarray, sy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest seed, distance to it, and half the gap to the second nearest (~distance to the
    shared cell wall) for each pixel: draws packed cells with membranes."""
    d2 = (px[:, None] - sx[None, :]) ** 2 + (py[:, None] - sy[None, :]) ** 2
    idx = np.argmin(d2, axis=1)
    if d2.shape[1] > 1:
        two = np.partition(d2, 1, axis=1)
        d1, dn = np.sqrt(two[:, 0]), np.sqrt(two[:, 1])
    else:
        d1 = np.sqrt(d2[:, 0])
        dn = np.full_like(d1, 1e6)
    return idx, d1, (dn - d1) * 0.5


def _in_arcs(theta: np.ndarray, arcs: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Soft membership (0..1) of angles in a set of (centre, half-width) arcs."""
    out = np.zeros_like(theta)
    for centre, half in arcs:
        d = np.abs(np.angle(np.exp(1j * (theta - centre))))
        out = np.maximum(out, np.clip((half - d) / 0.06, 0.0, 1.0))
    return out


def _draw_zona(
    img: np.ndarray, height: np.ndarray, grain: np.ndarray, spec: EmbryoSpec, frame: _Frame,
    r: np.ndarray, theta: np.ndarray, px: float,
) -> None:
    local = theta - frame.rot
    wob = np.zeros_like(r)
    for k, amp, phase in spec.zona_wobble:
        wob += amp * np.cos(k * local + phase)
    r_out = frame.unit * (1.0 + wob)
    r_in = frame.unit * (1.0 - spec.zona_thickness + 0.8 * wob + 0.006 * grain)
    band = np.clip(r - r_in + 0.5, 0, 1) * np.clip(r_out - r + 0.5, 0, 1)
    if spec.zona_gap is not None:
        band *= 1.0 - _in_arcs(local, (spec.zona_gap,))
    thick = np.maximum(r_out - r_in, 1.0)
    # Bright, slightly striated band; brightest near its inner third, as with a real zona.
    prof = 0.75 + 0.25 * np.cos(np.clip((r - r_in) / thick, 0, 1) * math.pi * 2 - 0.8)
    img += band * (spec.zona_brightness * prof + 3.0 * grain)
    lines = _line(r - r_out, 0.8 * px + 0.3) + 0.8 * _line(r - r_in, 0.8 * px + 0.3)
    if spec.zona_gap is not None:
        lines *= 1.0 - _in_arcs(local, (spec.zona_gap,))
    img -= 14.0 * lines
    height += band * thick * 0.35


def _draw_cleavage(
    img: np.ndarray, height: np.ndarray, grain: np.ndarray, spec: EmbryoSpec, frame: _Frame,
    px: float,
) -> None:
    base = spec.medium
    for ell in spec.cells:
        _draw_blob(img, height, grain, frame, ell, base + 10.0, 5.0, 28.0, 0.82, px)
    for x, y, r in spec.fragments:
        _draw_blob(img, height, grain, frame, (x, y, r, r, 0.0), base - 2.0, 3.0, 40.0, 0.9, px)


def _blastocyst_window(
    spec: EmbryoSpec, frame: _Frame, px: float
) -> tuple[list[Circle], slice, slice] | None:
    """The outline's circles in pixels (body, then the herniating part) and the image window
    that holds them; None when the blastocyst lies outside the image."""
    bcx, bcy = frame.pt(spec.body[0], spec.body[1])
    circles = [(bcx, bcy, spec.body[2] * frame.unit)]
    if spec.bulge is not None:
        gx, gy = frame.pt(spec.bulge[0], spec.bulge[1])
        circles.append((gx, gy, spec.bulge[2] * frame.unit))
    pad = 3 * px + 1
    x0 = max(int(min(c[0] - c[2] for c in circles) - pad), 0)
    x1 = min(int(max(c[0] + c[2] for c in circles) + pad) + 1, frame.size)
    y0 = max(int(min(c[1] - c[2] for c in circles) - pad), 0)
    y1 = min(int(max(c[1] + c[2] for c in circles) + pad) + 1, frame.size)
    if x1 <= x0 or y1 <= y0:
        return None
    return circles, slice(y0, y1), slice(x0, x1)


def _outline_distance(
    spec: EmbryoSpec, frame: _Frame, circles: list[Circle], gx_: np.ndarray, gy_: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed distance to the outline in pixels (negative inside), and where the TE has gaps
    (soft membership, None without gaps)."""
    bcx, bcy = circles[0][0], circles[0][1]
    dists = [np.hypot(gx_ - cx, gy_ - cy) - cr for cx, cy, cr in circles]
    gap = None
    if spec.te_gaps:
        ang = np.arctan2(gy_ - bcy, gx_ - bcx) - frame.rot
        gap = _in_arcs(ang, spec.te_gaps)
        if spec.collapse > 0:
            # Where the TE fails the blastocoel loses pressure and the outline sinks inwards.
            sink = np.zeros_like(gap)
            for centre, half in spec.te_gaps:
                d = np.abs(np.angle(np.exp(1j * (ang - centre)))) / (half * 1.6)
                sink = np.maximum(sink, np.cos(np.clip(d, 0.0, 1.0) * math.pi / 2) ** 2)
            dists[0] = dists[0] + sink * (spec.collapse * circles[0][2])
    sdf = dists[0] if len(dists) == 1 else np.minimum(dists[0], dists[1])
    return sdf, gap


@dataclass
class _Interior:
    """The window's pixels inside a blastocyst outline, and the layers painted for the window:
    grey `value`, dark `lines` to subtract, relief `height` (all flat, per window pixel)."""

    sel: np.ndarray  # flat indices of the pixels inside the outline
    fx: np.ndarray  # their pixel coordinates
    fy: np.ndarray
    depth: np.ndarray  # their distance inside the outline
    grain: np.ndarray  # their texture
    value: np.ndarray
    lines: np.ndarray
    height: np.ndarray
    base: float  # culture-medium grey level
    thin: float  # membrane line width


def _blastocoel(
    spec: EmbryoSpec, gx_: np.ndarray, gy_: np.ndarray, gsub: np.ndarray, sdf: np.ndarray,
    inside: np.ndarray, px: float,
) -> _Interior:
    """Blastocoel: smooth, slightly darker fluid; every cell layer is painted over it."""
    base = spec.medium
    sel = np.flatnonzero(inside > 0)
    return _Interior(
        sel=sel, fx=gx_.ravel()[sel], fy=gy_.ravel()[sel], depth=-sdf.ravel()[sel],
        grain=gsub.ravel()[sel], value=(base - 3.0 + 1.2 * gsub).ravel(),
        lines=np.zeros(gsub.size, np.float32), height=(np.clip(-sdf, 0, None) * 0.08).ravel(),
        base=base, thin=0.7 * px + 0.25,
    )


def _paint_cell_mass(layers: _Interior, spec: EmbryoSpec, frame: _Frame) -> None:
    """Compacting cell mass around a small cavity (expansion 1-2)."""
    sel, fx, fy, thin = layers.sel, layers.fx, layers.fy, layers.thin
    value, lines, hval = layers.value, layers.lines, layers.height
    seeds = np.array([frame.pt(x, y) for x, y in spec.mass_cells], np.float32)
    idx, _, wall = _voronoi(fx, fy, seeds[:, 0], seeds[:, 1])
    cavx, cavy = frame.pt(spec.cavity[0], spec.cavity[1])
    cav_sdf = np.hypot(fx - cavx, fy - cavy) - spec.cavity[2] * frame.unit
    mass = np.clip(cav_sdf + 0.5, 0.0, 1.0)
    tone = np.random.default_rng(spec.seed).uniform(-3.0, 3.0, len(seeds)).astype(np.float32)
    mv = layers.base + 9.0 + tone[idx] + 5.0 * layers.grain
    value[sel] += mass * (mv - value[sel])
    lines[sel] += mass * 16.0 * _line(wall, thin) + 10.0 * _line(cav_sdf, thin + 0.1)
    hval[sel] = np.maximum(hval[sel], mass * np.clip(cav_sdf, 0, None) * 0.35)


def _paint_icm(layers: _Interior, spec: EmbryoSpec, frame: _Frame) -> None:
    """Inner cell mass: packed cells, each reaching `r` from its seed."""
    sel, thin = layers.sel, layers.thin
    value, lines, hval = layers.value, layers.lines, layers.height
    seeds = np.array([frame.pt(x, y) for x, y, _ in spec.icm_cells], np.float32)
    rads = np.array([r for _, _, r in spec.icm_cells], np.float32) * frame.unit
    idx, d1, wall = _voronoi(layers.fx, layers.fy, seeds[:, 0], seeds[:, 1])
    edge = rads[idx] - d1
    member = np.clip(edge + 0.5, 0.0, 1.0) * np.clip(layers.depth - 0.5, 0.0, 1.0)
    iv = layers.base + 24.0 + 8.0 * layers.grain
    value[sel] += member * (iv - value[sel])
    lines[sel] += member * 20.0 * _line(wall, thin) + 12.0 * _line(edge, thin + 0.1)
    dome = np.sqrt(np.clip(1 - (d1 / np.maximum(rads[idx], 1e-3)) ** 2, 0, 1)) * rads[idx]
    hval[sel] = np.maximum(hval[sel], member * dome * 0.5)


def _paint_trophectoderm(
    layers: _Interior, spec: EmbryoSpec, frame: _Frame, gap: np.ndarray | None, px: float,
) -> None:
    """Trophectoderm: thin cells lining the outline, absent along gaps."""
    thin, value, lines, hval = layers.thin, layers.value, layers.lines, layers.height
    seeds = np.array([frame.pt(x, y) for x, y, _ in spec.te_cells], np.float32)
    thick = np.array([t for _, _, t in spec.te_cells], np.float32) * frame.unit
    near = layers.depth < thick.max() + 2 * px
    ns = layers.sel[near]
    idx, d1, wall = _voronoi(layers.fx[near], layers.fy[near], seeds[:, 0], seeds[:, 1])
    dep = layers.depth[near]
    open_ = 0.0 if gap is None else gap.ravel()[ns]
    layer = np.clip(thick[idx] - dep + 0.5, 0.0, 1.0) * (1.0 - open_)
    nucleus = np.exp(-((d1 / (thick[idx] * 0.9 + px)) ** 2))
    tv = layers.base + 8.0 + 10.0 * nucleus + 3.0 * layers.grain[near]
    value[ns] += layer * (tv - value[ns])
    lines[ns] += layer * 20.0 * _line(wall, thin)
    lines[ns] += 14.0 * _line(dep - thick[idx], thin) * (1.0 - open_)
    hval[ns] = np.maximum(hval[ns], layer * (thick[idx] * 0.6 + nucleus * 1.5 * px))


def _composite(
    img: np.ndarray, height: np.ndarray, ys: slice, xs: slice, inside: np.ndarray,
    sdf: np.ndarray, gap: np.ndarray | None, layers: _Interior,
) -> None:
    """Blend the painted layers into the window and draw the outer membrane."""
    membrane = _line(sdf.ravel(), layers.thin + 0.05)
    if gap is not None:
        membrane *= 1.0 - 0.6 * gap.ravel()
    lines = layers.lines
    lines += 18.0 * membrane
    sub = img[ys, xs]
    ins = inside.ravel()
    flat = sub.ravel()
    img[ys, xs] = (flat + ins * (layers.value - flat) - lines).reshape(sub.shape)
    height[ys, xs] = np.maximum(height[ys, xs], (ins * layers.height).reshape(sub.shape))


def _draw_blastocyst(
    img: np.ndarray, height: np.ndarray, grain: np.ndarray, spec: EmbryoSpec, frame: _Frame,
    px: float,
) -> None:
    window = _blastocyst_window(spec, frame, px)
    if window is None:
        return
    circles, ys, xs = window
    xx, yy = _grid(frame.size)
    gx_, gy_ = xx[ys, xs], yy[ys, xs]
    sdf, gap = _outline_distance(spec, frame, circles, gx_, gy_)
    inside = np.clip(-sdf + 0.5, 0.0, 1.0)
    layers = _blastocoel(spec, gx_, gy_, grain[ys, xs], sdf, inside, px)
    if spec.mass_cells:
        _paint_cell_mass(layers, spec, frame)
    if spec.icm_cells:
        _paint_icm(layers, spec, frame)
    if spec.te_cells:
        _paint_trophectoderm(layers, spec, frame, gap, px)
    _composite(img, height, ys, xs, inside, sdf, gap, layers)
    for x, y, r in spec.fragments:
        _draw_blob(img, height, grain, frame, (x, y, r, r, 0.0), spec.medium + 5.0, 3.0, 26.0,
                   0.9, px)


def _add_relief(img: np.ndarray, height: np.ndarray, spec: EmbryoSpec, px: float) -> None:
    """Modulation-contrast relief: brightness follows the slope of the optical path."""
    smooth = cv2.GaussianBlur(height, (0, 0), 0.8 * px)
    ca, sa = math.cos(spec.relief_angle), math.sin(spec.relief_angle)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3) * 0.125
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3) * 0.125
    img += spec.relief * 18.0 * np.clip(ca * gx + sa * gy, -2.5, 2.5)


def _set_exposure(img: np.ndarray, r: np.ndarray, spec: EmbryoSpec, frame: _Frame,
                  px: float) -> None:
    """Class-free exposure: the zona interior gets a target mean, whatever its content."""
    inner_px = frame.unit * (1.0 - spec.zona_thickness)
    inner = r < inner_px * 0.97
    if inner.any():
        vals = img[inner]
        mean, std = float(vals.mean()), float(vals.std())
        gain = min(max(spec.interior_contrast / max(std, 1e-3), 0.5), 2.0)
        target = spec.medium + spec.interior_shift
        weight = np.clip((inner_px - r) / (2.0 * px), 0.0, 1.0)
        img += weight * ((img - mean) * (gain - 1.0) + (target - mean))


def _illuminate(img: np.ndarray, r: np.ndarray, spec: EmbryoSpec, size: int) -> None:
    """Uneven illumination: a radial fall-off or a linear ramp across the image."""
    if spec.illumination == "radial":
        fall = (r / (0.7 * size)) ** 2
        img *= 1.0 + spec.illumination_strength * (0.5 - fall)
    else:
        xx, yy = _grid(size)
        ca, sa = math.cos(spec.illumination_angle), math.sin(spec.illumination_angle)
        ramp = ((xx - size / 2) * ca + (yy - size / 2) * sa) / size
        img *= 1.0 + spec.illumination_strength * ramp


def _defocus_and_noise(img: np.ndarray, spec: EmbryoSpec, focal_plane: int,
                       noise_rng: np.random.Generator, px: float) -> np.ndarray:
    """Blur growing with the distance from focus, then sensor noise; the uint8 image."""
    sigma = (spec.blur + 0.9 * abs(focal_plane) / FOCAL_STEP) * px
    if sigma > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    # Sensor noise, slightly correlated as after demosaicing; brighter pixels are noisier.
    noise = _smooth_noise(noise_rng, img.shape[0], 0.6 * px)
    img += noise * (spec.noise * np.sqrt(np.clip(img, 1.0, None) / 128.0))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_embryo(spec: EmbryoSpec, size: int = 128, focal_plane: int = 0) -> np.ndarray:
    """uint8 array (size, size) grayscale. Deterministic given spec+size+focal_plane.

    focal_plane 0 is in focus; |focal_plane| in units of 15 (e.g. -30,-15,0,15,30) adds blur
    proportional to distance. Texture is shared by an embryo's planes; sensor noise is not.
    """
    if not 16 <= int(size) <= 2048:
        raise ValueError(f"size must be between 16 and 2048 pixels, got {size}")
    size = int(size)
    px = size / 128.0
    tex_rng = np.random.default_rng([spec.seed, size])
    noise_rng = np.random.default_rng([spec.seed, size, int(focal_plane) + 1_000_000])
    frame = _Frame(spec, size)
    xx, yy = _grid(size)
    grain = _smooth_noise(tex_rng, size, 0.55 * px)

    img = np.full((size, size), spec.medium, np.float32)
    img += 3.0 * _low_noise(tex_rng, size) + 1.5 * grain
    height = np.zeros((size, size), np.float32)

    dx, dy = xx - frame.cx, yy - frame.cy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    _draw_zona(img, height, grain, spec, frame, r, theta, px)
    if spec.day == 3:
        _draw_cleavage(img, height, grain, spec, frame, px)
    else:
        _draw_blastocyst(img, height, grain, spec, frame, px)
    _add_relief(img, height, spec, px)
    _set_exposure(img, r, spec, frame, px)
    _illuminate(img, r, spec, size)
    return _defocus_and_noise(img, spec, focal_plane, noise_rng, px)


# --------------------------------------------------------------------------------------------
# Data sets


def focal_plane_offsets(count: int) -> list[int]:
    """`count` planes centred on 0 in steps of FOCAL_STEP (3 -> -15, 0, 15; 2 -> 0, 15)."""
    if count < 1:
        raise ValueError(f"focal_planes must be >= 1, got {count}")
    return [FOCAL_STEP * (i - (count - 1) // 2) for i in range(count)]


def _png_bytes(array: np.ndarray) -> bytes:
    """8-bit grayscale PNG. OpenCV's encoder is about twice as fast as Pillow's here, which is
    most of the writing time for noisy images (they hardly compress anyway)."""
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - only on a broken OpenCV build
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def _check_dataset_arguments(
    n: int, good_fraction: float, embryos_per_patient: tuple[int, int], label_rule: str,
    day_good_rates: tuple[float, float],
) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= good_fraction <= 1.0:
        raise ValueError(f"good_fraction must be in [0, 1], got {good_fraction}")
    if label_rule not in ("morphology", "day"):
        raise ValueError(f"label_rule must be 'morphology' or 'day', got {label_rule!r}")
    if not all(0.0 <= r <= 1.0 for r in day_good_rates) or len(day_good_rates) != len(DAYS):
        raise ValueError(f"day_good_rates must be two rates in [0, 1], got {day_good_rates}")
    lo, hi = embryos_per_patient
    if lo < 1 or hi < lo:
        raise ValueError(f"embryos_per_patient must be (min, max) with 1 <= min <= max, "
                         f"got {embryos_per_patient}")


def _labels_and_days(
    rng: np.random.Generator, n_embryos: int, good_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Labels in exact proportion, days alternating within each label, then shuffled."""
    n_good = int(round(good_fraction * n_embryos))
    labels = np.array(["good"] * n_good + ["poor"] * (n_embryos - n_good))
    days = np.zeros(n_embryos, dtype=int)
    for label in CLASSES:
        where = np.flatnonzero(labels == label)
        d = np.array([DAYS[i % 2] for i in range(len(where))])
        days[where] = rng.permutation(d)
    order = rng.permutation(n_embryos)
    return labels[order], days[order]


def _patients(
    rng: np.random.Generator, n_embryos: int, embryos_per_patient: tuple[int, int]
) -> list[tuple[str, str, int]]:
    """(patient id, embryo id, embryo index) for every embryo, patients of lo..hi embryos."""
    lo, hi = embryos_per_patient
    jobs: list[tuple[str, str, int]] = []
    patient = 0
    while len(jobs) < n_embryos:
        patient += 1
        count = int(rng.integers(lo, hi + 1))
        pid = f"P{patient:04d}"
        for e in range(min(count, n_embryos - len(jobs))):
            jobs.append((pid, f"{pid}-E{e + 1:02d}", len(jobs)))
    return jobs


def _with_progress(
    jobs: list[tuple[str, str, int]], progress: bool
) -> Iterable[tuple[str, str, int]]:
    if not progress:
        return jobs
    from tqdm import tqdm  # only the CLI wants a bar; keep the import off the library path

    return tqdm(jobs, desc="synthetic embryos", unit="embryo")


def _write_images(
    out_dir: Path, spec: EmbryoSpec, size: int, planes: list[int]
) -> list[dict[str, object]]:
    """One PNG per focal plane of `spec`; their manifest rows."""
    rows: list[dict[str, object]] = []
    for plane in planes:
        rel = f"images/{spec.label}/{spec.embryo_id}_{plane}.png"
        # atomic, not fsync'ed: test images regenerated by seed; the manifest is durable
        atomic_write_bytes(out_dir / rel, _png_bytes(render_embryo(spec, size, plane)),
                           durable=False)
        rows.append({"path": rel, "label": spec.label, "patient_id": spec.patient_id,
                     "embryo_id": spec.embryo_id, "day": spec.day, "focal_plane": plane,
                     "grade": spec.grade})
    return rows


def _write_manifest(manifest: Path, rows: list[dict[str, object]]) -> None:
    with atomic_open(manifest, "w", newline="") as fh:  # never half a manifest
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate_dataset(
    out_dir: str | Path,
    n: int,
    size: int = 128,
    seed: int = 0,
    focal_planes: int = 1,
    good_fraction: float = 0.5,
    embryos_per_patient: tuple[int, int] = (2, 6),
    progress: bool = False,
    label_rule: str = "morphology",
    day_good_rates: tuple[float, float] = (0.1, 0.8),
) -> Path:
    """Write n PNG images under out_dir/images/<label>/<embryo_id>_<focal_plane>.png and
    out_dir/manifest.csv; return the manifest path.

    Embryos = ceil(n / focal_planes); the last keeps only its planes nearest focus so that exactly
    n images are written. Labels are drawn in exact proportion and shuffled, days alternate within
    each label, so every patient cohort mixes qualities and each day is about half good.
    Same arguments give byte-identical files.

    `label_rule="day"` makes a *shortcut* data set for testing evaluation: the morphology is
    drawn exactly as above (good-looking or poor-looking, half each), but the label written to
    the manifest (and the folder) ignores it: it is `good` with probability
    `day_good_rates[0]` for a day-3 embryo and `day_good_rates[1]` for a day-5 one, drawn
    independently of how the embryo looks. The day (cleavage stage vs blastocyst) is plainly
    visible, so a model can score well overall by recognising the day while knowing nothing
    about quality within a day. The default rule leaves every draw, and so every file, as it was.
    """
    _check_dataset_arguments(n, good_fraction, embryos_per_patient, label_rule, day_good_rates)
    planes = focal_plane_offsets(focal_planes)
    near_first = sorted(planes, key=lambda p: (abs(p), p))
    n_embryos = math.ceil(n / focal_planes)
    rng = np.random.default_rng(seed)
    labels, days = _labels_and_days(rng, n_embryos, good_fraction)

    out_dir = Path(out_dir)
    for label in CLASSES:
        (out_dir / "images" / label).mkdir(parents=True, exist_ok=True)
    jobs = _patients(rng, n_embryos, embryos_per_patient)

    rows: list[dict[str, object]] = []
    remaining = n
    label_rng = np.random.default_rng([seed, 1])  # its own stream: `rng` draws stay the same
    for pid, eid, i in _with_progress(jobs, progress):
        spec = sample_embryo(rng, str(labels[i]), int(days[i]), eid, pid)
        if label_rule == "day":  # the label follows the day only; the looks stay as drawn
            rate = day_good_rates[DAYS.index(spec.day)]
            spec = replace(spec, label="good" if label_rng.random() < rate else "poor")
        take = sorted(near_first[: min(focal_planes, remaining)])
        remaining -= len(take)
        rows += _write_images(out_dir, spec, size, take)

    manifest = out_dir / "manifest.csv"
    _write_manifest(manifest, rows)
    return manifest
