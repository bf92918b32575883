"""Learn-Then-Test (:mod:`ConformalSegLib.conformal.ltt`): a brute force from the volumes, MAPIE's
fixed-sequence procedure, the exact false-positive summaries, and validity as a statistic."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ConformalSegLib.conformal.fp_summaries import (
    COMPONENT_THRESHOLDS,
    FalsePositiveBuilder,
    FalsePositiveSummaries,
    fp_components,
)
from ConformalSegLib.conformal.lesion_level import build_lesion_level
from ConformalSegLib.conformal.ltt import RiskData, calibrate_ltt, ltt_test, p_values, parse_risks
from ConformalSegLib.conformal.rcps import rcps_cutoff
from ConformalSegLib.conformal.summaries import LesionSummaries


def _volumes(rng: np.random.Generator, n: int, shape=(8, 16, 16)) -> list[tuple[str, np.ndarray, np.ndarray]]:
    cases = []
    for i in range(n):
        lesion = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 3))):
            c = rng.integers(2, np.array(shape) - 2)
            lesion[c[0] - 1 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = True
        p = np.clip(rng.normal(0.1, 0.15, shape), 0, 1)
        p[lesion] = np.clip(rng.normal(0.65 + 0.2 * rng.normal(), 0.2, int(lesion.sum())), 0, 1)
        p = np.round(p * 64) / 64 if i % 3 == 0 else p  # ties within and across scans
        cases.append((f"v{i}", p.astype(np.float32), lesion))
    return cases


def _data(cases, cap_ml: float, voxel_mm3: float = 8.0) -> RiskData:
    builder = FalsePositiveBuilder(cap_ml=cap_ml)
    for case_id, p, lesion in cases:
        builder.add_case(case_id, p, lesion, voxel_mm3)
    lesions = build_lesion_level([(c, p, les, voxel_mm3) for c, p, les in cases])
    return RiskData(LesionSummaries.from_volumes(cases), lesions, builder.build())


def _hb(total: float, n: int, target: float) -> float:
    r = total / n
    a = min(r, target)
    kl = (a * math.log(a / target) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - target))
    return min(math.exp(-n * kl), math.e * stats.binom.cdf(math.ceil(total - 1e-9), n, target))


def _brute(cases, risks: dict[str, float], cap_ml: float, delta: float, voxel_ml: float = 0.008) -> tuple[float, float]:
    """(largest, smallest) valid threshold of the two fixed sequences over every distinct probability (and +inf)."""
    grid = np.r_[np.unique(np.concatenate([p.ravel() for _, p, _ in cases]).astype(np.float64)), np.inf]

    totals = {  # loss sums at every grid value, straight from the volumes (sorted per case, counted)
        "fnr": sum(np.searchsorted(np.sort(p[les]), grid, side="left") / les.sum() for _, p, les in cases),
        "fp-ml": sum(
            np.minimum((les.size - les.sum() - np.searchsorted(np.sort(p[~les]), grid)) * voxel_ml, cap_ml) / cap_ml
            for _, p, les in cases
        ),
    }

    def ok(names: list[str], j: int, level: float) -> bool:
        return all(
            _hb(float(totals[name][j]), len(cases), risks[name] / (cap_ml if name == "fp-ml" else 1)) <= level
            for name in names
        )

    up = [r for r in risks if r == "fnr"]
    down = [r for r in risks if r == "fp-ml"]
    level = delta / 2 if up and down else delta
    hi = next((j for j in range(grid.size) if not ok(up, j, level)), grid.size) if up else grid.size
    lo = next((j + 1 for j in range(grid.size - 1, -1, -1) if not ok(down, j, level)), 0) if down else 0
    return (float(grid[hi - 1]), float(grid[lo])) if hi > lo else (-math.inf, math.nan)


@pytest.mark.parametrize("seed", range(3))
def test_ltt_is_the_brute_force_from_volumes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cases = _volumes(rng, 20, shape=(6, 12, 12))
    cap = 0.4
    data = _data(cases, cap)
    for risks in ({"fnr": 0.3}, {"fp-ml": 0.1}, {"fnr": 0.45, "fp-ml": 0.25}, {"fnr": 0.5, "fp-ml": 0.2}):
        specs = [f"{k}={v}" for k, v in risks.items()]
        result = ltt_test(data, parse_risks(specs), 0.3)
        largest, smallest = _brute(cases, risks, cap, 0.3)
        assert result.threshold == largest
        if len(risks) == 2:
            assert result.n_valid > 100  # a real range, not the trivial result
        if "fp-ml" in risks:  # the summaries test background values only: same interval of equal losses
            assert result.candidates[result.lo - 1] < smallest <= result.candidates[result.lo]


def test_fp_volume_is_exact_from_the_top_values_only() -> None:
    rng = np.random.default_rng(4)
    cases = _volumes(rng, 6)
    fp = _data(cases, cap_ml=0.5).false_positives
    assert fp is not None
    t = np.unique(np.r_[np.linspace(0, 1, 41), np.concatenate([p.ravel() for _, p, _ in cases])])
    for i, (_, p, lesion) in enumerate(cases):
        truth = np.minimum(np.count_nonzero(p[~lesion][:, None] >= t[None, :], axis=0) * 0.008, 0.5)
        np.testing.assert_allclose(fp.fp_ml(t)[i], truth, rtol=1e-12)
        assert fp.case(i).size == min(int(np.ceil(0.5 / 0.008)), int((~lesion).sum()))


def test_fp_components_counts_components_without_lesion() -> None:
    p = np.zeros((5, 9, 9), np.float32)
    lesion = np.zeros(p.shape, bool)
    p[1, 1, 1] = p[3, 7, 7] = 0.9  # two isolated false positives
    p[2, 4, 4] = p[2, 4, 5] = 0.5  # one component touching the lesion
    lesion[2, 4, 4] = True
    p[1, 2, 2] = 0.3  # joins the first false positive below 0.3 (diagonal neighbour)
    counts = fp_components(p, lesion, [0.2, 0.4, 0.95])
    assert counts.tolist() == [2, 2, 0]


def test_fnr_only_equals_rcps_hoeffding_bentkus() -> None:
    rng = np.random.default_rng(9)
    for _ in range(4):
        cases = [
            (f"c{i}", np.sort(rng.beta(3, 1, rng.integers(5, 60)))[::-1]) for i in range(int(rng.integers(30, 80)))
        ]
        s = LesionSummaries.from_sorted(cases)
        assert ltt_test(RiskData(s), parse_risks(["fnr=0.15"]), 0.1).threshold == rcps_cutoff(s, 0.15, 0.1)


@pytest.mark.parametrize("risk", ["fnr=0.3", "fp-ml=0.15"])
def test_valid_thresholds_match_mapie_fixed_sequence(risk: str) -> None:
    control = pytest.importorskip("mapie.risk_control._base_controller")
    rng = np.random.default_rng(11)
    data = _data(_volumes(rng, 30), cap_ml=0.8)
    bound = parse_risks([risk])[0]
    result = ltt_test(data, [bound], 0.2)
    t = result.candidates
    losses, _, _ = data.losses(bound.name, t)
    r_hat = losses.mean(axis=0)
    target = bound.target / data.cap(bound.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MAPIE warns about ties in a monotone risk
        valid, theirs = control.ltt_procedure(
            r_hat[None, :],
            np.array([[target]]),
            0.2,
            np.full((1, t.size), losses.shape[0]),
            fwer_method="fixed_sequence",
        )
    np.testing.assert_allclose(p_values(data, bound, t), theirs[:, 0], rtol=1e-10, atol=1e-300)
    assert sorted(valid[0]) == list(range(result.lo, result.hi))


def test_no_valid_threshold_is_the_trivial_result_with_a_warning() -> None:
    rng = np.random.default_rng(2)
    data = _data(_volumes(rng, 8), cap_ml=0.8)
    with pytest.warns(CalibrationSetTooSmallWarning, match="no threshold controls"):
        c = calibrate_ltt(data, parse_risks(["fnr=0.05", "fp-ml=0.01"]), 0.1)
    assert c.probability_threshold == -math.inf and c.n_valid == 0 and c.is_trivial


def test_risk_specs_are_checked() -> None:
    assert [r.name for r in parse_risks(["fnr=0.1", "lesion-miss=0.2", "fp-ml=5", "fp-components=3"])] == [
        "fnr",
        "lesion-miss",
        "fp-ml",
        "fp-components",
    ]
    for bad in (["fnr"], ["fnr=0"], ["dice=0.1"], ["fnr=0.1", "fnr=0.2"], []):
        with pytest.raises(ConformalSegError):
            parse_risks(bad)


def _synthetic(rng: np.random.Generator, n: int) -> RiskData:
    """Lesion values sigmoid(z + u_i) (as in test_rcps) and 20 background values U^3 per scan, 0.1 mL voxels."""
    cases, fp_values = [], []
    for i in range(n):
        m = int(rng.integers(1, 16))
        p = 1 / (1 + np.exp(-(rng.normal(1.0, 1.0, m) + rng.normal())))
        cases.append((f"c{i}", np.sort(p.astype(np.float32))[::-1]))
        fp_values.append(np.sort(rng.uniform(size=20) ** 3)[::-1].astype(np.float32))
    fp = FalsePositiveSummaries(
        np.concatenate(fp_values),
        np.arange(n + 1, dtype=np.int64) * 20,
        np.full(n, 0.1),
        np.zeros((n, len(COMPONENT_THRESHOLDS)), np.int64),
        tuple(c for c, _ in cases),
        cap_ml=2.0,
    )
    return RiskData(LesionSummaries.from_sorted(cases), None, fp)


def _true_risks(t: float) -> tuple[float, float]:
    """Expected FNR and expected min(0.1 X, 2) mL with X ~ Bin(20, P(U^3 >= t)) of the generator above."""
    if t == -math.inf:
        return 0.0, 2.0
    fnr = float(stats.norm.cdf((math.log(t / (1 - t)) - 1.0) / math.sqrt(2))) if 0 < t < 1 else float(t >= 1)
    x = np.arange(21)
    fp = float(np.sum(np.minimum(0.1 * x, 2.0) * stats.binom.pmf(x, 20, 1 - min(max(t, 0.0), 1.0) ** (1 / 3))))
    return fnr, fp


def test_ltt_is_valid_over_calibration_draws() -> None:
    trials, delta, eps_fnr, eps_fp = 500, 0.2, 0.6, 0.6
    ok = certified = 0
    risks = parse_risks([f"fnr={eps_fnr}", f"fp-ml={eps_fp}"])
    for trial in range(trials):
        rng = np.random.default_rng(np.random.SeedSequence(77, spawn_key=(trial,)))
        result = ltt_test(_synthetic(rng, 80), risks, delta)
        if not result.n_valid:
            ok += 1  # nothing certified, nothing claimed
            continue
        certified += 1
        fnr_hi, _ = _true_risks(result.threshold)
        _, fp_lo = _true_risks(float(result.candidates[result.lo]))
        ok += fnr_hi <= eps_fnr and fp_lo <= eps_fp  # every valid threshold satisfies both (monotone risks)
    assert certified >= 0.8 * trials  # not trivially valid
    assert ok / trials >= 1 - delta - 3 * math.sqrt(delta * (1 - delta) / trials)


def test_cli_calibrate_load_apply_recalibrate(tmp_path, capsys) -> None:
    from ConformalSegLib.cli import main
    from ConformalSegLib.conformal.profile import load_profile
    from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, 12, seed=5, shape=(16, 32, 32))
    out = tmp_path / "ltt.json"
    argv = ["calibrate", "--method", "ltt", "--data", data, "--lesion-label", "2", "--delta", "0.3", "--out", out]
    argv += ["--risk", "fnr=0.4", "--risk", "lesion-miss=0.5", "--risk", "fp-ml=2", "--fp-ml-cap", "20"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "With confidence at least 70%" in printed and "at most 2 mL are false positives" in printed
    profile = load_profile(out)
    c = profile.calibration
    assert c.method == "ltt" and profile.false_positives is not None and profile.lesion_level is not None
    risks = parse_risks(["fnr=0.4", "lesion-miss=0.5", "fp-ml=2"])
    data_back = RiskData(profile.summaries, profile.lesion_level, profile.false_positives)
    assert c.probability_threshold == ltt_test(data_back, risks, 0.3).threshold
    again = profile.recalibrate(alpha=0.5).calibration
    assert again.probability_threshold == ltt_test(data_back, risks, 0.5).threshold
    prob = data / "probs" / "synth_000.nii.gz"
    assert main(["apply", "--profile", str(out), "--prob", str(prob), "--out", str(tmp_path / "a")]) == 0


def test_slicer_slider_keeps_ltt_and_moves_rcps(tmp_path) -> None:
    import sys
    from pathlib import Path

    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ConformalSeg"))
    from ConformalSegSlicer.slider import SliderSettings, SliderState, relevant_sliders

    cases = list(make_cases(30, 4, shape=(20, 32, 32)))
    ltt = calibrate(cases, CalibrationRequest(method="ltt", delta=0.3, risks=("fnr=0.4",)))
    rcps = calibrate(cases, CalibrationRequest(method="rcps", epsilon=0.3, delta=0.3))
    assert relevant_sliders([ltt]) == set() and relevant_sliders([rcps]) == {"epsilon", "alpha"}
    settings = SliderSettings(0.2, 0.2, 0.2, 0.2)
    result = SliderState([ltt], cases[0].probability, cases[0].geometry).update(settings)
    assert result.guarantees == [ltt.guarantee] and not result.errors
    result = SliderState([rcps], cases[0].probability, cases[0].geometry).update(settings)
    assert result.guarantees == [rcps.recalibrate(epsilon=0.2, alpha=0.2).guarantee] and not result.errors
    # one segment name per method: CRC, RCPS and LTT masks side by side in one panel
    crc = calibrate(cases, CalibrationRequest(method="crc", epsilon=0.3))
    assert len({crc.mask_name, rcps.mask_name, ltt.mask_name}) == 3
    together = SliderState([crc, rcps, ltt], cases[0].probability, cases[0].geometry).update(settings)
    assert not together.errors and set(together.segments) == {crc.mask_name, rcps.mask_name, ltt.mask_name}


def test_fp_components_risk_is_tested_on_the_fixed_thresholds_only() -> None:
    rng = np.random.default_rng(5)
    cases = _volumes(rng, 20, shape=(6, 12, 12))
    data = _data(cases, cap_ml=0.4)
    grid = np.asarray(COMPONENT_THRESHOLDS)
    counts = np.array([fp_components(p, les, grid) for _, p, les in cases])  # (scans, thresholds)
    valid = 0
    for fnr_target, target, delta in ((0.7, 2.0, 0.3), (0.8, 1.0, 0.3), (0.6, 2.0, 0.3), (0.8, 5.0, 0.2)):
        result = ltt_test(data, parse_risks([f"fnr={fnr_target}", f"fp-components={target}"]), delta)
        valid += result.n_valid > 0
        assert result.candidates.tolist() == list(COMPONENT_THRESHOLDS)
        totals = np.minimum(counts, 10).sum(axis=0) / 10
        fnr = [sum(np.count_nonzero(p[les] < t) / les.sum() for _, p, les in cases) for t in grid]
        up = [_hb(f, len(cases), fnr_target) <= delta / 2 for f in fnr]
        down = [_hb(float(c), len(cases), target / 10) <= delta / 2 for c in totals]
        hi = up.index(False) if False in up else grid.size
        lo = grid.size - (down[::-1].index(False) if False in down else grid.size)
        assert (result.lo, result.hi) == (lo, hi)
    assert valid == 3  # the components are not monotone in t (0 at low t: one component holds the lesion)


def test_fp_components_at_the_trivial_and_empty_masks_equal_the_volumes() -> None:
    """The whole-image result (-inf, any t <= 0) and the empty mask (t > 1) are counted exactly; thresholds
    whose counts were never stored are refused with a message (before: ``tuple.index`` ValueError)."""
    rng = np.random.default_rng(11)
    cases = _volumes(rng, 6, shape=(6, 12, 12))
    cases.append(("empty", cases[0][1], np.zeros_like(cases[0][2])))  # a scan without lesion
    data = _data(cases, cap_ml=0.4)
    t = np.array([-math.inf, 0.0, COMPONENT_THRESHOLDS[3], 1.5, math.inf])
    _, counts, _ = data.losses("fp-components", t)
    expected = np.array([fp_components(p, les, t) for _, p, les in cases])
    np.testing.assert_array_equal(counts, np.minimum(expected, 10))
    assert counts[:, 0].tolist() == [0] * 6 + [1]
    with pytest.raises(ConformalSegError, match="0.05, 0.10, ..., 0.95 only"):
        data.losses("fp-components", np.array([0.33]))


def test_risk_control_evaluation_with_fp_components_survives_trivial_splits() -> None:
    from ConformalSegLib.evaluation.risk_control import evaluate_risk_control

    rng = np.random.default_rng(3)
    data = _data(_volumes(rng, 12, shape=(6, 12, 12)), cap_ml=0.4)
    risks = parse_risks(["fnr=0.3", "fp-components=0.05"])  # too strict for 6 calibration scans: trivial
    rows = {r.method: r for r in evaluate_risk_control(data, epsilon=0.2, delta=0.3, risks=risks, splits=5, seed=1)}
    assert rows["ltt"].trivial == 5 and rows["ltt"].held == 1.0
    assert rows["ltt"].test_means["fnr"] == 0.0
