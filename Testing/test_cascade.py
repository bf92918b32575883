"""Tests of ConformalSegLib.cascade: the component filters on hand-built volumes with known answers,
the lung masks on phantoms, ROI crop/paste, the outside-ROI rule, the config file, the end-to-end
cascade with tiny real networks built through model cards, and the evaluation tables.
The statistical validity of cascade + CLS is in test_cascade_validity.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from ConformalSegLib.cascade import (
    CascadeCancelled,
    CascadeConfig,
    CascadeConfigError,
    StageOutput,
    classical_lung_mask,
    crop_geometry,
    filter_lung_overlap,
    filter_min_volume,
    label_components,
    load_cascade_config,
    lung_distances_mm,
    lung_mask_from_labels,
    lung_overlap_fractions,
    margin_voxels,
    merge_components,
    paste_max,
    roi_box,
    run_cascade,
    select_components,
    top_k,
)
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.evaluation.metrics import dice_from_masks
from ConformalSegLib.io.volumes import Volume


def ids(labels: np.ndarray) -> set[int]:
    return set(np.unique(labels).tolist()) - {0}


# ----------------------------------------------------------------------------- merging


def test_merge_by_dilation_isotropic():
    mask = np.zeros((5, 5, 20), dtype=bool)
    mask[1:4, 1:4, 2:5] = True  # closest voxel centres x=4 and x=8: 4 mm apart, 3 empty voxels between
    mask[1:4, 1:4, 8:11] = True
    for radius, expected in ((0.0, 2), (1.0, 2), (1.9, 2), (2.0, 1), (5.0, 1)):
        labels, n = merge_components(mask, (1.0, 1.0, 1.0), radius)
        assert n == expected, radius
        assert np.array_equal(labels > 0, mask)  # the mask is not grown, only regrouped
    labels, n = label_components(mask)
    assert n == 2 and labels[2, 2, 3] == 1 and labels[2, 2, 9] == 2


def test_merge_radius_is_in_mm_on_anisotropic_grids():
    spacing = (3.0, 1.0, 1.0)  # z, y, x (mm)
    mask = np.zeros((9, 20, 20), dtype=bool)
    mask[0:2, 0:3, 2:5] = mask[0:2, 0:3, 6:9] = True  # one empty voxel along x: centres 2 mm apart
    mask[0:2, 12:15, 2:5] = mask[3:5, 12:15, 2:5] = True  # one empty slice along z: centres 6 mm apart
    assert label_components(mask)[1] == 4
    assert merge_components(mask, spacing, 1.0)[1] == 3  # reaches 1 voxel in x, none in z
    assert merge_components(mask, spacing, 3.0)[1] == 2  # reaches 1 slice in z
    # the same fragments on an isotropic 1 mm grid merge at 1 mm in both directions
    assert merge_components(mask, (1.0, 1.0, 1.0), 1.0)[1] == 2


# ----------------------------------------------------------------------------- minimum size and Top-K


def test_min_volume_uses_mm3():
    labels = np.zeros((4, 6, 20), dtype=np.int32)
    labels[0:2, 0:1, 0:5] = 1  # 10 voxels
    labels[0:2, 3:5, 10:15] = 2  # 20 voxels
    spacing = (2.0, 1.0, 1.0)  # 2 mm³ per voxel: 20 and 40 mm³
    assert ids(filter_min_volume(labels, spacing, 20.0)) == {1, 2}  # >= keeps the boundary
    assert ids(filter_min_volume(labels, spacing, 20.5)) == {2}
    assert ids(filter_min_volume(labels, (1.0, 1.0, 1.0), 20.5)) == set()  # 10 and 20 mm³ there


def test_top_k_by_volume_with_position_tie_break():
    labels = np.zeros((4, 4, 16), dtype=np.int32)
    labels[0:2, 0:2, 0:2] = 5  # 8 voxels, first voxel (0, 0, 0)
    labels[0:2, 0:2, 4:6] = 2  # 8 voxels, first voxel (0, 0, 4): loses the tie despite the lower id
    labels[0:1, 0:2, 8:10] = 7  # 4 voxels
    assert ids(top_k(labels, 1)) == {5}
    assert ids(top_k(labels, 2)) == {5, 2}
    assert ids(top_k(labels, 3)) == ids(top_k(labels, None)) == {2, 5, 7}
    labels[2:4, 2:4, 12:16] = 9  # 16 voxels, last in position: larger wins
    assert ids(top_k(labels, 1)) == {9}
    assert np.array_equal(top_k(labels, 1) > 0, labels == 9)
    with pytest.raises(ConformalSegError):
        top_k(labels, 0)


# ----------------------------------------------------------------------------- lung overlap and rescue


@pytest.fixture
def lung_scene():
    """Five components against a lung occupying x < 20, spacing (2, 1, 0.5) mm -> 1 mm³ voxels."""
    labels = np.zeros((10, 20, 40), dtype=np.int32)
    labels[1:3, 1:3, 2:7] = 1  # inside: overlap 1
    labels[5:7, 1:3, 16:21] = 2  # 4 of 5 columns inside: overlap exactly 0.8
    labels[1:3, 6:8, 18:22] = 3  # overlap 0.5, touches the lung: distance 0
    labels[5:7, 6:8, 24:26] = 4  # outside; nearest lung voxel x=19: 5 voxels * 0.5 mm = 2.5 mm; 8 mm³
    labels[1:3, 12:14, 36:40] = 5  # outside, 17 voxels * 0.5 mm = 8.5 mm
    lung = np.zeros(labels.shape, dtype=bool)
    lung[:, :, :20] = True
    return labels, lung, (2.0, 1.0, 0.5)


def test_lung_overlap_and_distance_values(lung_scene):
    labels, lung, spacing = lung_scene
    assert lung_overlap_fractions(labels, lung) == {1: 1.0, 2: 0.8, 3: 0.5, 4: 0.0, 5: 0.0}
    distances = lung_distances_mm(labels, lung, spacing)
    assert distances == pytest.approx({1: 0.0, 2: 0.0, 3: 0.0, 4: 2.5, 5: 8.5})
    assert lung_distances_mm(labels, np.zeros_like(lung), spacing)[1] == float("inf")


def test_lung_overlap_filter_and_rescue(lung_scene):
    labels, lung, spacing = lung_scene
    assert ids(filter_lung_overlap(labels, lung, spacing)) == {1, 2}  # >= 0.8, no rescue
    assert ids(filter_lung_overlap(labels, lung, spacing, min_overlap=0.5)) == {1, 2, 3}
    rescue = dict(rescue_distance_mm=2.5, rescue_min_volume_mm3=8.0)
    assert ids(filter_lung_overlap(labels, lung, spacing, **rescue)) == {1, 2, 3, 4}
    assert ids(filter_lung_overlap(labels, lung, spacing, rescue_distance_mm=2.4, rescue_min_volume_mm3=8.0)) == {
        1,
        2,
        3,
    }
    assert ids(filter_lung_overlap(labels, lung, spacing, rescue_distance_mm=2.5, rescue_min_volume_mm3=8.5)) == {
        1,
        2,
        3,
    }  # 3 is 16 mm³, 4 only 8 mm³
    assert ids(filter_lung_overlap(labels, lung, spacing, rescue_distance_mm=10.0, rescue_min_volume_mm3=0.0)) == {
        1,
        2,
        3,
        4,
        5,
    }
    assert ids(filter_lung_overlap(labels, lung, spacing, rescue_distance_mm=10.0, rescue_min_volume_mm3=16.0)) == {
        1,
        2,
        3,
        5,
    }
    before = labels.copy()
    filter_lung_overlap(labels, lung, spacing, **rescue)
    assert np.array_equal(labels, before)  # pure


def test_select_components_table(lung_scene):
    labels, lung, spacing = lung_scene
    kept, table = select_components(
        labels > 0,
        spacing,
        lung=lung,
        min_volume_mm3=10.0,
        min_lung_overlap=0.8,
        rescue_distance_mm=3.0,
        rescue_min_volume_mm3=0.0,
        k=2,
    )
    status = {c.id: c.status for c in table}
    # ids after merging follow the first voxel in C order: 1, 3, 5 start at z=1; 2, 4 at z=5
    assert [c.n_voxels for c in table] == [20, 16, 16, 20, 8]
    # 1 inside, 2 half in (rescued, then the smallest of three), 3 8.5 mm away, 4 at 0.8, 5 only 8 mm³
    assert status == {1: "kept", 2: "not_top_k", 3: "outside_lung", 4: "kept", 5: "too_small"}
    assert ids(kept) == {1, 4} and [c.kept for c in table] == [True, False, False, True, False]
    assert table[1].lung_overlap == 0.5 and table[2].lung_distance_mm == pytest.approx(8.5)
    _, table = select_components(
        labels > 0,
        spacing,
        lung=lung,
        min_volume_mm3=10.0,
        min_lung_overlap=0.8,
        rescue_distance_mm=3.0,
        rescue_min_volume_mm3=0.0,
        k=None,
    )
    assert table[1].status == "rescued" and table[1].kept
    assert table[0].bbox == ((1, 3), (1, 3), (2, 7)) and table[0].volume_mm3 == 20.0
    # everything off: all candidates kept
    kept, table = select_components(labels > 0, spacing, min_lung_overlap=None)
    assert len(ids(kept)) == 5 and all(c.status == "kept" for c in table)


# ----------------------------------------------------------------------------- lungs


def test_classical_lung_mask_matches_phantom_lungs():
    from ConformalSegLib.phantoms.generator import make_phantom
    from ConformalSegLib.phantoms.labels import LUNG

    for seed in (0, 1, 2):
        phantom = make_phantom(seed)
        mask = classical_lung_mask(phantom.image, phantom.geometry.spacing_zyx)
        filled = lung_mask_from_labels(phantom.labels, [LUNG])  # lung label with enclosed nodules/vessels
        assert dice_from_masks(mask, filled) > 0.97
        assert dice_from_masks(mask, phantom.labels == LUNG) > 0.93
    assert not classical_lung_mask(np.full((20, 30, 30), 40.0), (3.0, 1.0, 1.0)).any()  # no air, no lung


def test_lung_mask_from_labels_fills_enclosed_nodules():
    labels = np.zeros((6, 12, 12), dtype=np.uint8)
    labels[1:5, 2:10, 2:10] = 2
    labels[2:4, 5:7, 5:7] = 6  # nodule enclosed by lung
    assert lung_mask_from_labels(labels, [2])[2, 5, 5]
    assert not lung_mask_from_labels(labels, [2], fill_holes=False)[2, 5, 5]
    with pytest.raises(ConformalSegError, match="no voxel"):
        lung_mask_from_labels(labels, [9])


# ----------------------------------------------------------------------------- ROIs


def test_margin_in_voxels_and_mm():
    assert margin_voxels((3.0, 1.6, 1.6), voxels=16) == (16, 16, 16)
    assert margin_voxels((3.0, 1.6, 1.6), mm=3.2) == (2, 2, 2)
    assert margin_voxels((3.0, 1.6, 1.6), mm=4.0) == (2, 3, 3)
    for bad in (dict(), dict(voxels=1, mm=1.0), dict(voxels=-1)):
        with pytest.raises(ConformalSegError):
            margin_voxels((1.0, 1.0, 1.0), **bad)


def test_roi_crop_paste_round_trip_at_borders():
    rng = np.random.default_rng(0)
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry(shape=(10, 12, 14), spacing=(0.7, 0.9, 2.5), origin=(5.0, -3.0, 11.0), direction=direction)
    image = rng.random(geometry.shape).astype(np.float32)
    for bbox, margin in (
        (((0, 2), (10, 12), (3, 5)), (16, 16, 16)),
        (((4, 6), (5, 7), (12, 14)), (1, 2, 3)),
        (((0, 10), (0, 12), (0, 14)), (0, 0, 0)),
    ):
        box = roi_box(bbox, margin, geometry.shape)
        for s, (a, b), m, n in zip(box, bbox, margin, geometry.shape):
            assert s.start == max(a - m, 0) and s.stop == min(b + m, n)
        crop = image[box]
        pasted = np.zeros_like(image)
        paste_max(pasted, crop, box)
        assert np.array_equal(pasted[box], crop) and not pasted[~_box_mask(box, image.shape)].any()
        # the crop's geometry puts its first voxel at the same physical point
        sub = crop_geometry(geometry, box)
        first = geometry.ijk_to_lps() @ np.array([box[2].start, box[1].start, box[0].start, 1.0])
        assert sub.shape == crop.shape and np.allclose(sub.ijk_to_lps()[:3, 3], first[:3])
        last = np.array([s.stop - 1 for s in box])[::-1]
        assert np.allclose(
            sub.ijk_to_lps() @ np.append(last - [box[2].start, box[1].start, box[0].start], 1),
            geometry.ijk_to_lps() @ np.append(last, 1),
        )


def _box_mask(box, shape):
    out = np.zeros(shape, dtype=bool)
    out[box] = True
    return out


# ----------------------------------------------------------------------------- the outside-ROI rule


def _blobs_scene():
    geometry = Geometry(shape=(12, 20, 30), spacing=(1.0, 1.0, 2.0))
    coarse = np.zeros(geometry.shape, dtype=np.float32)
    coarse[3:6, 3:6, 3:6] = 0.9  # 27 voxels
    coarse[3:5, 3:5, 20:22] = 0.8  # 8 voxels
    coarse[8:10, 14:16, 12:14] = 0.3  # below the threshold: never a component
    return Volume(np.zeros(geometry.shape, dtype=np.float32), geometry, None), coarse


def _constant(value):
    return lambda volume, mc: StageOutput(
        np.full(volume.geometry.shape, value, dtype=np.float32),
        np.full(volume.geometry.shape, 0.01, dtype=np.float32) if mc else None,
    )


def test_outside_roi_rule_zero_and_scaled():
    volume, coarse = _blobs_scene()
    stage1 = lambda v, mc: StageOutput(coarse)  # noqa: E731
    config = CascadeConfig(lung_source="none", merge_radius_mm=0.0, top_k=None, roi_margin_voxels=1)
    result = run_cascade(volume, config, stage1, _constant(0.7))
    roi = result.roi_mask()
    assert set(result.roi_boxes) == {1, 2}
    assert result.roi_boxes[1] == (slice(2, 7), slice(2, 7), slice(2, 7))
    assert np.all(result.probability[roi] == np.float32(0.7)) and not result.probability[~roi].any()
    assert result.variance is None and result.probability.dtype == np.float32
    scaled = run_cascade(volume, config.replace(outside_roi_scale=0.5), stage1, _constant(0.7))
    assert np.array_equal(scaled.probability[roi], result.probability[roi])
    assert np.array_equal(scaled.probability[~roi], (np.float32(0.5) * coarse)[~roi])
    top1 = run_cascade(volume, config.replace(top_k=1, stage2_mc_passes=3), stage1, _constant(0.7))
    assert set(top1.roi_boxes) == {1} and not top1.probability[3:5, 3:5, 20:22].any()
    assert np.all(top1.variance[top1.roi_mask()] == np.float32(0.01)) and not top1.variance[~top1.roi_mask()].any()
    none_kept = run_cascade(volume, config.replace(stage1_threshold=0.95), stage1, _constant(0.7))
    assert not none_kept.roi_boxes and not none_kept.probability.any()


def test_overlapping_rois_take_the_maximum():
    volume, coarse = _blobs_scene()
    coarse[3:5, 3:5, 9:11] = 0.8  # a third blob close enough for 3-voxel margins to overlap the first ROI

    def by_position(crop: Volume, mc: int) -> StageOutput:  # ROI-specific constant: larger for later x origin
        x0 = crop.geometry.origin[0]
        return StageOutput(np.full(crop.geometry.shape, 0.1 + x0 / 100.0, dtype=np.float32))

    config = CascadeConfig(lung_source="none", merge_radius_mm=0.0, top_k=None, roi_margin_voxels=3)
    result = run_cascade(volume, config, lambda v, mc: StageOutput(coarse), by_position)
    box_a, box_b = result.roi_boxes[1], result.roi_boxes[2]  # ids follow the first voxel: blob at x 9:11 is 2
    assert box_a[2] == slice(0, 9) and box_b[2] == slice(6, 14)
    overlap = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box_a, box_b))
    assert np.all(result.probability[overlap] == np.float32(0.1 + 6.0 / 100.0))  # box b starts at x = 6 * 1 mm
    only_a = _box_mask(box_a, coarse.shape) & ~_box_mask(box_b, coarse.shape)
    assert np.all(result.probability[only_a] == np.float32(0.1))


def test_cascade_checks_predictor_output_and_lung_inputs():
    volume, coarse = _blobs_scene()
    config = CascadeConfig(lung_source="none", top_k=None)
    with pytest.raises(ConformalSegError, match="shape"):
        run_cascade(volume, config, lambda v, mc: StageOutput(coarse[:5]))
    with pytest.raises(ConformalSegError, match=r"outside \[0, 1\]"):
        run_cascade(volume, config, lambda v, mc: StageOutput(coarse * 2))
    with pytest.raises(ConformalSegError, match="no variance"):
        run_cascade(
            volume,
            config.replace(stage2_mc_passes=2),
            lambda v, mc: StageOutput(coarse),
            lambda v, mc: StageOutput(np.zeros(v.geometry.shape, np.float32)),
        )
    with pytest.raises(ConformalSegError, match="no lung label map"):
        run_cascade(volume, CascadeConfig(lung_source="labels"), lambda v, mc: StageOutput(coarse))


def test_lung_filter_inside_the_cascade():
    volume, coarse = _blobs_scene()
    lung = np.zeros(volume.geometry.shape, dtype=np.uint8)
    lung[:, :, 15:] = 2  # the second blob is in the lung, the first far outside
    config = CascadeConfig(
        lung_source="labels", lung_fill_holes=False, merge_radius_mm=0.0, top_k=None, rescue_distance_mm=None
    )
    result = run_cascade(volume, config, lambda v, mc: StageOutput(coarse), _constant(0.6), lung_labels=lung)
    assert [c.status for c in result.components] == ["outside_lung", "kept"]
    assert set(result.roi_boxes) == {2}


# ----------------------------------------------------------------------------- config


def test_config_json_round_trip_and_fingerprint(tmp_path):
    config = CascadeConfig(
        stage1_model="coarse.json",
        stage2_model="roi.json",
        top_k=2,
        roi_margin_voxels=None,
        roi_margin_mm=20.0,
        stage2_mc_passes=5,
    )
    path = config.save(tmp_path / "cascade.json")
    loaded = load_cascade_config(path)
    assert loaded == config and loaded.fingerprint() == config.fingerprint() and len(config.fingerprint()) == 64
    assert loaded.model_path(1) == tmp_path / "coarse.json" and loaded.model_path(2) == tmp_path / "roi.json"
    assert config.replace(top_k=1).fingerprint() != config.fingerprint()
    minimal = tmp_path / "minimal.json"
    minimal.write_text(json.dumps({"format": "conformalseg-cascade", "format_version": 1}))
    assert load_cascade_config(minimal) == CascadeConfig()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"top_kk": 1}, "did you mean 'top_k'"),
        ({"top_k": 0}, "'top_k' must be an integer >= 1"),
        ({"min_lung_overlap": 1.5}, "'min_lung_overlap' must be <= 1.0"),
        ({"roi_margin_mm": 5.0}, "exactly one of 'roi_margin_voxels' and 'roi_margin_mm'"),
        ({"lung_source": "hu2"}, "did you mean 'hu'"),
        ({"stage2_mc_passes": 1}, "'stage2_mc_passes' must be 0"),
        ({"lung_labels": []}, "'lung_labels'"),
        ({"format_version": 2}, "unsupported format_version"),
    ],
)
def test_invalid_configs_name_the_file_and_the_fix(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "conformalseg-cascade", "format_version": 1, **change}))
    with pytest.raises(CascadeConfigError, match=message) as info:
        load_cascade_config(path)
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(CascadeConfigError, match="not found"):
        load_cascade_config(tmp_path / "missing.json")
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    with pytest.raises(CascadeConfigError, match="not valid JSON"):
        load_cascade_config(bad)


# ----------------------------------------------------------------------------- end to end with real networks


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    from monai.networks.nets import UNet

    from Testing.test_inference import UNET_ARGS, card_dict, write_json

    root = tmp_path_factory.mktemp("cascade_models")
    torch.manual_seed(7)
    torch.save(UNet(**UNET_ARGS).state_dict(), root / "weights.pt")
    return write_json(
        root / "model_card.json",
        card_dict({"state_dict": {"network": "UNet", "args": UNET_ARGS, "weights": "weights.pt"}}),
    )


def test_end_to_end_with_model_cards(tiny_card):
    from ConformalSegLib.inference import InferenceEngine
    from Testing.test_inference import ct_volume

    volume = ct_volume(Geometry(shape=(20, 24, 22), spacing=(1.2, 1.0, 2.0)), seed=5)
    coarse_engine = InferenceEngine(tiny_card, device="cpu")
    refine_engine = InferenceEngine(tiny_card, device="cpu", seed=3)
    coarse = coarse_engine.predict(volume).probability
    threshold = float(np.quantile(coarse, 0.97))  # random weights: keep the top 3 % as candidates
    config = CascadeConfig(
        stage1_threshold=threshold,
        lung_source="none",
        top_k=2,
        roi_margin_voxels=2,
        stage2_mc_passes=3,
        merge_radius_mm=1.0,
    )
    calls = []
    result = run_cascade(volume, config, coarse_engine, refine_engine, progress=lambda d, t, s: calls.append((d, t)))
    assert np.array_equal(result.coarse_probability, coarse)
    roi = result.roi_mask()
    assert 1 <= len(result.roi_boxes) <= 2 and roi.any() and not roi.all()
    assert not result.probability[~roi].any() and not result.variance[~roi].any()
    assert result.variance[roi].max() > 0 and result.probability[roi].max() > 0
    # each ROI holds what the refining engine predicts on that crop alone (max where ROIs overlap)
    for box in result.roi_boxes.values():
        crop = Volume(volume.array[box], crop_geometry(volume.geometry, box), None)
        alone = refine_engine.predict(crop, mc_dropout=3)
        assert np.all(result.probability[box] >= alone.probability)
    assert calls[-1] == (len(result.roi_boxes) + 2,) * 2
    rows = result.table()
    assert sum(r["kept"] for r in rows) == len(result.roi_boxes) and all(
        (r["roi"] is not None) == r["kept"] for r in rows
    )
    json.dumps(rows)  # JSON-ready
    again = run_cascade(volume, config, coarse_engine, refine_engine)
    assert np.array_equal(again.probability, result.probability)  # seeded MC dropout: reproducible
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CascadeCancelled):
        run_cascade(volume, config, coarse_engine, refine_engine, cancel=cancel)


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_tables_on_phantom_lung_cases(tmp_path):
    from ConformalSegLib.cascade.evaluation import (
        correlation,
        evaluate_cascade,
        hu_refiner,
        lung_lesion_mask,
        phantom_lung_cases,
        simulated_coarse_predictor,
        write_report,
    )
    from ConformalSegLib.phantoms.generator import make_phantom
    from ConformalSegLib.phantoms.labels import LESION

    phantom = make_phantom(0)  # lesions in lung and kidney (see Phantom.lesions)
    hosts = sorted({lesion.host for lesion in phantom.lesions})
    lung_part = lung_lesion_mask(phantom.labels)
    assert hosts == [2, 4] and lung_part.any() and (phantom.labels == LESION)[~lung_part].any()
    cases = phantom_lung_cases(6, seed=0)
    assert 2 <= len(cases) <= 6 and all(c.truth.any() for c in cases)
    report = evaluate_cascade(cases, stage1=simulated_coarse_predictor, stage2=hu_refiner())
    assert set(report["summary"]) == {"baseline", "top1_roi0", "top1_roi16", "top2_roi0", "all_roi0"}
    assert all(0 <= s["dice"] <= 1 for s in report["summary"].values())
    by_labels = evaluate_cascade(
        cases[:1],
        stage1=simulated_coarse_predictor,
        stage2=hu_refiner(),
        configs={"top1_roi0": CascadeConfig()},
        lung_from_labels=True,
    )
    assert by_labels["configs"]["top1_roi0"]["lung_source"] == "labels"
    assert by_labels["lung_mask"] == "phantom labels" and report["configs"]["top1_roi0"]["lung_source"] == "hu"
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["n_cases"] == len(cases) and "Table III" in md_path.read_text()
    c = correlation([1, 2, 3, 4], [2, 4, 6, 9])
    assert c["pearson_r"] > 0.98 and c["spearman_rho"] == pytest.approx(1.0) and c["n"] == 4
    assert np.isnan(correlation([1, 1, 1], [1, 2, 3])["pearson_r"])


# ----------------------------------------------------------------------------- CLI options


def test_cli_cascade_options_build_an_engine_like_predictor(tiny_card, tmp_path):
    import argparse

    from ConformalSegLib.cli.cascade_options import add_cascade_argument, cascade_predictor_from_args
    from ConformalSegLib.inference import resolve_model
    from ConformalSegLib.io.volumes import save_volume
    from Testing.test_inference import ct_volume

    parser = argparse.ArgumentParser()
    add_cascade_argument(parser)
    parser.add_argument("--model", type=Path, default=None)
    assert cascade_predictor_from_args(parser.parse_args([])) is None
    config = CascadeConfig(
        stage1_model=str(tiny_card), stage1_threshold=0.5, lung_source="none", top_k=1, stage2_mc_passes=2
    )
    config_path = config.save(tmp_path / "cascade.json")
    args = parser.parse_args(["--cascade", str(config_path)])
    args.device = "cpu"
    predictor = cascade_predictor_from_args(args)
    volume = ct_volume(Geometry(shape=(16, 18, 16), spacing=(1.0, 1.0, 2.0)), seed=2)
    prediction = predictor.predict(volume)  # engine-compatible
    result = predictor(volume)
    assert np.array_equal(prediction.probability, result.probability) and prediction.mc_passes == 2
    assert prediction.info["cascade"] == result.table()
    single = resolve_model(tiny_card).pipeline_sha256()
    assert predictor.card.pipeline_sha256() not in (single, None) and predictor.card.name.startswith("cascade(")
    other = cascade_predictor_from_args(
        parser.parse_args(["--cascade", str(config.replace(top_k=2).save(tmp_path / "other.json"))])
    )
    assert other.card.pipeline_sha256() != predictor.card.pipeline_sha256()
    record = predictor.provenance()["cascade"]
    assert record["sha256"] == config.fingerprint() and record["stage1"]["pipeline_sha256"] == single
    with pytest.raises(ConformalSegError, match="--tta"):
        predictor.predict(volume, tta_flips=True)
    with pytest.raises(ConformalSegError, match="stage2_mc_passes"):
        predictor.predict(volume, mc_dropout=5)
    # no model anywhere; lung labels asked for but no folder; the folder lookup by case id
    bare = CascadeConfig(lung_source="none").save(tmp_path / "bare.json")
    with pytest.raises(ConformalSegError, match="no stage1_model"):
        cascade_predictor_from_args(parser.parse_args(["--cascade", str(bare)]))
    labels_cfg = config.replace(lung_source="labels").save(tmp_path / "labels.json")
    with pytest.raises(ConformalSegError, match="--cascade-lungs"):
        cascade_predictor_from_args(parser.parse_args(["--cascade", str(labels_cfg)]))
    lungs = tmp_path / "lungs"
    lung_map = np.zeros(volume.geometry.shape, dtype=np.uint8)
    lung_map[2:14, 2:16, 2:14] = 2
    save_volume(lung_map, volume.geometry, lungs / "case7.nii.gz")
    with_lungs = cascade_predictor_from_args(
        parser.parse_args(["--cascade", str(labels_cfg), "--cascade-lungs", str(lungs), "--model", str(tiny_card)])
    )
    found = with_lungs.lung_labels_for(Volume(volume.array, volume.geometry, str(tmp_path / "case7_0000.nii.gz")))
    assert np.array_equal(found.array, lung_map)
    with pytest.raises(ConformalSegError, match="no lung label map for case"):
        with_lungs.lung_labels_for(Volume(volume.array, volume.geometry, str(tmp_path / "case8.nii.gz")))


def test_cascade_through_infer_calibrate_and_apply(tiny_card, tmp_path, capsys):
    """``--cascade`` reaches infer, calibrate (--images) and apply (--image), and apply refuses another cascade."""
    from ConformalSegLib.cli import main
    from ConformalSegLib.io.volumes import load_image, save_volume
    from Testing.test_inference import ct_volume

    geometry = Geometry(shape=(16, 18, 16), spacing=(1.0, 1.0, 2.0))
    for i in range(4):
        volume = ct_volume(geometry, seed=10 + i)
        save_volume(volume.array, geometry, tmp_path / "images" / f"case{i}_0000.nii.gz")
        truth = np.zeros(geometry.shape, dtype=np.uint8)
        truth[4:9, 5:10, 4:9] = 1
        save_volume(truth, geometry, tmp_path / "labels" / f"case{i}.nii.gz")
    config = CascadeConfig(
        stage1_model=str(tiny_card),
        stage1_threshold=0.5,
        lung_source="none",
        top_k=1,
        roi_margin_voxels=2,
        outside_roi_scale=0.5,
    )
    config_path = config.save(tmp_path / "cascade.json")
    assert (
        main(
            [
                "infer",
                "--cascade",
                str(config_path),
                "--images",
                str(tmp_path / "images"),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "pred" / "inference.json").read_text())
    assert report["cascade"]["sha256"] == config.fingerprint() and report["model"]["name"].startswith("cascade(")
    profile = tmp_path / "p.json"
    assert (
        main(
            [
                "calibrate",
                "--method",
                "crc",
                "--epsilon",
                "0.3",
                "--lesion-label",
                "1",
                "--cascade",
                str(config_path),
                "--images",
                str(tmp_path / "images"),
                "--labels",
                str(tmp_path / "labels"),
                "--device",
                "cpu",
                "--out",
                str(profile),
            ]
        )
        == 0
    )
    doc = json.loads(profile.read_text())
    assert doc["provenance"]["inference"]["cascade"]["sha256"] == config.fingerprint()
    image = tmp_path / "images" / "case0_0000.nii.gz"
    assert (
        main(
            [
                "apply",
                "--profile",
                str(profile),
                "--image",
                str(image),
                "--cascade",
                str(config_path),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    infer_prob = load_image(tmp_path / "pred" / "probs" / "case0.nii.gz").array
    applied = load_image(tmp_path / "a" / "probability.nii.gz").array
    assert np.array_equal(infer_prob, applied)  # the identical pipeline at calibration and test time
    capsys.readouterr()
    other = config.replace(top_k=2).save(tmp_path / "other.json")
    assert (
        main(
            [
                "apply",
                "--profile",
                str(profile),
                "--image",
                str(image),
                "--cascade",
                str(other),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "not the pipeline the profile was calibrated with" in capsys.readouterr().err
    assert (
        main(
            [
                "apply",
                "--profile",
                str(profile),
                "--image",
                str(image),
                "--model",
                str(tiny_card),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "output of a cascade" in capsys.readouterr().err
