"""A DICOM SEG as a label map input (``calibrate --masks/--labels``, ``apply --mask``): written with our
exporter, read back voxel for voxel (segment number = label value), placed on the image's grid (also when
empty frames were omitted), and refused with one clear message when it cannot be a label map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicom_support import GEOM, SHAPE, write_ct_series

pytest.importorskip("highdicom")

from ConformalSegLib.cli import main  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.io.dataset import case_id  # noqa: E402
from ConformalSegLib.io.dicom_seg import GuaranteeRecord, write_dicom_seg  # noqa: E402
from ConformalSegLib.io.volumes import load_label_map, save_volume  # noqa: E402

RECORD = GuaranteeRecord("sets (mask)", None, 0.1, 12, "ab" * 32, "a sentence")


def label_map(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Labels 0..3 in random blocks; the first and last slices are background (so a SEG may omit them)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    labels[0] = labels[-1] = 0
    return labels


def write_label_seg(labels: np.ndarray, ct_folder, path, names=("liver", "spleen", "kidney")) -> None:
    """Our exporter, one segment per label value (segment k = value k)."""
    masks = {f"{name} inner set": labels == value for value, name in enumerate(names, start=1)}
    write_dicom_seg(masks, GEOM, ct_folder, path, RECORD)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg_input") / "ct"
    write_ct_series(folder, np.zeros(SHAPE, np.int16))
    return folder


def test_round_trip_voxel_for_voxel(ct, tmp_path):
    labels = label_map()
    write_label_seg(labels, ct, tmp_path / "case.dcm")
    own = load_label_map(tmp_path / "case.dcm")  # the SEG's own frame geometry
    assert own.geometry.mismatch(GEOM) is None
    assert np.array_equal(own.array, labels)
    placed = load_label_map(tmp_path / "case.dcm", GEOM)  # placed on the image's grid
    assert np.array_equal(placed.array, labels) and placed.geometry == GEOM
    assert case_id("case.dcm") == "case" and case_id("case.dcm", probability=True) is None


def highdicom_seg(ct, labels: np.ndarray, kind: str = "BINARY"):
    """A SEG written by highdicom itself from a label-map array (empty frames omitted: its default)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from ConformalSegLib.io.dicom_series import series_headers

    algorithm = hd.AlgorithmIdentificationSequence("t", codes.cid7162.ArtificialIntelligence, "1")
    descriptions = [
        hd.seg.SegmentDescription(
            k, f"s{k}", codes.SCT.Organ, codes.SCT.Liver, hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm
        )
        for k in (1, 2, 3)
    ]
    return hd.seg.Segmentation(
        series_headers(ct).datasets,
        labels,
        hd.seg.SegmentationTypeValues[kind],
        descriptions,
        hd.UID(),
        2,
        hd.UID(),
        1,
        "m",
        "m",
        "1",
        "1",
    )


def test_fractional_seg_is_refused(ct, tmp_path):
    rng = np.random.default_rng(6)
    fractions = np.stack([rng.random(SHAPE).astype(np.float32) for _ in range(3)], axis=-1)
    highdicom_seg(ct, fractions, "FRACTIONAL").save_as(tmp_path / "fractional.dcm")
    with pytest.raises(ConformalSegError, match="the SEG is FRACTIONAL, not a label map"):
        load_label_map(tmp_path / "fractional.dcm", GEOM)


def test_labelmap_seg(ct, tmp_path):
    labels = label_map(3)
    highdicom_seg(ct, labels, "LABELMAP").save_as(tmp_path / "labelmap.dcm")
    assert np.array_equal(load_label_map(tmp_path / "labelmap.dcm", GEOM).array, labels)


def test_seg_without_empty_frames_is_placed_on_the_image_grid(ct, tmp_path):
    labels = label_map(1)
    seg = highdicom_seg(ct, labels)
    assert seg.NumberOfFrames < 3 * SHAPE[0]
    seg.save_as(tmp_path / "omitted.dcm")
    assert np.array_equal(load_label_map(tmp_path / "omitted.dcm", GEOM).array, labels)
    with pytest.raises(ConformalSegError, match="frames on 4 of the 6 slices.*no image grid"):
        load_label_map(tmp_path / "omitted.dcm")  # without the image the extent is unknown


def test_refusals(ct, tmp_path):
    rng = np.random.default_rng(2)
    inner = rng.random(SHAPE) < 0.3
    masks = {"Inner set": inner, "Outer set": inner | (rng.random(SHAPE) < 0.3)}
    write_dicom_seg(masks, GEOM, ct, tmp_path / "overlap.dcm", RECORD)
    with pytest.raises(ConformalSegError, match="segments overlap.*one value per voxel"):
        load_label_map(tmp_path / "overlap.dcm")
    write_label_seg(label_map(), ct, tmp_path / "seg.dcm")
    shifted = Geometry(SHAPE, GEOM.spacing, tuple(np.add(GEOM.origin, (5.0, 0.0, 0.0))), GEOM.direction)
    with pytest.raises(ConformalSegError, match="not on the grid of the image it labels"):
        load_label_map(tmp_path / "seg.dcm", shifted)
    bigger = Geometry((SHAPE[0], SHAPE[1] + 1, SHAPE[2]), GEOM.spacing, GEOM.origin, GEOM.direction)
    with pytest.raises(ConformalSegError, match="frames are 9x11 pixels"):
        load_label_map(tmp_path / "seg.dcm", bigger)
    fewer = Geometry((3, *SHAPE[1:]), GEOM.spacing, GEOM.origin, GEOM.direction)
    with pytest.raises(ConformalSegError, match="frames outside the 3 slices"):
        load_label_map(tmp_path / "seg.dcm", fewer)
    ct_slice = next(ct.iterdir())
    with pytest.raises(ConformalSegError, match="not a DICOM SEG"):
        load_label_map(ct_slice)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(ConformalSegError, match="cannot read the DICOM file"):
        load_label_map(tmp_path / "junk.dcm")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_mask_cases(ct, root, *, seed: int, seg_value: int, names: tuple[str, ...]) -> None:
    """10 cases of a mask-only tool: a true ellipsoid (``labels/``, value 1) and a shifted prediction, as NIfTI
    (``pred_nifti/``, value 1) and as a SEG (``pred_seg/``, the prediction is segment ``seg_value`` of ``names``)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    (root / "pred_seg").mkdir(exist_ok=True)
    for i in range(10):
        centre = np.array([2.5, 4, 5]) + rng.normal(0, 0.6, 3)
        truth = ((z - centre[0]) / 2.0) ** 2 + ((y - centre[1]) / 3) ** 2 + ((x - centre[2]) / 3.5) ** 2 <= 1
        shift = centre + rng.normal(0, 0.5, 3)
        predicted = ((z - shift[0]) / 2.0) ** 2 + ((y - shift[1]) / 3) ** 2 + ((x - shift[2]) / 3.5) ** 2 <= 1
        save_volume(truth.astype(np.uint8), GEOM, root / "labels" / f"c{i}.nii.gz")
        save_volume(predicted.astype(np.uint8), GEOM, root / "pred_nifti" / f"c{i}.nii.gz")
        write_label_seg(seg_value * predicted.astype(np.uint8), ct, root / "pred_seg" / f"c{i}.dcm", names)


def test_mask_calibration_and_apply_read_dicom_segs(ct, tmp_path, capsys):
    """calibrate --masks on SEGs gives the profile of the same masks as NIfTI; apply --mask SEG the same sets."""
    write_mask_cases(ct, tmp_path, seed=5, seg_value=1, names=("liver",))
    base = ["calibrate", "--method", "sets", "--transform", "distance", "--alpha", "0.2", "--lesion-label", "1"]
    for kind in ("nifti", "seg"):
        argv = [*base, "--masks", tmp_path / f"pred_{kind}", "--labels", tmp_path / "labels"]
        code, _, err = run([*argv, "--out", tmp_path / f"{kind}.json"], capsys)
        assert code == 0, err
    nifti, seg = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("nifti", "seg"))
    for key in ("n", "inner_threshold", "outer_threshold"):
        assert nifti[key] == seg[key], key
    new = tmp_path / "pred_seg" / "c3.dcm"
    code, _, err = run(["apply", "--profile", tmp_path / "seg.json", "--mask", new, "--out", tmp_path / "a1"], capsys)
    assert code == 0, err
    new_nifti = tmp_path / "pred_nifti" / "c3.nii.gz"
    code, _, err = run(
        ["apply", "--profile", tmp_path / "seg.json", "--mask", new_nifti, "--out", tmp_path / "a2"], capsys
    )
    assert code == 0, err
    for name in ("inner_set", "outer_set"):
        a, b = (load_label_map(tmp_path / d / f"{name}.nii.gz") for d in ("a1", "a2"))
        assert np.array_equal(a.array, b.array) and a.geometry.mismatch(b.geometry) is None
    argv = ["apply", "--profile", tmp_path / "seg.json", "--mask", new, "--out", tmp_path / "a3"]
    code, _, err = run([*argv, "--dicom-seg", "--reference-dicom", ct], capsys)  # placed on the series' grid
    assert code == 0, err


def test_calibration_labels_as_dicom_segs(ct, tmp_path, capsys):
    """calibrate --probs --labels with CASE.dcm label maps equals the same labels as NIfTI."""
    rng = np.random.default_rng(8)
    for i in range(8):
        labels = label_map(10 + i)
        prob = np.clip(0.6 * (labels == 2) + 0.5 * rng.random(SHAPE), 0, 1).astype(np.float32)
        save_volume(prob, GEOM, tmp_path / "probs" / f"c{i}.nii.gz")
        save_volume(labels, GEOM, tmp_path / "labels_nifti" / f"c{i}.nii.gz")
        (tmp_path / "labels_seg").mkdir(exist_ok=True)
        write_label_seg(labels, ct, tmp_path / "labels_seg" / f"c{i}.dcm")
    base = ["calibrate", "--method", "cls", "--epsilon", "0.2", "--alpha", "0.2", "--lesion-label", "2"]
    for kind in ("nifti", "seg"):
        argv = [*base, "--probs", tmp_path / "probs", "--labels", tmp_path / f"labels_{kind}"]
        code, _, err = run([*argv, "--out", tmp_path / f"{kind}.json"], capsys)
        assert code == 0, err
    nifti, seg = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("nifti", "seg"))
    assert nifti["n"] == seg["n"] == 8
    assert nifti["probability_threshold"] == seg["probability_threshold"]


def test_segments_by_name_when_numbering_differs(ct, tmp_path, capsys):
    """``--seg-segments spleen=2``: SEGs numbering their segments differently per file calibrate exactly as
    the NIfTI label maps where spleen is 2; the mapping is recorded; unknown, ambiguous, malformed refused."""
    rng = np.random.default_rng(9)
    for i in range(8):
        labels = label_map(20 + i)
        prob = np.clip(0.6 * (labels == 2) + 0.5 * rng.random(SHAPE), 0, 1).astype(np.float32)
        save_volume(prob, GEOM, tmp_path / "probs" / f"c{i}.nii.gz")
        save_volume(labels, GEOM, tmp_path / "labels_nifti" / f"c{i}.nii.gz")
        (tmp_path / "labels_seg").mkdir(exist_ok=True)
        order = (1, 2, 3) if i % 2 else (3, 1, 2)  # segment numbers differ from file to file
        names = {1: "liver", 2: "spleen", 3: "kidney"}
        masks = {f"{names[v]} inner set": labels == v for v in order}
        write_dicom_seg(masks, GEOM, ct, tmp_path / "labels_seg" / f"c{i}.dcm", RECORD)
    base = ["calibrate", "--method", "cls", "--epsilon", "0.2", "--alpha", "0.2", "--lesion-label", "2"]
    base += ["--probs", tmp_path / "probs"]
    code, _, err = run([*base, "--labels", tmp_path / "labels_nifti", "--out", tmp_path / "nifti.json"], capsys)
    assert code == 0, err
    seg_base = [*base, "--labels", tmp_path / "labels_seg"]
    code, _, err = run([*seg_base, "--seg-segments", "Spleen=2", "--out", tmp_path / "seg.json"], capsys)
    assert code == 0, err
    nifti, seg = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("nifti", "seg"))
    assert nifti["n"] == seg["n"] == 8 and nifti["probability_threshold"] == seg["probability_threshold"]
    assert seg["provenance"]["seg_segments"] == {"spleen": 2}
    placed = load_label_map(tmp_path / "labels_seg" / "c0.dcm", GEOM, {"spleen": 2, "liver inner set": 1})
    truth = load_label_map(tmp_path / "labels_nifti" / "c0.nii.gz").array
    assert np.array_equal(placed.array, np.where(truth == 3, 0, truth))  # kidney not named: background
    code, _, err = run([*seg_base, "--seg-segments", "pancreas=2", "--out", tmp_path / "o1.json"], capsys)
    assert code == 2 and "'pancreas' matches no segment" in err and "'spleen inner set' (Spleen)" in err
    code, _, err = run([*seg_base, "--seg-segments", "spleen", "--out", tmp_path / "o2.json"], capsys)
    assert code == 2 and "NAME=VALUE" in err
    assert not (tmp_path / "o1.json").exists() and not (tmp_path / "o2.json").exists()
    write_dicom_seg({"a": truth == 1, "b": truth == 2}, GEOM, ct, tmp_path / "two_lesions.dcm", RECORD)
    with pytest.raises(ConformalSegError, match="'neoplasm' matches 2 segments"):
        load_label_map(tmp_path / "two_lesions.dcm", GEOM, {"neoplasm": 1})  # both coded Neoplasm


def test_mask_apply_reuses_the_segment_names_of_calibration(ct, tmp_path, capsys):
    """calibrate --masks --seg-segments liver=1 on SEGs where liver is segment 2; apply --mask on such a SEG
    without the option reads the same structure (the names are in the profile)."""
    write_mask_cases(ct, tmp_path, seed=6, seg_value=2, names=("spleen", "liver"))
    base = ["calibrate", "--method", "sets", "--transform", "distance", "--alpha", "0.2", "--lesion-label", "1"]
    code, _, err = run([*base, "--masks", tmp_path / "pred_nifti", "--labels", tmp_path / "labels", "--out",
                        tmp_path / "nifti.json"], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run([*base, "--masks", tmp_path / "pred_seg", "--labels", tmp_path / "labels", "--seg-segments",
                        "liver=1", "--out", tmp_path / "seg.json"], capsys)  # fmt: skip
    assert code == 0, err
    nifti, seg = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("nifti", "seg"))
    for key in ("n", "inner_threshold", "outer_threshold"):
        assert nifti[key] == seg[key], key
    for kind, mask in (("seg", tmp_path / "pred_seg" / "c3.dcm"), ("nifti", tmp_path / "pred_nifti" / "c3.nii.gz")):
        code, _, err = run(["apply", "--profile", tmp_path / f"{kind}.json", "--mask", mask, "--out",
                            tmp_path / f"a_{kind}"], capsys)  # fmt: skip
        assert code == 0, err
    for name in ("inner_set", "outer_set"):
        a, b = (load_label_map(tmp_path / d / f"{name}.nii.gz").array for d in ("a_seg", "a_nifti"))
        assert np.array_equal(a, b) and a.any()
