"""Tests of ConformalSegLib.phantoms.generator: deterministic synthetic CT phantoms and their nnU-Net-style dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.phantoms.dataset import write_phantom_dataset
from ConformalSegLib.phantoms.generator import Phantom, make_phantom, make_phantoms, phantom_seed
from ConformalSegLib.phantoms.labels import (
    BACKGROUND,
    BODY,
    BONE,
    KIDNEY,
    LABEL_NAMES,
    LESION,
    LESION_HOSTS,
    LIVER,
    LUNG,
    SPLEEN,
)
from ConformalSegLib.phantoms.lesions import MAX_LESION_RADIUS_MM, MAX_NODULE_RADIUS_MM, MIN_LESION_RADIUS_MM

N_STATS = 30
SMALL = {"shape": (20, 40, 40), "spacing": (3.7, 3.7, 7.0)}  # same field of view, quick to write


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return list(make_phantoms(N_STATS, seed=0))


def _assert_same(a: Phantom, b: Phantom) -> None:
    assert a.geometry == b.geometry
    assert a.lesions == b.lesions
    for name in ("image", "labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name


def _components(p: Phantom):
    """(slices, mask within the slices grown by one voxel, slices grown) per connected lesion component."""
    lab, _ = ndimage.label(p.lesion_mask)
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        yield lab[grown] == i, grown


# ---- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_phantom():
    _assert_same(make_phantom(7), make_phantom(7))
    _assert_same(make_phantom(phantom_seed(3, 2), **SMALL), make_phantom(phantom_seed(3, 2), **SMALL))


def test_different_seeds_differ():
    a, b = make_phantom(1), make_phantom(2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.labels, b.labels)
    assert a.case_id == "phantom_seed1" and make_phantom(1, case_id="x").case_id == "x"


def test_make_phantoms_ids_seeds_and_prefixes():
    first = list(make_phantoms(3, seed=11, **SMALL))
    assert [p.case_id for p in first] == ["phantom_000", "phantom_001", "phantom_002"]
    for a, b in zip(first, make_phantoms(3, seed=11, **SMALL)):
        _assert_same(a, b)
    _assert_same(first[1], make_phantom(phantom_seed(11, 1), case_id="phantom_001", **SMALL))
    _assert_same(list(make_phantoms(5, seed=11, **SMALL))[2], first[2])  # a prefix is the same cases
    other = next(iter(make_phantoms(1, seed=12, **SMALL)))
    assert not np.array_equal(other.image, first[0].image)
    assert not np.array_equal(first[0].image, first[1].image)
    assert list(make_phantoms(0)) == []
    with pytest.raises(ConformalSegError):
        list(make_phantoms(-1))


def test_anatomy_does_not_depend_on_lesion_options():
    with_lesions = make_phantom(5, n_lesions=3, empty_probability=0.0)
    without = make_phantom(5, n_lesions=0)
    outside = ~with_lesions.lesion_mask
    assert with_lesions.lesion_mask.any() and not without.lesion_mask.any()
    assert np.array_equal(with_lesions.labels[outside], without.labels[outside])


# ---- shapes, dtypes, labels ------------------------------------------------------------------------


def test_label_constants():
    assert LABEL_NAMES == {
        0: "background",
        1: "body",
        2: "lung",
        3: "liver",
        4: "kidney",
        5: "spleen",
        6: "lesion",
        7: "bone",
    }
    assert (BACKGROUND, BODY, LUNG, LIVER, KIDNEY, SPLEEN, LESION, BONE) == tuple(range(8))
    assert set(LESION_HOSTS) == {LUNG, LIVER, KIDNEY, SPLEEN}


def test_shapes_dtypes_geometry_and_label_set(phantoms):
    p = phantoms[0]
    assert isinstance(p.geometry, Geometry)
    assert p.geometry.shape == (48, 96, 96) and p.geometry.spacing == (1.6, 1.6, 3.0)
    assert p.geometry.spacing_zyx == (3.0, 1.6, 1.6)
    for p in phantoms:
        assert p.image.dtype == np.float32 and p.labels.dtype == np.uint8
        assert p.image.shape == p.labels.shape == (48, 96, 96)
        assert np.isfinite(p.image).all() and -1024 <= p.image.min() and p.image.max() <= 3071
        present = set(np.unique(p.labels).tolist())
        assert present <= set(LABEL_NAMES)
        assert {BACKGROUND, BODY, LUNG, LIVER, KIDNEY, SPLEEN, BONE} <= present, p.case_id
        assert (LESION in present) == bool(p.lesions)
        assert sum(info.n_voxels for info in p.lesions) == int(p.lesion_mask.sum())
    # the corners are air, the centre is inside the body
    assert (phantoms[0].labels[:, :2, :2] == BACKGROUND).all()
    assert phantoms[0].labels[24, 48, 48] != BACKGROUND

    custom = make_phantom(0, shape=(24, 48, 56), spacing=(0.7, 0.8, 3.0), n_lesions=2, empty_probability=0.0)
    assert custom.geometry.shape == (24, 48, 56) and custom.geometry.spacing == (0.7, 0.8, 3.0)
    assert custom.image.shape == custom.labels.shape == (24, 48, 56)


def test_anatomical_layout(phantoms):
    """Lungs above the abdominal organs, liver on the patient's right (small x), spleen left,
    kidneys posterior; LPS axes: x to the left, y posterior, z superior."""
    for p in phantoms[:10]:
        com = {lab: np.array(ndimage.center_of_mass(p.labels == lab)) for lab in (LUNG, LIVER, SPLEEN, KIDNEY)}
        z, y, x = 0, 1, 2
        assert com[LUNG][z] > com[LIVER][z] > com[KIDNEY][z]
        assert com[LIVER][x] < 48 < com[SPLEEN][x]
        assert com[KIDNEY][y] > com[LIVER][y]
        kidney_x = np.flatnonzero((p.labels == KIDNEY).any(axis=(0, 1)))
        assert kidney_x.min() < 48 < kidney_x.max()  # two kidneys, one each side


# ---- intensities -----------------------------------------------------------------------------------


def test_hu_ranges_per_label(phantoms):
    medians = {lab: [] for lab in LABEL_NAMES}
    for p in phantoms:
        for lab in LABEL_NAMES:
            if (p.labels == lab).any():
                medians[lab].append(float(np.median(p.image[p.labels == lab])))
    assert max(medians[BACKGROUND]) < -950
    assert max(medians[LUNG]) < -700
    assert 30 < min(medians[LIVER]) and max(medians[LIVER]) < 90
    assert 20 < min(medians[SPLEEN]) and max(medians[SPLEEN]) < 85
    assert 0 < min(medians[KIDNEY]) and max(medians[KIDNEY]) < 90
    assert min(medians[BONE]) > 200
    assert -110 < np.median(medians[BODY]) < 20  # fat, muscle, bowel
    # the contrast phase varies per case and moves the enhancing organs together
    assert np.std(medians[LIVER]) > 5
    assert np.corrcoef(medians[LIVER], medians[SPLEEN])[0, 1] > 0.5
    # noise: air holds only noise; sigma varies per case within 8-20 HU (slightly smoothed)
    air_std = [float(p.image[:, :3, :3].std()) for p in phantoms]
    assert 4 < min(air_std) and max(air_std) < 22 and max(air_std) / min(air_std) > 1.6


def test_lesion_contrast(phantoms):
    hypo, nodules = 0, 0
    for p in phantoms:
        for comp, box in _components(p):
            shell = ndimage.binary_dilation(comp, iterations=2) & ~comp
            around = p.labels[box][shell]
            counts = np.bincount(around, minlength=8)
            host = max(LESION_HOSTS, key=lambda lab: counts[lab])  # the organ it touches most
            core = ndimage.binary_erosion(comp) if comp.sum() > 60 else comp
            lesion_hu = float(np.median(p.image[box][core]))
            host_hu = float(np.median(p.image[p.labels == host]))
            if comp.sum() < 30:
                continue
            if host == LUNG:
                nodules += 1
                assert lesion_hu > -450 and lesion_hu > host_hu + 300  # soft-tissue nodule
            else:
                hypo += 1
                assert lesion_hu < host_hu - 3, (p.case_id, host)  # hypo-dense
    assert hypo >= 10 and nodules >= 3
    contrasts = [i.contrast_hu for p in phantoms for i in p.lesions if i.host != LUNG]
    assert all(-50.5 <= c <= -9.5 for c in contrasts)
    assert min(contrasts) < -40 and max(contrasts) > -20  # some are subtle


# ---- lesions ---------------------------------------------------------------------------------------


def test_lesions_sit_inside_allowed_organs():
    """Lesions are drawn after the anatomy: the lesion-free twin of a seed shows the host organs."""
    for seed in range(8):
        with_lesions = make_phantom(seed, n_lesions=4, empty_probability=0.0, **SMALL)
        twin = make_phantom(seed, n_lesions=0, **SMALL)
        mask = with_lesions.lesion_mask
        assert mask.any()
        assert set(np.unique(twin.labels[mask]).tolist()) <= set(LESION_HOSTS)
        for comp, box in _components(with_lesions):
            hosts = np.unique(twin.labels[box][comp])
            assert len(hosts) == 1  # one lesion lies in one organ
    for seed in range(4):  # default geometry, via the neighbourhood of each lesion
        p = make_phantom(seed, n_lesions=4, empty_probability=0.0)
        for comp, box in _components(p):
            shell = ndimage.binary_dilation(comp) & ~comp
            around = p.labels[box][shell]
            counts = np.bincount(around[around != LESION], minlength=8)
            assert counts.argmax() in LESION_HOSTS and counts.max() >= 0.5 * counts.sum()


def test_lesion_info_matches_the_label_map(phantoms):
    for p in phantoms[:12]:
        lesion_idx = np.argwhere(p.lesion_mask)[:, ::-1]  # (i, j, k)
        lps = lesion_idx * np.array(p.geometry.spacing) + np.array(p.geometry.origin)
        for info in p.lesions:
            assert info.host in LESION_HOSTS
            # the nominal centre (LPS x, y, z mm) lies within its radius of a lesion voxel
            assert np.min(np.linalg.norm(lps - np.array(info.center_mm), axis=1)) <= info.radius_mm + 1.0
            assert (
                MIN_LESION_RADIUS_MM
                <= info.radius_mm
                <= (MAX_NODULE_RADIUS_MM if info.host == LUNG else MAX_LESION_RADIUS_MM)
            )


def test_lesion_sizes_in_mm_respect_anisotropic_spacing(phantoms):
    spacing_zyx = np.array(phantoms[0].geometry.spacing_zyx)
    voxel_mm3 = float(np.prod(spacing_zyx))
    radii, ratios, voxel_ratios = [], [], []
    for p in phantoms:
        for comp, _ in _components(p):
            n = int(comp.sum())
            radii.append((3.0 * n * voxel_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0))
            if n >= 200:  # spread along z versus x, in mm (voxel-size discretisation removed)
                var_vox = np.argwhere(comp).var(axis=0)
                var_mm = var_vox * spacing_zyx**2 - spacing_zyx**2 / 12.0
                ratios.append(math.sqrt(var_mm[0] / var_mm[2]))
                voxel_ratios.append(math.sqrt(var_vox[0] / var_vox[2]))
    radii = np.array(radii)
    assert radii.min() >= 2.0 and radii.max() <= 25.0
    assert np.percentile(radii, 10) < 4.0 and np.percentile(radii, 90) > 9.0  # small and large lesions
    assert len(ratios) >= 10
    # round in mm (x 1.6 mm, z 3.0 mm): a lesion spans about half as many voxels along z as along x
    assert 0.8 < np.median(ratios) < 1.25
    assert 0.4 < np.median(voxel_ratios) < 0.67


def test_empty_probability_and_lesion_count():
    for seed in range(4):
        p = make_phantom(seed, empty_probability=1.0, **SMALL)
        assert not (p.labels == LESION).any() and p.lesions == []
        assert not make_phantom(seed, n_lesions=0, empty_probability=0.0, **SMALL).lesion_mask.any()
    counts = [len(make_phantom(s, n_lesions=2, empty_probability=0.0, **SMALL).lesions) for s in range(6)]
    assert max(counts) == 2 and min(counts) >= 1
    empty = [not make_phantom(s, n_lesions=(1, 1), empty_probability=0.5, **SMALL).lesions for s in range(30)]
    assert 5 <= sum(empty) <= 25


def test_lung_nodules_occur_over_many_seeds(phantoms):
    hosts = [info.host for p in phantoms for info in p.lesions]
    n_lung = hosts.count(LUNG)
    assert 0.1 < n_lung / len(hosts) < 0.5
    assert sum(any(i.host == LUNG for i in p.lesions) for p in phantoms) >= 4
    assert {LIVER, KIDNEY, SPLEEN} <= set(hosts)
    # nodules sit in the upper (thoracic) part, above the liver lesions
    z_lung = np.median([i.center_mm[2] for p in phantoms for i in p.lesions if i.host == LUNG])
    z_liver = np.median([i.center_mm[2] for p in phantoms for i in p.lesions if i.host == LIVER])
    assert z_lung > z_liver


def test_some_lesions_are_hard_some_easy(phantoms):
    sizes = [i.n_voxels for p in phantoms for i in p.lesions]
    assert min(sizes) < 30 and max(sizes) > 1000
    subtle_small = [
        i for p in phantoms for i in p.lesions if i.host != LUNG and i.contrast_hu > -25 and i.n_voxels < 150
    ]
    assert subtle_small


def test_invalid_arguments():
    for kw in (
        {"shape": (8, 64, 64)},
        {"shape": (32, 64)},
        {"spacing": (1.0, 0.0, 2.0)},
        {"empty_probability": 1.5},
        {"n_lesions": -1},
        {"n_lesions": (3, 1)},
        {"n_lesions": 2.5},
    ):
        with pytest.raises(ConformalSegError):
            make_phantom(0, **kw)


def test_dataset_layout_json_and_round_trip(tmp_path):
    out = tmp_path / "Dataset901_Phantom"
    calls = []
    result = write_phantom_dataset(out, 3, seed=4, progress=lambda *a: calls.append(a), **SMALL)
    assert result == out
    assert calls == [(1, 3, "phantom_000"), (2, 3, "phantom_001"), (3, 3, "phantom_002")]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"phantom_00{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"phantom_00{i}.nii.gz" for i in range(3)]

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {
        "background": 0,
        "body": 1,
        "lung": 2,
        "liver": 3,
        "kidney": 4,
        "spleen": 5,
        "lesion": 6,
        "bone": 7,
    }
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"

    for p in make_phantoms(3, seed=4, **SMALL):
        img = sitk.ReadImage(str(out / "imagesTr" / f"{p.case_id}_0000.nii.gz"))
        lab = sitk.ReadImage(str(out / "labelsTr" / f"{p.case_id}.nii.gz"))
        for itk in (img, lab):
            assert itk.GetSize() == tuple(reversed(p.geometry.shape))  # ITK (x, y, z)
            assert np.allclose(itk.GetSpacing(), p.geometry.spacing)
            assert np.allclose(itk.GetOrigin(), p.geometry.origin, atol=1e-4)
            assert np.allclose(itk.GetDirection(), p.geometry.direction)
        assert lab.GetPixelID() == sitk.sitkUInt8 and img.GetPixelID() == sitk.sitkInt16
        assert np.array_equal(sitk.GetArrayFromImage(lab), p.labels)
        assert np.abs(sitk.GetArrayFromImage(img) - p.image).max() <= 0.5 + 1e-3


def test_dataset_float32_images(tmp_path):
    write_phantom_dataset(tmp_path, 1, seed=2, image_dtype="float32", **SMALL)
    (p,) = make_phantoms(1, seed=2, **SMALL)
    img = sitk.ReadImage(str(tmp_path / "imagesTr" / "phantom_000_0000.nii.gz"))
    assert img.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(img), p.image)


def test_dataset_refuses_to_overwrite(tmp_path):
    write_phantom_dataset(tmp_path, 2, seed=0, **SMALL)
    label_file = tmp_path / "labelsTr" / "phantom_001.nii.gz"
    before = label_file.read_bytes()
    with pytest.raises(ConformalSegError, match="--force"):
        write_phantom_dataset(tmp_path, 2, seed=1, **SMALL)
    assert label_file.read_bytes() == before
    # nothing is written when any output exists, and no temporary files are left behind
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "dataset.json").write_text("{}")
    with pytest.raises(ConformalSegError, match="already exists"):
        write_phantom_dataset(fresh, 2, seed=1, **SMALL)
    assert sorted(p.name for p in fresh.iterdir()) == ["dataset.json"]
    # force overwrites
    write_phantom_dataset(tmp_path, 2, seed=1, force=True, **SMALL)
    assert label_file.read_bytes() != before
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 2
    with pytest.raises(ConformalSegError):
        write_phantom_dataset(tmp_path / "x", 1, image_dtype="uint8")
