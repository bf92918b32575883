"""nnU-Net fold ensembles: the averaged map and the fold disagreement against a hand computation, the
command line (calibrate / apply --folds) and every refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.special import xlogy

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.profile import load_profile
from ConformalSegLib.io.nnunet_folds import fold_files, fold_score_map, load_fold_ensemble, parse_fold_score
from ConformalSegLib.io.volumes import load_image, load_label_map, save_volume

SHAPE = (6, 8, 10)
GEOM = Geometry(SHAPE, spacing=(0.8, 0.8, 2.0), origin=(1.0, -2.0, 30.0))


def softmax_maps(rng: np.random.Generator, n_classes: int = 3) -> np.ndarray:
    logits = rng.normal(0, 2, (n_classes, *SHAPE))
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def write_folds(root, n_folds=3, cases=("case_a", "case_b"), seed=0, geometry=GEOM):
    """``root/fold_F/CASE.npz`` (+ nnU-Net's segmentation beside it); returns {case: [fold arrays]}."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, list[np.ndarray]] = {case: [] for case in cases}
    for f in range(n_folds):
        for case in cases:
            probabilities = softmax_maps(rng)
            folder = root / f"fold_{f}"
            folder.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities)
            save_volume(probabilities.argmax(axis=0).astype(np.uint8), geometry, folder / f"{case}.nii.gz")
            arrays[case].append(probabilities)
    return arrays


def by_hand(folds: list[np.ndarray], channel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.stack([f[channel].astype(np.float64) for f in folds])
    mean = p.mean(axis=0)

    def entropy(q):
        return -(xlogy(q, q) + xlogy(1 - q, 1 - q))

    return mean, p.var(axis=0), entropy(mean) - entropy(p).mean(axis=0)


def test_ensemble_equals_the_hand_computation(tmp_path):
    arrays = write_folds(tmp_path / "folds")
    files = fold_files(tmp_path / "folds")
    assert list(files) == ["case_a", "case_b"] and [p.parent.name for p in files["case_b"]] == [
        "fold_0",
        "fold_1",
        "fold_2",
    ]
    for case in files:
        ensemble = load_fold_ensemble(files[case], channel=1)
        mean, variance, information = by_hand(arrays[case], 1)
        assert ensemble.n_folds == 3 and ensemble.probability.geometry.mismatch(GEOM) is None
        np.testing.assert_allclose(ensemble.probability.array, mean, atol=1e-6)
        np.testing.assert_allclose(ensemble.variance, variance, atol=1e-6)
        np.testing.assert_allclose(ensemble.mutual_information, information, atol=1e-5)
        assert ensemble.mutual_information.min() >= 0 and ensemble.mutual_information.max() <= np.log(2) + 1e-6


def test_identical_folds_do_not_disagree(tmp_path):
    probabilities = softmax_maps(np.random.default_rng(1))
    for f in range(2):
        (tmp_path / f"f{f}").mkdir()
        np.save(tmp_path / f"f{f}" / "c.npy", probabilities[2])  # single-channel maps, no geometry
    ensemble = load_fold_ensemble(fold_files(tmp_path)["c"])
    np.testing.assert_allclose(ensemble.probability.array, probabilities[2], atol=1e-7)
    assert np.abs(ensemble.variance).max() < 1e-7 and np.abs(ensemble.mutual_information).max() < 1e-6


def test_refusals(tmp_path):
    write_folds(tmp_path / "one", n_folds=1)
    with pytest.raises(ConformalSegError, match="at least 2"):
        fold_files(tmp_path / "one")
    write_folds(tmp_path / "uneven", n_folds=2)
    (tmp_path / "uneven" / "fold_1" / "case_b.npz").unlink()
    (tmp_path / "uneven" / "fold_1" / "case_b.nii.gz").unlink()
    with pytest.raises(ConformalSegError, match="hold different cases.*case_b"):
        fold_files(tmp_path / "uneven")
    write_folds(tmp_path / "moved", n_folds=2, cases=("c",))
    save_volume(
        np.zeros(SHAPE, np.uint8), Geometry(SHAPE, spacing=(1, 1, 1)), tmp_path / "moved/fold_1/c.nii.gz", force=True
    )
    with pytest.raises(ConformalSegError, match="different voxel grids"):
        load_fold_ensemble(fold_files(tmp_path / "moved")["c"], channel=1)
    with pytest.raises(ConformalSegError, match="--channel"):
        load_fold_ensemble(fold_files(tmp_path / "moved")["c"])  # 3 classes: the lesion class must be named


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_calibrate_and_apply_on_folds(tmp_path, capsys):
    cases = tuple(f"c{i:02d}" for i in range(10))
    arrays = write_folds(tmp_path / "folds", n_folds=3, cases=cases, seed=4)
    noise = np.random.default_rng(9)
    for case in cases:  # the truth: where the averaged lesion class is high, plus noise
        mean = np.mean([a[1] for a in arrays[case]], axis=0)
        truth = (mean + noise.normal(0, 0.05, SHAPE) > 0.5).astype(np.uint8)
        save_volume(truth, GEOM, tmp_path / "labels" / f"{case}.nii.gz")
    profile = tmp_path / "cls.json"
    argv = ["calibrate", "--method", "cls", "--folds", tmp_path / "folds", "--labels", tmp_path / "labels"]
    code, _, err = run([*argv, "--channel", "1", "--epsilon", "0.2", "--alpha", "0.2", "--out", profile], capsys)
    assert code == 0, err
    assert json.loads(profile.read_text())["provenance"]["folds"] == ["fold_0", "fold_1", "fold_2"]
    out = tmp_path / "out"
    argv = ["apply", "--profile", profile, "--folds", tmp_path / "folds", "--channel", "1", "--out", out]
    code, stdout, err = run([*argv, "--case", "c03"], capsys)
    assert code == 0, err
    assert "3-fold ensemble of c03" in stdout
    mean, variance, information = by_hand(arrays["c03"], 1)
    np.testing.assert_allclose(load_image(out / "probability.nii.gz").array, mean, atol=1e-6)
    np.testing.assert_allclose(load_image(out / "fold_variance.nii.gz").array, variance, atol=1e-6)
    np.testing.assert_allclose(load_image(out / "fold_mutual_information.nii.gz").array, information, atol=1e-5)
    threshold = load_profile(profile).calibration.probability_threshold
    expected = load_image(out / "probability.nii.gz").array >= np.float32(threshold)
    assert np.array_equal(load_label_map(out / "lesion_fnr_controlled.nii.gz").array.astype(bool), expected)
    code, _, err = run([*argv, "--out", tmp_path / "o2"], capsys)  # several cases and no --case
    assert code == 2 and "the folds hold 10 cases" in err and "--case" in err
    shutil.rmtree(tmp_path / "folds" / "fold_2")
    code, _, err = run([*argv[:-2], "--out", tmp_path / "o3", "--case", "c03"], capsys)
    assert code == 2 and "calibrated on folds fold_0, fold_1, fold_2, not fold_0, fold_1" in err


def test_fold_score_transform(tmp_path, capsys):
    arrays = write_folds(tmp_path / "folds", n_folds=4, cases=("c",), seed=6)
    ensemble = load_fold_ensemble(fold_files(tmp_path / "folds")["c"], channel=2)
    mean, variance, _ = by_hand(arrays["c"], 2)
    np.testing.assert_allclose(fold_score_map(ensemble, "upper:1"), np.clip(mean + np.sqrt(variance), 0, 1), atol=1e-6)
    np.testing.assert_allclose(
        fold_score_map(ensemble, "lower:2.5"), np.clip(mean - 2.5 * np.sqrt(variance), 0, 1), atol=1e-6
    )
    assert np.array_equal(fold_score_map(ensemble, "mean"), ensemble.probability.array)
    for bad in ("median", "upper", "upper:-1", "lower:inf"):
        with pytest.raises(ConformalSegError, match="unknown fold score"):
            parse_fold_score(bad)


def test_cli_fold_score_is_recorded_and_reused(tmp_path, capsys):
    cases = tuple(f"c{i}" for i in range(6))
    arrays = write_folds(tmp_path / "folds", n_folds=2, cases=cases, seed=8)
    for case in cases:
        save_volume((arrays[case][0][1] > 0.5).astype(np.uint8), GEOM, tmp_path / "labels" / f"{case}.nii.gz")
    profile = tmp_path / "crc.json"
    argv = ["calibrate", "--method", "crc", "--epsilon", "0.3", "--folds", tmp_path / "folds", "--channel", "1"]
    code, _, err = run([*argv, "--labels", tmp_path / "labels", "--fold-score", "upper:1", "--out", profile], capsys)
    assert code == 0, err
    assert json.loads(profile.read_text())["provenance"]["fold_score"] == "upper:1"
    argv = ["apply", "--profile", profile, "--folds", tmp_path / "folds", "--channel", "1", "--case", "c2"]
    code, _, err = run([*argv, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    mean, variance, _ = by_hand(arrays["c2"], 1)
    seen = load_image(tmp_path / "out" / "probability.nii.gz").array
    np.testing.assert_allclose(seen, np.clip(mean + np.sqrt(variance), 0, 1), atol=1e-6)
