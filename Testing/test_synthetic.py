"""Tests of ConformalSegLib.phantoms.simulated_maps: the deterministic synthetic calibration cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.phantoms.simulated_maps import SyntheticCase, case_seed, make_case, make_cases

N_STATS = 40


@pytest.fixture(scope="module")
def cases() -> list[SyntheticCase]:
    return list(make_cases(N_STATS, seed=0))


def _fnr_dice(case: SyntheticCase, threshold: float = 0.5) -> tuple[float, float]:
    pred = case.probability >= threshold
    n_lesion = int(case.lesion.sum())
    tp = int((pred & case.lesion).sum())
    return 1.0 - tp / n_lesion, 2.0 * tp / (int(pred.sum()) + n_lesion)


def _assert_same(a: SyntheticCase, b: SyntheticCase) -> None:
    assert a.geometry == b.geometry
    for name in ("image", "probability", "lesion", "organ"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name  # bit-identical


def _lesion_extents(case_list: list[SyntheticCase]) -> np.ndarray:
    """Voxel extents (z, y, x) of every connected lesion component."""
    extents = []
    for case in case_list:
        labels, _ = ndimage.label(case.lesion)
        for box in ndimage.find_objects(labels):
            extents.append([s.stop - s.start for s in box])
    return np.array(extents, dtype=float)


# ---- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_case():
    _assert_same(make_case(123), make_case(123))
    _assert_same(
        make_case(5, empty_probability=0.5, shape=(24, 40, 48)), make_case(5, empty_probability=0.5, shape=(24, 40, 48))
    )


def test_different_seeds_differ():
    a, b = make_case(1), make_case(2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.probability, b.probability)
    assert not np.array_equal(a.lesion, b.lesion)


def test_make_cases_ids_seeds_and_reproducibility():
    first = list(make_cases(3, seed=11))
    again = list(make_cases(3, seed=11))
    assert [c.case_id for c in first] == ["synth_000", "synth_001", "synth_002"]
    for a, b in zip(first, again):
        _assert_same(a, b)
    # case i is make_case(case_seed(seed, i)), and case seeds are distinct across cases and seeds
    _assert_same(first[1], make_case(case_seed(11, 1)))
    seeds = {case_seed(s, i) for s in range(5) for i in range(50)}
    assert len(seeds) == 250
    other = next(iter(make_cases(1, seed=12)))
    assert not np.array_equal(other.image, first[0].image)
    # a prefix of a longer run is the same cases
    _assert_same(list(make_cases(5, seed=11))[2], first[2])
    assert list(make_cases(0)) == []


def test_make_cases_forwards_keywords():
    (case,) = make_cases(1, seed=3, shape=(20, 32, 36), spacing=(1.0, 1.2, 3.0), empty_probability=1.0)
    assert case.image.shape == (20, 32, 36)
    assert case.geometry.spacing == (1.0, 1.2, 3.0)
    assert not case.lesion.any()


# ---- shapes, dtypes, ranges ------------------------------------------------------------------------


def test_shapes_dtypes_and_geometry():
    case = make_case(0)
    assert isinstance(case.geometry, Geometry)
    assert case.geometry.shape == (40, 64, 64)
    assert case.geometry.spacing == (0.9, 0.9, 2.5)  # ITK (x, y, z) order, as given
    assert case.geometry.spacing_zyx == (2.5, 0.9, 0.9)
    assert case.image.dtype == np.float32 and case.probability.dtype == np.float32
    assert case.lesion.dtype == np.bool_ and case.organ.dtype == np.bool_
    for arr in (case.image, case.probability, case.lesion, case.organ):
        assert arr.shape == (40, 64, 64)

    custom = make_case(0, shape=(24, 48, 56), spacing=(0.7, 0.8, 3.0))
    assert custom.geometry.shape == (24, 48, 56)
    assert custom.geometry.spacing == (0.7, 0.8, 3.0)
    for arr in (custom.image, custom.probability, custom.lesion, custom.organ):
        assert arr.shape == (24, 48, 56)


def test_value_ranges_and_ct_like_intensities(cases):
    for case in cases[:10]:
        assert np.isfinite(case.image).all() and np.isfinite(case.probability).all()
        assert case.probability.min() >= 0.0 and case.probability.max() <= 1.0
        assert case.image.min() < -900  # air outside the body
        assert case.image.max() < 400  # no bone / metal
        organ_only = case.organ & ~ndimage.binary_dilation(case.lesion, iterations=2)
        organ_core = ndimage.binary_erosion(organ_only, iterations=2)
        organ_hu = float(case.image[organ_core].mean())
        assert 45.0 < organ_hu < 75.0
        lesion_core = ndimage.binary_erosion(case.lesion)
        lesion_hu = float(case.image[lesion_core].mean())
        assert 5.0 < organ_hu - lesion_hu < 45.0  # hypo-dense
        assert case.image[case.organ].min() > -500  # the organ is inside the body, not in air
        assert case.organ.sum() > 0.1 * case.organ.size


def test_lesions_inside_organ_and_count(cases):
    for case in cases:
        assert case.lesion.any()  # empty_probability defaults to 0
        assert not (case.lesion & ~case.organ).any()
        _, n = ndimage.label(case.lesion)
        assert 1 <= n <= 3


def test_lesion_physical_sizes(cases):
    spacing = np.array(cases[0].geometry.spacing_zyx)
    radii = []
    for case in cases:
        labels, n = ndimage.label(case.lesion)
        sizes = np.bincount(labels.ravel())[1:]
        radii.extend((3.0 * sizes * spacing.prod() / (4.0 * math.pi)) ** (1.0 / 3.0))
    radii = np.array(radii)
    assert radii.min() > 2.5 and radii.max() < 26.0
    assert radii.max() / radii.min() > 1.8  # varied sizes


def test_empty_probability():
    empty = list(make_cases(6, seed=4, empty_probability=1.0))
    assert all(not c.lesion.any() for c in empty)
    assert all(c.organ.any() for c in empty)
    full = list(make_cases(6, seed=4, empty_probability=0.0))
    assert all(c.lesion.any() for c in full)
    some = [make_case(case_seed(9, i), empty_probability=0.5).lesion.any() for i in range(20)]
    assert 3 <= sum(some) <= 17


# ---- the imitated network output -----------------------------------------------------------------


def test_fnr_and_dice_statistics(cases):
    stats = np.array([_fnr_dice(c) for c in cases])
    fnr, dice = stats[:, 0], stats[:, 1]
    assert fnr.std() > 0.05  # per-case miscalibration ...
    assert fnr.std() > 0.12  # ... from a per-case bias, not only from lesion sizes and noise (~0.10)
    assert 0.15 <= fnr.mean() <= 0.45
    assert fnr.max() - fnr.min() > 0.3
    assert 0.6 <= dice.mean() <= 0.9
    # the model is useful: most lesion voxels of most cases are found at some threshold
    assert np.median([c.probability[c.lesion].mean() for c in cases]) > 0.4


def test_lesion_probabilities_are_spread(cases):
    uncertain = [float(((c.probability[c.lesion] > 0.1) & (c.probability[c.lesion] < 0.9)).mean()) for c in cases]
    assert np.median(uncertain) > 0.3
    # per-case logit scale: some cases are over-confident (few uncertain voxels), some under-confident
    assert np.quantile(uncertain, 0.1) < 0.5 and np.quantile(uncertain, 0.9) > 0.8
    assert np.std(uncertain) > 0.15
    # and background far from lesions is confidently negative
    for case in cases[:10]:
        far = ~ndimage.binary_dilation(case.lesion, iterations=8)
        assert np.median(case.probability[far]) < 0.05


def test_probability_is_spatially_smooth_and_informative(cases):
    case = cases[0]
    p = case.probability
    # neighbouring in-plane voxels are strongly correlated (smooth logits, not white noise)
    assert np.corrcoef(p[:, :, 1:].ravel(), p[:, :, :-1].ravel())[0, 1] > 0.9
    # probability is much higher inside lesions than in the rest of the organ
    for c in cases[:10]:
        assert c.probability[c.lesion].mean() > 3 * c.probability[c.organ & ~c.lesion].mean()


# ---- anisotropic spacing -------------------------------------------------------------------------


def test_lesion_sizes_are_physical_for_anisotropic_spacing(cases):
    extents = _lesion_extents(cases).mean(axis=0)  # (z, y, x) voxels, spacing z 2.5 mm, x 0.9 mm
    assert extents[0] < 0.6 * extents[2]
    physical = extents * np.array(cases[0].geometry.spacing_zyx)
    assert 0.6 < physical[0] / physical[2] < 1.7

    iso = list(make_cases(12, seed=0, spacing=(1.0, 1.0, 1.0)))
    iso_extents = _lesion_extents(iso).mean(axis=0)
    assert 0.6 < iso_extents[0] / iso_extents[2] < 1.6

    # spacing is read in ITK (x, y, z) order: thick "x" voxels shrink the x extent instead
    swapped = list(make_cases(12, seed=0, shape=(64, 64, 40), spacing=(2.5, 0.9, 0.9)))
    sw_extents = _lesion_extents(swapped).mean(axis=0)
    assert sw_extents[2] < 0.6 * sw_extents[0]


# ---- input validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (40, 64)},
        {"shape": (4, 64, 64)},
        {"spacing": (0.9, 0.0, 2.5)},
        {"spacing": (0.9, float("nan"), 2.5)},
        {"empty_probability": 1.5},
        {"empty_probability": -0.1},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ConformalSegError):
        make_case(0, **kwargs)


def test_invalid_case_count_raises():
    with pytest.raises(ConformalSegError):
        list(make_cases(-1))
