"""Reading/validating probability maps and label maps, geometry checks and save_volume."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_io_support import GEOM, SHAPE, files_in, random_probabilities, write_garbage, write_sitk

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.io import (
    Volume,
    check_same_geometry,
    geometry_from_sitk,
    label_values,
    load_label_map,
    load_label_mask,
    load_probability_map,
    save_volume,
    sitk_image,
)


def assert_geometry_equal(actual: Geometry, expected: Geometry) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.spacing, expected.spacing, rtol=1e-6)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=1e-5)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=1e-6)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_probability_round_trip_keeps_geometry(tmp_path, ext):
    probs = random_probabilities()
    path = write_sitk(probs, tmp_path / f"case{ext}")
    volume = load_probability_map(path)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, probs)
    assert_geometry_equal(volume.geometry, GEOM)
    assert volume.geometry.mismatch(GEOM) is None
    assert volume.geometry_known and volume.path == str(path)


def test_float64_stays_float64_and_float16_becomes_float32(tmp_path):
    p64 = random_probabilities(dtype=np.float64)
    np.save(tmp_path / "a.npy", p64)
    assert load_probability_map(tmp_path / "a.npy").array.dtype == np.float64
    np.save(tmp_path / "b.npy", p64.astype(np.float16))
    loaded = load_probability_map(tmp_path / "b.npy").array
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, p64.astype(np.float16).astype(np.float32))


def test_npy_has_identity_geometry_with_optional_spacing(tmp_path):
    probs = random_probabilities()
    np.save(tmp_path / "case.npy", probs)
    volume = load_probability_map(tmp_path / "case.npy")
    np.testing.assert_array_equal(volume.array, probs)
    assert volume.geometry == Geometry(shape=SHAPE)
    assert not volume.geometry_known
    spaced = load_probability_map(tmp_path / "case.npy", spacing=(0.5, 0.6, 3.0))
    assert spaced.geometry.spacing == (0.5, 0.6, 3.0) and spaced.geometry.spacing_zyx == (3.0, 0.6, 0.5)
    with pytest.raises(ConformalSegError, match="spacing"):
        load_probability_map(tmp_path / "case.npy", spacing=(0.5, -1, 3.0))


@pytest.mark.parametrize("ext", [".nii.gz", ".mha"])
def test_4d_image_channel_selection(tmp_path, ext):
    channels = [random_probabilities(seed=s) for s in range(3)]
    img = sitk.JoinSeries([sitk_image(c, GEOM) for c in channels])
    assert img.GetDimension() == 4
    path = tmp_path / f"multi{ext}"
    sitk.WriteImage(img, str(path))
    volume = load_probability_map(path, channel=2)
    np.testing.assert_array_equal(volume.array, channels[2])
    assert_geometry_equal(volume.geometry, GEOM)
    with pytest.raises(ConformalSegError, match="--channel") as info:
        load_probability_map(path)
    assert path.name in str(info.value) and "3 channels" in str(info.value)


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"])
def test_vector_image_channel_selection(tmp_path, ext):
    stacked = np.stack([random_probabilities(seed=s) for s in range(2)], axis=-1)  # (z, y, x, C)
    path = write_sitk(stacked, tmp_path / f"vec{ext}", is_vector=True)
    volume = load_probability_map(path, channel=1)
    np.testing.assert_array_equal(volume.array, stacked[..., 1])
    assert_geometry_equal(volume.geometry, GEOM)
    with pytest.raises(ConformalSegError, match="channel 4 does not exist"):
        load_probability_map(path, channel=4)


# ----------------------------------------------------------------------------- nnU-Net npz


def write_npz(path, n_channels=3, shape=SHAPE):
    probs = np.stack([random_probabilities(shape, seed=s) for s in range(n_channels)])
    probs /= probs.sum(axis=0, keepdims=True)
    np.savez_compressed(path, probabilities=probs)
    return probs


def test_npz_channel_required_and_selected(tmp_path):
    probs = write_npz(tmp_path / "case7.npz")
    with pytest.raises(ConformalSegError) as info:
        load_probability_map(tmp_path / "case7.npz")
    message = str(info.value)
    assert "case7.npz" in message and "--channel" in message and "lesion class index" in message
    volume = load_probability_map(tmp_path / "case7.npz", channel=1)
    np.testing.assert_array_equal(volume.array, probs[1])
    assert volume.geometry == Geometry(shape=SHAPE) and not volume.geometry_known
    with pytest.raises(ConformalSegError, match="channel 3 does not exist") as info:
        load_probability_map(tmp_path / "case7.npz", channel=3)
    assert "case7.npz" in str(info.value)


def test_npz_takes_geometry_from_nnunet_sibling(tmp_path):
    probs = write_npz(tmp_path / "case7.npz", n_channels=2)
    write_sitk((probs[1] > 0.5).astype(np.uint8), tmp_path / "case7.nii.gz")
    volume = load_probability_map(tmp_path / "case7.npz", channel=1)
    assert volume.geometry_known
    assert_geometry_equal(volume.geometry, GEOM)


def test_npz_sibling_with_other_shape_is_an_error(tmp_path):
    write_npz(tmp_path / "case7.npz", n_channels=2)
    write_sitk(np.zeros((4, 6, 7), np.uint8), tmp_path / "case7.nrrd")
    with pytest.raises(ConformalSegError) as info:
        load_probability_map(tmp_path / "case7.npz", channel=1)
    assert "case7.npz" in str(info.value) and "case7.nrrd" in str(info.value)


def test_npz_without_probabilities_key(tmp_path):
    np.savez(tmp_path / "x.npz", softmax=random_probabilities())
    with pytest.raises(ConformalSegError, match="'probabilities'.*softmax"):
        load_probability_map(tmp_path / "x.npz")


# ----------------------------------------------------------------------------- invalid probability maps


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".npy"])
@pytest.mark.parametrize("bad, count", [(np.nan, 2), (np.inf, 2), (-np.inf, 1)])
def test_non_finite_values_are_counted(tmp_path, bad, count, ext):
    # SimpleITK's NIfTI reader would silently turn these into 0: the loader must still see them
    probs = random_probabilities()
    probs.flat[3 : 3 + count] = bad
    path = tmp_path / f"nanny{ext}"
    np.save(path, probs) if ext == ".npy" else write_sitk(probs, path)
    with pytest.raises(ConformalSegError) as info:
        load_probability_map(path)
    assert path.name in str(info.value) and f"{count} NaN or infinite" in str(info.value)


def test_nan_in_npz_is_an_error(tmp_path):
    probs = np.stack([random_probabilities(seed=s) for s in range(2)])
    probs[1, 2, 3, 4] = np.nan
    np.savez_compressed(tmp_path / "c.npz", probabilities=probs)
    load_probability_map(tmp_path / "c.npz", channel=0)
    with pytest.raises(ConformalSegError, match="1 NaN or infinite"):
        load_probability_map(tmp_path / "c.npz", channel=1)


def test_out_of_range_reports_min_max_and_fix(tmp_path):
    probs = random_probabilities()
    probs[0, 0, 0], probs[1, 1, 1] = -2.5, 7.25
    np.save(tmp_path / "logits.npy", probs)
    with pytest.raises(ConformalSegError) as info:
        load_probability_map(tmp_path / "logits.npy")
    message = str(info.value)
    assert "logits.npy" in message and "-2.5" in message and "7.25" in message
    assert "apply softmax/sigmoid to logits first" in message


def test_rounding_noise_is_clipped(tmp_path):
    probs = random_probabilities()
    probs[0, 0, 0], probs[0, 0, 1] = 1.0 + 1e-7, -1e-8
    np.save(tmp_path / "noisy.npy", probs)
    array = load_probability_map(tmp_path / "noisy.npy").array
    assert array.max() == 1.0 and array.min() == 0.0


def test_2d_and_integer_maps_are_errors(tmp_path):
    path = write_sitk(random_probabilities((6, 7)), tmp_path / "flat.nii.gz", None)
    with pytest.raises(ConformalSegError, match="2D") as info:
        load_probability_map(path)
    assert "flat.nii.gz" in str(info.value)
    np.save(tmp_path / "flat.npy", random_probabilities((6, 7)))
    with pytest.raises(ConformalSegError, match="2D"):
        load_probability_map(tmp_path / "flat.npy")
    seg = write_sitk(np.ones(SHAPE, np.uint8), tmp_path / "seg.nii.gz")
    with pytest.raises(ConformalSegError, match="integer voxels"):
        load_probability_map(seg)


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.nii", "bad.nrrd", "bad.mha", "bad.npy", "bad.npz"])
def test_corrupt_files_name_the_file(tmp_path, name):
    write_garbage(tmp_path / name)
    with pytest.raises(ConformalSegError) as info:
        load_probability_map(tmp_path / name, channel=0)
    assert name in str(info.value) and "corrupt" in str(info.value)
    if not name.endswith(".npz"):
        with pytest.raises(ConformalSegError, match="corrupt") as info:
            load_label_map(tmp_path / name)
        assert name in str(info.value)


def test_truncated_nifti_is_an_error(tmp_path):
    path = write_sitk(random_probabilities((20, 20, 20)), tmp_path / "cut.nii")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConformalSegError, match="cut.nii"):
        load_probability_map(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ConformalSegError, match="not found") as info:
        load_probability_map(tmp_path / "nothere.nii.gz")
    assert "nothere.nii.gz" in str(info.value)
    with pytest.raises(ConformalSegError, match="nothere_label.nrrd"):
        load_label_mask(tmp_path / "nothere_label.nrrd", [1])
    (tmp_path / "pic.png").write_bytes(b"x")
    with pytest.raises(ConformalSegError, match="unsupported") as info:
        load_probability_map(tmp_path / "pic.png")
    assert "pic.png" in str(info.value)


# ----------------------------------------------------------------------------- label maps


def test_label_mask_for_lesion_label_2(tmp_path):
    labels = np.random.default_rng(3).integers(0, 3, SHAPE).astype(np.uint8)
    path = write_sitk(labels, tmp_path / "lab.nrrd")
    mask = load_label_mask(path, [2])
    assert mask.array.dtype == bool
    np.testing.assert_array_equal(mask.array, labels == 2)
    assert_geometry_equal(mask.geometry, GEOM)
    np.testing.assert_array_equal(load_label_mask(path, [1, 2]).array, labels > 0)
    label_map = load_label_map(path)
    assert label_map.array.dtype == np.uint8
    assert label_values(label_map.array) == {0, 1, 2}


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8])
def test_label_map_keeps_stored_integer_type(tmp_path, dtype):
    labels = np.zeros(SHAPE, dtype)
    labels[1:3, 2:4, 3:5] = 5
    path = write_sitk(labels, tmp_path / "lab.nii.gz")
    assert load_label_map(path).array.dtype == dtype


def test_integer_valued_float_labels_are_accepted(tmp_path):
    labels = np.zeros(SHAPE, np.float32)
    labels[2, 2, 2] = 2.0
    volume = load_label_map(write_sitk(labels, tmp_path / "f.nii.gz"))
    assert np.issubdtype(volume.array.dtype, np.integer) and label_values(volume.array) == {0, 2}


def test_non_integer_labels_are_an_error(tmp_path):
    labels = np.zeros(SHAPE, np.float32)
    labels[0, 0, :3] = 0.5
    path = write_sitk(labels, tmp_path / "soft.nii.gz")
    with pytest.raises(ConformalSegError) as info:
        load_label_mask(path, [1])
    assert "soft.nii.gz" in str(info.value) and "3 non-integer" in str(info.value)


def test_invalid_lesion_labels(tmp_path):
    path = write_sitk(np.zeros(SHAPE, np.uint8), tmp_path / "lab.nii.gz")
    for bad in ([], [1.5], ["1"]):
        with pytest.raises(ConformalSegError, match="--lesion-label"):
            load_label_mask(path, bad)


def test_label_values():
    assert label_values(np.array([[[-3, 0, 7]]], np.int16)) == {-3, 0, 7}
    assert label_values(np.array([[[0, 70000, 5]]], np.int32)) == {0, 5, 70000}
    assert label_values(np.zeros((2, 2, 2), bool)) == {0}
    big = np.zeros((1 << 22) + 5, np.uint8)
    big[-1] = 9  # in the second chunk
    assert label_values(big) == {0, 9}


# ----------------------------------------------------------------------------- geometry checks


def test_geometry_mismatch_names_both_files(tmp_path):
    probs = write_sitk(random_probabilities(), tmp_path / "p_case.nii.gz")
    shifted = Geometry(shape=SHAPE, spacing=GEOM.spacing, origin=(0.0, 0.0, 0.0), direction=GEOM.direction)
    labels = write_sitk(np.zeros(SHAPE, np.uint8), tmp_path / "l_case.nii.gz", shifted)
    a, b = load_probability_map(probs), load_label_map(labels)
    with pytest.raises(ConformalSegError) as info:
        check_same_geometry(a, b)
    message = str(info.value)
    assert "p_case.nii.gz" in message and "l_case.nii.gz" in message and "origin" in message
    assert "SimpleITK.Resample" in message
    check_same_geometry(a, load_label_map(write_sitk(np.zeros(SHAPE, np.uint8), tmp_path / "ok.nrrd")))


def test_shape_is_checked_even_without_stored_geometry(tmp_path):
    labels = load_label_map(write_sitk(np.zeros(SHAPE, np.uint8), tmp_path / "l.nii.gz"))
    same = Volume(random_probabilities(), Geometry(shape=SHAPE), "p.npy", geometry_known=False)
    check_same_geometry(same, labels)  # identity geometry of a bare array is not compared
    other = Volume(random_probabilities((5, 6, 8)), Geometry(shape=(5, 6, 8)), "p.npy", geometry_known=False)
    with pytest.raises(ConformalSegError, match="shape.*p.npy.*l.nii.gz"):
        check_same_geometry(other, labels)


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".seg.nrrd"])
def test_save_volume_round_trip(tmp_path, ext):
    mask = random_probabilities() > 0.5
    path = save_volume(mask, GEOM, tmp_path / "out" / f"mask{ext}")
    img = sitk.ReadImage(str(path))
    assert img.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), mask.astype(np.uint8))
    assert_geometry_equal(geometry_from_sitk(img), GEOM)
    assert files_in(path.parent) == [path.name]


def test_save_volume_refuses_overwrite_and_bad_formats(tmp_path):
    probs = random_probabilities()
    path = save_volume(probs, GEOM, tmp_path / "p.nii.gz")
    with pytest.raises(ConformalSegError, match="--force") as info:
        save_volume(probs * 0, GEOM, path)
    assert "p.nii.gz" in str(info.value)
    np.testing.assert_array_equal(load_probability_map(path).array, probs)
    save_volume(probs * 0, GEOM, path, force=True)
    assert load_probability_map(path).array.max() == 0
    with pytest.raises(ConformalSegError, match="unsupported"):
        save_volume(probs, GEOM, tmp_path / "p.mhd")
    with pytest.raises(ValueError):
        save_volume(probs[:2], GEOM, tmp_path / "wrong_shape.nii.gz")
