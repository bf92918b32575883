"""The reviewed-case loop (:mod:`ConformalSegLib.conformal.reviewed_cases`, ``conformalseg profile add-case``).

Adding a case to a profile is bit for bit calibrating on the grown case list from scratch (CLS,
expected-FNR control, lesion-level alone and joint, confidence sets with a distance transform, threshold
methods on a margin or smoothed score), the old
profile file is untouched, and the provenance chain names the previous profile's SHA-256, the case id
and the time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
from ConformalSegLib.conformal.profile import load_profile
from ConformalSegLib.conformal.reviewed_cases import add_case
from ConformalSegLib.io.checksums import sha256_file
from ConformalSegLib.io.volumes import save_volume
from ConformalSegLib.phantoms.simulated_maps import make_cases

REQUESTS = {
    "cls": CalibrationRequest("cls", epsilon=0.1, alpha=0.2),
    "cls-uint16-pac": CalibrationRequest("cls", epsilon=0.2, alpha=0.2, precision="uint16", pac_delta=0.1),
    "crc": CalibrationRequest("crc", epsilon=0.1),
    "lesion": CalibrationRequest("lesion", epsilon=0.2, alpha=0.2),
    "lesion-joint": CalibrationRequest("lesion", epsilon=0.2, alpha=0.2, voxel_epsilon=0.3, min_lesion_voxels=2),
    "sets": CalibrationRequest("sets", alpha_inner=0.2, alpha_outer=0.2, outer_transform="distance:0.5"),
    "sets-joint": CalibrationRequest("sets", alpha=0.2, joint="max"),
    "cls-margin": CalibrationRequest("cls", epsilon=0.1, alpha=0.2, score="margin:0.5"),
    "lesion-gaussian": CalibrationRequest("lesion", epsilon=0.2, alpha=0.2, score="gaussian:2.0"),
}


@pytest.fixture(scope="module")
def cases():
    return list(make_cases(13, 11, shape=(16, 20, 20)))


def _same(a, b):
    arrays_a, arrays_b = a.summary_arrays(), b.summary_arrays()
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        assert arrays_a[key].dtype == arrays_b[key].dtype and np.array_equal(arrays_a[key], arrays_b[key]), key
    assert a.calibration == b.calibration and a.guarantee == b.guarantee
    assert a.summaries.case_ids == b.summaries.case_ids


@pytest.mark.filterwarnings("ignore::ConformalSegLib.common.errors.CalibrationSetTooSmallWarning")
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_adding_cases_is_calibrating_on_the_grown_set(cases, name):
    request = REQUESTS[name]
    profile = calibrate(cases[:10], request)
    for k, case in enumerate(cases[10:], start=10):  # three reviewed cases, one after the other
        profile = add_case(
            profile, case.case_id, case.probability, case.lesion, case.geometry, previous_sha256=f"{k:064x}"
        )
        _same(profile, calibrate(cases[: k + 1], request))
    chain = profile.provenance["reviewed_cases"]
    assert [c["case_id"] for c in chain] == [c.case_id for c in cases[10:]]
    assert [c["previous_profile_sha256"] for c in chain] == [f"{k:064x}" for k in (10, 11, 12)]


def test_add_case_refuses_duplicates_and_bad_shapes(cases):
    profile = calibrate(cases[:5], REQUESTS["cls"])
    c = cases[0]
    with pytest.raises(ConformalSegError, match="already"):
        add_case(profile, c.case_id, c.probability, c.lesion, c.geometry, previous_sha256="0")
    with pytest.raises(ConformalSegError, match="shapes"):
        add_case(profile, "new", c.probability, c.lesion[:-1], None, previous_sha256="0")
    assert profile.summaries.n == 5  # unchanged
    grown = add_case(profile, "new", c.probability, c.lesion, c.geometry, previous_sha256="0")
    assert grown.summaries.n == 6 and dataclasses.replace(grown) is not profile


def test_cli_add_case_writes_a_new_profile_and_never_touches_the_old(tmp_path, cases):
    profile = calibrate(cases[:10], REQUESTS["sets"])
    old_path, old_npz = profile.save(tmp_path / "sets.json")
    before = (old_path.read_bytes(), old_npz.read_bytes())
    c = cases[10]
    prob, label = tmp_path / "prob.nii.gz", tmp_path / "label.nii.gz"
    save_volume(c.probability.astype(np.float32), c.geometry, prob)
    save_volume(c.lesion.astype(np.uint8) * 2, c.geometry, label)
    argv = ["profile", "add-case", "--profile", str(old_path), "--prob", str(prob), "--label", str(label)]
    assert main([*argv, "--out", str(old_path)]) == 2  # never over the old profile
    assert main([*argv, "--lesion-label", "2", "--case-id", c.case_id, "--out", str(tmp_path / "sets2.json")]) == 0
    assert (old_path.read_bytes(), old_npz.read_bytes()) == before
    grown = load_profile(tmp_path / "sets2.json")
    assert grown.summaries.n == 11
    assert grown.provenance["reviewed_cases"][-1]["previous_profile_sha256"] == sha256_file(old_path)
    _same(grown, calibrate(cases[:11], REQUESTS["sets"]))
