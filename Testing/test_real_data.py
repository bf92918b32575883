"""Validity on real lesion shapes: KiTS19 tumour masks (../shared/data/kits19_labels) with a simulated
predictor, read in place and skipped cleanly when the folder is absent.

Why the binomial test is exact here: for a *fixed* pool of cases, drawing a uniformly random
calibration subset of size ``n`` and one test case from the rest makes the ``n + 1`` cases
exchangeable, so each split covers with probability ``p >= ceil((1-alpha)(n+1))/(n+1) >= 1 - alpha``,
and independent splits give a Binomial(T, p) count of covered splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage, special, stats

from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.cls import conformal_lower_cutoff, critical_cutoff
from ConformalSegLib.conformal.confidence_sets import case_statistics, conformal_upper_quantile
from ConformalSegLib.conformal.exact import conformal_rank
from ConformalSegLib.conformal.score_transforms import parse_transform
from ConformalSegLib.io.volumes import geometry_from_sitk

KITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kits19_labels"
TUMOUR = 2
pytestmark = pytest.mark.skipif(not KITS.is_dir(), reason="../shared/data/kits19_labels is not present")


def simulated_prediction(tumour: np.ndarray, geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """An imperfect network output: a per-case miscalibrated logit of the signed distance (mm) to the
    true boundary plus smooth noise (float32 probabilities)."""
    sp = geometry.spacing_zyx
    signed = np.where(
        tumour,
        -ndimage.distance_transform_edt(tumour, sampling=sp),
        ndimage.distance_transform_edt(~tumour, sampling=sp),
    )
    scale = np.exp(rng.uniform(np.log(0.3), np.log(2.5)))
    shift = rng.normal(-1.0, 1.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(tumour.shape), [3.0 / s for s in sp])
    noise /= noise.std() + 1e-12
    return special.expit(scale * (shift - np.minimum(signed, 25.0)) + 1.5 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def kits_cases():
    rng = np.random.default_rng(2024)
    cases = []
    for path in sorted(KITS.glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(image)
        tumour = labels == TUMOUR
        if not tumour.any():
            continue
        # crop to the tumour plus about 30 mm to keep the test fast; the spacing is unchanged
        margin = np.ceil(30.0 / np.asarray(geometry_from_sitk(image).spacing_zyx)).astype(int)
        where = np.argwhere(tumour)
        lo = np.maximum(where.min(axis=0) - margin, 0)
        hi = np.minimum(where.max(axis=0) + margin + 1, labels.shape)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        full = geometry_from_sitk(image)
        origin = tuple(image.TransformIndexToPhysicalPoint([int(v) for v in lo[::-1]]))
        geometry = Geometry(shape=tumour[crop].shape, spacing=full.spacing, origin=origin, direction=full.direction)
        tumour = tumour[crop]
        cases.append((tumour, simulated_prediction(tumour, geometry, rng), geometry))
    assert len(cases) >= 30, "expected the 50 KiTS19 label maps"
    return cases


def binomial_floor(trials: int, alpha: float, n: int) -> float:
    return stats.binom.ppf(0.001, trials, conformal_rank(n, alpha) / (n + 1))


@pytest.mark.parametrize("epsilon, alpha", [(0.1, 0.1), (0.2, 0.2), (0.05, 0.1)])
def test_cls_on_real_tumour_shapes(kits_cases, epsilon, alpha):
    cutoffs = np.array([critical_cutoff(prob, tumour, epsilon) for tumour, prob, _ in kits_cases])
    sizes = np.array([tumour.sum() for tumour, _, _ in kits_cases])
    n, trials = 24, 3000
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(trials):
        order = rng.permutation(len(cutoffs))
        c_hat = conformal_lower_cutoff(cutoffs[order[:n]], alpha)
        test = order[n]
        covered += c_hat <= cutoffs[test]  # <=> FNR_test(c_hat) <= epsilon (cls.py docstring)
    assert covered >= binomial_floor(trials, alpha, n)
    # the simulated predictor is not trivially good: at 0.5 most cases miss more than epsilon
    misses_at_half = np.array([np.count_nonzero(tumour & (prob < 0.5)) for tumour, prob, _ in kits_cases])
    assert np.mean(misses_at_half / sizes > epsilon) > 0.3


@pytest.mark.parametrize("transform", ["identity", "distance"])
def test_confidence_sets_on_real_tumour_shapes(kits_cases, transform):
    t = parse_transform(transform)
    stats_ = np.array([case_statistics(prob, tumour, geometry, t, t) for tumour, prob, geometry in kits_cases])
    tau, gamma = stats_[:, 0], stats_[:, 1]
    n, trials, alpha = 24, 3000, 0.1
    rng = np.random.default_rng(11)
    inner_ok = outer_ok = 0
    for _ in range(trials):
        order = rng.permutation(len(tau))
        cal, test = order[:n], order[n]
        inner_ok += tau[test] <= conformal_upper_quantile(tau[cal], alpha)
        outer_ok += gamma[test] <= conformal_upper_quantile(gamma[cal], alpha)
    floor = binomial_floor(trials, alpha, n)
    assert inner_ok >= floor and outer_ok >= floor
