"""The split protocol (ConformalSegLib.evaluation.protocol) against brute force on volumes, and the report writer."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError  # noqa: E402
from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.conformal.cls import apply_threshold, conformal_lower_cutoff, critical_cutoff, critical_cutoffs  # noqa: E402
from ConformalSegLib.conformal.confidence_sets import SetStatisticsBuilder, apply_sets, calibrate_sets  # noqa: E402
from ConformalSegLib.conformal.crc import calibrate_crc  # noqa: E402
from ConformalSegLib.conformal.lesion_level import LesionLevelBuilder, calibrate_lesion  # noqa: E402
from ConformalSegLib.conformal.score_transforms import parse_transform  # noqa: E402
from ConformalSegLib.conformal.simultaneous import simultaneous_band  # noqa: E402
from ConformalSegLib.conformal.summaries import (
    LesionSummaries,  # noqa: E402
    SummaryBuilder,  # noqa: E402
)
from ConformalSegLib.evaluation.lesion_metrics import lesion_detection  # noqa: E402
from ConformalSegLib.evaluation.metrics import hd95  # noqa: E402
from ConformalSegLib.evaluation.progress import STAGES  # noqa: E402
from ConformalSegLib.evaluation.protocol import evaluate_dataset  # noqa: E402
from ConformalSegLib.evaluation.report import REPORT_FILES, write_report  # noqa: E402
from ConformalSegLib.evaluation.results import binomial_tolerance, mean_std  # noqa: E402
from ConformalSegLib.phantoms.simulated_maps import make_cases  # noqa: E402

EPSILONS = (0.1, 0.3)
HAVE_MONAI = importlib.util.find_spec("monai") is not None
ALPHAS = (0.1, 0.2)


@dataclass
class ArrayCase:
    case_id: str
    probability: np.ndarray
    lesion: np.ndarray
    geometry: Geometry


def tied_cases(n: int = 12, seed: int = 0) -> list[ArrayCase]:
    """Small random volumes whose probabilities take 9 values only (heavy ties), one empty lesion."""
    rng = np.random.default_rng(seed)
    geometry = Geometry(shape=(6, 7, 8), spacing=(0.8, 0.9, 2.0))
    cases = []
    for i in range(n):
        prob = (rng.integers(0, 9, size=geometry.shape) / 8).astype(np.float32)
        lesion = rng.random(geometry.shape) < prob * 0.6 if i != 3 else np.zeros(geometry.shape, bool)
        cases.append(ArrayCase(f"tied_{i:02d}", prob, lesion, geometry))
    return cases


@pytest.fixture(scope="module")
def synthetic():
    return list(make_cases(20, seed=3, shape=(16, 32, 32), empty_probability=0.1))


@pytest.fixture(scope="module")
def synthetic_result(synthetic):
    assert any(not c.lesion.any() for c in synthetic)  # the 'exclude' policy has work to do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        return evaluate_dataset(
            synthetic,
            epsilons=EPSILONS,
            alphas=ALPHAS,
            main_alpha=0.2,
            main_epsilon=0.3,
            splits=6,
            seed=7,
            transforms=("identity", "distance"),
            hd95=HAVE_MONAI,
        )


@pytest.fixture(scope="module")
def tied():
    return tied_cases()


@pytest.fixture(scope="module")
def tied_result(tied):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        return evaluate_dataset(
            tied,
            epsilons=EPSILONS,
            alphas=(0.15, 0.3),
            main_alpha=0.15,
            splits=5,
            seed=1,
            hd95=HAVE_MONAI,
            transforms=("identity", "gaussian:1.5"),
            set_modes=("marginal", "joint-split", "joint-max"),
        )


# ----------------------------------------------------------------------------- brute force


def brute_force_split(cases, result, s: int) -> None:
    """Recompute split ``s`` from the volumes with the volume-based reference functions."""
    cfg = result.config
    n = len(cases)
    rng = np.random.default_rng(cfg.seed)
    for _ in range(s + 1):
        perm = rng.permutation(n)
    cal, test = np.sort(perm[: result.n_cal]), perm[result.n_cal :]
    np.testing.assert_array_equal(np.flatnonzero(result.test_mask[s]), np.sort(test))
    has = [bool(c.lesion.any()) for c in cases]
    pop = has if cfg.empty == "exclude" else [True] * n
    cal_pop = [i for i in cal if pop[i]]
    test_pop = [i for i in test if pop[i]]
    assert result.cls["n_cal"][s] == len(cal_pop) and result.cls["n_test"][s] == len(test_pop)

    def mask_metrics(cutoff):
        fnrs, oks, pcs, dices, hds = [], [], [], [], []
        for i in test_pop:
            c = cases[i]
            pred = apply_threshold(c.probability, cutoff)
            m = int(c.lesion.sum())
            misses = int((c.lesion & ~pred).sum())
            fnrs.append(misses / m if m else 0.0)
            oks.append(fnrs[-1] <= eps + 1e-12)
            pcs.append(pred.sum() / pred.size)
            denominator = pred.sum() + m
            dices.append(2 * (m - misses) / denominator if denominator else 1.0)
            hds.append(hd95(pred, c.lesion, c.geometry.spacing_zyx) if cfg.hd95 else np.nan)
        hds = np.array(hds)
        finite = hds[np.isfinite(hds)]
        return (
            np.mean(fnrs),
            np.mean(oks),
            np.mean(pcs),
            np.mean(dices),
            finite.mean() if finite.size else np.nan,
            int((~np.isfinite(hds)).sum()),
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        for e, eps in enumerate(cfg.epsilons):
            # baseline 0.5
            fnr_b, ecr_b, pc_b, dice_b, hd_b, excl_b = mask_metrics(0.5)
            assert result.baseline["fnr"][s] == pytest.approx(fnr_b, abs=1e-12)
            assert result.baseline["ecr"][s, e] == pytest.approx(ecr_b, abs=1e-12)
            assert result.baseline["pc"][s] == pytest.approx(pc_b, abs=1e-12)
            assert result.baseline["dice"][s] == pytest.approx(dice_b, abs=1e-12)
            if e == cfg.main_epsilon_index and cfg.hd95:
                assert result.baseline["hd95"][s] == pytest.approx(hd_b, rel=1e-6)
                assert result.baseline["hd95_excluded"][s] == excl_b
            # CLS from critical cutoffs computed on the volumes
            crit = np.array([critical_cutoff(cases[i].probability, cases[i].lesion, eps) for i in cal_pop])
            for a, alpha in enumerate(cfg.alphas):
                cutoff = conformal_lower_cutoff(crit, alpha)
                assert result.cls["cutoff"][s, e, a] == cutoff
                fnr_c, ecr_c, pc_c, dice_c, hd_c, excl_c = mask_metrics(cutoff)
                assert result.cls["fnr"][s, e, a] == pytest.approx(fnr_c, abs=1e-12)
                assert result.cls["ecr"][s, e, a] == pytest.approx(ecr_c, abs=1e-12)
                assert result.cls["pc"][s, e, a] == pytest.approx(pc_c, abs=1e-12)
                assert result.cls["dice"][s, e, a] == pytest.approx(dice_c, abs=1e-12)
                if e == cfg.main_epsilon_index and a == cfg.main_alpha_index and cfg.hd95:
                    assert result.cls["hd95"][s] == pytest.approx(hd_c, rel=1e-6)
                    assert result.cls["hd95_excluded"][s] == excl_c
            # CRC
            cal_summaries = LesionSummaries.from_volumes(
                (cases[i].case_id, cases[i].probability, cases[i].lesion) for i in cal_pop
            )
            cutoff = calibrate_crc(cal_summaries, eps, empty="include").probability_threshold
            assert result.crc["cutoff"][s, e] == cutoff
            fnr_c, ecr_c, pc_c, dice_c, _, _ = mask_metrics(cutoff)
            assert result.crc["fnr"][s, e] == pytest.approx(fnr_c, abs=1e-12)
            assert result.crc["ecr"][s, e] == pytest.approx(ecr_c, abs=1e-12)
            assert result.crc["pc"][s, e] == pytest.approx(pc_c, abs=1e-12)
            assert result.crc["dice"][s, e] == pytest.approx(dice_c, abs=1e-12)

        # confidence sets: every case, thresholds from volume statistics, coverage/sizes from masks
        for name, modes in result.sets.items():
            transform = parse_transform(name)
            builder = SetStatisticsBuilder(transform, transform)
            for i in cal:
                builder.add_case(cases[i].case_id, cases[i].probability, cases[i].lesion, cases[i].geometry)
            stats = builder.build()
            for mode, arrays in modes.items():
                for a, alpha in enumerate(cfg.alphas):
                    calibration = calibrate_sets(stats, alpha=alpha, mode=mode, warn=False)
                    assert arrays["inner_threshold"][s, a] == calibration.inner_threshold
                    assert arrays["outer_threshold"][s, a] == calibration.outer_threshold
                    inner_ok, outer_ok, inner_size, outer_size, inner_ml = [], [], [], [], []
                    for i in test:
                        c = cases[i]
                        scores = transform(c.probability, c.geometry).astype(np.float64)
                        inner_ok.append(not ((scores > calibration.inner_threshold) & ~c.lesion).any())
                        outer_ok.append(bool((scores[c.lesion] >= calibration.outer_threshold).all()))
                        inner, outer = apply_sets(c.probability, c.geometry, calibration)
                        inner_size.append(inner.sum())
                        outer_size.append(outer.sum())
                        inner_ml.append(inner.sum() * c.geometry.voxel_volume_mm3 / 1000)
                    joint = np.logical_and(inner_ok, outer_ok)
                    assert arrays["inner_coverage"][s, a] == pytest.approx(np.mean(inner_ok), abs=1e-12)
                    assert arrays["outer_coverage"][s, a] == pytest.approx(np.mean(outer_ok), abs=1e-12)
                    assert arrays["joint_coverage"][s, a] == pytest.approx(np.mean(joint), abs=1e-12)
                    assert arrays["inner_voxels"][s, a] == pytest.approx(np.mean(inner_size), abs=1e-9)
                    assert arrays["outer_voxels"][s, a] == pytest.approx(np.mean(outer_size), abs=1e-9)
                    assert arrays["inner_ml"][s, a] == pytest.approx(np.mean(inner_ml), rel=1e-9, abs=1e-12)


def test_one_split_equals_brute_force_on_synthetic_volumes(synthetic, synthetic_result):
    brute_force_split(synthetic, synthetic_result, s=2)


def brute_force_lesion_split(cases, result, s: int) -> None:
    """The lesion-level method, both slider-safe bands and the lesion-wise metrics of split ``s`` from the
    volumes: lesion counting with :func:`lesion_detection`, calibration with the conformal package."""
    cfg = result.config
    test = np.flatnonzero(result.test_mask[s])
    cal = np.flatnonzero(~result.test_mask[s])
    has = [bool(c.lesion.any()) for c in cases]
    cal_l, test_l = [i for i in cal if has[i]], [i for i in test if has[i]]
    builder, voxel = LesionLevelBuilder(cfg.detect_fraction), SummaryBuilder()
    for i in cal_l:
        c = cases[i]
        builder.add_case(c.case_id, c.probability, c.lesion, c.geometry.voxel_volume_mm3)
        voxel.add_case(c.case_id, c.probability, c.lesion)
    ll, vs = builder.build(), voxel.build()
    e_main, a_main = cfg.main_epsilon_index, cfg.main_alpha_index

    def lesion_outcomes(cutoff, eps):
        ok, rate = [], []
        for i in test_l:
            c = cases[i]
            det = lesion_detection(apply_threshold(c.probability, cutoff), c.lesion, c.geometry.spacing_zyx,
                                   detect_fraction=cfg.detect_fraction)  # fmt: skip
            ok.append(det.n_missed <= math.floor(Fraction(repr(eps)) * det.n_lesions))
            rate.append(det.missed_fraction)
        return np.mean(ok), np.mean(rate)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        for e, eps in enumerate(cfg.epsilons):
            for a, alpha in enumerate(cfg.alphas):
                cut = calibrate_lesion(ll, eps, alpha, voxel_epsilon=cfg.voxel_epsilon, voxel_summaries=vs)
                assert result.lesion["cutoff"][s, e, a] == cut.probability_threshold
                ecr, rate = lesion_outcomes(cut.probability_threshold, eps)
                assert result.lesion["lesion_ecr"][s, e, a] == pytest.approx(ecr, abs=1e-12)
                assert result.lesion["missed_rate"][s, e, a] == pytest.approx(rate, abs=1e-12)
            ecr_b, rate_b = lesion_outcomes(0.5, eps)
            assert result.lesionwise["baseline"]["lesion_ecr"][s, e] == pytest.approx(ecr_b, abs=1e-12)
            assert result.lesionwise["baseline"]["missed_rate"][s, e] == pytest.approx(rate_b, abs=1e-12)
        # the CLS band: every epsilon at once
        cls_cal = [i for i in cal if has[i] or cfg.empty == "include"]
        cls_sum = LesionSummaries.from_volumes(
            (cases[i].case_id, cases[i].probability, cases[i].lesion) for i in cls_cal
        )
        order = np.argsort(cfg.epsilons)
        grid = tuple(cfg.epsilons[k] for k in order)
        for a, alpha in enumerate(cfg.alphas):
            band = simultaneous_band(lambda x: critical_cutoffs(cls_sum, x), np.ones(cls_sum.n, bool), alpha, grid,
                                     warn=False)  # fmt: skip
            assert list(result.bands["cls"]["cutoff"][s, order, a]) == list(band.thresholds)
            assert result.bands["cls"]["level"][s, a] == band.level
        # false positives at the main setting
        fp = []
        for i in test_l:
            c = cases[i]
            cut = result.lesion["cutoff"][s, e_main, a_main]
            fp.append(lesion_detection(apply_threshold(c.probability, cut), c.lesion, c.geometry.spacing_zyx)
                      .false_positive_components)  # fmt: skip
        assert result.lesionwise["lesion"]["fp_components"][s] == pytest.approx(np.mean(fp), abs=1e-12)


def test_lesion_parts_equal_brute_force(synthetic, synthetic_result, tied, tied_result):
    for s in (0, 2):
        brute_force_lesion_split(synthetic, synthetic_result, s)
    brute_force_lesion_split(tied, tied_result, 1)


def test_lesion_level_and_bands_hold_over_many_splits(synthetic):
    result = evaluate_dataset(
        synthetic, epsilons=(0.25, 0.5, 0.75), alphas=(0.2, 0.3), splits=200, seed=4, hd95=False, transforms=(),
        lesionwise=False,
    )  # fmt: skip
    n_l = float(np.mean(result.lesion["n_test"]))
    for a, alpha in enumerate((0.2, 0.3)):
        for e in range(3):
            assert np.nanmean(result.lesion["lesion_ecr"][:, e, a]) >= 1 - alpha - binomial_tolerance(alpha, n_l)
        for name in ("cls", "lesion"):
            band = result.bands[name]
            assert np.nanmean(band["simultaneous_ecr"][:, a]) >= 1 - alpha - binomial_tolerance(alpha, n_l)
            fixed = result.cls if name == "cls" else result.lesion
            assert np.all(band["pc"][:, :, a] >= fixed["pc"][:, :, a] - 1e-12)  # simultaneity costs, never gains


def test_one_split_equals_brute_force_with_ties(tied, tied_result):
    brute_force_split(tied, tied_result, s=3)


def separable_cases(n: int = 10, seed: int = 5) -> list[ArrayCase]:
    """A 'perfect' network: every lesion voxel scores above every background voxel, so the calibrated
    inner threshold falls below the outer one and the displayed inner set I & O is the outer set."""
    rng = np.random.default_rng(seed)
    geometry = Geometry(shape=(5, 6, 7), spacing=(1.0, 1.0, 1.5))
    cases = []
    for i in range(n):
        lesion = np.zeros(geometry.shape, bool)
        lesion[1:4, 2 : 4 + i % 2, 1:5] = True
        prob = np.where(lesion, rng.uniform(0.7, 1.0, geometry.shape), rng.uniform(0.0, 0.3, geometry.shape))
        cases.append(ArrayCase(f"sep_{i}", prob.astype(np.float32), lesion, geometry))
    return cases


def test_inner_set_size_when_inner_threshold_is_below_outer_threshold():
    cases = separable_cases()
    result = evaluate_dataset(
        cases, epsilons=(0.2,), alphas=(0.2,), splits=2, transforms=("identity",), set_modes=("marginal",), hd95=False
    )
    arrays = result.sets["identity"]["marginal"]
    assert np.all(arrays["inner_threshold"] < arrays["outer_threshold"])
    np.testing.assert_array_equal(arrays["inner_voxels"], arrays["outer_voxels"])
    brute_force_split(cases, result, s=1)


def test_include_policy_matches_brute_force(tied):
    result = evaluate_dataset(
        tied, epsilons=(0.2,), alphas=(0.3,), splits=3, seed=4, transforms=(), hd95=False, empty="include"
    )
    assert result.population.all() and not result.sets
    brute_force_split(tied, result, s=1)


def test_internal_consistency(synthetic, synthetic_result):
    r = synthetic_result
    cfg = r.config
    summaries = LesionSummaries.from_volumes((c.case_id, c.probability, c.lesion) for c in synthetic)
    test_pop = r.test_mask & r.population[None, :]
    for e, eps in enumerate(cfg.epsilons):
        crit = critical_cutoffs(summaries, eps)
        # FNR <= eps  <=>  cutoff <= critical cutoff: ECR without counting any voxel
        covered = r.cls["cutoff"][:, e, :, None] <= crit[None, None, :]
        expected = (covered & test_pop[:, None, :]).sum(axis=2) / test_pop.sum(axis=1)[:, None]
        np.testing.assert_allclose(r.cls["ecr"][:, e, :], expected, atol=1e-12)
    # smaller alpha -> lower cutoff -> larger masks, lower FNR (per split)
    a_lo, a_hi = 0, 1  # ALPHAS = (0.1, 0.2)
    assert np.all(r.cls["cutoff"][:, :, a_lo] <= r.cls["cutoff"][:, :, a_hi])
    assert np.all(r.cls["pc"][:, :, a_lo] >= r.cls["pc"][:, :, a_hi])
    assert np.all(r.cls["fnr"][:, :, a_lo] <= r.cls["fnr"][:, :, a_hi] + 1e-15)
    # CLS at the main setting: the per-case FNRs average to the per-split mean
    np.testing.assert_allclose(
        np.nanmean(r.per_case["cls_main_fnr"], axis=1), r.cls["fnr"][:, cfg.main_epsilon_index, cfg.main_alpha_index]
    )
    # the baseline does not depend on epsilon except through ECR; larger epsilon -> higher ECR
    assert np.all(r.baseline["ecr"][:, 1] >= r.baseline["ecr"][:, 0])
    # sets: joint coverage is at most each marginal one; outer sets are larger than inner ones
    for modes in r.sets.values():
        for arrays in modes.values():
            assert np.all(arrays["joint_coverage"] <= np.minimum(arrays["inner_coverage"], arrays["outer_coverage"]))
            assert np.all(arrays["inner_voxels"] <= arrays["outer_voxels"])
    rows = r.summary_rows()
    assert {row["method"] for row in rows} == {
        "baseline", "cls", "crc", "sets", "lesion", "cls-slider-safe", "lesion-slider-safe"
    }  # fmt: skip
    main = [row for row in rows if row["method"] == "cls" and row["epsilon"] == 0.3 and row["alpha"] == 0.2][0]
    assert main["metrics"]["ecr"]["mean"] == pytest.approx(mean_std(r.cls["ecr"][:, 1, 1])[0])
    assert ("hd95" in main["metrics"]) == HAVE_MONAI


def test_ecr_and_set_coverage_hold_over_many_splits(synthetic):
    result = evaluate_dataset(
        synthetic,
        epsilons=(0.1, 0.25),
        alphas=(0.1, 0.2, 0.3),
        main_alpha=0.1,
        splits=300,
        seed=0,
        transforms=("identity",),
        set_modes=("marginal",),
        hd95=False,
    )
    n_test = result.mean_population_test
    for a, alpha in enumerate(result.config.alphas):
        tolerance = binomial_tolerance(alpha, n_test)
        for e in range(2):
            mean_ecr = result.cls["ecr"][:, e, a].mean()
            assert mean_ecr >= 1 - alpha - tolerance, (alpha, mean_ecr)
            assert mean_ecr <= 1.0
        arrays = result.sets["identity"]["marginal"]
        assert arrays["inner_coverage"][:, a].mean() >= 1 - alpha - binomial_tolerance(alpha, result.n_test)
        assert arrays["outer_coverage"][:, a].mean() >= 1 - alpha - binomial_tolerance(alpha, result.n_test)
    # the 0.5 baseline under-segments these cases: CLS is doing real work
    assert result.baseline["ecr"][:, 0].mean() < 0.5
    assert not result.cls["trivial"].any()


def test_calibration_dataset_gives_same_result_as_arrays(tied, tmp_path):
    from ConformalSegLib.io import CalibrationDataset, save_volume

    (tmp_path / "probs").mkdir()
    (tmp_path / "labels").mkdir()
    for c in tied[:8]:
        save_volume(c.probability, c.geometry, tmp_path / "probs" / f"{c.case_id}_prob.nii.gz")
        save_volume(c.lesion.astype(np.uint8), c.geometry, tmp_path / "labels" / f"{c.case_id}.nii.gz")
    dataset = CalibrationDataset.from_root(tmp_path, lesion_labels=[1])
    kw = dict(epsilons=(0.2,), alphas=(0.3,), splits=4, seed=2, transforms=("identity",), hd95=HAVE_MONAI)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        from_files = evaluate_dataset(dataset, **kw)
        from_arrays = evaluate_dataset(tied[:8], **kw)
    assert from_files.case_ids == from_arrays.case_ids
    for key in ("cutoff", "ecr", "fnr", "pc", "dice", "hd95"):
        np.testing.assert_array_equal(from_files.cls[key], from_arrays.cls[key])
    np.testing.assert_array_equal(
        from_files.sets["identity"]["marginal"]["inner_voxels"],
        from_arrays.sets["identity"]["marginal"]["inner_voxels"],
    )


def test_progress_callback_stages(tied):
    calls = []
    evaluate_dataset(
        tied,
        epsilons=(0.3,),
        alphas=(0.3,),
        splits=3,
        transforms=(),
        hd95=False,
        progress=lambda done, total, stage: calls.append((done, total, stage)),
    )
    stages = [stage for _, _, stage in calls]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == list(STAGES)
    assert (len(tied), len(tied), "statistics") in calls and (3, 3, "splits") in calls
    assert calls[-1] == (len(tied), len(tied), "sizes")


# ----------------------------------------------------------------------------- errors and warnings


def test_errors_with_fixes(tied):
    kw = dict(epsilons=(0.2,), alphas=(0.3,), splits=2, transforms=(), hd95=False)
    with pytest.raises(ConformalSegError, match="one-shot iterator"):
        evaluate_dataset(iter(tied), **kw)
    with pytest.raises(ConformalSegError, match="too few cases.*Fix"):
        evaluate_dataset(tied[:3], cal_fraction=0.2, **kw)
    with pytest.raises(ConformalSegError, match="too few cases"):
        evaluate_dataset(tied[:1], **kw)
    with pytest.raises(ConformalSegError, match="main_alpha"):
        evaluate_dataset(tied, main_alpha=0.1, **kw)
    with pytest.raises(ConformalSegError, match="main_epsilon"):
        evaluate_dataset(tied, main_epsilon=0.1, **kw)
    with pytest.raises(ConformalSegError, match="cal_fraction"):
        evaluate_dataset(tied, cal_fraction=1.5, **kw)
    with pytest.raises(ConformalSegError, match="lesion"):
        other_empty = ArrayCase("empty_b", tied[3].probability, tied[3].lesion, tied[3].geometry)
        evaluate_dataset([tied[3], tied[0], other_empty], **kw)  # one lesion case only under 'exclude'
    with pytest.raises(ConformalSegError, match="duplicate case id"):
        evaluate_dataset([tied[0], tied[1], tied[0]], **kw)

    class Shrinking:
        """Re-iterable that loses a case on the second pass."""

        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(tied if self.passes == 1 else tied[:-1])

    with pytest.raises(ConformalSegError, match="changed between the two passes"):
        evaluate_dataset(Shrinking(), **kw)


def test_too_small_calibration_side_is_reported_as_trivial(tied):
    # 6 calibration cases (5 with a lesion): alpha = 0.1 needs 9
    with pytest.warns(CalibrationSetTooSmallWarning, match="alpha=0.1"):
        result = evaluate_dataset(
            tied, epsilons=(0.2,), alphas=(0.1, 0.4), main_alpha=0.4, splits=4, transforms=("identity",), hd95=False
        )
    assert result.cls["trivial"][:, 0, 0].all() and not result.cls["trivial"][:, 0, 1].any()
    assert np.all(np.isneginf(result.cls["cutoff"][:, 0, 0]))
    np.testing.assert_array_equal(result.cls["ecr"][:, 0, 0], 1.0)  # whole-image mask: FNR 0
    np.testing.assert_array_equal(result.cls["pc"][:, 0, 0], 1.0)
    assert result.sets["identity"]["marginal"]["trivial"][:, 0].all()
    assert any("trivial" in w for w in result.warnings)


# ----------------------------------------------------------------------------- reporting


def test_report_writes_all_files_and_refuses_to_overwrite(synthetic_result, tmp_path):
    out = tmp_path / "report"
    paths = write_report(synthetic_result, out)
    assert [p.name for p in paths] == list(REPORT_FILES)
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    for name in REPORT_FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name}")

    data = json.loads((out / "results.json").read_text(), parse_constant=no_constants)
    assert data["config"]["splits"] == synthetic_result.config.splits
    assert len(data["per_split"]["cls"]["ecr"]) == synthetic_result.config.splits
    assert data["dataset"]["n_cases"] == 20
    report = (out / "report.md").read_text()
    for heading in ("Baseline vs CLS vs CRC", "ECR vs alpha", "Confidence sets: coverage", "Prediction compactness"):
        assert heading in report
    assert "PASS" in report or "CHECK" in report
    assert "| Method | Cutoff | ECR |" in report

    before = {p.name: p.read_bytes() for p in paths}
    with pytest.raises(ConformalSegError, match="already exist"):
        write_report(synthetic_result, out)
    assert {p.name: p.read_bytes() for p in paths} == before
    (out / "results.json").unlink()  # any remaining file blocks the whole report: nothing is written
    with pytest.raises(ConformalSegError, match="already exist"):
        write_report(synthetic_result, out)
    assert not (out / "results.json").exists()
    assert len(write_report(synthetic_result, out, force=True)) == len(REPORT_FILES)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_json_has_null_for_infinite_cutoffs(tied, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        result = evaluate_dataset(tied, epsilons=(0.2,), alphas=(0.1,), splits=2, transforms=(), hd95=False)
    write_report(result, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["per_split"]["cls"]["cutoff"] == [[[None]], [[None]]]
    assert data["per_split"]["cls"]["trivial"] == [[[True]], [[True]]]
    assert "trivial" in (tmp_path / "report.md").read_text()
