"""From a CT volume to the network's input tensor: axes, world space and the card's preprocessing.

**Axes and world space** (written once, in :func:`network_affine` / :func:`to_network_axes`).
A :class:`~ConformalSegLib.io.volumes.Volume` holds a numpy ``(z, y, x)`` array and an ITK geometry
(spacing/origin/direction in ``(x, y, z)`` order, world space **LPS**: +x = patient Left,
+y = Posterior, +z = Superior). MONAI (like nibabel) expects channel-first tensors whose spatial
axes are the index axes ``(i, j, k)`` = ``(x, y, z)`` and an affine to world space **RAS**
(+x = Right, +y = Anterior). So the engine

* transposes the array ``(z, y, x) -> (x, y, z)`` (a view; no copy until the tensor is built), and
* builds the affine ``A_ras = diag(-1, -1, 1, 1) @ A_lps`` with ``A_lps = [D @ diag(spacing) | origin]``
  (:meth:`Geometry.ijk_to_lps`): flipping the sign of the first two world coordinates converts
  LPS to RAS; the voxel axes are untouched.

This is exactly what ``monai.transforms.LoadImage`` produces for the same file (its readers
convert ITK's LPS to RAS and reverse the index order), so a network trained with a MONAI
``LoadImage -> Orientation -> Spacing`` pipeline sees the same tensor here (tested).

**Preprocessing** on a :class:`monai.data.MetaTensor`: ``Orientation`` (card ``orientation``,
RAS axis codes), ``Spacing`` (card ``spacing_mm``, trilinear, border padding), then intensity
(``ScaleIntensityRange`` / ``NormalizeIntensity``). Spatial transforms record themselves in the
MetaTensor, so their exact inverse is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry, geometry_from_ijk_to_ras
from ..io.volumes import Volume
from .model_card import ModelCard

__all__ = [
    "RAS_LABELS",
    "TORCH_DTYPES",
    "Preprocessed",
    "build_preprocessing",
    "checked_array",
    "from_network_axes",
    "geometry_from_affine",
    "network_affine",
    "preprocess_on",
    "to_network_axes",
]

#: MONAI's RAS axis labels (given explicitly so ``Orientation`` never guesses the space).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: numpy dtypes uploaded as they are (converted to float32 on the device).
TORCH_DTYPES = tuple(
    np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int16, np.int32, np.int64, np.uint8, np.int8, np.bool_)
)


def network_affine(geometry: Geometry) -> np.ndarray:
    """4x4 affine mapping the MONAI voxel index ``(d0, d1, d2) = (i, j, k)`` to **RAS** mm.

    :meth:`Geometry.ijk_to_ras`: the ITK index-to-LPS matrix with the x and y world coordinates
    negated. The voxel axes are the ITK index axes, i.e. the numpy ``(z, y, x)`` array transposed
    (:func:`to_network_axes`).
    """
    return geometry.ijk_to_ras()


def to_network_axes(array_zyx: np.ndarray) -> np.ndarray:
    """numpy ``(z, y, x)`` -> MONAI ``(x, y, z)`` (a view)."""
    return np.asarray(array_zyx).transpose(2, 1, 0)


def from_network_axes(array_xyz):
    """MONAI ``(x, y, z)`` -> numpy ``(z, y, x)`` (numpy array or torch tensor; a view)."""
    if isinstance(array_xyz, torch.Tensor):
        return array_xyz.permute(2, 1, 0)
    return np.asarray(array_xyz).transpose(2, 1, 0)


def geometry_from_affine(affine_ras: np.ndarray, shape_xyz: Sequence[int]) -> Geometry:
    """The :class:`Geometry` of a MONAI tensor with RAS ``affine`` and spatial shape ``(x, y, z)``."""
    return geometry_from_ijk_to_ras(affine_ras, tuple(reversed(tuple(shape_xyz))))


def build_preprocessing(card: ModelCard):
    """The card's preprocessing as MONAI transforms: ``(spatial, intensity)``, either may be None.

    ``spatial`` is a ``Compose`` of ``Orientation`` (card ``orientation``, RAS axis codes) and
    ``Spacing`` (card ``spacing_mm``, trilinear, border padding) for a channel-first
    :class:`monai.data.MetaTensor` in network axes (see :func:`network_affine`); being invertible,
    the engine uses it to map outputs back to the input grid. ``intensity`` is
    ``ScaleIntensityRange`` (``window``) or ``NormalizeIntensity`` (``zscore``). The engine and the
    trainer (:mod:`ConformalSegLib.training`) both build their transforms here, so training and
    inference preprocess identically (exchangeability needs that).
    """
    from monai.transforms import Compose, NormalizeIntensity, Orientation, ScaleIntensityRange, Spacing

    pre = card.preprocessing
    spatial: list[Any] = []
    if pre.orientation is not None:
        spatial.append(Orientation(axcodes=pre.orientation, labels=RAS_LABELS))
    if pre.spacing_mm is not None:
        spatial.append(Spacing(pixdim=pre.spacing_mm, mode="bilinear", padding_mode="border"))
    intensity = pre.intensity
    norm: Any = None
    if intensity.kind == "window":
        assert intensity.a_min is not None and intensity.a_max is not None  # a window has all four bounds
        norm = ScaleIntensityRange(
            a_min=intensity.a_min,
            a_max=intensity.a_max,
            b_min=intensity.b_min,
            b_max=intensity.b_max,
            clip=intensity.clip,
        )
    elif intensity.kind == "zscore":
        mean: Any = intensity.mean  # a float or None; MONAI's annotation asks for a sequence or array
        std: Any = intensity.std
        norm = NormalizeIntensity(subtrahend=mean, divisor=std, nonzero=False, channel_wise=False)  # one input channel
    return (Compose(spatial) if spatial else None), norm


def checked_array(volume: Volume) -> np.ndarray:
    """The volume's array after checking it is a 3D scalar image matching its geometry."""
    array = np.asarray(volume.array)
    if array.ndim != 3 or array.shape != volume.geometry.shape:
        raise ConformalSegError(
            f"image array shape {array.shape} does not match its geometry {volume.geometry.shape}",
            path=volume.path,
            fix="give a 3D image",
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ConformalSegError(
            f"image has non-numeric voxels ({array.dtype})", path=volume.path, fix="give a scalar image"
        )
    return array


@dataclass
class Preprocessed:
    tensor: torch.Tensor  # (1, d0, d1, d2) float32, network input
    meta: Any  # MetaTensor after the spatial transforms (affine + applied operations)
    finite: torch.Tensor  # 0-d bool: the input image had no NaN/Inf voxel


def preprocess_on(
    array: np.ndarray, affine: torch.Tensor, device: torch.device, spatial: Any, intensity: Any
) -> Preprocessed:
    """The network input on ``device``: upload, transpose to network axes, spatial then intensity transforms."""
    from monai.data import MetaTensor

    # upload in the stored dtype and (z, y, x) order; convert and transpose on the device
    data = torch.from_numpy(array).to(device).to(torch.float32)
    finite = torch.isfinite(data).all()  # checked after the windows are queued (no early device sync)
    data = from_network_axes(data).contiguous()  # (z, y, x) -> (x, y, z); the permutation is its own inverse
    image = MetaTensor(data[None], affine=affine)
    if spatial is not None:
        image = spatial(image)
    tensor = image.as_tensor()
    if intensity is not None:
        tensor = intensity(tensor)
        tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return Preprocessed(tensor=tensor.to(torch.float32).contiguous(), meta=image, finite=finite)
