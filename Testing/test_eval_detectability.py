"""The visibility estimate of ``benchmarks/eval_detectability.py`` (issue 11's feasibility argument):
its noise model must match the phantoms' own noise, or its SNR table means nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_detectability as D  # noqa: E402


def _phantom_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """The noise of :func:`ConformalSegLib.phantoms.imaging.form_image`, written out the same way."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, D.NOISE_FILTER, truncate=2.5, mode="wrap")
    return noise * np.float32(sigma / float(noise.std()))


def test_noise_filter_is_the_generators() -> None:
    import inspect

    from ConformalSegLib.phantoms import imaging

    assert f"gaussian_filter(noise, {D.NOISE_FILTER}" in inspect.getsource(imaging.form_image)


def test_sum_noise_sd_matches_simulation() -> None:
    rng = np.random.default_rng(0)
    shape = (6, 24, 24)
    zz, yy, xx = np.indices(shape)
    masks = {"blob": (zz - 3) ** 2 / 4 + (yy - 12) ** 2 / 16 + (xx - 11) ** 2 / 9 <= 1, "voxel": np.zeros(shape, bool)}
    masks["voxel"][3, 5, 5] = True
    sums = {name: [] for name in masks}
    for _ in range(600):
        noise = _phantom_noise(rng, shape, 15.0)
        for name, mask in masks.items():
            sums[name].append(float(noise[mask].sum()))
    for name, mask in masks.items():
        predicted = D.sum_noise_sd(mask, 15.0)
        assert abs(np.std(sums[name]) / predicted - 1.0) < 0.1, name
    # Correlated noise: the blob's sum varies more than white noise of the same sd would.
    assert D.sum_noise_sd(masks["blob"], 15.0) > 1.2 * 15.0 * np.sqrt(masks["blob"].sum())


def test_lesion_statistics_reads_contrast_and_sigma() -> None:
    rng = np.random.default_rng(1)
    shape = (12, 40, 40)
    labels = np.full(shape, 3, dtype=np.uint8)
    zz, yy, xx = np.indices(shape)
    lesion = (zz - 6) ** 2 / 9 + (yy - 20) ** 2 / 25 + (xx - 20) ** 2 / 25 <= 1
    labels[lesion] = 6
    image = np.where(lesion, 60.0, 90.0).astype(np.float32) + _phantom_noise(rng, shape, 10.0)
    components, rows = D.lesion_statistics(image, labels, 6, (2, 3, 4, 5))
    assert len(rows) == 1 and rows[0]["host"] == 3 and rows[0]["voxels"] == int(lesion.sum())
    assert abs(rows[0]["contrast"] - 30.0) < 2.0 and abs(rows[0]["sigma"] - 10.0) < 1.0
    expected = 30.0 * lesion.sum() / D.sum_noise_sd(lesion, 10.0)
    assert abs(rows[0]["snr"] / expected - 1.0) < 0.1
    assert (components > 0).sum() == lesion.sum()


def test_default_network_is_the_demos() -> None:
    """The network column reports the demo's model (until 2026-12-05 it was v1 by mistake)."""
    from ConformalSegLib.common.shipped_models import LESION_MODEL

    assert D.MODEL.name == LESION_MODEL and (D.MODEL / "model_card.json").is_file()
