"""Image formation: the piecewise-smooth anatomy as a CT scanner would show it.

A mild per-case Gaussian point-spread function (0.6-1.0 mm in plane, 0.8-1.5 mm along z; partial
volume), then Gaussian noise (sigma 8-20 HU per case, drawn with the tissue intensities; slightly
correlated in plane like CT noise), and clipping to [:data:`HU_MIN`, :data:`HU_MAX`].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .shapes import F32

__all__ = ["HU_MAX", "HU_MIN", "form_image"]

HU_MIN, HU_MAX = -1024.0, 3071.0


def form_image(rng: np.random.Generator, image: np.ndarray, sp: np.ndarray, noise_sigma: float) -> np.ndarray:
    """Blur ``image`` (HU, float32, ``(z, y, x)`` spacing ``sp``), add CT-like noise and clip; a new array."""
    shape = image.shape
    psf_mm = np.array([rng.uniform(0.8, 1.5), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
    image = ndimage.gaussian_filter(image, tuple(psf_mm / sp), truncate=2.5, mode="nearest")
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.45, 0.45), truncate=2.5, mode="wrap")
    noise *= F32(noise_sigma / max(float(noise.std()), 1e-6))
    image += noise
    np.clip(image, HU_MIN, HU_MAX, out=image)
    return image
