"""Group-conditional (Mondrian) calibration: exact per-group thresholds, too-small groups, the choice of a
group at apply time, profiles on disk, and the guarantee per group as a statistic.

The motivating example (``test_marginal_holds_while_one_group_fails_mondrian_fixes_it``): 30 % of the
scans are *small* hard lesions. Over 300 seeded calibration/test draws the marginal CLS threshold keeps its
promise over all scans (ECR >= 0.9) while the small-lesion scans get an ECR near 0.66; Mondrian
calibration brings each group to >= 0.9. The statistical tests follow ``Testing/test_validity.py``: each
trial is an independent calibration set and fresh test scans, so successes are a sum of independent
Bernoulli(p_t); the lower test is ``successes >= binom.ppf(0.001, T, 1 - alpha)``; the upper test
compares with the exact tie-free coverage ``k_t / (n_t + 1)`` (``n_t`` the group's size in trial t) plus
0.005 (Poisson-binomial tail bounded by the binomial at the mean, Hoeffding 1956).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy.stats import binom, norm

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.cls import calibrate_cls, critical_cutoffs
from ConformalSegLib.conformal.confidence_sets import SetStatistics, calibrate_sets
from ConformalSegLib.conformal.crc import calibrate_crc
from ConformalSegLib.conformal.exact import conformal_rank
from ConformalSegLib.conformal.lesion_level import LesionLevelSummaries, calibrate_lesion
from ConformalSegLib.conformal.mondrian import (
    BY_LESION_SIZE,
    bin_names,
    calibrate_groups,
    choose_group,
    grouping_by_size,
    grouping_from_table,
    parse_group_by,
    scan_volumes_ml,
    volume_bins,
)
from ConformalSegLib.conformal.profile import CalibrationProfile, load_profile
from ConformalSegLib.conformal.summaries import LesionSummaries

LEVEL = 0.001
SLACK = 0.005


def grouped_cases(rng: np.random.Generator, n: int, small_frac: float = 0.3, empty_frac: float = 0.0):
    """Summaries of ``n`` scans and which are small-lesion scans: small lesions (20-79 voxels) are hard
    (lesion probabilities Beta(a, b) with a in [0.5, 1.5]), large ones (150-399) easy (a in [1.5, 6])."""
    small = rng.random(n) < small_frac
    sizes = np.where(small, rng.integers(20, 80, n), rng.integers(150, 400, n))
    sizes[rng.random(n) < empty_frac] = 0
    a = np.where(small, rng.uniform(0.5, 1.5, n), rng.uniform(1.5, 6.0, n))
    b = rng.uniform(0.5, 2.0, n)
    values = [np.sort(rng.beta(a[i], b[i], sizes[i]).astype(np.float32))[::-1] for i in range(n)]
    return LesionSummaries.from_sorted((f"c{i:04d}", v) for i, v in enumerate(values)), small


def table(summaries: LesionSummaries, small: np.ndarray) -> dict[str, str]:
    return {cid: ("small" if s else "large") for cid, s in zip(summaries.case_ids, small)}


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        return fn(*args, **kw)


# ----------------------------------------------------------------------------- exact per-group thresholds


@pytest.mark.parametrize("empty", ["exclude", "include"])
@pytest.mark.parametrize("eps, alpha, pac", [(0.1, 0.1, None), (0.2, 0.25, None), (0.05, 0.05, None), (0.1, 0.2, 0.1)])
def test_cls_and_crc_groups_equal_calibrating_each_group_alone(eps, alpha, pac, empty):
    rng = np.random.default_rng(1)
    summaries, small = grouped_cases(rng, 90, empty_frac=0.1)
    grouping = grouping_from_table(summaries.case_ids, table(summaries, small))
    assert grouping.names == ("large", "small")
    for like in (
        quiet(calibrate_cls, summaries, eps, alpha, empty=empty, pac_delta=pac),
        quiet(calibrate_crc, summaries, eps, empty=empty),
    ):
        mondrian = quiet(calibrate_groups, grouping, like, CalibrationProfile(like, summaries, empty_policy=empty))
        for g, members in zip(mondrian.groups, (~small, small)):
            subset = summaries.subset(np.flatnonzero(members))
            alone = (
                quiet(calibrate_cls, subset, eps, alpha, empty=empty, pac_delta=pac)
                if like.method == "cls"
                else quiet(calibrate_crc, subset, eps, empty=empty)
            )
            assert g.calibration == alone  # thresholds, n, excluded scans, rank, PAC level, scans with a lesion


@pytest.mark.parametrize("pac", [None, 0.2])
@pytest.mark.parametrize("mode", ["marginal", "joint-split", "joint-max"])
def test_set_groups_equal_calibrating_each_group_alone(mode, pac):
    rng = np.random.default_rng(2)
    n = 80
    groups = rng.integers(0, 3, n)
    stats = SetStatistics(
        rng.normal(size=n) + groups,
        rng.normal(size=n) - groups,
        tuple(f"s{i}" for i in range(n)),
        "identity",
        "identity",
        np.full(n, 5),
    )
    summaries = LesionSummaries.from_sorted((cid, np.ones(5, np.float32)) for cid in stats.case_ids)
    like = calibrate_sets(stats, alpha=0.2, mode=mode, pac_delta=pac)
    profile = CalibrationProfile(like, summaries, stats, "include")
    grouping = grouping_from_table(stats.case_ids, {c: f"g{g}" for c, g in zip(stats.case_ids, groups)})
    mondrian = quiet(calibrate_groups, grouping, like, profile)
    for j, g in enumerate(mondrian.groups):
        alone = calibrate_sets(
            stats.subset(np.flatnonzero(groups == j)), alpha=0.2, mode=mode, pac_delta=pac, warn=False
        )
        assert g.calibration == alone


@pytest.mark.parametrize("voxel_epsilon, pac", [(None, None), (0.2, None), (0.2, 0.1)])
def test_lesion_level_groups_equal_calibrating_each_group_alone(voxel_epsilon, pac):
    rng = np.random.default_rng(3)
    n = 60
    counts = rng.integers(0, 5, n)
    values = np.concatenate([np.sort(rng.random(k)) for k in counts]).astype(np.float32)
    offsets = np.r_[0, np.cumsum(counts)]
    ids = tuple(f"l{i}" for i in range(n))
    lesions = LesionLevelSummaries(values, np.full(values.size, 10, np.int64), offsets, ids)
    voxels = LesionSummaries.from_sorted(
        (cid, np.sort(rng.random(10 * k).astype(np.float32))[::-1]) for cid, k in zip(ids, counts)
    )
    like = calibrate_lesion(lesions, 0.25, 0.2, voxel_epsilon=voxel_epsilon, voxel_summaries=voxels, pac_delta=pac)
    profile = CalibrationProfile(like, voxels, lesion_level=lesions)
    groups = rng.integers(0, 2, n)
    grouping = grouping_from_table(ids, {c: str(g) for c, g in zip(ids, groups)})
    mondrian = quiet(calibrate_groups, grouping, like, profile)
    for j, g in enumerate(mondrian.groups):
        idx = np.flatnonzero(groups == j)
        alone = quiet(
            calibrate_lesion,
            lesions.subset(idx),
            0.25,
            0.2,
            voxel_epsilon=voxel_epsilon,
            voxel_summaries=voxels.subset(idx),
            pac_delta=pac,
        )
        assert g.calibration == alone


# ----------------------------------------------------------------------------- too small, never a fallback


def test_too_small_group_is_the_whole_image_with_how_many_scans_it_needs():
    rng = np.random.default_rng(4)
    summaries, _ = grouped_cases(rng, 40)
    groups = {cid: ("rare" if i < 5 else "common") for i, cid in enumerate(summaries.case_ids)}
    like = calibrate_cls(summaries, 0.1, 0.1)
    with pytest.warns(CalibrationSetTooSmallWarning, match=r"group 'rare': 5 usable .* at least 9 .* 4 more"):
        mondrian = calibrate_groups(
            grouping_from_table(summaries.case_ids, groups), like, CalibrationProfile(like, summaries)
        )
    rare = mondrian.group("rare")
    assert rare.calibration.probability_threshold == -math.inf != like.probability_threshold  # no fallback
    assert (rare.n, rare.needed, rare.more_needed) == (5, 9, 4)
    choice = choose_group(mondrian, "rare")
    assert "This group needs 4 more calibration scan(s)" in choice.sentence and "whole image" in choice.sentence
    assert mondrian.group("common").more_needed == 0


def test_empty_bin_of_a_lesion_size_grouping_is_reported_not_dropped():
    rng = np.random.default_rng(5)
    summaries, _ = grouped_cases(rng, 30)
    true_ml = np.full(30, 2.0)
    grouping = grouping_by_size((1.0, 50.0), true_ml, true_ml)
    like = calibrate_crc(summaries, 0.1)
    mondrian = quiet(calibrate_groups, grouping, like, CalibrationProfile(like, summaries))
    assert [g.n for g in mondrian.groups] == [0, 30, 0]
    assert [g.more_needed for g in mondrian.groups] == [9, 0, 9]  # crc at eps 0.1 needs ceil(1/eps - 1) = 9
    assert mondrian.groups[0].calibration.probability_threshold == -math.inf


def test_groups_file_must_name_every_calibration_scan():
    with pytest.raises(ConformalSegError, match=r"2 calibration scan\(s\) have no group: b, c"):
        grouping_from_table(("a", "b", "c"), {"a": "x", "z": "y"}, "groups.csv")


# ----------------------------------------------------------------------------- lesion-size bins


def test_parse_group_by_and_bins():
    assert parse_group_by("lesion-size:5,20") == (5.0, 20.0)
    assert bin_names((5.0, 20.0)) == ("[0, 5) mL", "[5, 20) mL", "[20, inf) mL")
    assert volume_bins(np.array([0.0, 4.999, 5.0, 19.9, 20.0, 1e9]), (5.0, 20.0)).tolist() == [0, 0, 1, 1, 2, 2]
    for bad in ("lesion-size:", "size:5", "lesion-size:5,5", "lesion-size:-1,2", "lesion-size:a"):
        with pytest.raises(ConformalSegError):
            parse_group_by(bad)


def test_scan_volumes_in_ml():
    geometry = Geometry((4, 5, 6), spacing=(2.0, 2.0, 2.5))  # 10 mm^3 per voxel
    prob = np.zeros((4, 5, 6), np.float32)
    prob.flat[:7] = 0.5  # exactly 0.5 counts as predicted
    prob.flat[7:9] = np.nextafter(np.float32(0.5), np.float32(0))
    lesion = np.zeros((4, 5, 6), bool)
    lesion.flat[:100] = True
    assert scan_volumes_ml(prob, lesion, geometry) == pytest.approx((1.0, 0.07))


def test_choose_group_by_name_volume_or_predicted_size():
    rng = np.random.default_rng(6)
    summaries, small = grouped_cases(rng, 60)
    true_ml = np.where(small, 1.0, 30.0)
    predicted_ml = np.where(rng.random(60) < 0.8, true_ml, 31.0 - true_ml)  # a fifth predicted in the other bin
    grouping = grouping_by_size((10.0,), true_ml, predicted_ml)
    like = calibrate_cls(summaries, 0.1, 0.2)
    mondrian = quiet(calibrate_groups, grouping, like, CalibrationProfile(like, summaries))
    assert grouping.by == BY_LESION_SIZE and [g.n for g in mondrian.groups] == [int(small.sum()), int((~small).sum())]
    assert [g.n for g in mondrian.predicted_groups] == [int((predicted_ml < 10).sum()), int((predicted_ml >= 10).sum())]
    assert choose_group(mondrian, "[10, inf) mL").group is mondrian.groups[1]
    assert choose_group(mondrian, "3.5").group is mondrian.groups[0]  # a volume in mL picks its bin
    geometry = Geometry((10, 10, 10), spacing=(10.0, 10.0, 10.0))  # 1 mL per voxel
    prob = np.zeros((10, 10, 10), np.float32)
    prob.flat[:12] = 0.9  # 12 mL predicted
    choice = choose_group(mondrian, None, prob, geometry)
    assert choice.predicted and choice.group is mondrian.predicted_groups[1] and choice.predicted_ml == 12.0
    assert "marginal over the true lesion sizes" in choice.sentence and "probability >= 0.5" in choice.sentence
    with pytest.raises(ConformalSegError, match="unknown group"):
        choose_group(mondrian, "huge")


def test_file_groups_need_the_group_at_apply_time():
    rng = np.random.default_rng(7)
    summaries, small = grouped_cases(rng, 30)
    like = calibrate_cls(summaries, 0.2, 0.2)
    mondrian = quiet(
        calibrate_groups,
        grouping_from_table(summaries.case_ids, table(summaries, small)),
        like,
        CalibrationProfile(like, summaries),
    )
    with pytest.raises(ConformalSegError, match="pass --group with one of: 'large', 'small'"):
        choose_group(mondrian, None, np.zeros((2, 2, 2)), Geometry((2, 2, 2)))


# ----------------------------------------------------------------------------- profiles on disk


@pytest.mark.parametrize("empty, pac", [("exclude", None), ("include", 0.1)])
def test_profile_round_trip_recalibration_and_hand_edit(tmp_path, empty, pac):
    rng = np.random.default_rng(8)
    summaries, small = grouped_cases(rng, 80, empty_frac=0.1)
    like = quiet(calibrate_cls, summaries, 0.1, 0.1, empty=empty, pac_delta=pac)
    profile = CalibrationProfile(like, summaries, empty_policy=empty)
    grouping = grouping_by_size((2.0,), np.where(small, 1.0, 5.0), np.where(small, 1.5, 4.0))
    profile = CalibrationProfile(
        like, summaries, empty_policy=empty, groups=quiet(calibrate_groups, grouping, like, profile)
    )
    path, _ = profile.save(tmp_path / "p.json")
    loaded = quiet(load_profile, path)
    assert loaded.groups.thresholds() == profile.groups.thresholds()
    assert (
        loaded.groups.groups == profile.groups.groups
        and loaded.groups.predicted_groups == profile.groups.predicted_groups
    )
    assert np.array_equal(loaded.groups.grouping.predicted_ml, grouping.predicted_ml)
    doc = json.loads(path.read_text())
    assert doc["groups"]["by"] == "lesion-size" and doc["groups"]["edges_ml"] == [2.0]
    counted = np.ones(80, bool) if empty == "include" else summaries.lesion_sizes > 0
    assert [g["n"] for g in doc["groups"]["groups"]] == [int((small & counted).sum()), int((~small & counted).sum())]
    if empty == "include":
        assert [g["n_with_lesion"] for g in doc["groups"]["groups"]] == [
            int((small & (summaries.lesion_sizes > 0)).sum()),
            int((~small & (summaries.lesion_sizes > 0)).sum()),
        ]
    # recalibration recomputes every group from the summaries
    again = quiet(loaded.recalibrate, epsilon=0.2, alpha=0.2)
    fresh = quiet(calibrate_groups, grouping, again.calibration, again)
    assert again.groups.thresholds() == fresh.thresholds() != loaded.groups.thresholds()
    # a hand-edited group threshold is refused
    doc["groups"]["groups"][1]["probability_threshold"] = 0.123
    path.write_text(json.dumps(doc))
    with pytest.raises(ConformalSegError, match="group thresholds do not follow"):
        quiet(load_profile, path)


# ----------------------------------------------------------------------------- the guarantee, as a statistic


def _assert_valid(successes: int, T: int, alpha: float, p_exact: float, label: str) -> None:
    lower = binom.ppf(LEVEL, T, 1 - alpha)
    assert successes >= lower, f"{label}: {successes}/{T} < {lower}"
    upper = binom.isf(LEVEL, T, min(1.0, p_exact + SLACK))
    assert successes <= upper, f"{label}: {successes}/{T} > {upper} (p = {p_exact:.3f})"


def test_marginal_holds_while_one_group_fails_mondrian_fixes_it():
    """T = 300 independent trials: n = 100 calibration scans, then one fresh small-lesion scan, one fresh
    large-lesion scan and one fresh scan of the mixture."""
    eps, alpha, n, T = 0.1, 0.1, 100, 300
    rng = np.random.default_rng(2026)
    marginal_all = marginal_small = 0
    hits = {"small": 0, "large": 0}
    p_exact: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(T):
        summaries, small = grouped_cases(rng, n)
        like = calibrate_cls(summaries, eps, alpha)
        mondrian = quiet(
            calibrate_groups,
            grouping_from_table(summaries.case_ids, table(summaries, small)),
            like,
            CalibrationProfile(like, summaries),
        )
        test_small, _ = grouped_cases(rng, 1, small_frac=1.0)
        test_large, _ = grouped_cases(rng, 1, small_frac=0.0)
        test_mix, _ = grouped_cases(rng, 1)
        c = {"small": critical_cutoffs(test_small, eps)[0], "large": critical_cutoffs(test_large, eps)[0]}
        marginal_all += critical_cutoffs(test_mix, eps)[0] >= like.probability_threshold
        marginal_small += c["small"] >= like.probability_threshold
        for name in ("small", "large"):
            g = mondrian.group(name)
            hits[name] += c[name] >= g.calibration.probability_threshold  # FNR <= eps iff threshold <= c
            p_exact[name].append(conformal_rank(g.n, alpha) / (g.n + 1) if g.n >= 9 else 1.0)
    # the marginal guarantee holds over all scans ...
    assert marginal_all >= binom.ppf(LEVEL, T, 1 - alpha), marginal_all
    # ... while the small-lesion group gets far less than 1 - alpha (the failure Mondrian calibration fixes)
    assert marginal_small < binom.ppf(LEVEL, T, 1 - alpha), marginal_small
    assert marginal_small / T < 0.8
    for name in ("small", "large"):
        _assert_valid(hits[name], T, alpha, float(np.mean(p_exact[name])), f"Mondrian {name}")


def test_per_group_expected_fnr_control():
    """E[FNR | group] <= eps for every group (CLT tolerance at level 0.001, as in test_validity.py)."""
    eps, n, T = 0.1, 100, 300
    rng = np.random.default_rng(77)
    fnr = {"small": [], "large": []}
    for _ in range(T):
        summaries, small = grouped_cases(rng, n)
        like = calibrate_crc(summaries, eps)
        mondrian = quiet(
            calibrate_groups,
            grouping_from_table(summaries.case_ids, table(summaries, small)),
            like,
            CalibrationProfile(like, summaries),
        )
        for name, frac in (("small", 1.0), ("large", 0.0)):
            test, _ = grouped_cases(rng, 1, small_frac=frac)
            t = mondrian.group(name).calibration.probability_threshold
            m = test.lesion_sizes[0]
            fnr[name].append((m - test.count_at_least(t)[0]) / m)
    for name, values in fnr.items():
        x = np.asarray(values)
        tol = norm.isf(LEVEL) * x.std(ddof=1) / math.sqrt(T)
        assert x.mean() <= eps + tol, f"{name}: mean FNR {x.mean():.4f} > {eps} + {tol:.4f}"


def test_per_group_joint_sets_coverage():
    """Joint (max) confidence sets per scanner, where one scanner's scores are shifted."""
    alpha, n, T = 0.1, 120, 400
    rng = np.random.default_rng(78)
    hits, p_exact = {"A": 0, "B": 0}, {"A": [], "B": []}

    def draw(size: int, group: np.ndarray):
        return rng.normal(size=size) + 1.5 * group, rng.normal(size=size) + 1.5 * group

    for _ in range(T):
        group = (rng.random(n) < 0.3).astype(int)
        tau, gamma = draw(n, group)
        ids = tuple(f"s{i}" for i in range(n))
        stats = SetStatistics(tau, gamma, ids, "identity", "identity", np.full(n, 3))
        like = calibrate_sets(stats, alpha=alpha, mode="joint-max", warn=False)
        profile = CalibrationProfile(
            like, LesionSummaries.from_sorted((c, np.ones(3, np.float32)) for c in ids), stats, "include"
        )
        mondrian = quiet(
            calibrate_groups, grouping_from_table(ids, {c: "AB"[g] for c, g in zip(ids, group)}), like, profile
        )
        for j, name in enumerate("AB"):
            t, g = draw(1, np.array([j]))
            c = mondrian.group(name).calibration
            hits[name] += bool(t[0] <= c.inner_threshold and g[0] <= -c.outer_threshold)
            n_g = mondrian.group(name).n
            p_exact[name].append(conformal_rank(n_g, alpha) / (n_g + 1) if n_g >= 9 else 1.0)
    for name in "AB":
        _assert_valid(hits[name], T, alpha, float(np.mean(p_exact[name])), f"sets {name}")


def test_predicted_size_rule_is_valid_conditional_on_the_predicted_group():
    """Groups chosen by the predicted volume (a noisy function of the true size): the threshold calibrated on
    the scans of the same *predicted* size covers >= 1 - alpha of the new scans of that predicted size."""
    eps, alpha, n, T = 0.1, 0.1, 150, 300
    rng = np.random.default_rng(79)
    hits, p_exact = [0, 0], [[], []]

    def predicted(small: np.ndarray) -> np.ndarray:  # predicted mL: right bin 80 % of the time
        flip = rng.random(small.size) < 0.2
        return np.where(small ^ flip, 1.0, 30.0)

    for _ in range(T):
        summaries, small = grouped_cases(rng, n)
        like = calibrate_cls(summaries, eps, alpha)
        grouping = grouping_by_size((10.0,), np.where(small, 1.0, 30.0), predicted(small))
        mondrian = quiet(calibrate_groups, grouping, like, CalibrationProfile(like, summaries))
        for b in (0, 1):  # draw a new scan until its predicted size falls in bin b (rejection sampling)
            while True:
                test, test_small = grouped_cases(rng, 1)
                if int(predicted(test_small)[0] >= 10.0) == b:
                    break
            g = mondrian.predicted_groups[b]
            hits[b] += critical_cutoffs(test, eps)[0] >= g.calibration.probability_threshold
            p_exact[b].append(conformal_rank(g.n, alpha) / (g.n + 1) if g.n >= 9 else 1.0)
    for b in (0, 1):
        _assert_valid(hits[b], T, alpha, float(np.mean(p_exact[b])), f"predicted bin {b}")
