"""Seeded CT denoising data from phantoms: noisy inputs, clean targets and organ label maps.

The setting of Teneggi et al. (Sec. 4, denoising), on :mod:`ConformalSegLib.phantoms.generator` phantoms:

1. **Window.** The phantom image (HU; it already carries the phantom's own mild CT-like noise) is
   windowed: ``clean = clip((HU - (-175)) / (250 - (-175)), 0, 1)`` -- HU -175..250 mapped to [0, 1].
   ``clean`` is the ground truth ``x`` of the intervals.
2. **Noise.** ``noisy = clean + sigma * N(0, 1)`` with ``sigma = 0.2`` in these windowed units,
   independent per voxel, drawn from ``numpy.random.default_rng((seed, case index, NOISE_STREAM))``.
   ``noisy`` is **not** clipped (it leaves [0, 1]). This is the measurement ``y``.

Noise is added here, in a data-generation step, *not* inside any model pipeline: the images given
to the denoiser (``noisy/``) are already windowed and noisy, so the denoiser's model card has
intensity ``none`` (its input and output units are the windowed units). Calibration targets are
``clean/``; quantile maps, truth and the interval lengths are all in windowed units (1.0 = 425 HU).

Folders written by :func:`write_denoising_dataset` (NIfTI ``CASE.nii.gz``, the same case ids)::

    noisy/   float32 noisy windowed image (the network input)
    clean/   float32 clean windowed image (the truth)
    organs/  uint8 phantom label map (0 air, 1 body, 2 lung, 3 liver, 4 kidney, 5 spleen, 6 lesion,
             7 bone), the semantic map s(y) of sem-CRC (here the true organs, not a segmentation)
    dataset.json

The default grid is a coarse phantom (``DEFAULT_SHAPE`` = 24 x 48 x 48 voxels, ``DEFAULT_SPACING``
= 3.2 x 3.2 x 6.0 mm): the same anatomy as the default phantom at half the resolution, small enough
to train and calibrate on two CPU cores in minutes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry

WINDOW_HU = (-175.0, 250.0)  #: the paper's window (HU), mapped to [0, 1]
NOISE_SIGMA = 0.2  #: Gaussian noise standard deviation in windowed units (the paper's sigma)
DEFAULT_SHAPE = (24, 48, 48)  #: numpy (z, y, x)
DEFAULT_SPACING = (3.2, 3.2, 6.0)  #: mm, ITK (x, y, z)
NOISE_STREAM = 7  #: keeps the noise generator apart from the phantom's own streams
#: the phantom organ labels as sem-CRC groups (label 1 "body tissue" falls into sem-CRC's generic body)
PHANTOM_ORGANS = "2=lung,3=liver,4=kidney,5=spleen,6=lesion,7=bone"
FOLDERS = ("noisy", "clean", "organs")


def window(hu: np.ndarray, window_hu: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """HU -> windowed units: ``clip((hu - lo) / (hi - lo), 0, 1)`` as float32."""
    lo, hi = window_hu
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def add_noise(clean: np.ndarray, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> np.ndarray:
    """``clean + sigma * N(0, 1)`` (float32, not clipped)."""
    return (clean + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)).astype(np.float32)


@dataclass(frozen=True)
class DenoisingCase:
    """One case: arrays ``(z, y, x)`` on ``geometry`` (windowed units; ``organs`` uint8 labels)."""

    case_id: str
    noisy: np.ndarray
    clean: np.ndarray
    organs: np.ndarray
    geometry: Geometry


def denoising_cases(
    n: int,
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    sigma: float = NOISE_SIGMA,
    first: int = 0,
) -> Iterator[DenoisingCase]:
    """Cases ``first .. first + n - 1`` of the phantom stream ``seed`` (``make_phantoms`` numbering and
    case ids), windowed and with noise (module docstring). Deterministic in ``(seed, index, sigma)``."""
    from ..phantoms.generator import make_phantom, phantom_seed

    if isinstance(n, bool) or int(n) != n or n < 0 or first < 0:
        raise ConformalSegError(f"the number of cases must be a non-negative integer, got {n}")
    if not sigma >= 0:
        raise ConformalSegError(f"the noise sigma must be >= 0, got {sigma}")
    width = max(3, len(str(first + int(n) - 1)))
    for i in range(first, first + int(n)):
        phantom = make_phantom(phantom_seed(seed, i), shape=shape, spacing=spacing, case_id=f"phantom_{i:0{width}d}")
        clean = window(phantom.image)
        noisy = add_noise(clean, np.random.default_rng((int(seed), i, NOISE_STREAM)), sigma)
        yield DenoisingCase(phantom.case_id, noisy, clean, phantom.labels.astype(np.uint8), phantom.geometry)


def write_denoising_dataset(
    out: str | PathLike[str],
    n: int,
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    sigma: float = NOISE_SIGMA,
    first: int = 0,
    force: bool = False,
) -> Path:
    """Write ``noisy/``, ``clean/``, ``organs/`` and ``dataset.json`` under ``out`` (module docstring).

    Existing files are not overwritten without ``force`` (checked before anything is written).
    """
    from ..io.atomic import atomic_write_text
    from ..io.volumes import save_volume

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConformalSegError("the output path is a file", path=out, fix="give a folder")
    if not force and any((out / f).exists() and any((out / f).iterdir()) for f in FOLDERS):
        raise ConformalSegError(
            "the denoising dataset folder already holds data", path=out, fix="choose another folder or pass force=True"
        )
    ids = []
    for case in denoising_cases(n, seed, shape=shape, spacing=spacing, sigma=sigma, first=first):
        for folder, array in zip(FOLDERS, (case.noisy, case.clean, case.organs)):
            save_volume(array, case.geometry, out / folder / f"{case.case_id}.nii.gz", force=force)
        ids.append(case.case_id)
    meta = {
        "format": "conformalseg-denoising-dataset",
        "format_version": 1,
        "source": "phantoms",
        "phantom_seed": int(seed),
        "first_index": int(first),
        "cases": ids,
        "shape_zyx": list(shape),
        "spacing_mm_xyz": list(spacing),
        "window_hu": list(WINDOW_HU),
        "noise": {
            "kind": "gaussian",
            "sigma": float(sigma),
            "units": "windowed [0, 1]",
            "added": "after windowing, not clipped",
        },
        "organ_labels": PHANTOM_ORGANS,
        "folders": {"noisy": "network input", "clean": "truth", "organs": "phantom label map s(y)"},
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n", force=True)
    return out
