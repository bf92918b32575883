"""The network's output back on the input volume's grid, as the prediction objects the engine returns.

The stitched maps are given the preprocessed image's metadata and
the recorded spatial transforms are inverted (``Spacing`` inverse = trilinear resampling onto the
original affine and shape; ``Orientation`` inverse = exact axis permutation/flip), then transposed
back to ``(z, y, x)``. The result has the input volume's exact shape, spacing, origin and direction.

Quantile regression cards
-------------------------
For a card with ``output.quantiles`` (see :mod:`~ConformalSegLib.inference.model_card`)
:meth:`~.engine.InferenceEngine.predict_quantiles` runs the same pipeline with **no activation**: every
output channel (one per quantile level) is blended over windows (the same Gaussian weighting, now
of regression values) and mapped back to the input grid by the same inverse resampling; nothing is
clipped. Quantiles that cross after blending and resampling are put in order per voxel (sorting the
channels, the monotone rearrangement of Chernozhukov et al.); the number of crossing voxels is
reported in ``info["crossing_voxels"]``. MC dropout and flip TTA are lesion-only options.
:meth:`~.engine.InferenceEngine.predict` refuses quantile cards and :meth:`~.engine.InferenceEngine.predict_quantiles`
refuses probability cards, so the lesion path is unchanged.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..common.geometry import Geometry
from ..io.volumes import Volume
from .preprocessing import Preprocessed, from_network_axes

__all__ = ["Prediction", "QuantilePrediction", "free_cuda", "restore"]


@dataclass
class Prediction:
    """A network's output on the input volume's grid (numpy ``(z, y, x)``, float32)."""

    probability: np.ndarray
    geometry: Geometry
    variance: np.ndarray | None = None  # MC dropout only
    entropy: np.ndarray | None = None  # MC dropout only (nats)
    mc_passes: int = 0
    tta_flips: int = 1  # number of flip combinations averaged (1 = none, 8 = all)
    seconds: float = 0.0
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    def volume(self, which: str = "probability", path: str | None = None) -> Volume:
        """``probability``/``variance``/``entropy`` as a :class:`Volume` on the input grid."""
        array = getattr(self, which)
        if array is None:
            raise ValueError(f"this prediction has no {which} map (run with mc_dropout > 0)")
        return Volume(array, self.geometry, path)


@dataclass
class QuantilePrediction:
    """A quantile regression network's output on the input volume's grid.

    ``maps`` is float32 ``(Q, z, y, x)``: ``maps[c]`` estimates the ``levels[c]`` quantile, in the
    card's output units (for the phantom denoiser: windowed intensity, nominally [0, 1]);
    ``maps`` is non-decreasing along ``c`` at every voxel.
    """

    levels: tuple[float, ...]
    maps: np.ndarray
    geometry: Geometry
    seconds: float = 0.0
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lower(self) -> np.ndarray:
        """The lowest-level quantile map (the interval's lower bound), ``(z, y, x)``."""
        return self.maps[0]

    @property
    def upper(self) -> np.ndarray:
        """The highest-level quantile map (the interval's upper bound), ``(z, y, x)``."""
        return self.maps[-1]

    def volume(self, which: str | int = "lower", path: str | None = None) -> Volume:
        """``"lower"``, ``"upper"`` or channel index ``c`` as a :class:`Volume` on the input grid."""
        array = {"lower": self.lower, "upper": self.upper}.get(which) if isinstance(which, str) else self.maps[which]
        if array is None:
            raise ValueError(f"unknown quantile map {which!r}: use 'lower', 'upper' or a channel index")
        return Volume(array, self.geometry, path)


def restore(
    maps: torch.Tensor, image: Preprocessed, spatial: Any, *, mc: bool, quantile: bool = False
) -> tuple[list[np.ndarray], bool]:
    """Invert the spatial preprocessing; return float32 numpy ``(z, y, x)`` arrays per channel
    (probability clipped to [0, 1], variance to [0, 1/4], entropy >= 0: interpolation and
    float rounding can step outside by a few ulps; quantile maps are not clipped) and whether
    any variance is positive."""
    try:
        restored = _invert(maps, image, spatial)
    except torch.cuda.OutOfMemoryError:
        restored = None
    if restored is None:
        free_cuda()
        restored = _invert(maps.cpu(), image, spatial)
    restored = restored.to(torch.float32)
    if quantile:
        return [_to_host(from_network_axes(restored[c])) for c in range(restored.shape[0])], False
    restored[0].clamp_(0.0, 1.0)
    any_variance = False
    if mc:
        restored[1].clamp_(0.0, 0.25)
        restored[2].clamp_(min=0.0)
        any_variance = bool((restored[1] > 0).any())
    # clip and transpose on the device (fast on a GPU), then one copy to host memory per map
    return [_to_host(from_network_axes(restored[c])) for c in range(restored.shape[0])], any_variance


def _invert(maps: torch.Tensor, image: Preprocessed, spatial: Any) -> torch.Tensor:
    if spatial is None:
        return maps
    from monai.data import MetaTensor

    meta = dict(image.meta.meta)
    meta["affine"] = image.meta.affine.clone()
    out = MetaTensor(maps, meta=meta)
    out.applied_operations = list(image.meta.applied_operations)
    inverted = spatial.inverse(out)
    return inverted.as_tensor() if hasattr(inverted, "as_tensor") else inverted


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy copy; CUDA tensors go through page-locked memory (several times faster
    than a copy into pageable memory; PyTorch caches the pinned blocks between calls)."""
    if tensor.device.type != "cuda":
        return tensor.contiguous().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host.numpy()


def free_cuda() -> None:
    """Give cached CUDA memory back (after an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
