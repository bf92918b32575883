"""Validity of CLS on the cascade's output: P(FNR_test <= epsilon) >= 1 - alpha over seeded trials.

The guarantee holds for the cascade *as a whole* because calibration and test cases go through the
identical cascade (same config, same predictors); lesion voxels outside every ROI (a lesion the lung
filter or the Top-K dropped) have probability 0 and count as misses. Each of ``T`` trials draws fresh
i.i.d. synthetic cases (``n`` for calibration, one for the test), disjoint from every other trial's,
so the success count dominates Binomial(T, 1 - alpha); we assert
``successes >= binom.ppf(0.001, T, 1 - alpha)`` (one-sided test at level 0.001, as in test_validity.py).

Cases: a small volume with a "lung" (label 2) occupying part of the field of view, one lesion in the
lung and, in 8 % of the cases, a second lesion far outside it (the cascade drops it: those cases
need a lower cutoff or fail). The image is the lesion indicator plus Gaussian noise; both stages are
cheap deterministic image filters (stand-in models) that go through :func:`run_cascade` exactly like
inference engines do.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import binom

from ConformalSegLib.cascade import CascadeConfig, StageOutput, run_cascade
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.cls import apply_threshold, calibrate_cls
from ConformalSegLib.conformal.exact import fnr_exceeds
from ConformalSegLib.conformal.summaries import LesionSummaries
from ConformalSegLib.io.volumes import Volume

GEOMETRY = Geometry(shape=(12, 16, 20), spacing=(1.0, 1.0, 2.0))  # ITK (x, y, z) spacing
CONFIG = CascadeConfig(
    lung_source="labels",
    lung_fill_holes=True,
    min_lung_overlap=0.8,
    rescue_distance_mm=None,
    merge_radius_mm=1.0,
    min_volume_mm3=4.0,
    top_k=1,
    roi_margin_voxels=2,
    stage1_threshold=0.5,
)


def _sigmoid_filter(sigma: float, centre: float, gain: float):
    def predict(volume: Volume, mc_passes: int) -> StageOutput:
        smooth = ndimage.gaussian_filter(np.asarray(volume.array, dtype=np.float32), sigma, mode="nearest")
        return StageOutput((1.0 / (1.0 + np.exp(-(smooth - centre) * gain))).astype(np.float32))

    return predict


STAGE1 = _sigmoid_filter(0.8, 0.3, 8.0)
STAGE2 = _sigmoid_filter(0.6, 0.5, 6.0)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def make_case(rng: np.random.Generator) -> tuple[Volume, np.ndarray, np.ndarray]:
    """(image, lung label map, lesion truth) of one synthetic case."""
    shape = GEOMETRY.shape
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:11, 2:14, 1:11] = 2  # the lung: x < 11
    truth = _ellipsoid(shape, rng.uniform([4, 5, 4], [7, 10, 7]), rng.uniform(1.2, 2.6, 3))
    if rng.random() < 0.08:  # a second lesion far outside the lung: dropped by the lung filter
        truth |= _ellipsoid(shape, rng.uniform([4, 5, 15], [7, 10, 17]), rng.uniform(1.0, 2.0, 3))
    image = truth.astype(np.float32) + rng.normal(0.0, 0.35, shape).astype(np.float32)
    return Volume(image, GEOMETRY, None), labels, truth


def cascade_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    volume, labels, truth = make_case(rng)
    result = run_cascade(volume, CONFIG, STAGE1, STAGE2, lung_labels=labels)
    return result.probability, truth


def test_cls_on_cascade_output_controls_fnr():
    epsilon, alpha, n, trials = 0.2, 0.2, 19, 150
    rng = np.random.default_rng(2024)
    successes, thresholds, outside_misses = 0, [], 0
    for _ in range(trials):
        calibration = [cascade_case(rng) for _ in range(n)]
        summaries = LesionSummaries.from_volumes((f"c{i}", p, t) for i, (p, t) in enumerate(calibration))
        threshold = calibrate_cls(summaries, epsilon, alpha).probability_threshold
        probability, truth = cascade_case(rng)
        mask = apply_threshold(probability, threshold)
        misses = int(np.count_nonzero(truth & ~mask))
        successes += int(not fnr_exceeds(misses, int(truth.sum()), epsilon))
        thresholds.append(threshold)
        outside_misses += int(np.count_nonzero(truth[probability == 0]) > 0)
    assert successes >= binom.ppf(0.001, trials, 1 - alpha), (successes, trials)
    # not vacuous: the cutoffs are informative (> 0, so voxels outside the ROIs are excluded), and
    # some test cases really had lesion voxels outside every ROI
    assert np.mean(np.asarray(thresholds) > 0) >= 0.8 and np.median(thresholds) > 0.05
    assert outside_misses >= 3
    assert successes < trials  # and the masks are not so large that nothing is ever missed
