"""Calibration profiles: round trip, recalibration from summaries, validation errors, atomic writes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
from ConformalSegLib.conformal.cls import apply_threshold, calibrate_cls, conformal_lower_cutoff, critical_cutoff
from ConformalSegLib.conformal.guarantee_sentences import guarantee_sentence, percent
from ConformalSegLib.conformal.profile import load_profile
from ConformalSegLib.phantoms.simulated_maps import make_cases


@pytest.fixture(scope="module")
def cases():
    return list(make_cases(16, seed=3, shape=(20, 40, 40)))


def _profile(cases, **kw):
    return calibrate(cases, CalibrationRequest(**kw))


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="cls", epsilon=0.1, alpha=0.1),
        dict(method="cls", epsilon=0.2, alpha=0.2, precision="uint16"),
        dict(method="crc", epsilon=0.15),
        dict(method="sets", alpha=0.2),
        dict(method="sets", alpha=0.2, joint="split", inner_transform="identity", outer_transform="distance"),
        dict(method="sets", alpha=0.2, joint="max", inner_transform="gaussian:2"),
        dict(method="lesion", epsilon=0.5, alpha=0.2),
        dict(method="lesion", epsilon=0.34, alpha=0.2, voxel_epsilon=0.2, detect_fraction=0.3, min_lesion_voxels=5),
    ],
)
def test_round_trip_keeps_thresholds_and_recalibrates(tmp_path, cases, kw):
    profile = _profile(cases, **kw)
    json_path, npz_path = profile.save(tmp_path / "p.json")
    assert json_path.exists() and npz_path.exists()
    loaded = load_profile(json_path)
    assert loaded.calibration == profile.calibration
    assert loaded.guarantee == profile.guarantee
    assert loaded.summaries.case_ids == tuple(c.case_id for c in cases)
    doc = json.loads(json_path.read_text())
    for key in ("method", "epsilon", "alpha", "n", "guarantee", "provenance"):
        assert key in doc
    if kw["method"] in ("cls", "crc", "lesion"):
        assert "probability_threshold" in doc
    else:
        assert {"inner_threshold", "outer_threshold", "transform"} <= doc.keys()
    again = loaded.recalibrate(alpha=0.3) if kw["method"] != "crc" else loaded.recalibrate(epsilon=0.3)
    assert again.calibration != loaded.calibration or kw["method"] == "sets" and kw.get("joint") == "max"


def test_cls_profile_equals_direct_computation(tmp_path, cases):
    profile = _profile(cases, method="cls", epsilon=0.1, alpha=0.2)
    cutoffs = [critical_cutoff(c.probability, c.lesion, 0.1) for c in cases if c.lesion.any()]
    assert profile.calibration.probability_threshold == conformal_lower_cutoff(np.array(cutoffs), 0.2)
    # recalibration from summaries equals calibration from the volumes at the new parameters
    for eps, alpha in [(0.05, 0.3), (0.3, 0.15), (0.0, 0.5)]:
        from_volumes = _profile(cases, method="cls", epsilon=eps, alpha=alpha).calibration
        assert profile.recalibrate(epsilon=eps, alpha=alpha).calibration == from_volumes
    masks = profile.masks(cases[0].probability, cases[0].geometry)
    ((name, mask),) = masks.items()
    assert name == "Lesion (FNR-controlled)"
    assert np.array_equal(mask, apply_threshold(cases[0].probability, profile.calibration.probability_threshold))


def test_refuses_to_overwrite_and_force(tmp_path, cases):
    profile = _profile(cases, method="crc", epsilon=0.1)
    path = tmp_path / "p.json"
    profile.save(path)
    before = path.read_bytes()
    with pytest.raises(ConformalSegError, match="exists"):
        profile.save(path)
    assert path.read_bytes() == before
    profile.recalibrate(epsilon=0.3).save(path, force=True)
    assert load_profile(path).calibration.epsilon == 0.3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_tiny_calibration_set_infinite_quantile_round_trip(tmp_path, cases):
    with pytest.warns(CalibrationSetTooSmallWarning, match="at least 19"):
        profile = _profile(cases[:5], method="cls", epsilon=0.1, alpha=0.05)
    assert profile.calibration.probability_threshold == -np.inf
    assert "too few" in profile.guarantee
    profile.save(tmp_path / "tiny.json")
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert doc["probability_threshold"] == "-inf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_profile(tmp_path / "tiny.json")
    (mask,) = loaded.masks(cases[0].probability, cases[0].geometry).values()
    assert mask.all()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other"), "not a ConformalSeg"),
        (lambda d: d.update(format_version=99), "version"),
        (lambda d: d.pop("n"), "'n'"),
        (lambda d: d.update(method="magic"), "unknown method"),
        (lambda d: d.update(probability_threshold="abc"), "number"),
        (lambda d: d.update(probability_threshold=0.123456), "does not follow"),
    ],
)
def test_invalid_profiles_name_the_file(tmp_path, cases, mutate, message):
    path, _ = _profile(cases, method="cls", epsilon=0.1, alpha=0.2).save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ConformalSegError, match=message) as info:
        load_profile(path)
    assert "p.json" in str(info.value) or "p.npz" in str(info.value)


def test_corrupt_or_missing_summaries(tmp_path, cases):
    path, npz = _profile(cases, method="cls", epsilon=0.1, alpha=0.2).save(tmp_path / "p.json")
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ConformalSegError, match="checksum"):
        load_profile(path)
    npz.unlink()
    with pytest.raises(ConformalSegError, match="missing"):
        load_profile(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConformalSegError, match="bad.json"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(ConformalSegError, match="not found"):
        load_profile(tmp_path / "absent.json")


def test_request_validation():
    with pytest.raises(ConformalSegError, match="--epsilon"):
        CalibrationRequest("cls", alpha=0.1)
    with pytest.raises(ConformalSegError, match="--alpha"):
        CalibrationRequest("cls", epsilon=0.1)
    with pytest.raises(ConformalSegError, match="transform"):
        CalibrationRequest("sets", alpha=0.1, inner_transform="wavelet")
    with pytest.raises(ConformalSegError, match="unknown method"):
        CalibrationRequest("bogus")


def test_guarantee_sentences(cases):
    cls = calibrate_cls(calibrate(cases, CalibrationRequest("cls", epsilon=0.1, alpha=0.2)).summaries, 0.1, 0.2)
    text = guarantee_sentence(cls)
    assert "at least 80%" in text and "at most 10%" in text and "16 scans" in text
    assert percent(0.025) == "2.5%" and percent(0.1) == "10%" and percent(1 - 0.9) == "10%"
    sets = calibrate(cases, CalibrationRequest("sets", alpha=0.2, joint="split")).calibration
    assert "both at once" in guarantee_sentence(sets) and "0.1 + 0.1" in guarantee_sentence(sets)


def test_lesion_profile_recalibrates_like_a_fresh_calibration(tmp_path, cases):
    """Any new (epsilon, alpha, voxel epsilon) from the stored summaries equals calibrating on the volumes."""
    profile = _profile(cases, method="lesion", epsilon=0.5, alpha=0.2, detect_fraction=0.5)
    loaded = load_profile(profile.save(tmp_path / "l.json")[0])
    assert loaded.lesion_level is not None and loaded.lesion_level.n == len(cases)
    for eps, alpha, ev in ((0.0, 0.2, None), (0.34, 0.3, 0.1), (1.0, 0.1, 0.05)):
        fresh = _profile(cases, method="lesion", epsilon=eps, alpha=alpha, voxel_epsilon=ev)
        again = loaded.recalibrate(epsilon=eps, alpha=alpha, voxel_epsilon=ev)
        assert again.calibration == fresh.calibration
    joint = loaded.recalibrate(voxel_epsilon=0.1)
    assert joint.calibration.voxel_epsilon == 0.1
    assert joint.recalibrate(alpha=0.3).calibration.voxel_epsilon == 0.1  # kept unless changed
    assert joint.recalibrate(voxel_epsilon=None).calibration.voxel_epsilon is None
    masks = loaded.masks(cases[0].probability, cases[0].geometry)
    assert list(masks) == ["Lesion (lesion-level)"]
    # a hand edit of the threshold is refused
    doc = json.loads((tmp_path / "l.json").read_text())
    doc["probability_threshold"] = 0.99
    (tmp_path / "l.json").write_text(json.dumps(doc))
    with pytest.raises(ConformalSegError, match="edited by hand"):
        load_profile(tmp_path / "l.json")


def test_lesion_request_validation():
    with pytest.raises(ConformalSegError, match="needs --epsilon .*missed-lesion"):
        CalibrationRequest(method="lesion", alpha=0.1)
    with pytest.raises(ConformalSegError, match="needs --alpha"):
        CalibrationRequest(method="lesion", epsilon=0.1)
    with pytest.raises(ConformalSegError, match=r"\(0, 1\]"):
        CalibrationRequest(method="lesion", epsilon=0.1, alpha=0.1, detect_fraction=1.5)
    with pytest.raises(ConformalSegError, match="scans with a lesion only"):
        CalibrationRequest(method="lesion", epsilon=0.1, alpha=0.1, empty="include")
