"""The statistics audit's edge cases (../shared/reviews/statistics-audit.md, section 6), each with a test:
the `--empty include` sentence says who the guarantee is for; the Python API refuses NaN and
out-of-range probabilities in the summary builders with the readers' message; a cutoff <= 0 (ties at 0)
is flagged as the whole image with a warning naming the cause; the CRC "too few scans" minimum is exact;
joint-max refuses transforms in different units; CRC at epsilon 0 follows the trivial-set convention."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError, WholeImageWarning
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.confidence_sets import SetStatisticsBuilder, calibrate_sets
from ConformalSegLib.conformal.crc import calibrate_crc, min_crc_calibration_size
from ConformalSegLib.conformal.guarantee_sentences import guarantee_sentence
from ConformalSegLib.conformal.lesion_level import LesionLevelBuilder, calibrate_lesion
from ConformalSegLib.conformal.score_transforms import parse_transform
from ConformalSegLib.conformal.summaries import LesionSummaries, SummaryBuilder

GEOMETRY = Geometry(shape=(4, 5, 6), spacing=(1.0, 1.0, 2.0))


def _case(rng, lesion_free=False):
    probability = rng.random(GEOMETRY.shape).astype(np.float32)
    lesion = np.zeros(GEOMETRY.shape, bool) if lesion_free else rng.random(GEOMETRY.shape) < 0.3
    return probability, lesion


def test_include_sentence_says_who_the_guarantee_is_for():
    rng = np.random.default_rng(0)
    builder = SummaryBuilder()
    for i in range(20):
        builder.add_case(f"c{i}", *_case(rng, lesion_free=i % 2 == 0))
    s = builder.build()
    cls = calibrate_cls(s, 0.1, 0.2, empty="include")
    assert cls.n == 20 and cls.n_with_lesion == 10
    sentence = guarantee_sentence(cls)
    assert "20 scans (10 with a lesion)" in sentence and "with and without a lesion" in sentence
    crc = calibrate_crc(s, 0.2, empty="include")
    assert "20 scans (10 with a lesion)" in guarantee_sentence(crc)
    assert "10 scans with a lesion" in guarantee_sentence(calibrate_cls(s, 0.1, 0.2))  # exclude


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.5, 1.5])
def test_summary_builders_refuse_bad_probabilities(bad):
    rng = np.random.default_rng(1)
    probability, lesion = _case(rng)
    probability[lesion.nonzero()[0][0], lesion.nonzero()[1][0], lesion.nonzero()[2][0]] = bad
    message = "NaN or infinite" if not np.isfinite(bad) else "range from"
    with pytest.raises(ConformalSegError, match=message):
        SummaryBuilder().add_case("bad", probability, lesion)
    with pytest.raises(ConformalSegError, match=message):
        LesionLevelBuilder().add_case("bad", probability, lesion)
    with pytest.raises(ConformalSegError, match=message):
        SetStatisticsBuilder(parse_transform("identity"), parse_transform("identity")).add_case(
            "bad", probability, lesion, GEOMETRY
        )


def test_cutoff_zero_from_ties_is_flagged_as_the_whole_image():
    # saturated maps: most lesion voxels at exactly 0 -> every critical cutoff is 0
    values = [np.r_[np.ones(3), np.zeros(17)].astype(np.float32) for _ in range(30)]
    s = LesionSummaries.from_sorted((f"c{i}", v) for i, v in enumerate(values))
    with pytest.warns(WholeImageWarning, match="tied at probability 0"):
        cal = calibrate_cls(s, 0.1, 0.1)
    assert cal.probability_threshold == 0.0 and cal.is_trivial and cal.whole_image_from_ties
    assert "tied at probability 0" in guarantee_sentence(cal)
    with pytest.warns(WholeImageWarning):
        assert calibrate_crc(s, 0.1).is_trivial


def test_crc_minimum_is_exact():
    # 0.333333 is 333333/10^6: 1/eps - 1 = 2.000003, so 3 scans are needed (the float formula said 2)
    assert min_crc_calibration_size(0.333333) == 3
    s = LesionSummaries.from_sorted((f"c{i}", np.array([0.5], np.float32)) for i in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        cal = calibrate_crc(s, 0.333333)
    assert cal.is_trivial and "at least 3 are needed" in guarantee_sentence(cal)


def test_joint_max_refuses_transforms_in_different_units():
    rng = np.random.default_rng(2)
    builder = SetStatisticsBuilder(parse_transform("identity"), parse_transform("distance"))
    for i in range(25):
        builder.add_case(f"c{i}", *_case(rng), GEOMETRY)
    stats = builder.build()
    with pytest.raises(ConformalSegError, match="--joint-method split"):
        calibrate_sets(stats, alpha=0.2, mode="joint-max")
    assert calibrate_sets(stats, alpha=0.2, mode="joint-split").n == 25


def test_lesion_level_cutoff_zero_is_flagged():
    lesion = np.zeros((1, 1, 8), bool)
    lesion[0, 0, :4] = True
    probability = np.zeros((1, 1, 8), np.float32)
    builder = LesionLevelBuilder()
    for i in range(20):
        builder.add_case(f"c{i}", probability, lesion)
    with pytest.warns(WholeImageWarning):
        assert calibrate_lesion(builder.build(), 0.0, 0.2).is_trivial
