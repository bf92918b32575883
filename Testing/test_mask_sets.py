"""Confidence sets from predicted masks alone (mask-only tools): validity over seeded trials, the thresholds
by hand, the command line with several structures (and its DICOM SEG), and every refusal."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import binom

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.calibration import CalibrationRequest
from ConformalSegLib.conformal.mask_sets import calibrate_structures, check_mask_request, structure_map
from ConformalSegLib.io.volumes import load_label_map, save_volume

SHAPE = (10, 16, 16)
GEOM = Geometry(SHAPE, spacing=(1.0, 1.25, 2.0))
STRUCTURES = {"liver": (1,), "spleen": (2,)}


GRID = np.indices(SHAPE).reshape(3, -1).T.astype(float)


def ellipsoid(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return ((((GRID - centre) / radii) ** 2).sum(axis=-1) <= 1.0).reshape(SHAPE)


def make_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, true labels): two ellipsoids; the prediction is shifted and scaled at random."""
    truth = np.zeros(SHAPE, np.uint8)
    predicted = np.zeros(SHAPE, np.uint8)
    for value, centre in ((1, np.array([5.0, 5.0, 5.0])), (2, np.array([5.0, 10.0, 11.0]))):
        c = centre + rng.normal(0, 0.7, 3)
        r = np.array([2.5, 3.0, 3.0]) * rng.uniform(0.8, 1.2, 3)
        truth[ellipsoid(c, r)] = value
        predicted[ellipsoid(c + rng.normal(0, 0.6, 3), r * rng.uniform(0.8, 1.2, 3))] = value
    return predicted, truth


def sets_request(alpha: float = 0.1, **kw) -> CalibrationRequest:
    return CalibrationRequest(method="sets", alpha=alpha, inner_transform="distance", outer_transform="distance", **kw)


def test_mask_margins_are_valid_over_seeded_trials():
    """T independent trials, each a fresh calibration set of n scans and ONE fresh test scan: the success count
    of each structure's inner and outer statements dominates Binomial(T, 1 - alpha) (test at level 0.001)."""
    trials, n, alpha = 200, 19, 0.1
    rng = np.random.default_rng(2026)
    success = {(name, which): 0 for name in STRUCTURES for which in ("inner", "outer")}
    outer_sizes = []
    for _ in range(trials):
        cases = [make_case(rng) for _ in range(n + 1)]
        stream = ((f"c{i}", p, t, GEOM) for i, (p, t) in enumerate(cases[:n]))
        profiles = calibrate_structures(stream, STRUCTURES, sets_request(alpha))
        predicted, truth = cases[n]
        for name, values in STRUCTURES.items():
            inner, outer = profiles[name].masks(structure_map(predicted, values), GEOM).values()
            true = np.isin(truth, values)
            success[(name, "inner")] += bool(not (inner & ~true).any())
            success[(name, "outer")] += bool(not (true & ~outer).any())
            outer_sizes.append(outer.mean())
    floor = binom.ppf(0.001, trials, 1 - alpha)
    for key, count in success.items():
        assert count >= floor, (key, count, floor)
    # not trivially valid: the outer sets are margins, far from the whole image, and they sometimes miss
    assert np.mean(outer_sizes) < 0.5
    assert min(success.values()) < trials


def signed_distance_by_hand(mask: np.ndarray) -> np.ndarray:
    sampling = GEOM.spacing_zyx
    return np.where(
        mask, ndimage.distance_transform_edt(mask, sampling=sampling), -ndimage.distance_transform_edt(~mask, sampling)
    )


def test_thresholds_equal_the_hand_computation():
    rng = np.random.default_rng(5)
    cases = [make_case(rng) for _ in range(12)]
    alpha = 0.2
    profiles = calibrate_structures(
        ((f"c{i}", p, t, GEOM) for i, (p, t) in enumerate(cases)), STRUCTURES, sets_request(alpha)
    )
    k = math.ceil((1 - alpha) * (len(cases) + 1))  # 11 of 12
    for name, values in STRUCTURES.items():
        taus, gammas = [], []
        for predicted, truth in cases:
            distance = signed_distance_by_hand(np.isin(predicted, values))
            true = np.isin(truth, values)
            taus.append(distance[~true].max())
            gammas.append(-distance[true].min())
        calibration = profiles[name].calibration
        assert calibration.inner_threshold == pytest.approx(sorted(taus)[k - 1], abs=1e-5)
        assert calibration.outer_threshold == pytest.approx(-sorted(gammas)[k - 1], abs=1e-5)
        assert profiles[name].provenance["mask_input"] == {"structure": name, "label_values": list(values)}


def test_refusals_of_the_library():
    for method in ("cls", "crc", "lesion"):
        with pytest.raises(
            ConformalSegError, match=f"--method {method} thresholds probabilities.*--transform distance"
        ):
            check_mask_request(method, ("distance", "distance"))
    for transform in ("identity", "auto"):
        with pytest.raises(ConformalSegError, match="all-or-nothing sets.*Fix: use --transform distance"):
            check_mask_request("sets", (transform, "distance"))


# ----------------------------------------------------------------------------- command line


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_mask_data(root, seed: int):
    """12 cases of a mask-only tool (``pred/``, ``labels/``) and one new prediction ``new.nii.gz``."""
    rng = np.random.default_rng(seed)
    for i in range(12):
        predicted, truth = make_case(rng)
        save_volume(predicted, GEOM, root / "pred" / f"case{i:02d}.nii.gz")
        save_volume(truth, GEOM, root / "labels" / f"case{i:02d}.nii.gz")
    predicted, _ = make_case(rng)
    save_volume(predicted, GEOM, root / "new.nii.gz")
    return root


@pytest.fixture(scope="module")
def mask_data(tmp_path_factory):
    return write_mask_data(tmp_path_factory.mktemp("masks"), seed=11)


def test_cli_structures_calibrate_and_apply(mask_data, tmp_path, capsys):
    index = tmp_path / "organs.json"
    argv = ["calibrate", "--method", "sets", "--transform", "distance", "--alpha", "0.2"]
    argv += ["--masks", mask_data / "pred", "--labels", mask_data / "labels", "--structures", "1=liver,2=spleen"]
    code, out, err = run([*argv, "--out", index], capsys)
    assert code == 0, err
    assert "liver: With probability at least 80%" in out and "mm" in out
    doc = json.loads(index.read_text())
    assert doc["format"] == "conformalseg-structures"
    assert [e["profile"] for e in doc["structures"]] == ["organs.liver.json", "organs.spleen.json"]
    out_dir = tmp_path / "out"
    code, out, err = run(["apply", "--profile", index, "--mask", mask_data / "new.nii.gz", "--out", out_dir], capsys)
    assert code == 0, err
    predicted = load_label_map(mask_data / "new.nii.gz").array
    from ConformalSegLib.conformal.profile import load_profile

    for name, value in (("liver", 1), ("spleen", 2)):
        profile = load_profile(tmp_path / f"organs.{name}.json")
        inner, outer = profile.masks((predicted == value).astype(np.float32), GEOM).values()
        assert np.array_equal(load_label_map(out_dir / f"{name}_inner_set.nii.gz").array.astype(bool), inner)
        assert np.array_equal(load_label_map(out_dir / f"{name}_outer_set.nii.gz").array.astype(bool), outer)
    summary = json.loads((out_dir / "apply.json").read_text())
    assert set(summary["structures"]) == {"liver", "spleen"} and "alpha / K" in summary["note"]
    # a changed structure profile is refused
    (tmp_path / "organs.spleen.json").write_text((tmp_path / "organs.spleen.json").read_text() + " ")
    code, _, err = run(
        ["apply", "--profile", index, "--mask", mask_data / "new.nii.gz", "--out", tmp_path / "o2"], capsys
    )
    assert code == 2 and "changed since calibration" in err


def test_cli_single_structure_with_dicom_seg(mask_data, tmp_path, capsys):
    pytest.importorskip("highdicom")
    from dicom_support import write_ct_series

    from ConformalSegLib.io.dicom_seg import read_dicom_seg

    profile = tmp_path / "liver.json"
    argv = ["calibrate", "--method", "sets", "--transform", "distance", "--alpha", "0.2", "--joint"]
    argv += ["--masks", mask_data / "pred", "--labels", mask_data / "labels", "--lesion-label", "1", "--out", profile]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    write_ct_series(tmp_path / "ct", np.zeros(SHAPE, np.int16), GEOM)
    out_dir = tmp_path / "out"
    argv = ["apply", "--profile", profile, "--mask", mask_data / "new.nii.gz", "--out", out_dir]
    code, _, err = run([*argv, "--dicom-seg", "--reference-dicom", tmp_path / "ct"], capsys)
    assert code == 0, err
    back = read_dicom_seg(out_dir / "segmentation.dcm", tmp_path / "ct")
    assert list(back) == ["Inner set", "Outer set"]
    for name, file in (("Inner set", "inner_set"), ("Outer set", "outer_set")):
        assert np.array_equal(back[name], load_label_map(out_dir / f"{file}.nii.gz").array.astype(bool))


def test_cli_refusals(mask_data, tmp_path, capsys):
    base = ["calibrate", "--masks", mask_data / "pred", "--labels", mask_data / "labels", "--out", tmp_path / "p.json"]
    code, _, err = run([*base, "--method", "cls", "--epsilon", "0.1", "--alpha", "0.1"], capsys)
    assert code == 2 and "--method cls thresholds probabilities" in err
    code, _, err = run([*base, "--method", "sets", "--alpha", "0.1"], capsys)  # identity is the default transform
    assert code == 2 and "--transform identity on a mask gives all-or-nothing sets" in err
    code, _, err = run(
        [*base, "--method", "sets", "--alpha", "0.1", "--transform", "distance", "--structures", "x"], capsys
    )
    assert code == 2 and "cannot read --structures" in err
    argv = [*base, "--method", "sets", "--alpha", "0.1", "--transform", "distance", "--structures", "1=a,7=b"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "label value(s) 7 occur in no predicted or true label map" in err
    # integer maps given as probabilities: refused, and the message says they look like a segmentation
    code, _, err = run(
        [
            "calibrate",
            "--method",
            "sets",
            "--alpha",
            "0.1",
            "--probs",
            mask_data / "pred",
            "--labels",
            mask_data / "labels",
        ]
        + ["--out", tmp_path / "q.json"],
        capsys,
    )
    assert code == 2 and "looks like a segmentation, not probabilities" in err
    # profile and input must match
    profile = tmp_path / "m.json"
    argv = [*base[:-1], profile, "--method", "sets", "--alpha", "0.2", "--transform", "distance"]
    code, _, err = run(argv, capsys)  # the label maps hold 1 and 2: which is the structure is not guessed
    assert code == 2 and "which one is the structure?" in err and not profile.exists()
    code, _, err = run([*argv, "--lesion-label", "1"], capsys)
    assert code == 0, err
    prob = tmp_path / "prob.nii.gz"
    save_volume(np.full(SHAPE, 0.5, np.float32), GEOM, prob)
    code, _, err = run(["apply", "--profile", profile, "--prob", prob, "--out", tmp_path / "a"], capsys)
    assert code == 2 and "calibrated on predicted masks" in err and "--mask" in err
    from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", 4, seed=1, shape=(16, 16, 16))
    cls = tmp_path / "cls.json"
    argv = ["calibrate", "--method", "cls", "--data", tmp_path / "data", "--lesion-label", "2", "--epsilon", "0.5"]
    assert run([*argv, "--alpha", "0.5", "--out", cls], capsys)[0] == 0
    code, _, err = run(["apply", "--profile", cls, "--mask", mask_data / "new.nii.gz", "--out", tmp_path / "b"], capsys)
    assert code == 2 and "--mask needs a profile calibrated on predicted masks" in err


def test_structure_map():
    labels = np.array([[[0, 1, 2, 3]]])
    assert structure_map(labels, (2, 3)).tolist() == [[[0.0, 0.0, 1.0, 1.0]]]
