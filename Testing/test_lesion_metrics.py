"""Lesion-wise detection (ConformalSegLib.evaluation.lesion_metrics): 26-connected lesions, the exact ceil(tau * size)
rule with its edge cases, false-positive components and mL, size classes by equivalent radius."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.conformal.exact import detection_count
from ConformalSegLib.evaluation.lesion_metrics import (
    DetectionTally,
    equivalent_radius_mm,
    false_positives,
    lesion_detection,
    size_class,
)


def test_detection_count_is_exact():
    assert detection_count(10, 0.5) == 5
    assert detection_count(3, 0.5) == 2  # ceil(1.5)
    assert detection_count(100, 0.29) == 29  # 0.29 * 100 = 28.999... in floating point
    assert detection_count(7, 1.0) == 7
    assert detection_count(1000, 1e-9) == 1  # any overlap
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConformalSegError, match=r"\(0, 1\]"):
            detection_count(5, bad)


def test_lesions_touching_diagonally_are_one_lesion():
    truth = np.zeros((4, 4, 4), dtype=bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True  # corner contact: one 26-connected lesion
    truth[3, 3, 3] = True  # a second lesion
    result = lesion_detection(truth.copy(), truth)
    assert result.n_lesions == 2 and result.lesion_voxels == (2, 1)
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = True  # half of the two-voxel lesion
    assert lesion_detection(pred, truth, detect_fraction=0.5).detected == (True, False)
    assert lesion_detection(pred, truth, detect_fraction=1.0).detected == (False, False)
    assert lesion_detection(pred, truth, detect_fraction=0.5).missed_fraction == 0.5


def test_false_positive_components_and_volume():
    truth = np.zeros((6, 6, 6), dtype=bool)
    truth[0:2, 0:2, 0:2] = True
    pred = np.zeros_like(truth)
    pred[1:3, 1:3, 1:3] = True  # overlaps the lesion: not a false positive
    pred[5, 5, 5] = True  # a one-voxel false positive
    pred[5, 0, 5] = pred[5, 0, 4] = True  # a two-voxel false positive
    result = lesion_detection(pred, truth, (2.0, 1.0, 1.0))
    assert result.predicted_components == 3 and result.false_positive_components == 2
    assert result.false_positive_ml == pytest.approx(3 * 2.0 / 1000.0)
    assert result.detected == (False,)  # 1 of 8 voxels: below ceil(0.5 * 8) = 4
    assert lesion_detection(pred, truth, detect_fraction=0.125).detected == (True,)
    empty = lesion_detection(np.zeros_like(truth), np.zeros_like(truth))
    assert empty.n_lesions == 0 and math.isnan(empty.missed_fraction) and empty.false_positive_components == 0
    with pytest.raises(ConformalSegError, match="shape"):
        lesion_detection(pred[:5], truth)
    assert false_positives(pred, truth, (2.0, 1.0, 1.0)) == (2, pytest.approx(3 * 2.0 / 1000.0))
    assert false_positives(np.zeros_like(truth), truth) == (0, 0.0)
    with pytest.raises(ConformalSegError, match="shape"):
        false_positives(pred[:5], truth)


@pytest.mark.parametrize("seed", range(20))
def test_false_positives_alone_equal_the_full_matching(seed):
    """The one-labelling shortcut the evaluation uses at every cutoff gives lesion_detection's numbers."""
    rng = np.random.default_rng(seed)
    truth = rng.random((8, 9, 10)) < 0.15
    pred = rng.random((8, 9, 10)) < rng.uniform(0.02, 0.4)
    full = lesion_detection(pred, truth, (1.5, 0.7, 0.7))
    comps, ml = false_positives(pred, truth, (1.5, 0.7, 0.7))
    assert comps == full.false_positive_components and ml == pytest.approx(full.false_positive_ml, rel=1e-12)


def test_size_classes_and_tally():
    assert equivalent_radius_mm(1, 4.0 / 3.0 * math.pi * 27.0) == pytest.approx(3.0)
    assert size_class(2.3) == "3-5 mm" and size_class(5.0) == "5-10 mm" and size_class(25.0) == "10-20 mm"
    tally = DetectionTally()
    truth = np.zeros((30, 30, 30), dtype=bool)
    truth[0:2, 0:2, 0:2] = True  # 8 voxels of 1 mm^3: radius 1.24 mm, small
    truth[10:25, 10:25, 10:25] = True  # 3375 voxels: radius 9.3 mm
    pred = np.zeros_like(truth)
    pred[10:25, 10:25, 10:25] = True
    tally.add(lesion_detection(pred, truth))
    tally.add(lesion_detection(np.zeros_like(truth), np.zeros_like(truth)))
    d = tally.as_dict()
    assert d["lesions"] == 2 and d["scans"] == 2 and d["sensitivity"] == 0.5
    assert d["sensitivity_by_size"] == {"3-5 mm": 0.0, "5-10 mm": 1.0, "10-20 mm": None}
    assert d["false_positive_components_per_scan"] == 0.0
