"""Lesions drawn into a phantom's anatomy (label :data:`~.labels.LESION`).

Each lesion sits in a host organ drawn with weights liver 0.45, lung 0.25, kidney 0.15, spleen 0.15
(organs too thin for a 3 mm lesion are skipped). The radius is log-uniform in 3-20 mm (3-15 mm in
lung), capped at 0.9 x the host's largest inner depth; the shape is a randomly rotated ellipsoid
(axes 0.7-1.3 x radius) with 0-2 satellite lobes and a noise-perturbed surface, clipped to the host
organ (largest connected part kept). Intensity: in solid organs hypo-dense, 10-50 HU below the host
organ (uniform, so a quarter of them are 10-20 HU: with 8-20 HU noise, small ones are genuinely
hard), large ones with a darker necrotic core; in lung, soft-tissue nodules of 0-40 HU. A lesion
that the organ edge clips to a sliver (< 6 voxels or < 1/4 of its nominal volume) is re-drawn.
Lesion centres keep apart, but irregular neighbours occasionally touch and form one connected
region (about 1 case in 25). At the defaults a lesion has 7 to about 4,000-6,500 voxels (median
about 100, 10th-90th percentile about 20-1,100; equivalent radius 2.3-20 mm); about 44% sit in the
liver, 26% in the lungs, 15% in the kidneys and 15% in the spleen (200 phantoms, seed 0).

The draws of :func:`place_lesions` come after the whole anatomy, so the organ labels of a seed do
not depend on the number of lesions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..common.geometry import Geometry
from ..common.randomness import random_rotation
from .labels import KIDNEY, LESION, LESION_HOSTS, LIVER, LUNG, SPLEEN
from .shapes import F32, Box, bbox, box, ellipsoid, paint

__all__ = [
    "MAX_LESION_RADIUS_MM",
    "MAX_NODULE_RADIUS_MM",
    "MIN_LESION_RADIUS_MM",
    "MIN_LESION_VOXELS",
    "LesionInfo",
    "place_lesions",
]

_HOST_WEIGHTS = {LIVER: 0.45, LUNG: 0.25, KIDNEY: 0.15, SPLEEN: 0.15}
MIN_LESION_RADIUS_MM = 3.0
MAX_LESION_RADIUS_MM = 20.0
MAX_NODULE_RADIUS_MM = 15.0
MIN_LESION_VOXELS = 6  #: smaller clipped lesions are re-drawn
_PLACEMENT_ATTEMPTS = 5


@dataclass(frozen=True)
class LesionInfo:
    """One placed lesion (a connected region of :data:`~.labels.LESION` voxels, unless lesions touch)."""

    host: int  #: label of the organ it sits in (LIVER, LUNG, KIDNEY or SPLEEN)
    center_mm: tuple[float, float, float]  #: nominal centre, physical LPS (x, y, z) mm
    radius_mm: float  #: nominal radius drawn (the actual shape is irregular and clipped)
    hu: float  #: mean lesion intensity before blur and noise
    contrast_hu: float  #: lesion minus host-organ intensity (negative: hypo-dense)
    n_voxels: int  #: voxels labelled for this lesion


@dataclass(frozen=True)
class _Host:
    label: int
    box: Box  #: bounding box of the organ (grown by one voxel)
    depth: np.ndarray  #: inner depth (mm to the organ boundary) on ``box``, before any lesion


class _Hosts:
    """The organs that can hold a lesion, their depth maps computed once, drawn by weight."""

    def __init__(self, labels: np.ndarray, sp: np.ndarray):
        self.labels, self.sp = labels, sp
        self.viable = list(LESION_HOSTS)
        self._cache: dict[int, _Host] = {}

    def _depth(self, host: int) -> _Host | None:
        """The host's depth map; None when the organ cannot hold the smallest lesion."""
        if host not in self._cache:
            hbox = bbox(self.labels == host, pad=1)
            if hbox is None:
                return None
            depth = ndimage.distance_transform_edt(self.labels[hbox] == host, sampling=self.sp).astype(np.float32)
            if float(depth.max()) < 0.8 * MIN_LESION_RADIUS_MM:
                return None
            self._cache[host] = _Host(host, hbox, depth)
        return self._cache[host]

    def choose(self, rng: np.random.Generator) -> _Host | None:
        """A host drawn by weight among the viable ones (dropping those too thin); None when none is left."""
        found = None
        while self.viable and found is None:
            weights = np.array([_HOST_WEIGHTS[h] for h in self.viable])
            host = self.viable[int(rng.choice(len(self.viable), p=weights / weights.sum()))]
            found = self._depth(host)
            if found is None:
                self.viable.remove(host)
        return found


def place_lesions(
    rng: np.random.Generator,
    count: int,
    image: np.ndarray,
    labels: np.ndarray,
    texture: np.ndarray,
    host_hu: dict[int, float],
    sp: np.ndarray,
    geometry: Geometry,
) -> list[LesionInfo]:
    """Draw ``count`` lesions into ``image``/``labels`` (in place); return what was placed.

    A lesion that the host organ's edge clips to a sliver (fewer than :data:`MIN_LESION_VOXELS` or
    a quarter of its nominal volume) is re-drawn, up to :data:`_PLACEMENT_ATTEMPTS` times.
    """
    hosts = _Hosts(labels, sp)
    placed: list[LesionInfo] = []
    centres: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            host = hosts.choose(rng)
            if host is None:
                return placed
            lesion = _try_lesion(rng, host, centres, image, labels, texture, host_hu, sp, geometry)
            if lesion is not None:
                placed.append(lesion)
                break
    return placed


def _try_lesion(
    rng: np.random.Generator,
    host: _Host,
    centres: list[tuple[np.ndarray, float]],
    image: np.ndarray,
    labels: np.ndarray,
    texture: np.ndarray,
    host_hu: dict[int, float],
    sp: np.ndarray,
    geometry: Geometry,
) -> LesionInfo | None:
    """One placement attempt in ``host``: paint the lesion and record its centre, or None to re-draw."""
    radius, centre = _draw_centre(rng, host, sp)
    if any(np.linalg.norm(centre - c2) < 0.9 * (radius + r2) + 2.0 for c2, r2 in centres):
        return None
    lbox = box(centre, 1.6 * radius + sp.max(), sp, labels.shape)
    if lbox is None:
        return None
    axes = radius * rng.uniform(0.7, 1.3, 3)
    field_ = _draw_shape(rng, lbox, centre, radius, axes, texture, sp)
    blob = (field_ < 1.0) & (labels[lbox] == host.label)
    parts, n_parts = ndimage.label(blob)
    if n_parts == 0:
        return None
    if n_parts > 1:
        blob = parts == (int(np.argmax(np.bincount(parts.ravel())[1:])) + 1)
    n_vox = int(blob.sum())
    nominal = 4.0 / 3.0 * math.pi * float(np.prod(axes)) / float(np.prod(sp))
    if n_vox < max(MIN_LESION_VOXELS, 0.25 * nominal):
        return None
    hu, lesion_img = _draw_intensity(rng, host.label, host_hu, radius, field_, texture[lbox])
    paint(image, labels, lbox, blob, lesion_img, LESION)
    centres.append((centre, radius))
    phys = geometry.ijk_to_lps() @ np.append((centre / sp)[::-1], 1.0)
    return LesionInfo(
        host=host.label,
        center_mm=(float(phys[0]), float(phys[1]), float(phys[2])),
        radius_mm=radius,
        hu=float(hu),
        contrast_hu=float(hu - host_hu[host.label]),
        n_voxels=n_vox,
    )


def _draw_centre(rng: np.random.Generator, host: _Host, sp: np.ndarray) -> tuple[float, np.ndarray]:
    """Radius (log-uniform, capped by the host's depth) and a centre deep enough inside the host (mm)."""
    depth = host.depth
    max_depth = float(depth.max())
    r_max = MAX_NODULE_RADIUS_MM if host.label == LUNG else MAX_LESION_RADIUS_MM
    r_cap = max(MIN_LESION_RADIUS_MM, min(r_max, 0.9 * max_depth))
    radius = float(math.exp(rng.uniform(math.log(MIN_LESION_RADIUS_MM), math.log(r_cap))))
    # the depth map is of the organ before any lesion: lesions already placed are avoided by the caller
    candidates = np.flatnonzero(depth >= min(0.6 * radius, 0.9 * max_depth))
    start = np.array([s.start for s in host.box])
    idx = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], depth.shape)) + start
    return radius, (idx + rng.uniform(-0.5, 0.5, 3)) * sp


def _draw_shape(
    rng: np.random.Generator,
    lbox: Box,
    centre: np.ndarray,
    radius: float,
    axes: np.ndarray,
    texture: np.ndarray,
    sp: np.ndarray,
) -> np.ndarray:
    """Normalised radius field (< 1 inside) of a rotated ellipsoid with 0-2 lobes and a noisy surface."""
    field_ = ellipsoid(lbox, centre, axes, sp, random_rotation(rng))
    for _lobe in range(int(rng.integers(0, 3))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        lobe_c = centre + direction * radius * rng.uniform(0.35, 0.65)
        lobe = ellipsoid(lbox, lobe_c, radius * rng.uniform(0.4, 0.65, 3), sp, random_rotation(rng))
        field_ = np.minimum(field_, lobe)
    return field_ + F32(rng.uniform(0.08, 0.22)) * texture[lbox]


def _draw_intensity(
    rng: np.random.Generator,
    host: int,
    host_hu: dict[int, float],
    radius: float,
    field_: np.ndarray,
    texture: np.ndarray,
) -> tuple[float, np.ndarray]:
    """Mean intensity (HU) and image of the lesion on its box: nodule in lung, hypo-dense elsewhere."""
    if host == LUNG:
        hu = rng.uniform(0.0, 40.0)
        return hu, F32(hu) + F32(6.0) * texture
    hu = host_hu[host] - rng.uniform(10.0, 50.0)
    lesion_img = F32(hu) + F32(4.0) * texture[::-1]
    if radius > 10.0 and rng.random() < 0.6:  # necrotic core
        lesion_img = lesion_img - F32(rng.uniform(5.0, 20.0)) * (field_ < 0.55)
    return hu, lesion_img
