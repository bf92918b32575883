"""Lesion-level conformal control (ConformalSegLib.conformal.lesion_level): brute force on small random
cases (every threshold checked) for the detection thresholds, the criticals and the conformal step;
ties, diagonal contact (26-connectivity), tau = 1 and a tau so small that one voxel detects, the size
filter; statistical validity of the lesion-level and the joint guarantee over independent draws.

Validity protocol (as Testing/test_validity.py): every trial draws a fresh calibration set of n scans
and one fresh test scan, disjoint from every other trial, so the number of successes over T trials is
Binomial(T, p) with p >= 1 - alpha (lower one-sided test at level 0.001). The per-scan scores are
almost surely distinct here (continuous probabilities, epsilon = 0.25 never allows all lesions of a
scan to be missed), so p = k / (n + 1) exactly with k = ceil((1 - alpha)(n + 1)), and the upper test
checks the method is not more conservative than that (+0.005 slack).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import binom

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ConformalSegLib.conformal.cls import critical_cutoffs
from ConformalSegLib.conformal.exact import conformal_rank, detection_count, detection_counts
from ConformalSegLib.conformal.lesion_level import (
    LesionLevelBuilder,
    calibrate_lesion,
    detection_thresholds,
    missed_lesions,
    scan_critical,
    scan_scores,
)
from ConformalSegLib.conformal.summaries import SummaryBuilder

LEVEL = 0.001
SLACK = 0.005
S26 = np.ones((3, 3, 3), dtype=bool)


# ----------------------------------------------------------------------------- brute force


def brute_missed(
    probability: np.ndarray, lesion: np.ndarray, t: float, tau: float, min_voxels: int = 0
) -> tuple[int, int]:
    """(missed lesions, counted lesions) of the mask probability >= t, by counting voxels per component."""
    labels, count = ndimage.label(lesion, structure=S26)
    missed = counted = 0
    for i in range(1, count + 1):
        comp = labels == i
        m = int(comp.sum())
        if m < min_voxels:
            continue
        counted += 1
        need = math.ceil(Fraction(repr(tau)) * m)
        if int(np.count_nonzero(probability[comp] >= t)) < max(need, 1):
            missed += 1
    return missed, counted


def random_case(rng: np.random.Generator, shape=(6, 7, 8), levels: int | None = 6):
    lesion = rng.random(shape) < 0.25
    probability = rng.random(shape).astype(np.float32)
    if levels:  # many ties
        probability = (np.floor(probability * levels) / levels).astype(np.float32)
    return probability, lesion


@pytest.mark.parametrize("tau", [0.5, 1.0, 1e-6, 0.29, 0.7])
def test_detection_thresholds_and_criticals_brute_force(tau):
    rng = np.random.default_rng(int(tau * 1e6) + 3)
    for trial in range(60):
        probability, lesion = random_case(rng, levels=None if trial % 3 == 0 else 5)
        d, sizes = detection_thresholds(probability, lesion, detect_fraction=tau)
        assert np.all(np.diff(d) >= 0)
        thresholds = np.concatenate(
            [np.unique(probability), [0.0, 1.0, 1.5, -0.5], np.nextafter(np.unique(probability), 2)]
        )
        for t in thresholds:
            missed, counted = brute_missed(probability, lesion, float(t), tau)
            assert counted == d.size
            assert int(missed_lesions(d, [t])[0]) == missed  # detected iff t <= d
            for eps in (0.0, 0.1, 0.25, 0.5, 1.0):
                c = scan_critical(d, eps)
                ok = missed <= math.floor(Fraction(repr(eps)) * counted)
                assert ok == (t <= c), (trial, t, eps, c)


def test_diagonal_contact_is_one_lesion_and_tiny_tau_is_one_voxel():
    lesion = np.zeros((3, 3, 3), dtype=bool)
    lesion[0, 0, 0] = lesion[1, 1, 1] = True
    probability = np.zeros((3, 3, 3), dtype=np.float32)
    probability[0, 0, 0], probability[1, 1, 1] = 0.9, 0.2
    d, sizes = detection_thresholds(probability, lesion, detect_fraction=0.5)
    assert sizes.tolist() == [2] and d.tolist() == [pytest.approx(0.9)]  # ceil(0.5 * 2) = 1 voxel: the largest
    d1, _ = detection_thresholds(probability, lesion, detect_fraction=1.0)
    assert d1.tolist() == [pytest.approx(0.2)]  # every voxel: the smallest
    dt, _ = detection_thresholds(probability, lesion, detect_fraction=1e-9)
    assert dt.tolist() == [pytest.approx(0.9)]
    assert detection_count(7, 1e-9) == 1 and detection_count(7, 1.0) == 7 and detection_count(100, 0.29) == 29
    assert detection_counts(np.array([1, 3, 10, 100]), 0.5).tolist() == [1, 2, 5, 50]


def test_size_filter_ignores_small_lesions():
    lesion = np.zeros((1, 1, 12), dtype=bool)
    lesion[0, 0, 0:1] = True  # 1 voxel
    lesion[0, 0, 3:6] = True  # 3 voxels
    lesion[0, 0, 8:12] = True  # 4 voxels
    probability = np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 1, 12)
    _, sizes = detection_thresholds(probability, lesion, min_lesion_voxels=3)
    assert sorted(sizes.tolist()) == [3, 4]
    _, sizes = detection_thresholds(probability, lesion, voxel_mm3=2.0, min_lesion_mm3=7.0)
    assert sizes.tolist() == [4]
    builder = LesionLevelBuilder(min_lesion_voxels=100)
    builder.add_case("tiny", probability, lesion)
    with pytest.raises(ConformalSegError, match="no calibration scan has a lesion of at least 100 voxels"):
        calibrate_lesion(builder.build(), 0.25, 0.1)
    with pytest.raises(ConformalSegError, match="integer >= 0"):
        LesionLevelBuilder(min_lesion_voxels=-1)
    with pytest.raises(ConformalSegError, match=r"\(0, 1\]"):
        LesionLevelBuilder(detect_fraction=0.0)


def test_conformal_step_brute_force_and_recalibration():
    rng = np.random.default_rng(7)
    builder, voxels = LesionLevelBuilder(0.5), SummaryBuilder()
    cases = []
    for i in range(23):
        probability, lesion = random_case(rng, levels=None)
        if i == 5:
            lesion[:] = False  # a scan without lesion: excluded
        builder.add_case(f"c{i}", probability, lesion)
        voxels.add_case(f"c{i}", probability, lesion)
        cases.append((probability, lesion))
    s, v = builder.build(), voxels.build()
    labelled = [ndimage.label(lesion, structure=S26)[0] for _, lesion in cases]
    for eps, alpha, ev in ((0.25, 0.1, None), (0.0, 0.2, None), (0.5, 0.1, 0.2), (0.25, 0.3, 0.05)):
        cal = calibrate_lesion(s, eps, alpha, voxel_epsilon=ev, voxel_summaries=v)
        assert cal.n == 22 and cal.n_excluded_empty == 1
        # brute force: the largest t with #{scans whose event holds at t} >= k; outcomes change only at
        # lesion-voxel values, so those (and -inf) are every threshold that matters
        k = conformal_rank(22, alpha)
        candidates = np.unique(np.concatenate([c[0][c[1]] for c in cases]))
        best = -np.inf
        for t in candidates[::-1]:
            good = 0
            for (probability, lesion), labels in zip(cases, labelled):
                if not lesion.any():
                    continue
                hits = np.bincount(labels[probability >= t], minlength=labels.max() + 1)[1:]
                sizes = np.bincount(labels.ravel(), minlength=labels.max() + 1)[1:]
                need = np.array([max(1, math.ceil(Fraction(1, 2) * int(m))) for m in sizes])
                missed = int(np.count_nonzero(hits < need))
                ok = missed <= math.floor(Fraction(repr(eps)) * sizes.size)
                if ev is not None:
                    m = int(lesion.sum())
                    ok &= int(np.count_nonzero(probability[lesion] < t)) <= math.floor(Fraction(repr(ev)) * m)
                good += ok
            if good >= k:
                best = float(t)
                break
        assert cal.probability_threshold == best, (eps, alpha, ev)
        assert cal.rank == k and cal.is_joint == (ev is not None)
    scores = scan_scores(s, 0.25, voxel_epsilon=0.1, voxel_summaries=v)
    assert np.array_equal(scores, np.minimum(s.critical_cutoffs(0.25), critical_cutoffs(v, 0.1)))
    assert s.subset([3, 1]).case_ids == ("c3", "c1")
    assert np.array_equal(s.subset([3, 1]).critical_cutoffs(0.25), s.critical_cutoffs(0.25)[[3, 1]])


def test_too_few_scans_give_the_whole_image_with_a_warning():
    rng = np.random.default_rng(1)
    builder = LesionLevelBuilder()
    for i in range(5):
        builder.add_case(f"c{i}", *random_case(rng, levels=None))
    with pytest.warns(CalibrationSetTooSmallWarning, match="at least 9"):
        cal = calibrate_lesion(builder.build(), 0.25, 0.1)
    assert cal.probability_threshold == float("-inf") and cal.is_trivial
    with pytest.raises(ConformalSegError, match="same scans"):
        calibrate_lesion(builder.build(), 0.25, 0.1, voxel_epsilon=0.1, voxel_summaries=SummaryBuilder().build())


# ----------------------------------------------------------------------------- validity


def chain_scan(rng: np.random.Generator):
    """One scan as a (1, 1, V) chain of 1-5 lesions (runs separated by background), each of 1-60 voxels
    with Beta probabilities whose mean falls with a per-scan quality and with smaller lesions."""
    n_lesions = int(rng.integers(1, 6))
    sizes = rng.integers(1, 61, n_lesions)
    quality = rng.uniform(0.5, 5.0)
    runs, probs = [], []
    for m in sizes:
        a = quality * (0.3 + m / 60.0)
        runs.append(np.r_[np.ones(m, bool), np.zeros(2, bool)])
        probs.append(np.r_[rng.beta(a, 2.0, m), rng.random(2) * 0.3])
    lesion = np.concatenate(runs)[None, None]
    probability = np.concatenate(probs).astype(np.float32)[None, None]
    return probability, lesion


@pytest.mark.parametrize("joint", [False, True])
def test_lesion_level_validity(joint):
    rng = np.random.default_rng(2026 + joint)
    n, alpha, eps, ev, T = 19, 0.1, 0.25, 0.2, 400
    successes = 0
    for _ in range(T):
        builder, voxels = LesionLevelBuilder(0.5), SummaryBuilder()
        for i in range(n):
            probability, lesion = chain_scan(rng)
            builder.add_case(str(i), probability, lesion)
            voxels.add_case(str(i), probability, lesion)
        cal = calibrate_lesion(
            builder.build(), eps, alpha, voxel_epsilon=ev if joint else None, voxel_summaries=voxels.build()
        )
        probability, lesion = chain_scan(rng)
        t = cal.probability_threshold
        missed, counted = brute_missed(probability, lesion, t, 0.5)
        ok = missed <= math.floor(Fraction(repr(eps)) * counted)
        if joint:
            m = int(lesion.sum())
            ok &= int(np.count_nonzero(probability[lesion] < t)) <= math.floor(Fraction(repr(ev)) * m)
        successes += ok
    k = conformal_rank(n, alpha)
    assert successes >= binom.ppf(LEVEL, T, 1 - alpha), successes
    assert successes <= binom.isf(LEVEL, T, k / (n + 1) + SLACK), successes
