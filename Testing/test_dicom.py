"""DICOM in and out: series folders as input (geometry carried through) and the DICOM SEG of `apply`
(written, read back with highdicom and compared voxel for voxel with the NIfTI masks)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from dicom_support import GEOM, SHAPE, ct_values, write_ct_series
from test_io_support import write_sitk

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.io.dicom_seg import GuaranteeRecord, read_dicom_seg, segment_concepts, write_dicom_seg
from ConformalSegLib.io.dicom_series import load_image_input, load_probability_input, series_headers
from ConformalSegLib.io.volumes import load_image, load_label_map
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

pytest.importorskip("highdicom")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    hu = ct_values()
    write_ct_series(folder, hu)
    return folder, hu


def smooth_probabilities(shape=SHAPE, seed=3) -> np.ndarray:
    """A probability map with a blob in the middle (so that every set is neither empty nor everything)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    blob = np.exp(-4.0 * (x**2 + y**2 + z**2))
    noise = np.random.default_rng(seed).random(shape) * 0.002
    return np.clip(1.3 * blob + noise, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- DICOM series in


def test_series_volume_equals_the_nifti_export_of_the_same_series(ct, tmp_path):
    folder, hu = ct
    nifti = write_sitk(hu, tmp_path / "ct.nii.gz", GEOM)  # the same CT written as NIfTI, independently
    from_series, from_nifti = load_image_input(folder), load_image(nifti)
    assert from_series.geometry.mismatch(from_nifti.geometry) is None
    assert from_series.geometry.mismatch(GEOM) is None
    assert np.array_equal(from_series.array, from_nifti.array)  # slices sorted by position, rescale applied
    assert series_headers(folder).geometry.mismatch(GEOM) is None  # the pydicom reading agrees


def test_series_uid_picks_one_of_several(tmp_path):
    folder = tmp_path / "two"
    first, second = ct_values(seed=1), ct_values(seed=2)
    write_ct_series(folder, first, series_uid="1.2.3.1")
    write_ct_series(folder, second, series_uid="1.2.3.2", series_number=2)
    with pytest.raises(ConformalSegError, match=r"2 series: 1\.2\.3\.1, 1\.2\.3\.2.*--series-uid"):
        load_image_input(folder)
    assert np.array_equal(load_image_input(folder, "1.2.3.2").array, second)
    with pytest.raises(ConformalSegError, match=r"series 9\.9 is not in the folder"):
        load_image_input(folder, "9.9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConformalSegError, match="no DICOM image series"):
        load_image_input(tmp_path / "empty")


def test_probability_series_with_rescale_slope(tmp_path):
    probability = smooth_probabilities()
    quantised = np.round(probability * 1000) / 1000  # stored as integers with a rescale slope of 1/1000
    write_ct_series(tmp_path / "prob", quantised, rescale=(0.001, 0.0))
    volume = load_probability_input(tmp_path / "prob")
    assert volume.geometry.mismatch(GEOM) is None
    assert np.allclose(volume.array, quantised, atol=1e-6)
    write_ct_series(tmp_path / "hu", ct_values())  # integer Hounsfield units are not probabilities
    with pytest.raises(ConformalSegError, match="holds integers.*not probabilities"):
        load_probability_input(tmp_path / "hu")
    write_ct_series(tmp_path / "hu2", ct_values(), rescale=(0.5, -1024.0))  # rescaled to floats, out of range
    with pytest.raises(ConformalSegError, match="probability values range"):
        load_probability_input(tmp_path / "hu2")
    with pytest.raises(ConformalSegError, match="--series-uid applies to a DICOM series folder"):
        load_probability_input(tmp_path / "x.nii.gz", series_uid="1.2")


# ----------------------------------------------------------------------------- DICOM SEG out


def test_seg_round_trip_with_overlapping_segments(ct, tmp_path):
    folder, _ = ct
    rng = np.random.default_rng(0)
    outer = rng.random(SHAPE) < 0.6
    mask = outer & (rng.random(SHAPE) < 0.6)
    inner = mask & (rng.random(SHAPE) < 0.5)
    inner[0] = mask[0] = outer[0] = False  # an empty frame is kept too
    masks = {"Inner set": inner, "Lesion (FNR-controlled)": mask, "Outer set": outer}
    record = GuaranteeRecord("cls", 0.1, 0.2, 57, "0f" * 32, "With probability at least 80%, the FNR is at most 10%.")
    path = write_dicom_seg(masks, GEOM, folder, tmp_path / "seg.dcm", record)
    back = read_dicom_seg(path, folder)
    assert list(back) == list(masks)
    for name, expected in masks.items():
        assert np.array_equal(back[name], expected), name
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary file left
    with pytest.raises(ConformalSegError, match="already exists"):
        write_dicom_seg(masks, GEOM, folder, path, record)


def test_seg_fast_layout_and_omitted_frames_keep_the_masks(ct, tmp_path):
    """The segment-major layout gives highdicom the same pixels (identical PixelData); omitting the empty
    frames gives fewer frames and the same masks read back on the series' grid."""
    import pydicom

    from ConformalSegLib.io.dicom_seg import build_segmentation, stack_segments
    from ConformalSegLib.io.dicom_series import series_headers

    folder, _ = ct
    rng = np.random.default_rng(4)
    outer = np.zeros(SHAPE, bool)
    outer[2:4] = rng.random((2, *SHAPE[1:])) < 0.5
    masks = {"Inner set": outer & (rng.random(SHAPE) < 0.3), "Outer set": outer}
    record = GuaranteeRecord("sets", None, 0.1, 9, "0" * 64, "x")
    reference = series_headers(folder)
    old = np.stack([masks[name] for name in masks], axis=-1).astype(np.uint8)  # the layout before
    assert np.array_equal(stack_segments(masks), old.astype(bool))
    before = build_segmentation(reference, old, list(masks), record, False)
    after = build_segmentation(reference, stack_segments(masks), list(masks), record, False)
    assert before.PixelData == after.PixelData and before.NumberOfFrames == after.NumberOfFrames
    full = write_dicom_seg(masks, GEOM, folder, tmp_path / "full.dcm", record, reference=reference)
    sparse = write_dicom_seg(masks, GEOM, folder, tmp_path / "sparse.dcm", record, omit_empty_frames=True)
    assert pydicom.dcmread(full).NumberOfFrames == 2 * SHAPE[0]
    assert pydicom.dcmread(sparse).NumberOfFrames == 4 < 2 * SHAPE[0]
    for path in (full, sparse):
        back = read_dicom_seg(path, folder)
        assert all(np.array_equal(back[name], masks[name]) for name in masks)


def test_seg_refuses_another_grid(ct, tmp_path):
    folder, _ = ct
    for other in (
        Geometry(SHAPE, (0.8, 0.65, 3.0), GEOM.origin, GEOM.direction),
        Geometry(SHAPE, GEOM.spacing, (0.0, 0.0, 0.0), GEOM.direction),
        Geometry((6, 9, 12), GEOM.spacing, GEOM.origin, GEOM.direction),
    ):
        masks = {"Inner set": np.zeros(other.shape, bool)}
        with pytest.raises(ConformalSegError, match="not on the grid of the referenced DICOM series"):
            write_dicom_seg(masks, other, folder, tmp_path / "seg.dcm", GuaranteeRecord("cls", 0.1, 0.1, 9, "0", "x"))
    assert not (tmp_path / "seg.dcm").exists()


def test_segment_concepts():
    assert segment_concepts("Lesion (FNR-controlled)")[1].value == "108369006"  # neoplasm
    assert segment_concepts("Inner set")[1].value == "108369006"
    assert segment_concepts("Outer set")[1].value == "113663"  # outer limits of fuzzy margin
    assert segment_concepts("liver outer set")[1].value == "113663"
    category, kind = segment_concepts("liver inner set")
    assert (category.value, kind.value) == ("91723000", "10200004")  # anatomical structure / liver
    assert segment_concepts("gizmo inner set")[1].value == "91772007"  # no code for the name: organ


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_cli")
    write_synthetic_dataset(root / "data", 12, seed=4, shape=(16, 24, 24))
    paths = {}
    for method, extra in (("cls", ["--epsilon", "0.2", "--alpha", "0.2"]), ("sets", ["--alpha", "0.2"])):
        paths[method] = root / f"{method}.json"
        argv = ["calibrate", "--method", method, "--data", root / "data", "--lesion-label", "2", *extra]
        assert main([str(a) for a in [*argv, "--out", paths[method]]]) == 0
    return paths


def test_apply_writes_a_dicom_seg_equal_to_the_nifti_masks(ct, profiles, tmp_path, capsys):
    folder, _ = ct
    prob = write_sitk(smooth_probabilities(), tmp_path / "prob.nii.gz", GEOM)
    out = tmp_path / "out"
    argv = ["apply", "--profile", profiles["sets"], "--prob", prob, "--compare-threshold", "--out", out]
    code, stdout, err = run([*argv, "--dicom-seg", "--reference-dicom", folder], capsys)
    assert code == 0, err
    assert "wrote the DICOM SEG" in stdout
    back = read_dicom_seg(out / "segmentation.dcm", folder)
    assert list(back) == ["Inner set", "Outer set", "Lesion (threshold 0.5)"]
    for name, file in (
        ("Inner set", "inner_set"),
        ("Outer set", "outer_set"),
        ("Lesion (threshold 0.5)", "lesion_threshold_0_5"),
    ):
        nifti = load_label_map(out / f"{file}.nii.gz")
        assert nifti.geometry.mismatch(GEOM) is None
        assert np.array_equal(back[name], nifti.array.astype(bool)), name
    assert back["Inner set"].any() and not back["Outer set"].all()
    assert (back["Inner set"] <= back["Outer set"]).all()  # the overlap is kept
    import pydicom

    seg = pydicom.dcmread(out / "segmentation.dcm")
    doc = json.loads(profiles["sets"].read_text())
    sha = hashlib.sha256(profiles["sets"].read_bytes()).hexdigest()
    assert seg.SeriesDescription == f"ConformalSeg sets alpha=0.2 n={doc['n']}"
    assert seg.ContentDescription.startswith(f"sets alpha=0.2 n={doc['n']} profile sha256 {sha[:8]}")
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert f"profile_sha256={sha}" in parameters and "method=sets" in parameters and "alpha=0.2" in parameters
    assert seg.SegmentsOverlap == "YES" and seg.SegmentationType == "BINARY"
    assert json.loads((out / "apply.json").read_text())["dicom_seg"] == str(out / "segmentation.dcm")


def test_apply_with_a_dicom_probability_series(profiles, tmp_path, capsys):
    write_ct_series(tmp_path / "prob", smooth_probabilities(), rescale=(0.001, 0.0))
    out = tmp_path / "out"
    code, _, err = run(
        ["apply", "--profile", profiles["cls"], "--prob", tmp_path / "prob", "--dicom-seg", "--out", out], capsys
    )
    assert code == 0, err  # the reference defaults to the --prob series itself
    back = read_dicom_seg(out / "segmentation.dcm", tmp_path / "prob")
    nifti = load_label_map(out / "lesion_fnr_controlled.nii.gz")
    assert np.array_equal(back["Lesion (FNR-controlled)"], nifti.array.astype(bool))
    argv = ["apply", "--profile", profiles["cls"], "--prob", tmp_path / "prob", "--dicom-seg", "--out", tmp_path / "o2"]
    code, _, err = run([*argv, "--dicom-seg-omit-empty"], capsys)
    assert code == 0, err
    sparse = read_dicom_seg(tmp_path / "o2" / "segmentation.dcm", tmp_path / "prob")
    assert np.array_equal(sparse["Lesion (FNR-controlled)"], back["Lesion (FNR-controlled)"])


def test_apply_dicom_refusals(ct, profiles, tmp_path, capsys):
    folder, _ = ct
    prob = write_sitk(smooth_probabilities(), tmp_path / "prob.nii.gz", GEOM)
    base = ["apply", "--profile", profiles["cls"], "--prob", prob]
    code, _, err = run([*base, "--dicom-seg", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "--dicom-seg needs the DICOM series" in err and "--reference-dicom" in err
    code, _, err = run([*base, "--reference-dicom", folder, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "--reference-dicom and --dicom-seg-omit-empty need --dicom-seg" in err
    shifted = Geometry(SHAPE, GEOM.spacing, (0.0, 0.0, 0.0), GEOM.direction)
    moved = write_sitk(smooth_probabilities(), tmp_path / "moved.nii.gz", shifted)
    argv = ["apply", "--profile", profiles["cls"], "--prob", moved, "--dicom-seg", "--reference-dicom", folder]
    code, _, err = run([*argv, "--out", tmp_path / "c"], capsys)
    assert code == 2 and "not on the grid of the referenced DICOM series (origin" in err
    assert not (tmp_path / "c").exists()  # refused before any output
    code, _, err = run([*base, "--dicom-seg", "--reference-dicom", tmp_path / "none", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "not a folder" in err
