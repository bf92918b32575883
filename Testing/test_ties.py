"""Randomised tie-breaking (ConformalSegLib.conformal.ties) on saturated / quantised probability maps.

* Validity, CLS: T = 500 seeded splits of a pool of saturated scans (every lesion voxel at 0.0001 or 0.9999),
  n = 39 calibration scans and 60 test scans each, tie_seed = the split index. Without tie-breaking the
  coverage is 1 (the ties only add coverage, masks too large); with it the mean coverage must lie in a
  two-sided band around k/(n+1) = 0.9: the binomial band at level 0.001 for T x 60 test scans, widened by
  the split-to-split spread of the conditional coverage (a Beta(k, n+1-k) draw per split, SD 0.047).
* Validity, CRC: mean FNR over the same kind of splits <= epsilon and >= epsilon - 2/(n + 1) (the CRC lower
  bound, reached because the loss now jumps one voxel at a time), while without tie-breaking it is 0.
* Bit-identical reproducibility with the seed; the profile round trip (save / load / recalibrate / apply,
  CLI too); the refusals; the whole-image warning names the cause.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from ConformalSegLib.common.errors import ConformalSegError, WholeImageWarning
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.crc import calibrate_crc
from ConformalSegLib.conformal.summaries import LesionSummaries
from ConformalSegLib.conformal.ties import apply_tie_broken, calibrate_cls_ties, calibrate_crc_ties

HIGH, LOW = np.float32(0.9999), np.float32(0.0001)


def saturated_pool(rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """Lesion probabilities of ``size`` scans: each voxel at 0.9999 with a scan-specific chance, else 0.0001."""
    pool = []
    for _ in range(size):
        m, found = int(rng.integers(20, 200)), rng.uniform(0.6, 1.0)
        values = np.where(rng.random(m) < found, HIGH, LOW).astype(np.float32)
        pool.append(-np.sort(-values))
    return pool


def _summaries(pool: list[np.ndarray], idx: np.ndarray) -> LesionSummaries:
    return LesionSummaries.from_sorted((str(i), pool[i]) for i in idx)


def test_cls_coverage_is_close_to_the_level_not_only_above():
    rng = np.random.default_rng(13)
    pool = saturated_pool(rng, 4000)
    splits, n, n_test, eps, alpha = 500, 39, 60, 0.1, 0.1
    covered = covered_plain = 0
    for split in range(splits):
        idx = rng.choice(len(pool), n + n_test, replace=False)
        cal = _summaries(pool, idx[:n])
        ties, plain = calibrate_cls_ties(cal, eps, alpha, seed=split), calibrate_cls(cal, eps, alpha)
        for i in idx[n:]:
            v = pool[i]
            allowed = math.floor(eps * v.size)
            covered += int(v.size - apply_tie_broken(v, ties).sum() <= allowed)
            covered_plain += int(v.size - (v >= plain.probability_threshold).sum() <= allowed)
    k = math.ceil((1 - alpha) * (n + 1))
    target, total = k / (n + 1), splits * n_test
    spread = math.sqrt(target * (1 - target) / total + beta_dist(k, n + 1 - k).var() / splits)
    z = norm.ppf(1 - 0.001 / 2)
    assert abs(covered / total - target) <= z * spread, (covered / total, target, spread)
    assert covered_plain / total > target + 5 * spread  # what the ties cost without tie-breaking


def test_crc_mean_fnr_is_close_to_epsilon():
    rng = np.random.default_rng(7)
    pool = saturated_pool(rng, 4000)
    splits, n, n_test, eps = 300, 39, 40, 0.1
    fnr, fnr_plain = [], []
    for split in range(splits):
        idx = rng.choice(len(pool), n + n_test, replace=False)
        cal = _summaries(pool, idx[:n])
        ties, plain = calibrate_crc_ties(cal, eps, seed=split), calibrate_crc(cal, eps)
        for i in idx[n:]:
            v = pool[i]
            fnr.append(1 - apply_tie_broken(v, ties).sum() / v.size)
            fnr_plain.append(1 - (v >= plain.probability_threshold).sum() / v.size)
    sd = np.std(fnr) / math.sqrt(len(fnr)) * 3  # generous: splits make the draws dependent
    assert np.mean(fnr) <= eps + 4 * sd
    assert np.mean(fnr) >= eps - 2 / (n + 1) - 4 * sd
    assert np.mean(fnr_plain) < 0.01  # without tie-breaking the whole tie at 0.9999 is dropped never


def test_reproducible_with_the_seed_and_different_across_seeds():
    rng = np.random.default_rng(1)
    pool = saturated_pool(rng, 60)
    cal = _summaries(pool, np.arange(49))
    a, b = calibrate_cls_ties(cal, 0.1, 0.1, seed=5), calibrate_cls_ties(cal, 0.1, 0.1, seed=5)
    assert a == b and a.tie_seed == 5 and a.tie_threshold is not None
    c = calibrate_cls_ties(cal, 0.1, 0.1, seed=6)
    assert c.tie_threshold != a.tie_threshold
    test = rng.choice([LOW, HIGH], size=(8, 16, 16)).astype(np.float32)
    mask = apply_tie_broken(test, a)
    assert np.array_equal(mask, apply_tie_broken(test, a)) and np.array_equal(
        mask, apply_tie_broken(test.astype(np.float64), a)
    )
    assert 0 < mask[test == a.probability_threshold].mean() < 1  # the tie is split
    assert calibrate_crc_ties(cal, 0.1, seed=3) == calibrate_crc_ties(cal, 0.1, seed=3)


class _Case:
    def __init__(self, case_id: str, probability: np.ndarray, lesion: np.ndarray):
        self.case_id, self.probability, self.lesion = case_id, probability, lesion
        self.geometry = Geometry(probability.shape)


def _maps(rng: np.random.Generator, count: int) -> list[_Case]:
    """Small saturated maps: background at 0.0001, a lesion block partly at 0.9999, partly at 0.0001."""
    cases = []
    for i in range(count):
        prob = np.full((6, 10, 10), LOW, dtype=np.float32)
        lesion = np.zeros(prob.shape, bool)
        lesion[2:4, 3:7, 3:7] = True
        prob[lesion & (rng.random(prob.shape) < rng.uniform(0.6, 1))] = HIGH
        cases.append(_Case(f"c{i:03d}", prob, lesion))
    return cases


def test_profile_round_trip_recalibration_and_refusals(tmp_path):
    from ConformalSegLib.conformal.profile import load_profile

    rng = np.random.default_rng(2)
    cases = _maps(rng, 40)
    for method, alpha in (("cls", 0.1), ("crc", None)):
        request = CalibrationRequest(method=method, epsilon=0.1, alpha=alpha, tie_breaking="random", tie_seed=11)
        profile = calibrate(cases, request)
        c = profile.calibration
        assert c.tie_seed == 11 and "broken at random (seed 11)" in profile.guarantee
        path, _ = profile.save(tmp_path / f"{method}.json")
        doc = json.loads(path.read_text())
        assert doc["tie_breaking"] == "random" and doc["tie_seed"] == 11
        loaded = load_profile(path)
        assert loaded.calibration == c
        again = loaded.recalibrate(epsilon=0.2)
        direct = calibrate(
            cases, CalibrationRequest(method=method, epsilon=0.2, alpha=alpha, tie_breaking="random", tie_seed=11)
        )
        assert again.calibration == direct.calibration  # recalibration = calibrating from scratch
        prob = cases[0].probability
        assert np.array_equal(loaded.masks(prob, Geometry(prob.shape))[loaded.mask_name], apply_tie_broken(prob, c))
        with pytest.raises(ConformalSegError, match="slider-safe bands are not implemented"):
            loaded.slider_band()
        doc["tie_threshold"] = 1.7
        path.write_text(json.dumps(doc))
        with pytest.raises(ConformalSegError, match="tie_threshold are invalid"):
            load_profile(path)
    for bad in (dict(method="lesion", alpha=0.1), dict(method="sets", alpha=0.1, epsilon=None)):
        with pytest.raises(ConformalSegError, match="implemented for --method cls and crc"):
            CalibrationRequest(**{"epsilon": 0.1, **bad}, tie_breaking="random")
    with pytest.raises(ConformalSegError, match="float32 summaries"):
        CalibrationRequest(method="cls", epsilon=0.1, alpha=0.1, tie_breaking="random", precision="uint16")


def test_whole_image_warning_names_ties_and_tie_breaking_lifts_it():
    # every lesion has 30 % of its voxels at probability 0: at eps = 0.1 each critical cutoff is 0
    cal = LesionSummaries.from_sorted((f"c{i}", np.r_[np.full(7, 0.8), np.zeros(3)]) for i in range(19))
    with pytest.warns(WholeImageWarning, match="tied at probability 0.*--tie-breaking random"):
        plain = calibrate_cls(cal, 0.1, 0.1)
    assert plain.is_trivial
    with warnings.catch_warnings():
        warnings.simplefilter("error", WholeImageWarning)
        ties = calibrate_cls_ties(cal, 0.1, 0.1, seed=0)
    assert ties.probability_threshold == 0 and not ties.is_trivial and 0 < ties.tie_threshold < 1


def test_cli_calibrate_apply_and_refusals(tmp_path, capsys):
    from ConformalSegLib.cli import main
    from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", 12, seed=4, shape=(16, 16, 16))
    base = ["calibrate", "--data", str(data), "--lesion-label", "2", "--epsilon", "0.1", "--alpha", "0.2"]
    base += ["--tie-breaking", "random"]
    assert main([*base, "--method", "cls", "--tie-seed", "3", "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["tie_seed"] == 3
    prob = str(data / "probs" / "synth_000.nii.gz")
    for run in ("a", "b"):
        args = ["apply", "--profile", str(tmp_path / "p.json"), "--prob", prob, "--epsilon", "0.2"]
        assert main([*args, "--out", str(tmp_path / run)]) == 0
    a, b = (json.loads((tmp_path / r / "apply.json").read_text()) for r in ("a", "b"))
    assert a["voxels"] == b["voxels"] and a["tie_seed"] == 3 and a["epsilon"] == 0.2
    for extra in (["--method", "lesion"], ["--method", "cls", "--precision", "uint16"]):
        assert main([*base, *extra, "--out", str(tmp_path / "x.json")]) == 2
    groups = tmp_path / "groups.csv"
    groups.write_text("case_id,group\n" + "".join(f"synth_{i:03d},{'ab'[i % 2]}\n" for i in range(12)))
    assert main([*base, "--method", "cls", "--groups", str(groups), "--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert "not implemented for group-conditional" in err and "uint16" in err and "cls and crc, not lesion" in err


def test_slicer_slider_honours_tie_breaking():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ConformalSeg"))
    from ConformalSegSlicer.slider import SliderSettings, SliderState

    cases = _maps(np.random.default_rng(3), 40)
    profiles = [
        calibrate(cases, CalibrationRequest(method=m, epsilon=0.1, alpha=a, tie_breaking="random", tie_seed=2))
        for m, a in (("cls", 0.1), ("crc", None))
    ]
    prob = cases[0].probability
    state = SliderState(profiles, prob, Geometry(prob.shape))
    for eps, safe in ((0.1, False), (0.25, True), (0.4, True)):  # no slider-safe band: the fixed mask either way
        settings = SliderSettings(eps, 0.2, slider_safe=safe)
        result, expected = state.update(settings), state.library_masks(settings)
        for name, mask in expected.items():
            assert np.array_equal(result.segments[name].mask, mask), name
    cls = profiles[0].recalibrate(epsilon=0.4, alpha=0.2).calibration
    assert np.array_equal(result.segments[profiles[0].mask_name].mask, apply_tie_broken(prob, cls))
