"""Case-id matching, discover_pairs errors and streaming CalibrationDataset iteration."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from test_io_support import GEOM, SHAPE, random_probabilities, write_sitk

import ConformalSegLib.io.dataset as dataset_module
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.io import CalibrationDataset, case_id, discover_pairs


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


@pytest.mark.parametrize(
    "name, probability, expected",
    [
        ("case01.nii.gz", False, "case01"),
        ("case01.NII.GZ", False, "case01"),
        ("case01_prob.nii.gz", True, "case01"),
        ("case01_probs.nrrd", True, "case01"),
        ("case01_probability.mha", True, "case01"),
        ("case01_probabilities.npz", True, "case01"),
        ("case01_prob.nii.gz", False, "case01_prob"),  # labels keep the suffix
        ("case01_prob_probs.npy", True, "case01_prob"),  # only one suffix is removed
        ("seg.case.seg.nrrd", False, "seg.case"),
        ("brain.mhd", False, "brain"),
        ("_prob.nii.gz", True, "_prob"),
        (".hidden.nii.gz", False, None),
        ("dataset.json", False, None),
        ("case01.pkl", True, None),
        ("case01.raw", False, None),
        ("notes.md", False, None),
        ("photo.png", False, None),
    ],
)
def test_case_id_rule(name, probability, expected):
    assert case_id(name, probability=probability) == expected


def test_discover_pairs_matching_rules(tmp_path):
    probs, labels = tmp_path / "probs", tmp_path / "labels"
    touch(
        probs,
        "b_probs.nrrd",
        "a_prob.nii.gz",
        "c.npz",
        "c.nii.gz",
        "c.pkl",
        "plans.json",
        ".DS_Store",
        "d_probabilities.mha",
        "d.raw",
    )
    touch(labels, "c.nii.gz", "a.nii.gz", "b.seg.nrrd", "d.mha", "readme.txt", "dataset.json")
    (labels / "sub").mkdir()
    pairs = discover_pairs(probs, labels)
    assert [(cid, p.name, lab.name) for cid, p, lab in pairs] == [
        ("a", "a_prob.nii.gz", "a.nii.gz"),
        ("b", "b_probs.nrrd", "b.seg.nrrd"),
        ("c", "c.npz", "c.nii.gz"),
        ("d", "d_probabilities.mha", "d.mha"),
    ]
    assert all(p.parent == probs and lab.parent == labels for _, p, lab in pairs)


def test_unmatched_cases_are_listed_with_count(tmp_path):
    probs, labels = tmp_path / "probs", tmp_path / "labels"
    touch(probs, *[f"p{i:02d}.nii.gz" for i in range(12)], "shared.nii.gz")
    touch(labels, "shared.nii.gz", "orphan_label.nii.gz")
    with pytest.raises(ConformalSegError) as info:
        discover_pairs(probs, labels)
    message = str(info.value)
    assert "12 case(s)" in message and "p00, p01" in message and "p09" in message
    assert "p10" not in message and "(2 more)" in message
    assert "1 case(s)" in message and "orphan_label" in message
    assert str(probs) in message and str(labels) in message


@pytest.mark.parametrize(
    "folder, names",
    [
        ("probs", ["a.nii.gz", "a_prob.nrrd"]),
        ("probs", ["a.npz", "a_prob.npz"]),
        ("probs", ["a_prob.npz", "a.nii.gz"]),  # not nnU-Net's CASE.npz + CASE.nii.gz pattern
        ("labels", ["a.nii.gz", "a.nrrd"]),
        ("labels", ["a.npz", "a.nii.gz"]),  # the npz rule applies to probability folders only
    ],
)
def test_duplicate_case_ids_are_an_error(tmp_path, folder, names):
    touch(tmp_path / "probs", "a.nii.gz") if folder == "labels" else touch(tmp_path / "labels", "a.nii.gz")
    touch(tmp_path / folder, *names)
    with pytest.raises(ConformalSegError) as info:
        discover_pairs(tmp_path / "probs", tmp_path / "labels")
    message = str(info.value)
    assert all(name in message for name in names) and "one file per case" in message


def test_missing_and_empty_folders(tmp_path):
    touch(tmp_path / "labels", "a.nii.gz")
    with pytest.raises(ConformalSegError, match="does not exist") as info:
        discover_pairs(tmp_path / "nope", tmp_path / "labels")
    assert "nope" in str(info.value)
    touch(tmp_path / "probs", "notes.txt", ".hidden.nii.gz")
    with pytest.raises(ConformalSegError, match="no probability map files.*notes.txt"):
        discover_pairs(tmp_path / "probs", tmp_path / "labels")
    with pytest.raises(ConformalSegError, match="labels/ subfolder"):
        CalibrationDataset.from_root(tmp_path / "probs", [1])


# ----------------------------------------------------------------------------- real datasets


def make_dataset(root: Path, n_cases: int = 3, label_values=(0, 1)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``root/probs/caseN_prob.nii.gz`` and ``root/labels/caseN.nrrd``; return the arrays."""
    data = {}
    for i in range(n_cases):
        probs = random_probabilities(seed=i)
        labels = np.random.default_rng(100 + i).choice(np.array(label_values, np.uint8), SHAPE)
        write_sitk(probs, root / "probs" / f"case{i}_prob.nii.gz")
        write_sitk(labels, root / "labels" / f"case{i}.nrrd")
        data[f"case{i}"] = (probs, labels)
    return data


def test_iteration_yields_checked_cases_in_order(tmp_path):
    data = make_dataset(tmp_path, label_values=(0, 1, 2))
    calls = []
    dataset = CalibrationDataset.from_root(tmp_path, [2], progress=lambda *args: calls.append(args))
    assert dataset.case_ids == ["case0", "case1", "case2"] and len(dataset) == 3
    seen = []
    for case in dataset:
        probs, labels = data[case.case_id]
        np.testing.assert_array_equal(case.probability.array, probs)
        np.testing.assert_array_equal(case.lesion.array, labels == 2)
        assert case.lesion.array.dtype == bool
        assert case.probability.geometry.mismatch(GEOM) is None and case.lesion.geometry.mismatch(GEOM) is None
        seen.append(case.case_id)
    assert seen == dataset.case_ids
    assert calls == [(1, 3, "case0"), (2, 3, "case1"), (3, 3, "case2")]
    assert dataset.labels_seen["case0"] == {0, 1, 2}


def test_iteration_streams_one_case_at_a_time(tmp_path, monkeypatch):
    make_dataset(tmp_path, n_cases=3)
    loads: list[str] = []
    previous: list[weakref.ref] = []
    real_loader = dataset_module.load_probability_input

    def spy(path, **kwargs):
        gc.collect()
        # the previous case must be garbage once the consumer dropped it: the dataset holds no copy
        assert all(ref() is None for ref in previous), "previous case still referenced while loading the next"
        loads.append(Path(path).name)
        return real_loader(path, **kwargs)

    monkeypatch.setattr(dataset_module, "load_probability_input", spy)
    iterator = iter(CalibrationDataset(tmp_path / "probs", tmp_path / "labels", [1]))
    assert loads == []  # nothing is read before iteration starts
    for expected in range(3):
        case = next(iterator)
        assert len(loads) == expected + 1  # lazily loaded, one at a time
        previous[:] = [weakref.ref(case.probability.array), weakref.ref(case.lesion.array)]
        del case
    with pytest.raises(StopIteration):
        next(iterator)


def test_unknown_lesion_label_is_reported_after_all_cases(tmp_path):
    make_dataset(tmp_path, label_values=(0, 1))
    dataset = CalibrationDataset.from_root(tmp_path, [2])
    yielded = []
    with pytest.raises(ConformalSegError) as info:
        for case in dataset:
            yielded.append(case.case_id)
    assert yielded == ["case0", "case1", "case2"]
    message = str(info.value)
    assert "label value 2 does not occur in any label file (values seen: 0, 1)" in message
    assert "pass the lesion label value(s) with --lesion-label" in message


def test_lesion_label_present_in_one_file_is_enough(tmp_path):
    make_dataset(tmp_path, label_values=(0, 1))
    write_sitk(np.full(SHAPE, 7, np.uint8), tmp_path / "labels" / "case1.nrrd")  # overwrite one label file
    cases = list(CalibrationDataset.from_root(tmp_path, [7]))
    assert [c.lesion.array.sum() for c in cases] == [0, np.prod(SHAPE), 0]


def test_geometry_mismatch_of_a_pair_names_both_files(tmp_path):
    make_dataset(tmp_path, n_cases=2)
    wrong = Geometry(shape=SHAPE, spacing=(1.0, 1.0, 1.0), origin=GEOM.origin, direction=GEOM.direction)
    write_sitk(np.zeros(SHAPE, np.uint8), tmp_path / "labels" / "case1.nrrd", wrong)
    dataset = CalibrationDataset.from_root(tmp_path, [1])
    dataset.load("case0")
    with pytest.raises(ConformalSegError) as info:
        dataset.load("case1")
    message = str(info.value)
    assert "case1_prob.nii.gz" in message and "case1.nrrd" in message and "spacing" in message
    with pytest.raises(ConformalSegError, match="unknown case id 'case9'"):
        dataset.load("case9")


def test_nnunet_npz_dataset_with_channel(tmp_path):
    probs_dir, labels_dir = tmp_path / "pred", tmp_path / "gt"
    probs = np.stack([random_probabilities(seed=s) for s in range(3)])
    probs /= probs.sum(axis=0, keepdims=True)
    probs_dir.mkdir()
    np.savez_compressed(probs_dir / "liver_001.npz", probabilities=probs)
    write_sitk(probs.argmax(0).astype(np.uint8), probs_dir / "liver_001.nii.gz")
    (probs_dir / "liver_001.pkl").write_bytes(b"not read")
    labels = np.random.default_rng(0).integers(0, 3, SHAPE).astype(np.uint8)
    write_sitk(labels, labels_dir / "liver_001.nii.gz")
    with pytest.raises(ConformalSegError, match="--channel"):
        list(CalibrationDataset(probs_dir, labels_dir, [2]))
    (case,) = list(CalibrationDataset(probs_dir, labels_dir, [2], channel=2))
    np.testing.assert_array_equal(case.probability.array, probs[2])
    np.testing.assert_array_equal(case.lesion.array, labels == 2)
    assert case.probability.geometry.mismatch(GEOM) is None


def test_bare_npy_probabilities_adopt_label_geometry(tmp_path):
    (tmp_path / "probs").mkdir()
    np.save(tmp_path / "probs" / "x_probs.npy", random_probabilities())
    write_sitk(np.ones(SHAPE, np.uint8), tmp_path / "labels" / "x.mha")
    (case,) = list(CalibrationDataset.from_root(tmp_path, [1]))
    assert case.probability.geometry == case.lesion.geometry and case.probability.geometry_known
    np.save(tmp_path / "probs" / "x_probs.npy", random_probabilities((5, 6, 8)))
    with pytest.raises(ConformalSegError, match="shape"):
        list(CalibrationDataset.from_root(tmp_path, [1]))
