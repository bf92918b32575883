"""Drift monitoring: conformal p-values, the two test martingales, Ville's alarm as a statistic (false
alarms on exchangeable streams, detection on shifted ones), profiles' streams, the log and the drift badge.

False alarms: a run is R independent seeded streams (calibration scores then reviewed scores, all i.i.d.);
by Ville's inequality each crosses 1/delta with probability at most delta, so the number of runs that
cross is stochastically below Binomial(R, delta): we assert ``crossings <= binom.isf(0.001, R, delta)``,
i.e. at least (1 - delta) of the runs stay below 1/delta up to a level-0.001 tolerance. Detection: the same
streams with the reviewed scores shifted (harder cases) must cross, and the median number of reviewed
cases to the alarm is asserted below a bound (its value is reported in README.md and RESULTS.md).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom, kstest

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.crc import calibrate_crc
from ConformalSegLib.conformal.monitoring import (
    LOG_NAME,
    ReviewedData,
    conformal_p_values,
    default_log_dir,
    drift_status,
    first_alarm,
    monitor,
    monitor_profile,
    power_mixture,
    read_log,
    simple_jumper,
    write_log,
)
from ConformalSegLib.conformal.profile import CalibrationProfile
from ConformalSegLib.conformal.summaries import LesionSummaries

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ConformalSeg"))
from ConformalSegSlicer.drift import drift_badge  # noqa: E402

LEVEL = 0.001


# ----------------------------------------------------------------------------- p-values and martingales


def test_p_values_follow_the_formula():
    calibration = np.array([0.0, 1.0, 1.0, 2.0])
    stream = np.array([1.0, 3.0, -1.0, 1.0])
    thetas = 1.0 - np.random.default_rng(3).random(4)
    p = conformal_p_values(calibration, stream, np.random.default_rng(3))
    seen = list(calibration)
    for k, s in enumerate(stream):
        seen.append(s)
        greater = sum(x > s for x in seen)
        equal = sum(x == s for x in seen)
        assert p[k] == pytest.approx((greater + thetas[k] * equal) / len(seen))


def test_p_values_are_uniform_under_exchangeability():
    rng = np.random.default_rng(0)
    p = np.concatenate([conformal_p_values(rng.normal(size=30), rng.normal(size=50), rng) for _ in range(40)])
    assert kstest(p, "uniform").pvalue > LEVEL
    # ties (discrete scores) are smoothed: still uniform
    p = np.concatenate(
        [conformal_p_values(rng.integers(0, 3, 30) * 1.0, rng.integers(0, 3, 50) * 1.0, rng) for _ in range(40)]
    )
    assert kstest(p, "uniform").pvalue > LEVEL


def test_martingales_against_direct_products():
    p = np.random.default_rng(1).random(30)
    m = power_mixture(p)
    for k in (0, 9, 29):
        direct = np.mean([np.prod(e * p[: k + 1] ** (e - 1)) for e in np.arange(1, 20) * 0.05])
        assert m[k] == pytest.approx(direct, rel=1e-9)
    # the Simple Jumper, written out with a dict of the three bettors' capital
    capital, total = {-1: 1 / 3, 0: 1 / 3, 1: 1 / 3}, 1.0
    jumper = simple_jumper(p)
    for k, pk in enumerate(p):
        capital = {e: 0.99 * c + 0.01 * total / 3 for e, c in capital.items()}
        capital = {e: c * (1 + e * (pk - 0.5)) for e, c in capital.items()}
        total = sum(capital.values())
        assert jumper[k] == pytest.approx(total, rel=1e-12)


def test_first_alarm_uses_one_over_delta():
    assert first_alarm(np.array([1.0, 50.0, 99.9, 100.0, 20.0, 300.0]), 0.01) == 3
    assert first_alarm(np.array([1.0, 19.9]), 0.05) is None
    with pytest.raises(ConformalSegError):
        first_alarm(np.ones(3), 1.5)


# ----------------------------------------------------------------------------- Ville's inequality, as a statistic


def crossings(rng: np.random.Generator, kind: str, delta: float, shift: float, runs: int, n: int = 100, k: int = 200):
    """Per run, the index of the first alarm (None without one)."""
    out = []
    for _ in range(runs):
        result = monitor(
            rng.normal(size=n),
            rng.normal(shift, 1.0, size=k),
            None,
            case_ids=[str(i) for i in range(k)],
            delta=delta,
            kind=kind,
            seed=int(rng.integers(1 << 30)),
        )
        out.append(result.alarm)
    return out


@pytest.mark.parametrize("kind", ["jumper", "power"])
@pytest.mark.parametrize("delta", [0.05, 0.01])
def test_exchangeable_streams_rarely_cross_one_over_delta(kind, delta):
    runs = 300
    alarms = crossings(np.random.default_rng(11), kind, delta, 0.0, runs)
    crossed = sum(a is not None for a in alarms)
    assert crossed <= binom.isf(LEVEL, runs, delta), f"{crossed}/{runs} exchangeable runs crossed 1/{delta}"


@pytest.mark.parametrize("kind, bound", [("jumper", 40), ("power", 25)])
def test_shifted_streams_cross_quickly(kind, bound):
    """Reviewed cases one standard deviation harder than the calibration ones, from the first case on."""
    alarms = crossings(np.random.default_rng(12), kind, 0.01, 1.0, 100)
    assert all(a is not None for a in alarms)
    median = float(np.median([a + 1 for a in alarms]))
    assert median <= bound, f"median {median} reviewed cases to detection"


# ----------------------------------------------------------------------------- a profile's stream


def scans(rng: np.random.Generator, n: int, hard: float = 0.0, prefix: str = "c") -> LesionSummaries:
    """Lesion probabilities Beta(a, b); ``hard`` lowers a (the network is less sure)."""
    sizes = rng.integers(40, 300, n)
    a, b = rng.uniform(1.5, 6.0, n) * math.exp(-hard), rng.uniform(0.5, 2.0, n)
    values = [np.sort(rng.beta(a[i], b[i], sizes[i]).astype(np.float32))[::-1] for i in range(n)]
    return LesionSummaries.from_sorted((f"{prefix}{i:04d}", v) for i, v in enumerate(values))


def test_profile_streams_false_alarms_and_detection():
    """CLS profiles of 100 scans, 150 reviewed scans: exchangeable streams stay below 1/delta in >= 1 - delta of
    200 runs; streams of harder scans (the network's confidence drops) are flagged."""
    rng = np.random.default_rng(13)
    runs, delta = 200, 0.05
    false_alarms, delays = 0, []
    for run in range(runs):
        summaries = scans(rng, 100)
        profile = CalibrationProfile(calibrate_cls(summaries, 0.1, 0.1), summaries)
        same = ReviewedData(scans(rng, 150, prefix="r"), None, None, "exclude")
        false_alarms += monitor_profile(profile, same, delta=delta, seed=run).alarm is not None
        if run < 40:
            harder = ReviewedData(scans(rng, 150, hard=1.0, prefix="r"), None, None, "exclude")
            result = monitor_profile(profile, harder, delta=delta, seed=run)
            assert result.alarm is not None and result.running[-1] < 0.9
            delays.append(result.alarm + 1)
    assert false_alarms <= binom.isf(LEVEL, runs, delta), f"{false_alarms}/{runs}"
    assert np.median(delays) <= 30, delays


def test_crc_profiles_report_the_running_mean_fnr():
    rng = np.random.default_rng(14)
    summaries = scans(rng, 60)
    profile = CalibrationProfile(calibrate_crc(summaries, 0.1), summaries)
    reviewed = scans(rng, 20, prefix="r")
    result = monitor_profile(profile, ReviewedData(reviewed, None, None, "exclude"))
    t = profile.calibration.probability_threshold
    fnr = (reviewed.lesion_sizes - reviewed.count_at_least(t)) / reviewed.lesion_sizes
    assert result.running_label == "running mean FNR" and result.target == 0.1
    assert np.allclose(result.running, np.cumsum(fnr) / np.arange(1, 21))


def test_lesion_free_reviewed_cases_are_skipped_and_calibration_scans_refused():
    rng = np.random.default_rng(15)
    summaries = scans(rng, 40)
    profile = CalibrationProfile(calibrate_cls(summaries, 0.1, 0.2), summaries)
    reviewed = LesionSummaries.from_sorted(
        [("r0", np.array([0.9, 0.5], np.float32)), ("r1", np.zeros(0, np.float32)), ("r2", np.ones(3, np.float32))]
    )
    result = monitor_profile(profile, ReviewedData(reviewed, None, None, "exclude"))
    assert result.case_ids == ("r0", "r2") and result.skipped == ("r1",)


# ----------------------------------------------------------------------------- the log and the badge


def test_log_drift_status_and_slicer_badge(tmp_path):
    rng = np.random.default_rng(16)
    summaries = scans(rng, 50)
    profile_path, _ = CalibrationProfile(calibrate_cls(summaries, 0.1, 0.1), summaries).save(tmp_path / "p.json")
    assert drift_status(profile_path).state == "none" and drift_badge([profile_path]) == ("", False)
    log_path = default_log_dir(profile_path) / LOG_NAME
    calm = monitor(rng.normal(size=50), rng.normal(size=30), None, case_ids=[f"r{i}" for i in range(30)])
    write_log(calm, profile_path, log_path)
    status = drift_status(profile_path)
    assert status.state == "ok" and not status.warning and "No drift detected over 30" in status.text
    assert read_log(log_path)["cases"][0]["case_id"] == "r0"
    text, warning = drift_badge([profile_path])
    assert text.startswith("p.json: No drift") and not warning

    shifted = monitor(
        rng.normal(size=50),
        rng.normal(2.0, 1.0, size=60),
        None,
        case_ids=[f"r{i}" for i in range(60)],
        times=[f"2026-12-{1 + i // 3:02d}" for i in range(60)],
    )
    with pytest.raises(ConformalSegError, match="already exists"):
        write_log(shifted, profile_path, log_path)
    write_log(shifted, profile_path, log_path, force=True)
    status = drift_status(profile_path)
    assert status.state == "drift" and status.warning and "Shift detected at reviewed case" in status.text
    assert f"r{shifted.alarm}, 2026-12-" in status.text
    text, warning = drift_badge([profile_path])
    assert "Shift detected" in text and warning

    doc = json.loads(profile_path.read_text())  # the profile changes: the log no longer applies
    doc["provenance"]["note"] = "recalibrated"
    profile_path.write_text(json.dumps(doc))
    assert drift_status(profile_path).state == "stale"
    log_path.write_text("{}")
    text, warning = drift_badge([profile_path])
    assert "unreadable" in text and warning
