"""RCPS (:mod:`ConformalSegLib.conformal.rcps`): exact thresholds against a brute force, the HB p-value
against MAPIE's, the WSR test against its bound found independently, and validity as a statistic."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning
from ConformalSegLib.conformal.rcps import (
    calibrate_rcps,
    hb_p_value,
    min_rcps_calibration_size,
    rcps_cutoff,
    wsr_passes,
)
from ConformalSegLib.conformal.summaries import LesionSummaries


def _summaries(rng: np.random.Generator, n: int, m_max: int = 30, quantise: int | None = None) -> LesionSummaries:
    """Scans with a random offset: lesion probabilities sigmoid(z + u_i), z ~ N(1, 1), u_i ~ N(0, 1)."""
    cases = []
    for i in range(n):
        m = int(rng.integers(1, m_max + 1))
        p = 1 / (1 + np.exp(-(rng.normal(1.0, 1.0, m) + rng.normal())))
        if quantise:
            p = np.round(p * quantise) / quantise  # ties inside and across scans
        cases.append((f"c{i}", np.sort(p.astype(np.float32))[::-1]))
    return LesionSummaries.from_sorted(cases)


def _true_risk(t: float) -> float:
    """E[FNR(t)] of the generator above: P(z + u < logit t) with z + u ~ N(1, 2)."""
    if t == -math.inf or t <= 0:
        return 0.0
    if t == math.inf or t > 1:
        return 1.0
    if t == 1:
        return 1.0
    return float(stats.norm.cdf((math.log(t / (1 - t)) - 1.0) / math.sqrt(2)))


def _exact_fnr_sum(s: LesionSummaries, t: float) -> Fraction:
    total = Fraction(0)
    for i in range(s.n):
        v = s.case(i)
        total += Fraction(int(np.count_nonzero(v < t)), v.size)
    return total


def _brute_hb(s: LesionSummaries, eps: float, delta: float) -> float:
    """Every threshold the masks can distinguish (all values, +inf), exact risks, the RCPS scan upwards."""
    candidates = sorted(set(s.probabilities().tolist())) + [math.inf]
    best = -math.inf
    for t in candidates:
        total = _exact_fnr_sum(s, t)
        r = float(total) / s.n
        hoeff = math.exp(-s.n * _kl(min(r, eps), eps))
        bentkus = math.e * stats.binom.cdf(math.ceil(total), s.n, eps)
        if min(hoeff, bentkus) > delta:
            break
        best = t
    return best


def _kl(a: float, b: float) -> float:
    first = a * math.log(a / b) if a > 0 else 0.0
    return first + (1 - a) * math.log((1 - a) / (1 - b))  # a = min(r, eps) < 1


@pytest.mark.parametrize("seed", range(6))
def test_hb_threshold_is_the_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = _summaries(rng, int(rng.integers(20, 60)), quantise=20 if seed % 2 else None)
    for eps in (0.1, 0.2, 0.3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
            assert rcps_cutoff(s, eps, 0.1, bound="hb") == _brute_hb(s, eps, 0.1)


def _wsr_ucb(losses: np.ndarray, delta: float) -> float:
    """The WSR bound by its definition, with a plain loop and bisection on R (independent of wsr_passes)."""
    n = len(losses)

    def k_max(r: float) -> float:
        mu_sum, var_sum, log_k, best, s2_prev = 0.0, 0.0, 0.0, -math.inf, 0.25
        for i, x in enumerate(losses, start=1):
            nu = min(1.0, math.sqrt(2 * math.log(1 / delta) / (n * s2_prev)))
            log_k += math.log(1 - nu * (x - r))
            best = max(best, log_k)
            mu_sum += x
            mu = (0.5 + mu_sum) / (i + 1)
            var_sum += (x - mu) ** 2
            s2_prev = (0.25 + var_sum) / (i + 1)
        return best

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if k_max(mid) > math.log(1 / delta) else (mid, hi)
    return hi


@pytest.mark.parametrize("seed", range(4))
def test_wsr_test_agrees_with_its_bound(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    losses = rng.beta(1, 6, size=(40, 1))
    ucb = _wsr_ucb(losses[:, 0], 0.1)
    for eps in np.linspace(0.02, 0.5, 25):
        if abs(eps - ucb) > 1e-6:
            assert bool(wsr_passes(losses, eps, 0.1)[0]) == (ucb <= eps), (eps, ucb)


def test_hb_p_value_matches_mapie() -> None:
    methods = pytest.importorskip("mapie.risk_control.methods")
    rng = np.random.default_rng(7)
    for n in (5, 37, 200):
        r_hat = np.r_[0.0, rng.uniform(0, 0.6, 50), 1 / n, 3 / n]
        for eps in (0.05, 0.1, 0.3):
            ours = hb_p_value(r_hat, n, eps)
            theirs = methods.compute_hoeffding_bentkus_p_value(r_hat, n, eps)[:, 0]
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-300)


def test_wsr_threshold_is_the_scan_over_all_values() -> None:
    rng = np.random.default_rng(3)
    s = _summaries(rng, 40)
    values = np.unique(s.probabilities())
    losses = np.array([[np.count_nonzero(s.case(i) < t) / s.case(i).size for t in values] for i in range(s.n)])
    ok = wsr_passes(losses, 0.15, 0.1)
    first_bad = int(np.argmin(ok)) if not ok.all() else len(values)
    expected = -math.inf if first_bad == 0 else float(values[first_bad - 1])
    assert rcps_cutoff(s, 0.15, 0.1, bound="wsr") == expected


def test_too_few_scans_give_the_whole_image_with_a_warning() -> None:
    n_min = min_rcps_calibration_size(0.1, 0.1)
    assert n_min == 22  # 0.9^22 = 0.098 <= 0.1 < 0.9^21
    rng = np.random.default_rng(0)
    with pytest.warns(CalibrationSetTooSmallWarning, match="at least 22"):
        c = calibrate_rcps(_summaries(rng, 21), 0.1, 0.1)
    assert c.probability_threshold == -math.inf and c.is_trivial
    assert calibrate_rcps(_summaries(rng, 22), 0.1, 0.1).probability_threshold > 0


def _validity(bound: str, trials: int, n: int, eps: float, delta: float) -> tuple[float, float]:
    """Share of calibration draws whose threshold has true risk <= eps, and the mean true risk."""
    ok, risks = 0, []
    for trial in range(trials):
        rng = np.random.default_rng(np.random.SeedSequence(2024, spawn_key=(trial,)))
        t = rcps_cutoff(_summaries(rng, n, m_max=15), eps, delta, bound=bound)
        risk = _true_risk(t)
        ok += risk <= eps
        risks.append(risk)
    return ok / trials, float(np.mean(risks))


@pytest.mark.parametrize("bound", ["hb", "wsr"])
def test_rcps_is_valid_over_calibration_draws(bound: str) -> None:
    trials, eps, delta = 500, 0.2, 0.2
    share, mean_risk = _validity(bound, trials, 40, eps, delta)
    tolerance = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert share >= 1 - delta - tolerance
    assert mean_risk > 0.4 * eps  # not trivially valid: the masks are far from the whole image


def test_the_validity_check_detects_an_uncorrected_threshold() -> None:
    """Picking the largest t with Rhat(t) <= eps (no bound) fails about half the draws: the check can fail."""
    trials, eps, ok = 200, 0.2, 0
    for trial in range(trials):
        rng = np.random.default_rng(np.random.SeedSequence(2024, spawn_key=(trial,)))
        s = _summaries(rng, 40, m_max=15)
        values = np.unique(s.probabilities())
        risk = np.mean([np.searchsorted(s.case(i)[::-1], values) / s.case(i).size for i in range(s.n)], axis=0)
        ok += _true_risk(float(values[risk <= eps].max())) <= eps
    assert ok / trials < 1 - 0.2 - 3 * math.sqrt(0.16 / trials)


def test_cli_calibrate_load_apply_recalibrate(tmp_path, capsys) -> None:
    from ConformalSegLib.cli import main
    from ConformalSegLib.conformal.profile import load_profile
    from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, 12, seed=5, shape=(16, 32, 32))
    for bound in ("hb", "wsr"):
        out = tmp_path / f"rcps_{bound}.json"
        argv = ["calibrate", "--method", "rcps", "--bound", bound, "--data", data, "--lesion-label", "2"]
        argv += ["--epsilon", "0.3", "--delta", "0.2", "--out", out]
        assert main([str(a) for a in argv]) == 0
        assert "With confidence at least 80%" in capsys.readouterr().out
        profile = load_profile(out)
        c = profile.calibration
        assert c.method == "rcps" and getattr(c, "bound", None) == bound
        assert c.probability_threshold == rcps_cutoff(profile.summaries, 0.3, 0.2, bound=bound)
        assert 0 < c.probability_threshold < 1
        again = profile.recalibrate(epsilon=0.4, alpha=0.1).calibration
        assert again.probability_threshold == rcps_cutoff(profile.summaries, 0.4, 0.1, bound=bound)
        prob = data / "probs" / "synth_000.nii.gz"
        assert main(["apply", "--profile", str(out), "--prob", str(prob), "--out", str(tmp_path / bound)]) == 0
    doc = (tmp_path / "rcps_hb.json").read_text()
    assert '"bound": "hb"' in doc and '"delta": 0.2' in doc
