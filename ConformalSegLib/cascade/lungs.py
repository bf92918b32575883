"""Lung masks for the anatomy-aware filters: from a label map, or by a classical HU algorithm.

No lung segmentation network (the paper uses the LungMask library) can be downloaded here, so
:func:`classical_lung_mask` segments the lungs of a CT in Hounsfield units with a documented,
deterministic threshold-and-morphology algorithm. Arrays are numpy ``(z, y, x)``; the spacing is in
numpy order (``Geometry.spacing_zyx``, mm); **axial slices are** ``array[z]``.

Classical algorithm (:func:`classical_lung_mask`)
-------------------------------------------------
1. **Body**: voxels above ``body_hu`` (default -500 HU); the largest 6-connected component; its
   holes filled in 3D and then slice by slice in the axial plane (the lungs are holes of the body
   in every axial slice even where they touch the top or bottom of the volume).
2. **Air inside the body**: voxels below ``air_hu`` (default -400 HU) inside the filled body.
3. **Lung candidates**: 6-connected components of that air which do not touch the in-plane border
   of the volume (``y`` or ``x`` faces; outside air that leaks through an open body outline does).
   The largest is kept, and the second largest when it is at least ``second_lung_fraction``
   (default 0.1) of the largest (the two lungs; small bowel-gas pockets are dropped). Components
   below ``min_volume_mm3`` (default 10 mL) are never lungs.
4. **Closing and hole filling**: binary closing with a ball of ``closing_mm`` (default 3 mm,
   joining the parenchyma around vessels), then holes filled in 3D and per axial slice, so vessels,
   airway walls and nodules *enclosed* by the lung count as lung; the result is intersected with
   the filled body.

The result is boolean; an all-False mask when nothing qualifies (e.g. an abdominal scan).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..common.errors import ConformalSegError
from .components import ball, label_components, structure

__all__ = ["classical_lung_mask", "fill_holes_axial", "lung_mask_from_labels"]


def fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 3D, then in every axial slice ``mask[z]`` (8-connected background in 2D)."""
    out = ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))
    for z in range(out.shape[0]):
        if out[z].any():
            out[z] = ndimage.binary_fill_holes(out[z])
    return out


def lung_mask_from_labels(label_map: np.ndarray, values: Iterable[int], *, fill_holes: bool = True) -> np.ndarray:
    """Lung mask = voxels of ``label_map`` whose value is one of ``values``; with ``fill_holes``
    (default) holes are filled as in :func:`fill_holes_axial`, so that a nodule *inside* the lung
    (labelled as tumour, not lung, in most label maps) counts as lung for the overlap filter."""
    values = [int(v) for v in values]
    if not values:
        raise ConformalSegError("no lung label value given", fix="give the lung label value(s), e.g. [2]")
    mask = np.isin(np.asarray(label_map), values)
    if not mask.any():
        raise ConformalSegError(
            f"the lung label map has no voxel with value(s) {values}",
            fix="check the lung label value(s) (the phantom's lung is 2)",
        )
    return fill_holes_axial(mask) if fill_holes else mask


def _largest(labels: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(labels.shape, dtype=bool)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def classical_lung_mask(
    image_hu: np.ndarray,
    spacing_zyx: Sequence[float] | np.ndarray,
    *,
    body_hu: float = -500.0,
    air_hu: float = -400.0,
    closing_mm: float = 3.0,
    min_volume_mm3: float = 10_000.0,
    second_lung_fraction: float = 0.1,
) -> np.ndarray:
    """Lungs of a CT (HU) by thresholds and morphology; see the module docstring for the steps."""
    image = np.asarray(image_hu)
    if image.ndim != 3:
        raise ConformalSegError(f"the lung algorithm needs a 3D image, got shape {image.shape}")
    sp = np.asarray(spacing_zyx, dtype=float)
    six = structure(6)
    body_labels, n_body = label_components(image > body_hu, 6)
    body = fill_holes_axial(_largest(body_labels, n_body))
    air = (image < air_hu) & body
    labels, n = ndimage.label(air, structure=six)
    if n == 0:
        return np.zeros(image.shape, dtype=bool)
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    counts = np.bincount(labels.ravel()).astype(float)
    counts[0] = 0
    counts[border] = 0
    voxel = float(np.prod(sp))
    order = np.argsort(-counts, kind="stable")
    chosen = [int(i) for i in order[:2] if counts[i] * voxel >= min_volume_mm3]
    if len(chosen) == 2 and counts[chosen[1]] < second_lung_fraction * counts[chosen[0]]:
        chosen = chosen[:1]
    lungs = np.isin(labels, chosen)
    if not lungs.any():
        return lungs
    if closing_mm and closing_mm > 0:
        element = ball(closing_mm, sp)
        pad = [(r, r) for r in (np.array(element.shape) // 2)]
        lungs = ndimage.binary_closing(np.pad(lungs, pad), structure=element)[
            tuple(slice(p, p + s) for (p, _), s in zip(pad, image.shape))
        ]
    return fill_holes_axial(lungs) & body
