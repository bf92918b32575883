"""Connected components of a coarse tumour mask and the anatomy-aware filters of Isler et al.

Every filter is a **pure, deterministic function on numpy arrays**: it takes an integer label map
(numpy ``(z, y, x)`` order, 0 = background, ``1..n`` = components; see :func:`label_components`) and
the voxel spacing **in numpy axis order** (``Geometry.spacing_zyx``, mm), and returns a *new* label
map in which the dropped components are set to 0 and the kept ones keep their ids. Inputs are never
modified. Where the paper counts voxels, the parameters here are physical (mm, mm³), so a setting
means the same on grids of different resolution:

* **distances** are Euclidean distances between voxel centres in mm (``scipy.ndimage``
  ``distance_transform_edt`` with ``sampling=spacing``);
* **volumes** are voxel counts times the voxel volume ``prod(spacing)`` in mm³;
* a **ball of radius r mm** is the set of voxel offsets ``d`` with ``sum((d_i * s_i)^2) <= r^2``
  (so along an axis with spacing ``s`` it reaches ``floor(r / s)`` voxels; ``r < s`` reaches none).

Connectivity is 26 (faces, edges and corners) by default; 6 and 18 are accepted.

Order used by :func:`select_components` (and the cascade): merge by dilation -> minimum volume ->
lung-overlap filter with the borderline rescue -> Top-K by volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..common.errors import ConformalSegError

__all__ = [
    "CONNECTIVITIES",
    "ComponentInfo",
    "ball",
    "bounding_boxes",
    "component_volumes_mm3",
    "filter_lung_overlap",
    "filter_min_volume",
    "label_components",
    "lung_distances_mm",
    "lung_overlap_fractions",
    "merge_components",
    "relabel_sequential",
    "select_components",
    "structure",
    "top_k",
]

CONNECTIVITIES = (6, 18, 26)
Box = tuple[slice, slice, slice]


def structure(connectivity: int = 26) -> np.ndarray:
    """The 3x3x3 neighbourhood of ``connectivity`` 6, 18 or 26."""
    if connectivity not in CONNECTIVITIES:
        raise ConformalSegError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    return ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])


def _spacing(spacing_zyx: Sequence[float] | np.ndarray) -> np.ndarray:
    sp = np.asarray(spacing_zyx, dtype=float)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ConformalSegError(f"spacing must be three positive numbers in numpy (z, y, x) order, got {spacing_zyx!r}")
    return sp


def ball(radius_mm: float, spacing_zyx: Sequence[float] | np.ndarray) -> np.ndarray:
    """Boolean structuring element: voxel offsets within ``radius_mm`` of the centre (see module docstring)."""
    sp = _spacing(spacing_zyx)
    reach = np.floor(max(float(radius_mm), 0.0) / sp + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(reach, sp)], indexing="ij")
    return sum(g * g for g in grids) <= float(radius_mm) ** 2 + 1e-9


def relabel_sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber the non-zero ids of ``labels`` to ``1..n`` **in the order of their first voxel** in C
    (``z``, then ``y``, then ``x``) order; returns ``(int32 labels, n)``."""
    labels = np.asarray(labels)
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    ids, first = ids[keep], first[keep]
    order = ids[np.argsort(first, kind="stable")]
    lookup = np.zeros(int(flat.max(initial=0)) + 1, dtype=np.int32)
    lookup[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lookup[labels].astype(np.int32, copy=False), int(order.size)


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask: ``(int32 labels, n)``, numbered by first voxel in C order
    (which is also what ``scipy.ndimage.label`` does)."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=structure(connectivity))
    return labels.astype(np.int32, copy=False), int(n)


def merge_components(
    mask: np.ndarray, spacing_zyx: Sequence[float] | np.ndarray, radius_mm: float, connectivity: int = 26
) -> tuple[np.ndarray, int]:
    """Component merging by 3D dilation (paper step 1).

    The mask is dilated with a ball of ``radius_mm`` (see module docstring); the connected components
    of the *dilated* mask define the groups, and each voxel of the **original** mask gets the id of its
    group. The mask itself is not grown: only the grouping changes. Two fragments end up in one
    component when their dilations touch, i.e. roughly when their closest voxel centres are at most
    ``2 * radius_mm`` (+ one voxel) apart. ``radius_mm <= 0`` is plain labelling. Returns
    ``(int32 labels, n)`` numbered by first voxel in C order.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius_mm is None or radius_mm <= 0:
        return label_components(mask, connectivity)
    element = ball(radius_mm, spacing_zyx)
    if element.sum() <= 1:
        return label_components(mask, connectivity)
    dilated = ndimage.binary_dilation(mask, structure=element)
    groups, _ = label_components(dilated, connectivity)
    return relabel_sequential(np.where(mask, groups, 0))


def _counts(labels: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(labels).ravel())


def component_volumes_mm3(labels: np.ndarray, spacing_zyx: Sequence[float] | np.ndarray) -> dict[int, float]:
    """``{id: volume in mm³}`` of every non-zero id present."""
    counts = _counts(labels)
    voxel = float(np.prod(_spacing(spacing_zyx)))
    return {int(i): float(counts[i]) * voxel for i in np.flatnonzero(counts) if i != 0}


def _keep(labels: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    return np.where(np.isin(labels, np.asarray(list(ids), dtype=labels.dtype)), labels, 0).astype(labels.dtype)


def filter_min_volume(
    labels: np.ndarray, spacing_zyx: Sequence[float] | np.ndarray, min_volume_mm3: float
) -> np.ndarray:
    """Keep components whose volume (mm³) is **>=** ``min_volume_mm3``."""
    volumes = component_volumes_mm3(labels, spacing_zyx)
    return _keep(labels, [i for i, v in volumes.items() if v >= float(min_volume_mm3)])


def lung_overlap_fractions(labels: np.ndarray, lung: np.ndarray) -> dict[int, float]:
    """``{id: |component ∩ lung| / |component|}`` (a voxel-count ratio, equal to the volume ratio)."""
    labels = np.asarray(labels)
    lung = np.asarray(lung, dtype=bool)
    if lung.shape != labels.shape:
        raise ConformalSegError(
            f"the lung mask shape {lung.shape} differs from the volume shape {labels.shape}",
            fix="give a lung mask on the image's grid",
        )
    total = _counts(labels)
    inside = np.bincount(labels[lung].ravel(), minlength=total.size)
    return {int(i): float(inside[i]) / float(total[i]) for i in np.flatnonzero(total) if i != 0}


def lung_distances_mm(
    labels: np.ndarray, lung: np.ndarray, spacing_zyx: Sequence[float] | np.ndarray
) -> dict[int, float]:
    """``{id: distance in mm from the component to the lung}``: the minimum over the component's voxels of
    the Euclidean distance between its centre and the nearest lung voxel centre. 0 for a component
    that overlaps the lung; one voxel spacing for one that merely touches it; ``inf`` without lung."""
    labels = np.asarray(labels)
    lung = np.asarray(lung, dtype=bool)
    ids = [int(i) for i in np.flatnonzero(_counts(labels)) if i != 0]
    if not lung.any():
        return {i: float("inf") for i in ids}
    distance = ndimage.distance_transform_edt(~lung, sampling=_spacing(spacing_zyx))
    minima = ndimage.minimum(distance, labels=labels, index=ids) if ids else []
    return {i: float(d) for i, d in zip(ids, np.atleast_1d(minima))}


def filter_lung_overlap(
    labels: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: Sequence[float] | np.ndarray,
    *,
    min_overlap: float = 0.8,
    rescue_distance_mm: float | None = None,
    rescue_min_volume_mm3: float = 0.0,
) -> np.ndarray:
    """Lung-overlap filtering with the borderline rescue (paper steps 2 and 3).

    A component is kept when its lung overlap fraction is **>=** ``min_overlap``, or -- the rescue
    rule, on when ``rescue_distance_mm`` is not None -- when its distance to the lung
    (:func:`lung_distances_mm`) is **<=** ``rescue_distance_mm`` **and** its volume is **>=**
    ``rescue_min_volume_mm3``. Everything else is dropped.
    """
    overlap = lung_overlap_fractions(labels, lung)
    keep = [i for i, f in overlap.items() if f >= float(min_overlap)]
    low = [i for i in overlap if i not in keep]
    if rescue_distance_mm is not None and low:
        volumes = component_volumes_mm3(labels, spacing_zyx)
        distances = lung_distances_mm(_keep(labels, low), lung, spacing_zyx)
        keep += [
            i for i in low if distances[i] <= float(rescue_distance_mm) and volumes[i] >= float(rescue_min_volume_mm3)
        ]
    return _keep(labels, keep)


def top_k(labels: np.ndarray, k: int | None) -> np.ndarray:
    """Keep the ``k`` largest components by voxel count (``None``: all).

    Ties are broken by position: among equally large components the one whose first voxel in C
    (``z``, ``y``, ``x``) order comes first wins (for a map from :func:`label_components` that is the
    lower id). Volumes in mm³ order components exactly like voxel counts (one grid), so no spacing is needed.
    """
    if k is None:
        return np.asarray(labels).copy()
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ConformalSegError(f"top_k must be a positive integer or None (all), got {k!r}")
    labels = np.asarray(labels)
    flat = labels.ravel()
    ids, first, counts = np.unique(flat, return_index=True, return_counts=True)
    nz = ids != 0
    ids, first, counts = ids[nz], first[nz], counts[nz]
    order = np.lexsort((first, -counts))  # primary: larger count; secondary: earlier first voxel
    return _keep(labels, ids[order[: int(k)]])


def bounding_boxes(labels: np.ndarray) -> dict[int, Box]:
    """``{id: (z, y, x) slices of the component's bounding box}``."""
    found = ndimage.find_objects(np.asarray(labels))
    return {i + 1: box for i, box in enumerate(found) if box is not None}


# ----------------------------------------------------------------------------- the whole selection


@dataclass(frozen=True)
class ComponentInfo:
    """One candidate component of the coarse mask (after merging) and what became of it.

    ``status``: ``"kept"``, ``"rescued"`` (kept by the borderline rule), ``"too_small"``,
    ``"outside_lung"`` or ``"not_top_k"``. ``bbox`` is ``((z0, z1), (y0, y1), (x0, x1))``, half-open
    voxel index ranges. ``lung_overlap``/``lung_distance_mm`` are None when no lung filter ran.
    """

    id: int
    n_voxels: int
    volume_mm3: float
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    lung_overlap: float | None
    lung_distance_mm: float | None
    status: str

    @property
    def kept(self) -> bool:
        return self.status in ("kept", "rescued")

    def to_dict(self) -> dict:
        return asdict(self)


def select_components(
    mask: np.ndarray,
    spacing_zyx: Sequence[float] | np.ndarray,
    *,
    lung: np.ndarray | None = None,
    connectivity: int = 26,
    merge_radius_mm: float | None = None,
    min_volume_mm3: float | None = None,
    min_lung_overlap: float | None = 0.8,
    rescue_distance_mm: float | None = None,
    rescue_min_volume_mm3: float = 0.0,
    k: int | None = None,
) -> tuple[np.ndarray, list[ComponentInfo]]:
    """Run the whole post-processing on a binary coarse mask (each step off when its parameter is None;
    the lung filter also when ``lung`` is None).

    Returns the merged label map restricted to the kept components (ids as after merging) and a
    table with one :class:`ComponentInfo` per merged candidate, in id order.
    """
    sp = _spacing(spacing_zyx)
    labels, _ = merge_components(mask, sp, merge_radius_mm or 0.0, connectivity)
    counts = _counts(labels)
    boxes = bounding_boxes(labels)
    status: dict[int, str] = {int(i): "kept" for i in np.flatnonzero(counts) if i != 0}
    current = labels
    if min_volume_mm3 is not None:
        current = filter_min_volume(current, sp, min_volume_mm3)
        present = set(np.unique(current).tolist())
        status.update({i: "too_small" for i in status if status[i] == "kept" and i not in present})
    overlap: dict[int, float] = {}
    distance: dict[int, float] = {}
    if lung is not None and min_lung_overlap is not None:
        overlap = lung_overlap_fractions(labels, lung)
        if rescue_distance_mm is not None:
            distance = lung_distances_mm(labels, lung, sp)
        after = filter_lung_overlap(
            current,
            lung,
            sp,
            min_overlap=min_lung_overlap,
            rescue_distance_mm=rescue_distance_mm,
            rescue_min_volume_mm3=rescue_min_volume_mm3,
        )
        present = set(np.unique(after).tolist())
        for i in status:
            if status[i] == "kept":
                if i not in present:
                    status[i] = "outside_lung"
                elif overlap[i] < min_lung_overlap:
                    status[i] = "rescued"
        current = after
    if k is not None:
        after = top_k(current, k)
        present = set(np.unique(after).tolist())
        status.update({i: "not_top_k" for i in status if status[i] in ("kept", "rescued") and i not in present})
        current = after
    voxel = float(np.prod(sp))
    table = [
        ComponentInfo(
            id=i,
            n_voxels=int(counts[i]),
            volume_mm3=float(counts[i]) * voxel,
            bbox=tuple((int(s.start), int(s.stop)) for s in boxes[i]),  # type: ignore[arg-type]
            lung_overlap=overlap.get(i),
            lung_distance_mm=distance.get(i),
            status=status[i],
        )
        for i in sorted(status)
    ]
    return current, table
