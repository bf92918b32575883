"""Threshold methods on a score of the probability (``calibrate --score``, ``conformal/threshold_scores.py``).

The margin score ``g(D)``, ``D`` the signed distance to the network's 0.5 mask: its cutoff must read back as the
margin it stands for; CLS on it must keep its promise (many seeded calibration/test draws against a binomial
tolerance) where CLS on the probability needs the whole background; the profile records the score and applies
it (format version 2), and the CLI, the evaluation and the Slicer slider do the same as the library.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
from ConformalSegLib.conformal.cls import apply_threshold, calibrate_cls, critical_cutoff
from ConformalSegLib.conformal.profile import load_profile
from ConformalSegLib.conformal.score_transforms import MARGIN_SCALE_MM, margin_mm, margin_score, parse_transform
from ConformalSegLib.conformal.threshold_scores import (
    describe_cutoff,
    parse_threshold_score,
    score_map_by_name,
    threshold_scores,
)
from ConformalSegLib.evaluation.protocol import evaluate_dataset
from ConformalSegLib.io.volumes import Volume, save_volume

SHAPE = (16, 24, 24)
GEOMETRY = Geometry(SHAPE, spacing=(2.0, 2.0, 3.0))


@dataclass
class Case:
    case_id: str
    probability: np.ndarray
    lesion: np.ndarray
    geometry: Geometry = GEOMETRY


def _ball(center: np.ndarray, radius_mm: float) -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE).astype(float)
    sz, sy, sx = GEOMETRY.spacing_zyx
    d2 = ((zz - center[0]) * sz) ** 2 + ((yy - center[1]) * sy) ** 2 + ((xx - center[2]) * sx) ** 2
    return d2 <= radius_mm**2


def _case(rng: np.random.Generator, i: int = 0) -> Case:
    """A lesion ball and a network that finds its core confidently and ranks a random-width outer shell
    (the "margin") below the whole background: ``p = 1e-9`` there, against ``1e-6 .. 1e-3`` elsewhere."""
    center = np.array(SHAPE) / 2 + rng.uniform(-2, 2, 3)
    radius = rng.uniform(8.0, 14.0)
    lesion = _ball(center, radius)
    core = _ball(center, radius - rng.uniform(0.0, 6.0))
    p = rng.uniform(1e-6, 1e-3, SHAPE)
    p[lesion] = 1e-9
    p[core] = rng.uniform(0.6, 1.0, int(core.sum()))
    return Case(f"case_{i:03d}", p.astype(np.float32), lesion)


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    rng = np.random.default_rng(1)
    return [_case(rng, i) for i in range(120)]


# ----------------------------------------------------------------------------------------------- the score


def test_scores_are_parsed_and_distance_is_refused() -> None:
    assert parse_threshold_score("identity").name == "identity"
    assert parse_threshold_score("margin").name == "margin:0.5"
    assert parse_threshold_score("MARGIN:0.3").name == "margin:0.3"
    assert parse_threshold_score("gaussian:2").name == "gaussian:2.0"
    with pytest.raises(ConformalSegError, match="millimetres") as info:
        parse_threshold_score("distance:0.4")
    assert "margin:0.4" in str(info.value)
    for bad in ("margin:0", "margin:1.5", "probability", "gaussian"):
        with pytest.raises(ConformalSegError, match="unknown score transform"):
            parse_threshold_score(bad)


def test_the_cutoff_reads_back_as_the_margin() -> None:
    p = _case(np.random.default_rng(0)).probability
    score = threshold_scores(p, GEOMETRY, "margin:0.5")
    distance = parse_transform("distance:0.5")(p, GEOMETRY)
    assert score.dtype == np.float32 and np.array_equal(score >= 0.5, p >= 0.5)  # 0.5: the network's own mask
    for d in (-7.5, -3.0, 2.5):
        c = 1.0 / (1.0 + math.exp(-d / MARGIN_SCALE_MM))
        assert math.isclose(margin_mm(c), d, abs_tol=1e-9)
        clear = np.abs(distance - d) > 1e-3  # away from float32 rounding at the mask's own edge
        assert np.array_equal((score >= c)[clear], (distance >= d)[clear])
    assert margin_mm(0.0) == -math.inf and margin_mm(1.0) == math.inf
    assert "grown by 7.5 mm" in describe_cutoff("margin:0.5", 1.0 / (1.0 + math.exp(0.75)))
    assert "shrunk by 2.5 mm" in describe_cutoff("margin:0.5", 1.0 / (1.0 + math.exp(-0.25)))
    assert describe_cutoff("margin:0.5", 0.0).startswith("every voxel")
    assert describe_cutoff("margin:0.5", math.inf) == "no voxel"


def test_margin_score_keeps_the_order_of_distances() -> None:
    """Rounding to float32 may tie distinct distances (deep inside: 1.0), never swap them."""
    d = np.sort(np.random.default_rng(3).uniform(-2000, 400, 200_000)).astype(np.float32)
    g = margin_score(d)
    assert g.dtype == np.float32 and np.all(np.diff(g) >= 0) and g[0] >= 0 and g[-1] == 1.0
    assert margin_score(np.float32([0.0]))[0] == 0.5
    big = np.random.default_rng(4).uniform(-300, 300, (3, 1500, 1000)).astype(np.float32)  # > one 4 Mi slab
    expected = margin_score(big.copy())
    assert margin_score(big, out=big) is big and np.array_equal(big, expected)  # in place, slab by slab
    with pytest.raises(ValueError, match="C-contiguous float32"):
        margin_score(d, out=np.empty(d.shape, np.float64))


def test_gaussian_score_stays_in_the_unit_interval() -> None:
    p = np.zeros(SHAPE, np.float32)
    p[4:12, 6:18, 6:18] = 1.0
    s = threshold_scores(p, GEOMETRY, "gaussian:3.0")
    assert s.min() >= 0.0 and s.max() <= 1.0 and 0 < s[0, 0, 0] < s[8, 12, 12]


def test_identity_is_the_map_itself_and_mm_scores_need_a_geometry() -> None:
    p = np.full(SHAPE, 0.2, np.float32)
    assert threshold_scores(p, None, "identity") is p
    with pytest.raises(ConformalSegError, match="no voxel spacing"):
        threshold_scores(p, None, "margin:0.5")


# ----------------------------------------------------------------------------------------------- the guarantee


def test_cls_on_the_margin_keeps_its_promise_with_a_small_mask(cases) -> None:
    """The summaries ``calibrate`` builds on the score, recalibrated on 1500 seeded 19-scan draws: the test scan's
    FNR <= eps in at least 1 - alpha of the draws (binomial tolerance), with a mask far smaller than on the
    probability (whose cutoff must fall below the background, the network's ranking of the margin)."""
    eps, alpha, n_cal, trials = 0.1, 0.1, 19, 1500
    on_margin = calibrate(cases, CalibrationRequest("cls", epsilon=eps, alpha=alpha, score="margin:0.5"))
    on_prob = calibrate(cases, CalibrationRequest("cls", epsilon=eps, alpha=alpha))
    maps = [threshold_scores(c.probability, c.geometry, "margin:0.5") for c in cases]
    critical = np.array([critical_cutoff(m, c.lesion, eps) for m, c in zip(maps, cases)])
    covered, size_margin, size_prob = 0, [], []
    draw = np.random.default_rng(2)
    for _ in range(trials):
        pick = draw.choice(len(cases), n_cal + 1, replace=False)
        cal, test = pick[:-1], int(pick[-1])
        cutoff = calibrate_cls(on_margin.summaries.subset(cal), eps, alpha).probability_threshold
        covered += cutoff <= critical[test]  # FNR_test <= eps  <=>  c_hat <= c_test (cls.py)
        size_margin.append(float(np.mean(maps[test] >= cutoff)))
        prob_cutoff = calibrate_cls(on_prob.summaries.subset(cal), eps, alpha).probability_threshold
        size_prob.append(float(np.mean(cases[test].probability >= prob_cutoff)))
    ecr = covered / trials
    # k = ceil(0.9 * 20) = 18 of 20: coverage >= 0.9 exactly; 4 binomial sd below it fails
    assert ecr >= 1 - alpha - 4 * math.sqrt(alpha * (1 - alpha) / trials)
    assert np.mean(size_margin) < 0.25 < 0.9 < np.mean(size_prob)


# ----------------------------------------------------------------------------------------------- the profile


@pytest.mark.parametrize("method", ["cls", "crc", "lesion", "rcps"])
def test_profile_records_and_applies_the_score(tmp_path, cases, method) -> None:
    kw = {"cls": {"alpha": 0.1}, "crc": {}, "lesion": {"alpha": 0.1}, "rcps": {"delta": 0.1}}[method]
    profile = calibrate(cases[:40], CalibrationRequest(method, epsilon=0.1, score="margin:0.5", **kw))
    json_path, _ = profile.save(tmp_path / "p.json")
    doc = json.loads(json_path.read_text())
    assert doc["format_version"] == 2 and doc["score"] == "margin:0.5"
    back = load_profile(json_path)
    assert back.score == "margin:0.5" and back.recalibrate(epsilon=0.2).score == "margin:0.5"
    new = cases[50]
    cutoff = back.calibration.probability_threshold
    expected = apply_threshold(threshold_scores(new.probability, GEOMETRY, "margin:0.5"), cutoff)
    assert np.array_equal(back.masks(new.probability, GEOMETRY)[back.mask_name], expected)
    assert "mask grown by" in back.guarantee and "margin:0.5" in back.guarantee
    plain = calibrate(cases[:40], CalibrationRequest(method, epsilon=0.1, **kw))
    plain_path, _ = plain.save(tmp_path / "plain.json")
    plain_doc = json.loads(plain_path.read_text())
    assert plain_doc["format_version"] == 1 and "score" not in plain_doc
    assert load_profile(plain_path).score == "identity" and "probability" not in plain.guarantee.split(";")[-1]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format_version=1), "version-1 profile has no 'score'"),
        (lambda d: d.pop("score"), "no 'score' key"),
        (lambda d: d.update(score="margin"), "malformed"),
        (lambda d: d.update(score="identity"), "malformed"),
        (lambda d: d.update(score="distance:0.5"), "not a threshold score"),
        (lambda d: d.update(score="margin:0.4"), "checksum|edited"),
        (lambda d: d.update(format_version=3), "format version 3"),
    ],
)
def test_hand_edited_scores_are_refused(tmp_path, cases, mutate, message) -> None:
    profile = calibrate(cases[:20], CalibrationRequest("cls", epsilon=0.1, alpha=0.2, score="margin:0.5"))
    path, _ = profile.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ConformalSegError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_requests_refuse_what_the_score_cannot_do(cases) -> None:
    with pytest.raises(ConformalSegError, match="--transform margin:0.5"):
        CalibrationRequest("sets", alpha=0.1, score="margin:0.5")
    with pytest.raises(ConformalSegError, match="canonical"):
        CalibrationRequest("cls", epsilon=0.1, alpha=0.1, score="margin")
    bad = Case("bad", np.full(SHAPE, 1.5, np.float32), cases[0].lesion)
    with pytest.raises(ConformalSegError, match="probability values range"):
        calibrate([bad], CalibrationRequest("cls", epsilon=0.1, alpha=0.1, score="margin:0.5"))


# ----------------------------------------------------------------------------------------------- evaluation


def test_evaluation_on_a_score_equals_evaluation_on_the_score_maps(cases) -> None:
    kw = {"epsilons": (0.1,), "alphas": (0.1,), "splits": 5, "transforms": ("identity",), "hd95": False}
    scored = evaluate_dataset(cases[:24], score="margin:0.5", **kw)
    maps = [Case(c.case_id, threshold_scores(c.probability, GEOMETRY, "margin:0.5"), c.lesion) for c in cases[:24]]
    direct = evaluate_dataset(maps, **kw)
    for key in ("cutoff", "ecr", "pc", "fnr"):
        assert np.array_equal(scored.cls[key], direct.cls[key], equal_nan=True)
    assert scored.config.score == "margin:0.5" and scored.to_dict()["config"]["score"] == "margin:0.5"


# ----------------------------------------------------------------------------------------------- CLI and Slicer


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cases):
    root = tmp_path_factory.mktemp("scores")
    for sub in ("probs", "labels"):
        (root / sub).mkdir()
    for c in cases[:24]:
        save_volume(c.probability, GEOMETRY, root / "probs" / f"{c.case_id}.nii.gz")
        save_volume(c.lesion.astype(np.uint8), GEOMETRY, root / "labels" / f"{c.case_id}.nii.gz")
    return root


def test_cli_calibrate_apply_and_evaluate_on_the_margin(tmp_path, folder, cases, capsys) -> None:
    profile = tmp_path / "cls.json"
    argv = ["calibrate", "--method", "cls", "--data", folder, "--epsilon", "0.1", "--alpha", "0.1"]
    assert main([str(a) for a in argv + ["--score", "margin", "--out", profile]]) == 0
    out = capsys.readouterr().out
    assert "The mask thresholds the margin:0.5 score" in out and "grown by" in out
    loaded = load_profile(profile)
    assert loaded.score == "margin:0.5"
    new = folder / "probs" / "case_000.nii.gz"
    assert main(["apply", "--profile", str(profile), "--prob", str(new), "--out", str(tmp_path / "a")]) == 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(next((tmp_path / "a").glob("lesion_fnr*.nii.gz")))))
    expected = loaded.masks(cases[0].probability, GEOMETRY)[loaded.mask_name]
    assert np.array_equal(written.astype(bool), expected)
    summary = json.loads((tmp_path / "a" / "apply.json").read_text())
    assert summary["score"] == "margin:0.5" and "grown by" in summary["guarantee"]
    argv = ["apply", "--profile", profile, "--prob", new, "--slider-safe", "--epsilon", "0.2", "--out", tmp_path / "b"]
    assert main([str(a) for a in argv]) == 0
    assert "the margin:0.5 score" in json.loads((tmp_path / "b" / "apply.json").read_text())["guarantee"]
    argv = ["evaluate", "--data", folder, "--splits", "3", "--epsilons", "0.1", "--alphas", "0.1", "--no-hd95"]
    assert (
        main([str(a) for a in argv + ["--transforms", "identity", "--score", "margin", "--out", tmp_path / "e"]]) == 0
    )
    report = (tmp_path / "e" / "report.md").read_text()
    assert "thresholds the margin:0.5 score" in report and "baseline (score >= 0.5)" in report
    assert "prob >= 0.5" not in report
    capsys.readouterr()
    bad = ["calibrate", "--method", "cls", "--data", folder, "--epsilon", "0.1", "--alpha", "0.1"]
    assert main([str(a) for a in bad + ["--score", "distance", "--out", tmp_path / "x.json"]]) == 2
    assert "--score margin:0.5" in capsys.readouterr().err


def test_slider_thresholds_the_score_map_inline_or_handed_in(tmp_path, cases) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ConformalSeg"))
    from ConformalSegSlicer.slider import SliderSettings, SliderState

    profile = calibrate(cases[:30], CalibrationRequest("cls", epsilon=0.1, alpha=0.1, score="margin:0.5"))
    new = cases[60]
    settings = SliderSettings(epsilon=0.2, alpha=0.1)
    inline = SliderState([profile], new.probability, GEOMETRY).update(settings)
    expected = SliderState([profile], new.probability, GEOMETRY).library_masks(settings)[profile.mask_name]
    segment = inline.segments[profile.mask_name]
    assert np.array_equal(segment.mask, expected) and "grown by" in segment.rule and not inline.pending
    assert "grown by" in inline.guarantees[0]
    panel = SliderState([profile], new.probability, GEOMETRY, inline_scores=False)
    assert panel.missing_scores() == ["score:margin:0.5"]
    first = panel.update(settings)
    assert profile.mask_name not in first.segments and "margin:0.5" in first.pending[0]
    import subprocess

    from ConformalSegSlicer import commands, score_maps

    work = Path(tmp_path) / "work"
    score_maps.write_inputs(work, panel.probability, panel.geometry)  # the panel's background process
    argv = score_maps.command(sys.executable, work, panel.missing_scores())
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(argv, env=commands.child_environment(library_dir=root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name, scores in score_maps.read_outputs(work, ["score:margin:0.5"]).items():
        assert np.array_equal(scores, score_map_by_name(name, new.probability, GEOMETRY))
        panel.set_scores(name, scores)
    later = panel.update(settings)
    assert not later.pending and np.array_equal(later.segments[profile.mask_name].mask, expected)
    many = calibrate(cases[:100], CalibrationRequest("cls", epsilon=0.1, alpha=0.2, score="margin:0.5"))
    safe = SliderState([many], new.probability, GEOMETRY).update(SliderSettings(0.2, 0.2, slider_safe=True))
    assert safe.guarantees[0].startswith("Slider-safe") and "grown by" in safe.guarantees[0] and not safe.errors


def test_volume_wrapped_maps_take_the_same_score(cases) -> None:
    c = cases[5]
    wrapped = Case(c.case_id, Volume(c.probability, GEOMETRY, None), c.lesion)  # type: ignore[arg-type]
    from ConformalSegLib.evaluation.cases import as_eval_case

    assert np.array_equal(
        as_eval_case(wrapped, "margin:0.5").probability, threshold_scores(c.probability, GEOMETRY, "margin:0.5")
    )
    from types import SimpleNamespace

    bare = SimpleNamespace(case_id="bare", probability=c.probability, lesion=c.lesion)  # no spacing anywhere
    assert as_eval_case(bare).geometry.spacing == (1.0, 1.0, 1.0)  # the probability alone: 1 mm is harmless
    with pytest.raises(ConformalSegError, match="no voxel spacing"):
        as_eval_case(bare, "margin:0.5")


def test_reviewed_cases_for_monitoring_take_the_profile_score(cases) -> None:
    from ConformalSegLib.conformal.monitoring import reviewed_data

    profile = calibrate(cases[:30], CalibrationRequest("cls", epsilon=0.1, alpha=0.1, score="margin:0.5"))
    reviewed = [
        Case(c.case_id, Volume(c.probability, GEOMETRY, None), Volume(c.lesion, GEOMETRY, None))  # type: ignore[arg-type]
        for c in cases[30:36]
    ]
    data = reviewed_data(reviewed, profile)
    direct = calibrate(cases[30:36], CalibrationRequest("cls", epsilon=0.1, alpha=0.1, score="margin:0.5"))
    assert np.array_equal(data.summaries.values, direct.summaries.values)
    assert np.array_equal(data.summaries.offsets, direct.summaries.offsets)


# ----------------------------------------------------------------------------------------------- --score auto


def _missed_far_away(rng: np.random.Generator, i: int) -> Case:
    """Whole lesions missed far from the predicted blob, but ranked above the background (p 0.05 .. 0.2 against
    1e-6 .. 1e-3): the probability is the better score here, the margin would have to grow across the scan."""
    lesion = _ball(np.array([4.0, 5.0, 5.0]) + rng.uniform(-1, 1, 3), rng.uniform(5.0, 8.0))
    p = rng.uniform(1e-6, 1e-3, SHAPE)
    p[lesion] = rng.uniform(0.05, 0.2, int(lesion.sum()))
    p[_ball(np.array([12.0, 19.0, 19.0]), 6.0)] = 0.9  # a false positive far from the lesion
    return Case(f"far_{i:03d}", p.astype(np.float32), lesion)


def _tuples(cases):
    return [(c.case_id, c.probability, c.lesion, c.geometry) for c in cases]


def test_score_auto_picks_the_margin_or_the_probability_as_the_data_say(cases) -> None:
    from ConformalSegLib.conformal.score_selection import select_score

    request = CalibrationRequest("cls", epsilon=0.1, alpha=0.2)
    margin = select_score(_tuples(cases[:16]), request, ("identity", "margin:0.5"), repeats=5)
    assert margin.score == "margin:0.5" and margin.n_learning == 16
    assert margin.mean_fraction["margin:0.5"] < 0.2 < 0.9 < margin.mean_fraction["identity"]
    assert select_score(_tuples(cases[:16]), request, repeats=5).score != "identity"  # smoothing also lifts the shell
    rng = np.random.default_rng(7)
    far = select_score(_tuples([_missed_far_away(rng, i) for i in range(16)]), request, repeats=5)
    assert far.score == "identity" and far.mean_fraction["identity"] < far.mean_fraction["margin:0.5"]
    lesion = select_score(_tuples(cases[:8]), CalibrationRequest("lesion", epsilon=0.2, alpha=0.3), repeats=3)
    assert set(lesion.mean_fraction) == {"identity", "margin:0.5", "gaussian:2.0"}


def test_score_auto_refusals(cases) -> None:
    from ConformalSegLib.conformal.score_selection import select_score

    request = CalibrationRequest("cls", epsilon=0.1, alpha=0.2)
    with pytest.raises(ConformalSegError, match="at least 4 learning scans"):
        select_score(_tuples(cases[:3]), request)
    with pytest.raises(ConformalSegError, match="distinct"):
        select_score(_tuples(cases[:6]), request, candidates=("margin", "margin:0.5"))
    with pytest.raises(ConformalSegError, match="without tie-breaking"):
        select_score(_tuples(cases[:6]), CalibrationRequest("cls", epsilon=0.1, alpha=0.2, tie_breaking="random"))


def test_cli_score_auto_chooses_on_learning_data_only(tmp_path, folder, cases, capsys) -> None:
    learn = tmp_path / "learn"
    for sub in ("probs", "labels"):
        (learn / sub).mkdir(parents=True)
    for c in cases[100:110]:
        save_volume(c.probability, GEOMETRY, learn / "probs" / f"{c.case_id}.nii.gz")
        save_volume(c.lesion.astype(np.uint8), GEOMETRY, learn / "labels" / f"{c.case_id}.nii.gz")
    argv = ["calibrate", "--method", "cls", "--data", folder, "--epsilon", "0.1", "--alpha", "0.2", "--score", "auto"]
    assert main([str(a) for a in argv + ["--learning-data", learn, "--out", tmp_path / "p.json"]]) == 0
    chosen = load_profile(tmp_path / "p.json").score
    assert chosen in ("margin:0.5", "gaussian:2.0") and f"learning cases: {chosen}" in capsys.readouterr().out
    profile = load_profile(tmp_path / "p.json")
    assert profile.provenance["score_selection"]["score"] == chosen
    assert profile.provenance["score_selection"]["learning_cases"] == [c.case_id for c in cases[100:110]]
    assert main([str(a) for a in argv + ["--out", tmp_path / "q.json"]]) == 2
    assert "--score auto needs --learning-data" in capsys.readouterr().err
    assert main([str(a) for a in argv + ["--learning-data", folder, "--out", tmp_path / "r.json"]]) == 2
    assert "choosing the score on calibration cases" in capsys.readouterr().err


def test_worker_processes_compute_the_same_scores(folder) -> None:
    """The score travels to process-pool workers (calibration and both evaluation passes): bit-identical."""
    from ConformalSegLib.common.executors import ExecutorSpec
    from ConformalSegLib.conformal.calibration import calibrate_dataset
    from ConformalSegLib.io.dataset import CalibrationDataset

    dataset = CalibrationDataset.from_root(folder, (1,))
    pool = ExecutorSpec("processes", workers=2)
    request = CalibrationRequest("cls", epsilon=0.1, alpha=0.1, score="margin:0.5")
    serial, parallel = calibrate_dataset(dataset, request), calibrate_dataset(dataset, request, pool)
    assert np.array_equal(serial.summaries.values, parallel.summaries.values)
    assert serial.calibration == parallel.calibration
    kw = {"epsilons": (0.1,), "alphas": (0.1,), "splits": 3, "transforms": (), "hd95": False, "score": "margin:0.5"}
    one, two = evaluate_dataset(dataset, **kw), evaluate_dataset(dataset, executor=pool, **kw)
    for key in ("cutoff", "ecr", "pc", "dice"):
        assert np.array_equal(one.cls[key], two.cls[key], equal_nan=True)
