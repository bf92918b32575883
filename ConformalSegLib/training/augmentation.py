"""Seeded data augmentation of training patches (nnU-Net-style, with MONAI's transforms).

Every random choice is drawn from the ``numpy`` generator handed in (seeded per sample by the
samplers), and then applied with MONAI's *deterministic* transforms (``Affine``, ``Flip``,
``GaussianSmooth``, ``AdjustContrast``), so a sample's augmentation depends only on its seed, not on
worker processes or global random state.

Spatial (``(1, d0, d1, d2)`` image and label together; ``d2`` is the slice axis)
  * rotation about the slice axis by up to ``rotate_deg`` degrees and an isotropic scaling in
    ``scale`` with probability ``p_rotate_scale``: the patch is taken from a larger crop around the
    same centre and resampled (image bilinear; label bilinear then ``> 0.5``), so no padding enters
    the patch except at the volume border;
  * mirroring of each in-plane axis with probability ``p_flip`` (the lesions' appearance does not
    depend on side; the slice axis is not mirrored).

Intensity (on the preprocessed image, e.g. a window mapped to ``[0, 1]``)
  * additive Gaussian noise, standard deviation uniform in ``(0, noise_std]``, probability ``p_noise``;
  * Gaussian blur, sigma uniform in ``blur_sigma`` voxels, probability ``p_blur``;
  * multiplicative brightness uniform in ``brightness``, probability ``p_brightness``;
  * contrast about the patch mean uniform in ``contrast``, probability ``p_contrast``;
  * gamma uniform in ``gamma`` on the patch's min-max range (``AdjustContrast``), probability ``p_gamma``.

The label is never changed by the intensity transforms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class AugmentationConfig:
    """Probabilities and ranges of :mod:`ConformalSegLib.training.augmentation` (see its docstring)."""

    p_rotate_scale: float = 0.3
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    p_flip: float = 0.5
    p_noise: float = 0.15
    noise_std: float = 0.03
    p_blur: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.9, 1.1)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.8, 1.2)
    p_gamma: float = 0.15
    gamma: tuple[float, float] = (0.8, 1.25)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def margin(self, patch: np.ndarray) -> np.ndarray:
        """Size of the larger crop a rotated and scaled patch is resampled from (per axis, voxels)."""
        if self.p_rotate_scale <= 0:
            return np.asarray(patch, dtype=np.int64)
        angle = math.radians(self.rotate_deg)
        spread = (abs(math.cos(angle)) + abs(math.sin(angle))) * max(self.scale)
        grown = np.asarray(patch, dtype=np.float64).copy()
        grown[:2] = np.ceil(grown[:2] * spread)
        grown[2] = math.ceil(grown[2] * max(self.scale))
        return grown.astype(np.int64) + 2


def spatial_augment(
    image: torch.Tensor, label: torch.Tensor, patch: np.ndarray, rng: np.random.Generator, config: AugmentationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale (from a larger crop) to ``patch`` and mirror; ``image``/``label`` are ``(1, *crop)``
    centred on the patch centre (see the module docstring)."""
    from monai.transforms import Affine, Flip

    size = [int(p) for p in patch]
    if tuple(image.shape[1:]) != tuple(size):
        angle = math.radians(float(rng.uniform(-config.rotate_deg, config.rotate_deg)))
        zoom = float(rng.uniform(*config.scale))
        affine = Affine(
            rotate_params=(0.0, 0.0, angle),
            scale_params=(zoom, zoom, zoom),
            spatial_size=size,
            mode="bilinear",
            padding_mode="zeros",
            image_only=True,
        )
        image = _plain(affine(image))
        label = (_plain(affine(label.float())) > 0.5).to(label.dtype)
    for axis in (0, 1):
        if rng.random() < config.p_flip:
            flip = Flip(spatial_axis=axis)
            image, label = _plain(flip(image)), _plain(flip(label))
    return image.contiguous(), label.contiguous()


def _plain(value: Any) -> torch.Tensor:
    """A plain tensor from what a MONAI transform returns (a MetaTensor, or a tensor)."""
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def intensity_augment(image: torch.Tensor, rng: np.random.Generator, config: AugmentationConfig) -> torch.Tensor:
    """The intensity transforms of the module docstring, each with its probability."""
    from monai.transforms import AdjustContrast, GaussianSmooth

    out = image.clone()
    if rng.random() < config.p_noise:
        std = float(rng.uniform(0.0, config.noise_std))
        noise = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
        out = out + std * noise
    if rng.random() < config.p_blur:
        out = torch.as_tensor(GaussianSmooth(sigma=float(rng.uniform(*config.blur_sigma)))(out))
    if rng.random() < config.p_brightness:
        out = out * float(rng.uniform(*config.brightness))
    if rng.random() < config.p_contrast:
        mean = out.mean()
        out = (out - mean) * float(rng.uniform(*config.contrast)) + mean
    if rng.random() < config.p_gamma:
        out = torch.as_tensor(AdjustContrast(gamma=float(rng.uniform(*config.gamma)))(out))
    return out.to(torch.float32).contiguous()
