"""Synthetic fundus photographs with labels, written to disk as a manifest dataset.

Deterministic for a seed, so tests, smoke runs and CI get the same data everywhere without a
download, and the data goes through exactly the loading path of real data (manifest, JPEG, PNG).
Each image is drawn for a right eye and mirrored for a left eye; lesions follow the ICDR grades.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from data_modules.manifest import MANIFEST_NAME, read_manifest, write_manifest
from data_modules.samples import SPLITS, Sample, register_source

VERSION = 2
PARAMS_NAME = "synth.json"
MASK_NAMES = (
    "vessels",
    "optic_disc",
    "optic_cup",
    "microaneurysms",
    "haemorrhages",
    "hard_exudates",
    "neovascularization",
)
GRADE_PROBS = (0.45, 0.10, 0.25, 0.10, 0.10)  # ICDR 0-4, skewed like screening data
DME_PROBS = (0.4, 0.3, 0.3)  # DME risk 0-2 among eyes that have hard exudates
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train, val, test, by patient
GLAUCOMA_CDR = 0.6
FOVEA_DISC_DIAMETERS = 2.5
MIN_IMAGE_SIZE = 64
# Lesion radii in pixels of a 256 px image, large enough to survive the CPU profile's 96 px.
MICROANEURYSM_RADIUS = (1.5, 2.5)
HAEMORRHAGE_RADIUS = (2.5, 6.0)
EXUDATE_RADIUS = (2.0, 3.5)

# Per-channel darkening of red structures: red falls least, so vessels and blood look dark red.
_BLOOD_TINT = np.array([0.45, 0.80, 0.75], dtype=np.float32)
_EXUDATE_COLOUR = np.array([0.98, 0.86, 0.42], dtype=np.float32)


@dataclass(frozen=True)
class _EyePlan:
    """The labels decided before drawing, for the whole dataset at once."""

    patient: int
    eye: int  # 0 left, 1 right
    grade: int
    dme_target: int
    cdr: float
    split: str


@dataclass
class _Eye:
    """One drawn eye: image, masks and points in the written (possibly mirrored) frame."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    disc: tuple[float, float]
    fovea: tuple[float, float]
    dme_risk: int
    jpeg_quality: int


def _params(n: int, image_size: int, seed: int) -> dict[str, int]:
    return {"n": n, "image_size": image_size, "seed": seed, "version": VERSION}


def _check_args(n: int, image_size: int) -> None:
    if n <= 0 or n % 2:
        raise ValueError(f"synthetic data needs a positive even n (two eyes per patient); got {n}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"synthetic image_size must be at least {MIN_IMAGE_SIZE}; got {image_size}"
        )


def _allocate(probs: tuple[float, ...], count: int, rng: np.random.Generator) -> np.ndarray:
    """Class labels in exactly the given proportions (largest remainder), shuffled.

    Unlike independent draws, a small dataset still contains every class it has room for.
    """
    quotas = np.asarray(probs) * count
    counts = np.floor(quotas).astype(int)
    counts[np.argsort(counts - quotas, kind="stable")[: count - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(probs)), counts))


def _plan(n: int, seed: int) -> list[_EyePlan]:
    """Decide every label first, so grade and DME proportions hold for the dataset as a whole."""
    rng = np.random.default_rng(seed)
    patients = n // 2
    severity = _allocate(GRADE_PROBS, patients, rng)
    splits = _allocate(SPLIT_FRACTIONS, patients, rng)
    patient_cdr = rng.uniform(0.2, 0.85, patients)
    eyes = []
    for p in range(patients):
        # Fellow eyes: one eye has the patient's severity, the other differs by at most one grade.
        grades = [int(severity[p])] * 2
        jittered = int(rng.integers(2))
        step = int(rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15]))
        grades[jittered] = int(np.clip(grades[jittered] + step, 0, 4))
        for eye in (0, 1):
            cdr = round(float(np.clip(patient_cdr[p] + rng.normal(0, 0.03), 0.2, 0.85)), 3)
            eyes.append((p, eye, grades[eye], cdr))
    with_exudates = [i for i, e in enumerate(eyes) if e[2] >= 2]
    dme = np.zeros(len(eyes), dtype=int)
    dme[with_exudates] = _allocate(DME_PROBS, len(with_exudates), rng)
    return [
        _EyePlan(p, eye, grade, int(dme[i]), cdr, SPLITS[splits[p]])
        for i, (p, eye, grade, cdr) in enumerate(eyes)
    ]


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Zero-mean, unit-scale noise varying over ``size / grid`` pixels (bicubic upsampling)."""
    coarse = rng.normal(0, 1, (grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.BICUBIC))


def _stamp(
    cover: np.ndarray,
    mask: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float = 0.0,
    value: float = 1.0,
    soft: float = 1.0,
) -> tuple[slice, slice]:
    """Draw a filled ellipse: anti-aliased coverage (max, scaled by ``value``) into ``cover`` and
    its pixels into ``mask``. Only the ellipse's bounding box is computed; it is returned."""
    size = cover.shape[0]
    x, y = centre
    rx, ry = max(radii[0], 0.5), max(radii[1], 0.5)
    reach = max(rx, ry) + soft + 1
    x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, size)
    y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, size)
    window = (slice(y0, y1), slice(x0, x1))
    if x0 >= x1 or y0 >= y1:
        return window
    gx = np.arange(x0, x1, dtype=np.float32)[None, :]
    gy = np.arange(y0, y1, dtype=np.float32)[:, None]
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((gx - x) * cos + (gy - y) * sin) / rx
    v = (-(gx - x) * sin + (gy - y) * cos) / ry
    rho = np.sqrt(u * u + v * v)
    alpha = np.clip((1 - rho) * np.sqrt(rx * ry) / soft + 0.5, 0, 1) * value
    np.maximum(cover[window], alpha, out=cover[window])
    mask[window] |= rho <= 1
    return window


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    turn: float,
    length: float,
    step: float,
    wiggle: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random curve: points (k, 2) and the heading at each point."""
    k = max(int(length / step), 2)
    headings = heading + turn * step * np.arange(k) + np.cumsum(rng.normal(0, wiggle, k))
    moves = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    return start + np.cumsum(moves, axis=0), headings


def _grow(
    rng: np.random.Generator,
    out: list[tuple[np.ndarray, np.ndarray, float]],
    start: np.ndarray,
    heading: float,
    turn: float,
    length: float,
    width: float,
    darkness: float,
    fov: tuple[float, float, float],
    size: int,
    depth: int = 0,
) -> None:
    """Grow one vessel and, recursively, its thinner branches; append (points, widths, darkness)."""
    points, headings = _walk(
        rng, start, heading, turn, length, step=max(1.0, size / 128), wiggle=0.04
    )
    cx, cy, radius = fov
    inside = np.hypot(points[:, 0] - cx, points[:, 1] - cy) < radius
    keep = len(points) if inside.all() else int(np.argmin(inside))
    if keep < 2:
        return
    points, headings = points[:keep], headings[:keep]
    widths = width * (1 - 0.55 * np.arange(keep) / max(len(inside) - 1, 1))
    out.append((points, widths, darkness))
    if depth == 3:
        return
    for _ in range(rng.poisson(length / (0.14 * size))):
        i = int(rng.integers(keep // 6, keep))
        child_width = widths[i] * rng.uniform(0.55, 0.75)
        if child_width < 0.6 * size / 256:
            continue
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        _grow(
            rng,
            out,
            points[i],
            headings[i] + side * rng.uniform(0.45, 1.0),
            rng.normal(0, 1.5 / length),
            (length - i * length / len(inside)) * rng.uniform(0.4, 0.8),
            child_width,
            darkness * 0.95,
            fov,
            size,
            depth + 1,
        )


def _vessel_tree(
    rng: np.random.Generator, disc: np.ndarray, fov: tuple[float, float, float], size: int
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Vessels of a right eye: temporal arcades arching around the macula (to the left), and
    smaller nasal vessels (to the right), each an artery/vein pair going up and down."""
    s = size / 256
    vessels: list[tuple[np.ndarray, np.ndarray, float]] = []
    for vdir in (-1.0, 1.0):  # up, down (image y grows downwards)
        for width, darkness in ((3.6 * s, 0.55), (2.7 * s, 0.38)):  # vein, artery
            start = disc + rng.normal(0, 1.5 * s, 2)
            length = rng.uniform(0.55, 0.75) * size
            heading = vdir * (np.pi / 2 + rng.uniform(0.1, 0.45))
            turn = vdir * rng.uniform(1.2, 1.8) / length  # bends toward the temporal side
            _grow(rng, vessels, start, heading, turn, length, width, darkness, fov, size)
            start = disc + rng.normal(0, 1.5 * s, 2)
            length = rng.uniform(0.25, 0.4) * size
            heading = vdir * rng.uniform(0.3, 1.1)
            turn = rng.normal(0, 0.6) / length
            _grow(rng, vessels, start, heading, turn, length, width * 0.7, darkness, fov, size)
    return vessels


def _draw_curves(
    size: int, curves: list[tuple[np.ndarray, np.ndarray, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise curves: a darkness map drawn at 2x and box-downsampled (anti-aliased), and a
    binary mask drawn at 1x. Darker curves are drawn last so they win at crossings."""
    shade = Image.new("L", (2 * size, 2 * size))
    mask = Image.new("L", (size, size))
    draw_shade, draw_mask = ImageDraw.Draw(shade), ImageDraw.Draw(mask)
    for points, widths, darkness in sorted(curves, key=lambda c: c[2]):
        for draw, scale, fill in ((draw_mask, 1, 255), (draw_shade, 2, round(255 * darkness))):
            xy = points * scale + (scale - 1) / 2  # pixel centres of the finer grid
            pixel_widths = np.maximum(1, np.round(widths * scale)).astype(int)
            # One polyline per run of equal width: tapering vessels need only a few draw calls.
            starts = [0, *(np.flatnonzero(np.diff(pixel_widths[:-1])) + 1).tolist()]
            for a, b in zip(starts, [*starts[1:], len(xy) - 1]):
                line = xy[a : b + 1].ravel().tolist()
                draw.line(line, fill=fill, width=int(pixel_widths[a]), joint="curve")
    shade_map = np.asarray(shade.resize((size, size), Image.BOX), dtype=np.float32) / 255
    return shade_map, np.asarray(mask) > 0


def _sample_points(
    rng: np.random.Generator,
    count: int,
    centre: tuple[float, float],
    radius: float,
    ok: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """``count`` integer pixel positions uniform in a circle, restricted to where ``ok`` holds."""
    found = np.zeros((0, 2))
    for _ in range(100):
        r = radius * np.sqrt(rng.uniform(0, 1, 512))
        t = rng.uniform(0, 2 * np.pi, 512)
        cand = np.round(np.stack([centre[0] + r * np.cos(t), centre[1] + r * np.sin(t)], 1))
        found = np.concatenate([found, cand[ok(cand)]])
        if len(found) >= count:
            return found[:count]
    raise RuntimeError("synthetic lesion placement found no room; this is a generator bug")


def _ring(
    centre: tuple[float, float] | np.ndarray, inner: float, outer: float
) -> Callable[[np.ndarray], np.ndarray]:
    """Predicate on points (k, 2): strictly between ``inner`` and ``outer`` from ``centre``."""

    def inside(p: np.ndarray) -> np.ndarray:
        d = np.hypot(p[:, 0] - centre[0], p[:, 1] - centre[1])
        return (d > inner) & (d < outer)

    return inside


def _dme_risk(exudates: np.ndarray, disc: np.ndarray, fovea: tuple[float, float]) -> int:
    """DME risk from the masks: 2 if hard exudates lie within one disc diameter of the fovea,
    1 within two, else 0. The disc diameter is that of a circle of the disc mask's area."""
    if not exudates.any():
        return 0
    ys, xs = np.nonzero(exudates)
    nearest = np.hypot(xs - fovea[0], ys - fovea[1]).min()
    diameter = 2 * np.sqrt(disc.sum() / np.pi)
    return 2 if nearest <= diameter else 1 if nearest <= 2 * diameter else 0


@dataclass(frozen=True)
class _Layout:
    """Where the anatomy of one right eye lies, in pixels (x, y)."""

    size: int
    centre: tuple[float, float]  # of the circular field of view
    radius: float  # of the field of view
    disc: np.ndarray
    disc_radii: tuple[float, float]  # horizontal, vertical
    fovea: np.ndarray

    @property
    def scale(self) -> float:
        """Lesion and vessel sizes are specified for 256 px images."""
        return self.size / 256

    @property
    def disc_diameter(self) -> float:
        """Diameter of the circle with the disc's area."""
        return 2 * np.sqrt(self.disc_radii[0] * self.disc_radii[1])

    @property
    def lesion_area(self) -> tuple[tuple[float, float], float]:
        """Circle that lesions are placed in, clear of the field of view's edge."""
        return self.centre, 0.85 * self.radius

    def off_disc(self, points: np.ndarray) -> np.ndarray:
        return _ring(self.disc, 1.4 * max(self.disc_radii), np.inf)(points)


def _layout(rng: np.random.Generator, size: int) -> _Layout:
    """Field of view near the centre; optic disc right of centre; fovea 2.5 disc diameters to
    its left (temporal) and slightly below."""
    middle = (size - 1) / 2
    cx, cy = middle + np.clip(rng.normal(0, 0.01 * size, 2), -0.02 * size, 0.02 * size)
    r_disc = 0.07 * size * rng.uniform(0.9, 1.1)
    disc_radii = (r_disc * rng.uniform(0.9, 1.0), r_disc * rng.uniform(1.0, 1.12))
    disc = np.array([cx + rng.uniform(0.17, 0.21) * size, cy + rng.normal(0, 0.015) * size])
    diameter = 2 * np.sqrt(disc_radii[0] * disc_radii[1])
    below = rng.uniform(0.05, 0.18)
    fovea = disc + FOVEA_DISC_DIAMETERS * diameter * np.array([-np.cos(below), np.sin(below)])
    radius = 0.46 * size * rng.uniform(0.98, 1.02)
    return _Layout(size, (float(cx), float(cy)), float(radius), disc, disc_radii, fovea)


def _fundus(
    rng: np.random.Generator, lay: _Layout, fov_dist: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Background: pigmentation, uneven illumination, vignetting, choroidal texture and a darker
    macula. Returns the RGB float image and the illumination field (to light later layers)."""
    size = lay.size
    base = np.array([0.78, 0.36, 0.15], dtype=np.float32)
    base *= rng.uniform([0.9, 0.8, 0.7], [1.1, 1.2, 1.3]).astype(np.float32)
    light = 1 + 0.12 * _smooth_noise(rng, size, 4)
    light *= 1 - rng.uniform(0.2, 0.45) * (fov_dist / lay.radius) ** 2
    texture = 1 + 0.04 * _smooth_noise(rng, size, 24)
    xx = np.arange(size, dtype=np.float32)[None, :]
    yy = np.arange(size, dtype=np.float32)[:, None]
    fovea_d2 = (xx - lay.fovea[0]) ** 2 + (yy - lay.fovea[1]) ** 2
    diameter = lay.disc_diameter
    macula = rng.uniform(0.25, 0.45) * np.exp(-fovea_d2 / (2 * (0.55 * diameter) ** 2))
    macula += 0.15 * np.exp(-fovea_d2 / (2 * (0.12 * diameter) ** 2))
    return base * (light * texture * (1 - macula))[..., None], light


def _draw_disc(
    rng: np.random.Generator,
    lay: _Layout,
    cdr: float,
    img: np.ndarray,
    light: np.ndarray,
    masks: dict[str, np.ndarray],
) -> None:
    """Bright yellowish disc with a paler cup whose vertical radius is ``cdr`` times the disc's."""
    size, s = lay.size, lay.scale
    rx, ry = lay.disc_radii
    disc_cover = np.zeros((size, size), dtype=np.float32)
    window = _stamp(disc_cover, masks["optic_disc"], tuple(lay.disc), (rx, ry), soft=1.5 * s)
    cup_ry = cdr * ry
    cup_rx = min(cup_ry * rng.uniform(0.85, 1.0), 0.92 * rx)
    cup_x = lay.disc[0] - rng.uniform(0, 0.95 * rx - cup_rx)  # the cup sits temporally
    cup_cover = np.zeros((size, size), dtype=np.float32)
    _stamp(cup_cover, masks["optic_cup"], (cup_x, lay.disc[1]), (cup_rx, cup_ry), soft=2 * s)
    masks["optic_cup"] &= masks["optic_disc"]
    disc_colour = np.array([0.97, 0.74, 0.46], dtype=np.float32) * rng.uniform(0.9, 1.05)
    cup_colour = np.array([1.0, 0.93, 0.74], dtype=np.float32)
    for cover, colour in ((disc_cover, disc_colour), (cup_cover, cup_colour)):
        a = cover[window][..., None]  # the cup lies inside the disc's window
        img[window] += a * (colour * light[window][..., None] - img[window])


def _draw_lesions(
    rng: np.random.Generator, plan: _EyePlan, lay: _Layout, masks: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Lesions of the planned ICDR grade: 1 microaneurysms; 2 also a few haemorrhages and hard
    exudates; 3 haemorrhages in all four quadrants; 4 neovascular tufts and/or a large
    haemorrhage. Fills the lesion masks; returns coverage maps of red and of yellow lesions."""
    size, s, grade = lay.size, lay.scale, plan.grade
    red = np.zeros((size, size), dtype=np.float32)
    yellow = np.zeros((size, size), dtype=np.float32)
    if grade >= 1:
        count = int(rng.integers(*{1: (2, 6), 2: (5, 13), 3: (10, 21), 4: (8, 21)}[grade]))
        for x, y in _sample_points(rng, count, *lay.lesion_area, lay.off_disc):
            r = rng.uniform(*MICROANEURYSM_RADIUS) * s
            _stamp(red, masks["microaneurysms"], (x, y), (r, r), value=rng.uniform(0.8, 0.95))
    if grade < 2:
        return red, yellow
    for x, y in _haemorrhage_centres(rng, grade, lay):
        for _ in range(int(rng.integers(1, 4))):  # a blot is one to three overlapping ellipses
            r = rng.uniform(*HAEMORRHAGE_RADIUS) * s
            at = (x + rng.normal(0, r / 2), y + rng.normal(0, r / 2))
            radii = (r, r * rng.uniform(0.6, 1.0))
            angle = rng.uniform(0, np.pi)
            _stamp(red, masks["haemorrhages"], at, radii, angle, rng.uniform(0.6, 0.75))
    proliferative = int(rng.integers(3)) if grade == 4 else -1  # 0 NV, 1 both, 2 large bleed
    if proliferative in (1, 2):
        r = rng.uniform(0.035, 0.06) * size
        x, y = _sample_points(rng, 1, lay.centre, 0.7 * lay.radius, lay.off_disc)[0]
        radii = (r, r * rng.uniform(0.6, 0.9))
        _stamp(red, masks["haemorrhages"], (x, y), radii, rng.uniform(0, np.pi), 0.85)
    if proliferative in (0, 1):
        nv_shade, masks["neovascularization"] = _draw_curves(size, _neovascular_tufts(rng, lay))
        np.maximum(red, nv_shade, out=red)
    _place_exudates(rng, plan.dme_target, lay, masks, yellow)
    return red, yellow


def _haemorrhage_centres(rng: np.random.Generator, grade: int, lay: _Layout) -> np.ndarray:
    """A few blots for grade 2; many in each of the four image quadrants for grade 3 (and for
    half of the grade 4 eyes, the others having a few)."""
    if grade == 2 or (grade == 4 and rng.uniform() < 0.5):
        return _sample_points(rng, int(rng.integers(1, 5)), *lay.lesion_area, lay.off_disc)
    middle = (lay.size - 1) / 2
    margin = 0.04 * lay.size  # keeps blots clear of the quadrant borders
    centres = []
    for qx in (-1, 1):
        for qy in (-1, 1):

            def in_quadrant(p: np.ndarray, qx: int = qx, qy: int = qy) -> np.ndarray:
                away = (qx * (p[:, 0] - middle) > margin) & (qy * (p[:, 1] - middle) > margin)
                return away & lay.off_disc(p)

            count = int(rng.integers(4, 9))
            centres.append(_sample_points(rng, count, *lay.lesion_area, in_quadrant))
    return np.concatenate(centres)


def _neovascular_tufts(
    rng: np.random.Generator, lay: _Layout
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """One or two tangles of fine, tortuous vessels on or next to the disc."""
    s = lay.scale
    diameter = lay.disc_diameter
    tufts = []
    for _ in range(int(rng.integers(1, 3))):
        t = rng.uniform(0, 2 * np.pi)
        centre = lay.disc + rng.uniform(0.2, 1.0) * diameter * np.array([np.cos(t), np.sin(t)])
        for _ in range(int(rng.integers(4, 9))):
            start = centre + rng.normal(0, 0.15 * diameter, 2)
            length = rng.uniform(0.03, 0.07) * lay.size
            turn = rng.uniform(4, 9) / length * (1.0 if rng.uniform() < 0.5 else -1.0)
            points, _ = _walk(rng, start, rng.uniform(0, 2 * np.pi), turn, length, s, wiggle=0.3)
            tufts.append((points, np.full(len(points), 0.9 * s), 0.5))
    return tufts


def _place_exudates(
    rng: np.random.Generator,
    target: int,
    lay: _Layout,
    masks: dict[str, np.ndarray],
    cover: np.ndarray,
) -> None:
    """Clusters of small yellow specks placed so that the DME risk read from the masks is
    ``target``: the first cluster sets the nearest distance to the fovea, the others stay out of
    the zones that would raise it."""
    s = lay.scale
    diameter = 2 * np.sqrt(masks["optic_disc"].sum() / np.pi)  # as _dme_risk measures it
    margin = EXUDATE_RADIUS[1] * s + 1.5  # largest speck radius plus rasterisation slack
    first_zone, rest_inner = {
        0: ((2 * diameter + margin, np.inf), 2 * diameter + margin),
        1: ((diameter + margin, 2 * diameter - margin), diameter + margin),
        2: ((0.0, diameter - margin), 0.0),
    }[target]
    in_area = _ring(lay.lesion_area[0], -1.0, lay.lesion_area[1])
    allowed = _ring(lay.fovea, rest_inner, np.inf)
    for cluster in range(int(rng.integers(1, 4))):
        zone = _ring(lay.fovea, *first_zone) if cluster == 0 else allowed
        centre = _sample_points(rng, 1, *lay.lesion_area, lambda p, z=zone: z(p) & lay.off_disc(p))
        spread = rng.normal(0, 4 * s, (int(rng.integers(1, 6)), 2))
        specks = np.round(np.concatenate([centre, centre + spread]))
        for x, y in specks[allowed(specks) & lay.off_disc(specks) & in_area(specks)]:
            r = rng.uniform(*EXUDATE_RADIUS) * s
            _stamp(cover, masks["hard_exudates"], (x, y), (r, r), value=rng.uniform(0.8, 0.95))


def _camera(
    rng: np.random.Generator, img: np.ndarray, fov_alpha: np.ndarray, s: float
) -> np.ndarray:
    """Nuisances of a fundus camera: exposure, colour cast and gamma (one lookup table per
    channel), blur and luminance noise; black outside the field of view. Returns uint8 RGB."""
    gains = rng.uniform(0.75, 1.25) * rng.normal(1, 0.06, 3)
    curves = np.clip(np.arange(256) / 255 * gains[:, None], 0, 1) ** rng.uniform(0.8, 1.25)
    np.clip(img * 255 + 0.5, 0, 255, out=img)
    pil = Image.fromarray(img.astype(np.uint8), "RGB")
    pil = pil.point(np.round(255 * curves).astype(int).ravel().tolist())
    blur = rng.uniform(0, 1.0) * s
    if blur > 0.25:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    noise = rng.standard_normal(fov_alpha.shape, dtype=np.float32) * rng.uniform(0, 6)
    out = np.asarray(pil, dtype=np.float32) + noise[..., None]
    out *= fov_alpha[..., None]
    out += 0.5
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _render_eye(plan: _EyePlan, size: int, seed: int) -> _Eye:
    """Draw one eye as a right eye, then mirror it if it is a left eye."""
    rng = np.random.default_rng([seed, plan.patient, plan.eye])
    lay = _layout(rng, size)
    xx = np.arange(size, dtype=np.float32)[None, :]
    yy = np.arange(size, dtype=np.float32)[:, None]
    fov_dist = np.hypot(xx - lay.centre[0], yy - lay.centre[1])
    masks = {name: np.zeros((size, size), dtype=bool) for name in MASK_NAMES}

    img, light = _fundus(rng, lay, fov_dist)
    _draw_disc(rng, lay, plan.cdr, img, light, masks)
    vessels = _vessel_tree(rng, lay.disc, (*lay.centre, lay.radius), size)
    shade, masks["vessels"] = _draw_curves(size, vessels)
    red, yellow = _draw_lesions(rng, plan, lay, masks)
    # Vessels and red lesions darken (blood over blood does not add up); exudates are painted.
    # Both touch few pixels, so only those are computed.
    blood = np.maximum(shade, red)
    ys, xs = np.nonzero(blood)
    img[ys, xs] *= 1 - blood[ys, xs, None] * _BLOOD_TINT
    ys, xs = np.nonzero(yellow)
    a = yellow[ys, xs, None]
    img[ys, xs] += a * (_EXUDATE_COLOUR * light[ys, xs, None] - img[ys, xs])
    image = _camera(rng, img, np.clip(lay.radius - fov_dist + 0.5, 0, 1), lay.scale)

    fov_mask = fov_dist <= lay.radius - 1
    for name in MASK_NAMES:
        masks[name] &= fov_mask
    disc_xy = (float(lay.disc[0]), float(lay.disc[1]))
    fovea_xy = (float(lay.fovea[0]), float(lay.fovea[1]))
    dme = _dme_risk(masks["hard_exudates"], masks["optic_disc"], fovea_xy)
    if plan.eye == 0:  # left eye: the mirror image of a right eye
        image = np.ascontiguousarray(image[:, ::-1])
        masks = {k: m[:, ::-1] for k, m in masks.items()}
        disc_xy = (size - 1 - disc_xy[0], disc_xy[1])
        fovea_xy = (size - 1 - fovea_xy[0], fovea_xy[1])
    return _Eye(image, masks, disc_xy, fovea_xy, dme, int(rng.integers(60, 96)))


def generate_synthetic(
    out_dir: str | Path, n: int = 600, image_size: int = 256, seed: int = 0, progress: bool = True
) -> Path:
    """Write a synthetic dataset (images, masks, manifest.csv, synth.json) to ``out_dir``.

    Everything is written into a hidden temporary sibling folder that is renamed into place at the
    end, so an interrupted run never leaves a folder that looks like a complete dataset.
    Returns the manifest path.
    """
    _check_args(n, image_size)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists and is not empty; synthetic data is written to a new folder. "
            "Delete it or pick another folder."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    params = _params(n, image_size, seed)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared dataset.
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        samples = []
        for plan in tqdm(_plan(n, seed), desc="synthetic fundus", disable=not progress):
            samples.append(_write_eye(tmp, plan, _render_eye(plan, image_size, seed)))
        write_manifest(samples, tmp / MANIFEST_NAME)
        (tmp / PARAMS_NAME).write_text(json.dumps(params, indent=2) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process (e.g. a DDP rank) finished the same folder first: use theirs.
            if not (out_dir / PARAMS_NAME).exists():
                raise
            shutil.rmtree(tmp)
            _check_params(out_dir, params)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST_NAME


def _write_eye(folder: Path, plan: _EyePlan, eye: _Eye) -> Sample:
    """Save one eye's image and masks under ``folder``; return its Sample record."""
    patient_id = f"synth_{plan.patient:04d}"
    sample_id = f"{patient_id}_{'LR'[plan.eye]}"
    image_path = folder / "images" / f"{sample_id}.jpg"
    Image.fromarray(eye.image, "RGB").save(image_path, quality=eye.jpeg_quality)
    masks = {}
    for name, mask in eye.masks.items():
        path = folder / "masks" / f"{sample_id}_{name}.png"
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path, compress_level=1)
        masks[name] = str(path)
    labels = {
        "dr_grade": float(plan.grade),
        "dme_risk": float(eye.dme_risk),
        "glaucoma": float(plan.cdr >= GLAUCOMA_CDR),
        "cdr": plan.cdr,
        "eye": float(plan.eye),
    }
    return Sample(
        sample_id=sample_id,
        patient_id=patient_id,
        image=str(image_path),
        split=plan.split,
        labels=labels,
        masks=masks,
        points={"optic_disc": eye.disc, "fovea": eye.fovea},
        texts={"report": report(labels)},
    )


GRADE_WORDS = (
    "no diabetic retinopathy",
    "mild non-proliferative retinopathy",
    "moderate non-proliferative retinopathy",
    "severe non-proliferative retinopathy",
    "proliferative retinopathy",
)


def report(labels: dict[str, float]) -> str:
    """A short written diagnosis made from the eye's own labels only, so the same seed writes
    the same text (the text task's reference): grade, where the hard exudates lie (the DME
    risk), cup-to-disc ratio and a glaucoma suspicion."""
    grade, dme = int(labels["dr_grade"]), int(labels["dme_risk"])
    if grade < 2:
        exudates = "no hard exudates"
    else:
        exudates = (
            "hard exudates away from the fovea",
            "hard exudates within two disc diameters of the fovea",
            "hard exudates within one disc diameter of the fovea",
        )[dme]
    parts = [GRADE_WORDS[grade], exudates, f"cup-to-disc {labels['cdr']:.1f}"]
    if labels["glaucoma"]:
        parts.append("suspected glaucoma")
    return "; ".join(parts)


def _check_params(root: Path, params: dict[str, int]) -> None:
    found = json.loads((root / PARAMS_NAME).read_text())
    if found != params:
        raise ValueError(
            f"synthetic data at {root} was generated with {found}, but {params} was asked for. "
            "Delete that folder to regenerate it, or pick another root."
        )


@register_source("synthetic", generates=True)
def synthetic_source(
    root: Path, n: int = 600, image_size: int = 256, seed: int = 0
) -> list[Sample]:
    """Source kind ``synthetic``: generate the dataset at ``root`` on first use, then reuse it."""
    _check_args(n, image_size)
    params = _params(n, image_size, seed)
    if (root / PARAMS_NAME).exists():
        _check_params(root, params)
    else:
        generate_synthetic(root, n, image_size, seed)
    return read_manifest(root / MANIFEST_NAME)
