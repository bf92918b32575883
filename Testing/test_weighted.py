"""Weighted conformal calibration under covariate shift: the exact weighted quantile against a brute force
in rational arithmetic, the domain classifier, weighted profiles on disk, label-free scan features, and the
guarantee at a shifted site as a statistic.

The simulated shift (``shifted_cases``): a scan's label-free feature ``x`` is N(0, 1) at the calibration
site and N(1, 1) at the target site; lesion probabilities are Beta(exp(1 - 0.7 x), b), so target scans are
harder, and given ``x`` both sites are identical (exact covariate shift; likelihood ratio
``w(x) = exp(x - 1/2)``). Over 400 independent trials (200 calibration scans, 200 unlabelled target scans,
one labelled target test scan each), unweighted CLS keeps FNR <= eps on about 62 % of target scans
(alpha = 0.1 promises 90 %), weighted CLS with the true ratio on >= 90 % (binomial lower test at level
0.001: Tibshirani et al.'s guarantee is exact), and with the ratio estimated by the logistic domain
classifier within a few points of it (tested against 1 - alpha - 0.04: estimated weights make the
guarantee approximate).
"""

from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.cls import calibrate_cls, critical_cutoffs
from ConformalSegLib.conformal.confidence_sets import SetStatistics, calibrate_sets, conformal_upper_quantile
from ConformalSegLib.conformal.crc import calibrate_crc
from ConformalSegLib.conformal.profile import CalibrationProfile, load_profile
from ConformalSegLib.conformal.scan_features import INTENSITY_EDGES_HU, feature_names, scan_features
from ConformalSegLib.conformal.summaries import LesionSummaries
from ConformalSegLib.conformal.weighted import (
    DomainClassifier,
    Weighting,
    check_effective_size,
    effective_sample_size,
    fit_domain_classifier,
    weighted_calibration,
    weighted_conformal_quantile,
)

LEVEL = 0.001


def brute_weighted_quantile(scores, weights, test_weight, alpha) -> float:
    """Every candidate (each score, then +inf), masses as exact fractions of the floats."""
    level = 1 - Fraction(repr(alpha))
    total = sum((Fraction(float(w)) for w in weights), Fraction(0)) + Fraction(float(test_weight))
    for s in sorted(set(float(x) for x in scores)):
        mass = sum((Fraction(float(w)) for x, w in zip(scores, weights) if float(x) <= s), Fraction(0))
        if mass >= level * total:
            return s
    return math.inf


# ----------------------------------------------------------------------------- the exact weighted quantile


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]), st.floats(1e-3, 10.0)), min_size=1, max_size=25
    ),
    st.floats(1e-3, 50.0),
    st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5]),
)
def test_weighted_quantile_matches_brute_force_with_ties(pairs, test_weight, alpha):
    scores = np.array([p[0] for p in pairs])
    weights = np.array([p[1] for p in pairs])
    assert weighted_conformal_quantile(scores, weights, test_weight, alpha) == brute_weighted_quantile(
        scores, weights, test_weight, alpha
    )


@pytest.mark.parametrize("n", [1, 8, 9, 10, 19, 100])
@pytest.mark.parametrize("alpha", [0.1, 0.05, 0.2, 0.3])
def test_equal_weights_give_the_unweighted_conformal_quantile(n, alpha):
    scores = np.random.default_rng(n).normal(size=n)
    assert weighted_conformal_quantile(scores, np.full(n, 0.7), 0.7, alpha) == conformal_upper_quantile(scores, alpha)


def test_boundary_decided_exactly():
    # 0.1 is not exact in binary: ten weights of 0.1 and a test weight of 0.1 put the boundary on a rounding edge
    scores = np.arange(10.0)
    weights = np.full(10, 0.1)
    for alpha in (0.1, 0.2, 0.3, 1 / 11):
        assert weighted_conformal_quantile(scores, weights, 0.1, alpha) == brute_weighted_quantile(
            scores, weights, 0.1, alpha
        )
    assert weighted_conformal_quantile(scores[:8], weights[:8], 0.1, 0.1) == math.inf  # 8 < 0.9 * 9


def test_invalid_weights_and_infinite_test_weight():
    s = np.array([1.0, 2.0])
    assert weighted_conformal_quantile(s, np.ones(2), math.inf, 0.1) == math.inf
    assert weighted_conformal_quantile(s, np.ones(2), 1e-9, 0.4) == 2.0
    for bad in (np.array([1.0, 0.0]), np.array([1.0, -1.0]), np.array([1.0, np.inf])):
        with pytest.raises(ValueError):
            weighted_conformal_quantile(s, bad, 1.0, 0.1)


def test_effective_sample_size():
    assert effective_sample_size(np.full(50, 3.0)) == pytest.approx(50)
    assert effective_sample_size(np.r_[1e6, np.ones(99)]) == pytest.approx(1.0, abs=1e-3)
    assert effective_sample_size(np.zeros(0)) == 0.0


# ----------------------------------------------------------------------------- domain classifier, features


def test_domain_classifier_recovers_a_gaussian_likelihood_ratio():
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(3000, 1)), rng.normal(1.0, 1.0, size=(2000, 1))
    classifier, auc = fit_domain_classifier(source, target, ("x",))
    grid = np.linspace(-2, 3, 11)[:, None]
    true = grid[:, 0] - 0.5  # log dN(1,1)/dN(0,1)
    assert np.max(np.abs(classifier.log_weights(grid) - true)) < 0.25
    assert 0.70 < auc < 0.80  # Phi(1/sqrt(2)) = 0.76 for a unit shift
    # equal sites: weights near 1, AUC near 0.5
    classifier, auc = fit_domain_classifier(rng.normal(size=(500, 2)), rng.normal(size=(300, 2)), ("a", "b"))
    assert abs(auc - 0.5) < 0.1 and np.all(np.abs(classifier.log_weights(rng.normal(size=(20, 2)))) < 0.5)
    with pytest.raises(ConformalSegError, match="at least 2"):
        fit_domain_classifier(source[:1], target, ("x",))


def test_scan_features_are_label_free_and_exact_on_a_known_map():
    geometry = Geometry((10, 10, 10), spacing=(1.0, 2.0, 5.0))  # 10 mm^3 = 0.01 mL per voxel
    prob = np.zeros((10, 10, 10), np.float32)
    prob.flat[:100] = 0.75  # predicted (>= 0.5) and uncertain (0.1 <= p < 0.9)
    prob.flat[100:150] = 0.2  # uncertain only
    f = dict(zip(feature_names(False), scan_features(prob, geometry)))
    assert f["log_predicted_volume_ml"] == pytest.approx(math.log1p(1.0))
    assert f["log_uncertain_volume_ml"] == pytest.approx(math.log1p(1.5))
    assert f["mean_probability"] == pytest.approx((75 + 10) / 1000)
    assert f["mean_probability_in_prediction"] == pytest.approx(0.75)
    assert (f["spacing_x_mm"], f["spacing_y_mm"], f["spacing_z_mm"]) == (1.0, 2.0, 5.0)
    image = np.full((10, 10, 10), 40.0, np.float32)
    image.flat[:250] = -1000.0
    with_image = dict(zip(feature_names(True), scan_features(prob, geometry, image)))
    assert len(with_image) == len(f) + len(INTENSITY_EDGES_HU) + 1
    assert with_image["hu_fraction_-inf_-500"] == 0.25 and with_image["hu_fraction_20_60"] == 0.75
    with pytest.raises(ConformalSegError, match="same grid"):
        scan_features(prob, geometry, image[:5])


# ----------------------------------------------------------------------------- shifted sites


def shifted_cases(rng: np.random.Generator, x: np.ndarray) -> LesionSummaries:
    sizes = rng.integers(50, 300, x.size)
    a, b = np.exp(1.0 - 0.7 * x), rng.uniform(0.5, 1.5, x.size)
    values = [np.sort(rng.beta(a[i], b[i], sizes[i]).astype(np.float32))[::-1] for i in range(x.size)]
    return LesionSummaries.from_sorted((f"c{i:04d}", v) for i, v in enumerate(values))


def _weighting(classifier: DomainClassifier, x: np.ndarray, xt: np.ndarray) -> Weighting:
    return Weighting(classifier, x[:, None], xt[:, None])


ORACLE = DomainClassifier(("x",), np.zeros(1), np.ones(1), np.ones(1), -0.5, 1, 1)  # log w(x) = x - 1/2


def test_weighted_calibration_restores_coverage_under_shift():
    eps, alpha, n, T = 0.1, 0.1, 200, 400
    rng = np.random.default_rng(2019)
    unweighted = oracle = estimated = 0
    trivial = 0
    for _ in range(T):
        x, xt = rng.normal(size=n), rng.normal(1.0, 1.0, size=n)
        summaries = shifted_cases(rng, x)
        like = calibrate_cls(summaries, eps, alpha)
        profile = CalibrationProfile(like, summaries)
        x_test = rng.normal(1.0, 1.0, size=1)
        c_test = critical_cutoffs(shifted_cases(rng, x_test), eps)[0]
        unweighted += c_test >= like.probability_threshold
        o = weighted_calibration(
            like, profile, _weighting(ORACLE, x, xt), ORACLE.weights(x_test[:, None])[0], warn=False
        )
        oracle += c_test >= o.calibration.probability_threshold
        classifier, _ = fit_domain_classifier(x[:, None], xt[:, None], ("x",), cv_auc=False)
        weighting = _weighting(classifier, x, xt)
        e = weighted_calibration(like, profile, weighting, weighting.weight_of(x_test[:, None]), warn=False)
        estimated += c_test >= e.calibration.probability_threshold
        trivial += e.is_trivial
    assert unweighted < binom.ppf(LEVEL, T, 1 - alpha) and unweighted / T < 0.75  # coverage lost
    assert oracle >= binom.ppf(LEVEL, T, 1 - alpha), oracle / T  # restored: exact with the true ratio
    assert estimated >= binom.ppf(LEVEL, T, 1 - alpha - 0.04), estimated / T  # estimated ratio: approximately
    assert trivial / T < 0.1  # mostly informative masks, not the whole image


def test_weighted_sets_use_each_channel_at_its_level():
    rng = np.random.default_rng(5)
    n = 60
    stats = SetStatistics(
        rng.normal(size=n), rng.normal(size=n), tuple(f"s{i}" for i in range(n)), "identity", "identity", np.full(n, 4)
    )
    summaries = LesionSummaries.from_sorted((c, np.ones(4, np.float32)) for c in stats.case_ids)
    like = calibrate_sets(stats, alpha_inner=0.1, alpha_outer=0.2, mode="marginal")
    x = rng.normal(size=n)
    weighting = _weighting(ORACLE, x, x + 1)
    w = ORACLE.weights(x[:, None])
    result = weighted_calibration(like, CalibrationProfile(like, summaries, stats, "include"), weighting, 2.0)
    assert result.calibration.inner_threshold == weighted_conformal_quantile(stats.tau, w, 2.0, 0.1)
    assert result.calibration.outer_threshold == -weighted_conformal_quantile(stats.gamma, w, 2.0, 0.2)


def test_pac_profiles_have_no_weighted_version():
    summaries = shifted_cases(np.random.default_rng(2), np.zeros(40))
    like = calibrate_cls(summaries, 0.1, 0.2, pac_delta=0.1)
    with pytest.raises(ConformalSegError, match="not a PAC one"):
        weighted_calibration(
            like, CalibrationProfile(like, summaries), _weighting(ORACLE, np.zeros(40), np.ones(5)), 1.0
        )


def test_crc_has_no_weighted_version():
    summaries = shifted_cases(np.random.default_rng(1), np.zeros(20))
    like = calibrate_crc(summaries, 0.1)
    with pytest.raises(ConformalSegError, match="no per-scan score"):
        weighted_calibration(
            like, CalibrationProfile(like, summaries), _weighting(ORACLE, np.zeros(20), np.ones(5)), 1.0
        )


def test_large_weight_gives_the_trivial_set_and_small_ess_warns():
    rng = np.random.default_rng(6)
    x = rng.normal(size=30)
    summaries = shifted_cases(rng, x)
    like = calibrate_cls(summaries, 0.1, 0.1)
    profile = CalibrationProfile(like, summaries)
    steep = DomainClassifier(("x",), np.zeros(1), np.ones(1), np.full(1, 4.0), 0.0, 1, 1)
    weighting = _weighting(steep, x, x + 3)
    with pytest.warns(CalibrationSetTooSmallWarning, match="weight is too large"):
        result = weighted_calibration(like, profile, weighting, 1e6)
    assert result.calibration.probability_threshold == -math.inf and "whole image" in result.sentence
    with pytest.warns(CalibrationSetTooSmallWarning, match="effective sample size"):
        ess, trivial = check_effective_size(weighting, like, profile)
    assert ess < 9 and trivial > 0


def test_weighted_profile_round_trip_and_hand_edit(tmp_path):
    rng = np.random.default_rng(7)
    x, xt = rng.normal(size=40), rng.normal(0.5, 1.0, size=25)
    summaries = shifted_cases(rng, x)
    like = calibrate_cls(summaries, 0.1, 0.2)
    classifier, auc = fit_domain_classifier(x[:, None], xt[:, None], ("x",))
    profile = CalibrationProfile(like, summaries, weighting=Weighting(classifier, x[:, None], xt[:, None], (), auc))
    path, _ = profile.save(tmp_path / "w.json")
    loaded = load_profile(path)
    assert loaded.weighting is not None and np.array_equal(
        loaded.weighting.calibration_weights, profile.weighting.calibration_weights
    )
    assert loaded.weighting.auc == auc
    doc = json.loads(path.read_text())
    assert doc["weighting"]["features"] == ["x"] and doc["weighting"]["classifier"]["kind"] == "logistic-regression"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = weighted_calibration(like, profile, profile.weighting, 1.3)
        b = weighted_calibration(loaded.calibration, loaded, loaded.weighting, 1.3)
    assert a.calibration.probability_threshold == b.calibration.probability_threshold
    doc["weighting"]["classifier"]["intercept"] += 1.0  # a hand edit changes the weights and thresholds
    path.write_text(json.dumps(doc))
    with pytest.raises(ConformalSegError, match="weighted thresholds do not follow"):
        load_profile(path)
