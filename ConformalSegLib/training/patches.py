"""Where a training patch is taken, and the patch itself (cropped, padded, augmented).

Foreground oversampling (nnU-Net style, lesion-balanced)
-------------------------------------------------------
With probability ``fg_fraction`` a patch is *positive*: a lesion (26-connected component of the
lesion mask on the network grid) is chosen **uniformly among the case's lesions** and the patch is
centred on a uniformly chosen voxel of it. Choosing the lesion first keeps small lesions from being
under-represented (choosing a voxel uniformly would pick a 4,000-voxel lesion 200 times as often as
a 20-voxel one). Otherwise (and always for a case without lesion) the centre is a uniformly random
voxel of the volume. The patch is then shifted to lie inside the volume (volumes are at least one
patch large: :func:`~ConformalSegLib.training.data.prepare_case` pads them).

With augmentation, a rotated/scaled patch is resampled from a larger crop around the same centre
(zero-padded where it leaves the volume); see :mod:`ConformalSegLib.training.augmentation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .augmentation import AugmentationConfig, intensity_augment, spatial_augment

if TYPE_CHECKING:
    from .data import PreparedCase


def choose_centre(case: PreparedCase, rng: np.random.Generator, fg_fraction: float) -> tuple[np.ndarray, bool]:
    """``(centre voxel, positive)`` of one patch of ``case`` (see the module docstring)."""
    shape = np.array(case.image.shape[1:])
    positive = case.has_lesion and rng.random() < fg_fraction
    if positive:
        component = int(rng.integers(case.n_components))
        members = np.flatnonzero(case.lesion_component == component)
        return case.lesion_voxels[members[rng.integers(members.size)]], True
    return np.array([rng.integers(s) for s in shape]), False


def crop(tensor: torch.Tensor, centre: np.ndarray, size: np.ndarray) -> torch.Tensor:
    """The ``size`` box of ``tensor`` ``(C, d0, d1, d2)`` centred on ``centre`` (zero-padded outside)."""
    shape = np.array(tensor.shape[1:])
    start = np.asarray(centre, dtype=np.int64) - np.asarray(size, dtype=np.int64) // 2
    stop = start + np.asarray(size, dtype=np.int64)
    lo, hi = np.maximum(start, 0), np.minimum(stop, shape)
    inner = tensor[(slice(None),) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    pads: list[int] = []
    for before, after in reversed(list(zip(lo - start, stop - hi))):
        pads += [int(before), int(after)]
    return torch.nn.functional.pad(inner, pads) if any(pads) else inner


def inside_centre(centre: np.ndarray, shape: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """``centre`` moved so that a ``patch`` around it lies inside a volume of ``shape`` (>= patch)."""
    start = np.clip(np.asarray(centre) - patch // 2, 0, np.asarray(shape) - patch)
    return start + patch // 2


def sample_patch(
    case: PreparedCase,
    patch_size: np.ndarray | tuple[int, ...],
    rng: np.random.Generator,
    *,
    fg_fraction: float,
    augmentation: AugmentationConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(image (1, *patch), lesion (1, *patch), positive)`` of one random patch of ``case``."""
    patch = np.asarray(patch_size, dtype=np.int64)
    centre, positive = choose_centre(case, rng, fg_fraction)
    centre = inside_centre(centre, np.array(case.image.shape[1:]), patch)
    if augmentation is None:
        return crop(case.image, centre, patch), crop(case.lesion, centre, patch), positive
    size = augmentation.margin(patch) if rng.random() < augmentation.p_rotate_scale else patch
    image, lesion = spatial_augment(
        crop(case.image, centre, size), crop(case.lesion, centre, size), patch, rng, augmentation
    )
    return intensity_augment(image, rng, augmentation), lesion, positive
