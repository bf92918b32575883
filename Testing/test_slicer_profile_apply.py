"""Mask-only margin profiles and nnU-Net fold profiles in the Slicer panel (issue 18), without Slicer.

The panel runs ``conformalseg apply --mask`` / ``--folds`` (optionally ``--dicom-seg``) in a child; here the
same command lines run through the CLI in process, and the result is read as the panel reads it: the
segmentation file, the guarantee sentences, the DICOM SEG with the library's segment names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ConformalSeg"))

from test_mask_sets import GEOM, SHAPE, write_mask_data  # noqa: E402
from test_nnunet_folds import write_folds  # noqa: E402

from ConformalSegLib.cli import main  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.conformal.profile import load_profile  # noqa: E402
from ConformalSegLib.io.volumes import load_label_map, save_volume  # noqa: E402
from ConformalSegSlicer import fixtures, profile_apply  # noqa: E402


def _run(argv, capsys) -> str:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return write_mask_data(tmp_path_factory.mktemp("slicer_masks"), seed=3)


def _calibrate_masks(masks: Path, out: Path, capsys, *extra) -> None:
    argv = ["calibrate", "--method", "sets", "--transform", "distance", "--alpha", "0.2"]
    argv += ["--masks", masks / "pred", "--labels", masks / "labels", *extra, "--out", out]
    _run(argv, capsys)


def test_structures_index_applied_as_the_panel_does(masks, tmp_path, capsys):
    index = tmp_path / "organs.json"
    _calibrate_masks(masks, index, capsys, "--structures", "1=liver,2=spleen")
    assert profile_apply.profile_input(index) == profile_apply.MASK
    assert profile_apply.profile_input(tmp_path / "organs.liver.json") == profile_apply.MASK
    argv = profile_apply.apply_command(
        "py", profile=index, out_dir=tmp_path / "out", mask=masks / "new.nii.gz", alpha=0.3
    )
    assert argv[:4] == ["py", "-m", "ConformalSegLib", "apply"] and argv[-1] == "--force"
    assert "--alpha" in argv and "--dicom-seg" not in argv
    _run(argv[3:], capsys)
    result = profile_apply.read_apply_result(tmp_path / "out")
    assert result.segmentation.is_file() and result.dicom_seg is None and result.volumes == {}
    assert [g.split(":")[0] for g in result.guarantees] == ["liver", "spleen"]
    assert all("With probability at least 70%" in g for g in result.guarantees)  # recalibrated to alpha 0.3
    assert result.note is not None and "alpha / K" in result.note
    # the sets equal the library's for the recalibrated profile
    predicted = load_label_map(masks / "new.nii.gz").array
    liver = load_profile(tmp_path / "organs.liver.json").recalibrate(alpha=0.3)
    inner, outer = liver.masks((predicted == 1).astype(np.float32), GEOM).values()
    assert np.array_equal(load_label_map(tmp_path / "out" / "liver_outer_set.nii.gz").array.astype(bool), outer)
    assert np.array_equal(load_label_map(tmp_path / "out" / "liver_inner_set.nii.gz").array.astype(bool), inner)


def test_single_structure_with_dicom_seg(masks, tmp_path, capsys):
    pytest.importorskip("highdicom")
    from dicom_support import write_ct_series

    from ConformalSegLib.io.dicom_seg import read_dicom_seg

    profile = tmp_path / "liver.json"
    _calibrate_masks(masks, profile, capsys, "--lesion-label", "1")
    write_ct_series(tmp_path / "ct", np.zeros(SHAPE, np.int16), GEOM)
    files = sorted(str(f) for f in (tmp_path / "ct").iterdir())
    lookup = {f"uid{i}": f for i, f in enumerate(files)}
    assert profile_apply.dicom_reference_files(" ".join(lookup), lookup.get) == files
    assert profile_apply.dicom_reference_files(None, lookup.get) == []
    assert profile_apply.dicom_reference_files("uid0 gone", lookup.get) == []
    argv = profile_apply.apply_command(
        "py", profile=profile, out_dir=tmp_path / "out", mask=masks / "new.nii.gz", reference_dicom=tmp_path / "ct"
    )
    _run(argv[3:], capsys)
    result = profile_apply.read_apply_result(tmp_path / "out")
    assert len(result.guarantees) == 1 and result.guarantees[0].startswith("With probability at least 80%")
    assert result.note is None and result.dicom_seg is not None
    back = read_dicom_seg(result.dicom_seg, tmp_path / "ct")
    assert list(back) == ["Inner set", "Outer set"]  # the library's segment names, as in the .seg.nrrd
    for name, file in (("Inner set", "inner_set"), ("Outer set", "outer_set")):
        assert np.array_equal(back[name], load_label_map(tmp_path / "out" / f"{file}.nii.gz").array.astype(bool))


def test_fold_profile_applied_as_the_panel_does(tmp_path, capsys):
    from test_nnunet_folds import GEOM as FOLD_GEOM
    from test_nnunet_folds import SHAPE as FOLD_SHAPE

    cases = tuple(f"c{i:02d}" for i in range(10))
    arrays = write_folds(tmp_path / "folds", n_folds=3, cases=cases, seed=4)
    noise = np.random.default_rng(9)
    for case in cases:
        mean = np.mean([a[1] for a in arrays[case]], axis=0)
        truth = (mean + noise.normal(0, 0.05, FOLD_SHAPE) > 0.5).astype(np.uint8)
        save_volume(truth, FOLD_GEOM, tmp_path / "labels" / f"{case}.nii.gz")
    profile = tmp_path / "cls.json"
    argv = ["calibrate", "--method", "cls", "--folds", tmp_path / "folds", "--labels", tmp_path / "labels"]
    _run([*argv, "--channel", "1", "--epsilon", "0.2", "--alpha", "0.2", "--out", profile], capsys)
    assert profile_apply.profile_input(profile) == profile_apply.FOLDS
    argv = profile_apply.apply_command(
        "py", profile=profile, out_dir=tmp_path / "out", folds=tmp_path / "folds", case="c03", channel=1
    )
    _run(argv[3:], capsys)
    result = profile_apply.read_apply_result(tmp_path / "out")
    assert set(result.volumes) == {"probability", "fold_variance", "fold_mutual_information"}
    assert result.guarantees == [load_profile(profile).guarantee]
    assert result.segmentation.is_file()


def test_probability_profiles_stay_on_the_slider(tmp_path):
    fixture = fixtures.make_slider_fixture(tmp_path)
    assert {profile_apply.profile_input(p) for p in fixture.profile_paths} == {profile_apply.PROBABILITY}
    with pytest.raises(ConformalSegError, match="profile"):
        profile_apply.profile_input(tmp_path / "missing.json")


def test_command_and_result_refusals(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        profile_apply.apply_command("py", profile="p", out_dir="o")
    with pytest.raises(ValueError, match="exactly one"):
        profile_apply.apply_command("py", profile="p", out_dir="o", mask="m", folds="f")
    with pytest.raises(ValueError, match="case goes with folds"):
        profile_apply.apply_command("py", profile="p", out_dir="o", mask="m", case="c")
    with pytest.raises(ValueError, match="alpha"):
        profile_apply.apply_command("py", profile="p", out_dir="o", mask="m", alpha=1.5)
    argv = profile_apply.apply_command(
        "py", profile="p", out_dir="o", mask="m", reference_dicom="ct", series_uid="1.2.3"
    )
    assert argv[argv.index("--dicom-seg") :] == [
        "--dicom-seg",
        "--reference-dicom",
        "ct",
        "--series-uid",
        "1.2.3",
        "--out",
        "o",
        "--force",
    ]
    with pytest.raises(ValueError, match="apply.json"):
        profile_apply.read_apply_result(tmp_path)
    (tmp_path / "apply.json").write_text(json.dumps({"guarantee": "G"}))
    assert profile_apply.read_apply_result(tmp_path).guarantees == ["G"]


def test_slider_refuses_mask_profiles(masks, tmp_path, capsys):
    from ConformalSegSlicer.slider import SliderState

    profile = tmp_path / "liver.json"
    _calibrate_masks(masks, profile, capsys, "--lesion-label", "1")
    probability = np.zeros(SHAPE, np.float32)
    with pytest.raises(ConformalSegError, match="calibrated on predicted masks"):
        SliderState.from_files([profile], probability, GEOM)


def test_mask_fixture_of_the_self_test_applies_through_the_cli(tmp_path, capsys):
    """What ``test_MaskProfileApply`` of the Slicer self-test runs, without Slicer: the sets of
    ``apply --mask`` equal the fixture's expected masks, under the names the self-test looks up."""
    fixture = fixtures.make_mask_fixture(tmp_path / "fixture")
    assert profile_apply.profile_input(fixture.profile_path) == profile_apply.MASK
    mask = tmp_path / "mask.nrrd"
    save_volume(fixture.labels, fixture.geometry, mask)
    argv = profile_apply.apply_command("py", profile=fixture.profile_path, out_dir=tmp_path / "out", mask=mask)
    _run(argv[3:], capsys)
    result = profile_apply.read_apply_result(tmp_path / "out")
    assert result.guarantees[0].startswith("With probability at least 80%")
    for name, file in (("Inner set", "inner_set"), ("Outer set", "outer_set")):
        assert np.array_equal(
            load_label_map(tmp_path / "out" / f"{file}.nii.gz").array.astype(bool), fixture.expected[name]
        )
    assert fixture.expected["Outer set"].any() and fixture.expected["Outer set"].sum() > fixture.labels.sum()


def test_structures_dicom_seg_names_and_codes_match_the_seg_nrrd(masks, tmp_path, capsys):
    """The segments Slicer loads (``.seg.nrrd``) and the DICOM SEG carry the same names, and each DICOM
    segment the library's coded concept (liver inner set: the anatomical structure; outer sets: margin)."""
    pytest.importorskip("highdicom")
    import pydicom
    from dicom_support import write_ct_series

    from ConformalSegLib.io.dicom_seg import segment_concepts

    index = tmp_path / "organs.json"
    _calibrate_masks(masks, index, capsys, "--structures", "1=liver,2=spleen")
    write_ct_series(tmp_path / "ct", np.zeros(SHAPE, np.int16), GEOM)
    argv = profile_apply.apply_command(
        "py", profile=index, out_dir=tmp_path / "out", mask=masks / "new.nii.gz", reference_dicom=tmp_path / "ct"
    )
    _run(argv[3:], capsys)
    result = profile_apply.read_apply_result(tmp_path / "out")
    assert result.dicom_seg is not None
    header = result.segmentation.read_bytes().split(b"\n\n", 1)[0].decode("latin-1")
    nrrd_names = sorted(
        line.split(":=", 1)[1] for line in header.splitlines() if line.startswith("Segment") and "_Name:=" in line
    )
    seg = pydicom.dcmread(result.dicom_seg)
    dicom_names = sorted(item.SegmentLabel for item in seg.SegmentSequence)
    assert dicom_names == nrrd_names == ["liver inner set", "liver outer set", "spleen inner set", "spleen outer set"]
    for item in seg.SegmentSequence:
        category, kind = segment_concepts(item.SegmentLabel)
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == kind.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category.value
    liver = next(i for i in seg.SegmentSequence if i.SegmentLabel == "liver inner set")
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeMeaning.lower() == "liver"


def test_copy_atomically_replaces_whole_file_and_leaves_no_part(tmp_path):
    """The panel's DICOM SEG output is written through a temporary file and a rename: the target
    holds the whole new file, an old file is replaced, and no temporary file stays behind."""
    source = tmp_path / "work" / "segmentation.dcm"
    source.parent.mkdir()
    source.write_bytes(b"new-seg" * 1000)
    target = tmp_path / "out" / "case.dcm"
    profile_apply.copy_atomically(source, target)
    assert target.read_bytes() == source.read_bytes()
    target.write_bytes(b"old")
    profile_apply.copy_atomically(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["case.dcm"]


def test_copy_atomically_failure_keeps_old_target(tmp_path):
    """A copy that fails (missing source) is one clear error naming the target, and leaves the previous
    file untouched and no temporary file."""
    from ConformalSegLib.common.errors import ConformalSegError

    target = tmp_path / "case.dcm"
    target.write_bytes(b"old")
    with pytest.raises(ConformalSegError, match="case.dcm"):
        profile_apply.copy_atomically(tmp_path / "missing.dcm", target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["case.dcm"]


@pytest.mark.parametrize("slider_safe", [True, False])
def test_seg_export_holds_the_masks_on_screen(tmp_path, capsys, slider_safe):
    """The panel's *Export DICOM SEG* for a probability profile: ``apply --prob`` at the sliders' settings writes
    a SEG whose segments are, voxel for voxel, the masks the sliders show (CLS in or out of the slider-safe band,
    CRC, confidence sets), recalibrated away from the calibrated levels."""
    pytest.importorskip("highdicom")
    from dicom_support import write_ct_series

    from ConformalSegLib.io.dicom_seg import read_dicom_seg
    from ConformalSegSlicer.slider import SliderSettings, SliderState

    fixture = fixtures.make_slider_fixture(tmp_path / "fixture")
    case = fixture.case
    write_ct_series(tmp_path / "ct", np.zeros(case.probability.shape, np.int16), case.geometry)
    save_volume(case.probability.astype(np.float32), case.geometry, tmp_path / "prob.nii.gz")
    settings = SliderSettings(0.2, 0.3, 0.15, 0.25, slider_safe=slider_safe)
    exported = {}
    for method, path in fixture.profiles.items():
        out = tmp_path / f"out_{method}"
        argv = profile_apply.seg_export_argv(
            "py", profile=path, prob=tmp_path / "prob.nii.gz", out_dir=out, reference_dicom=tmp_path / "ct",
            settings=settings,
        )  # fmt: skip
        assert ("--slider-safe" in argv) == (slider_safe and method == "cls")
        _run(argv[3:], capsys)
        result = profile_apply.read_apply_result(out)
        on_screen = SliderState.from_files([path], case.probability, case.geometry).update(settings)
        assert len(result.guarantees) == len(on_screen.guarantees) == 1
        assert on_screen.guarantees[0].endswith(result.guarantees[0]), (result.guarantees, on_screen.guarantees)
        seg = read_dicom_seg(result.dicom_seg, tmp_path / "ct")
        shown = {name: update.mask for name, update in on_screen.segments.items()}
        assert len(seg) == len(shown), (list(seg), list(shown))
        for (name, mask), (shown_name, shown_mask) in zip(seg.items(), shown.items()):
            assert np.array_equal(mask, shown_mask), (method, name, shown_name)
        exported[method] = list(seg.values())
    # two profiles on screen (the panel's second profile): one SEG each, together the masks shown
    pair = [fixture.profiles["cls"], fixture.profiles["sets"]]
    both = SliderState.from_files(pair, case.probability, case.geometry).update(settings)
    shown_masks = [update.mask for update in both.segments.values()]
    assert len(shown_masks) == len(exported["cls"]) + len(exported["sets"])
    assert all(np.array_equal(a, b) for a, b in zip(shown_masks, exported["cls"] + exported["sets"]))


def test_seg_export_targets_one_seg_per_profile(tmp_path):
    """The first profile's SEG is the chosen file; a second profile's goes beside it, named after the profile,
    never onto the first one's name (a number is added on a clash)."""
    out = tmp_path / "case.dcm"
    assert profile_apply.seg_export_targets(out, ["a/cls.json"]) == [("a/cls.json", str(out))]
    assert profile_apply.seg_export_targets(out, ["a/cls.json", "b/sets.json"]) == [
        ("a/cls.json", str(out)),
        ("b/sets.json", str(tmp_path / "case.sets.dcm")),
    ]
    same = profile_apply.seg_export_targets(tmp_path / "x.dcm", ["a/p.json", "b/p.json", "c/p.json"])
    assert [target for _, target in same] == [str(tmp_path / n) for n in ("x.dcm", "x.p.dcm", "x.p-2.dcm")]
    no_suffix = profile_apply.seg_export_targets(tmp_path / "seg", ["a.json", "b.json"])
    assert no_suffix[1][1] == str(tmp_path / "seg.b.dcm")


def test_seg_export_levels_per_method(tmp_path):
    from ConformalSegSlicer.slider import SliderSettings

    fixture = fixtures.make_slider_fixture(tmp_path, methods=("cls", "crc", "sets"))
    settings = SliderSettings(0.1234, 0.3, 0.15, 0.25, slider_safe=True)

    def flags(method):
        argv = profile_apply.seg_export_argv(
            "py", profile=fixture.profiles[method], prob="p.nii.gz", out_dir="o", reference_dicom="ct",
            settings=settings,
        )  # fmt: skip
        return argv[argv.index("p.nii.gz") + 1 : argv.index("--dicom-seg")]

    assert flags("cls") == ["--epsilon", "0.123", "--slider-safe", "--alpha", "0.3"]  # snapped as the slider snaps
    assert flags("crc") == ["--epsilon", "0.123"]
    assert flags("sets") == ["--alpha-inner", "0.15", "--alpha-outer", "0.25"]
    with pytest.raises(ValueError, match="exactly one of mask, folds and prob"):
        profile_apply.apply_command("py", profile="p", out_dir="o", mask="m", prob="q")
    with pytest.raises(ValueError, match="epsilon goes with prob"):
        profile_apply.apply_command("py", profile="p", out_dir="o", mask="m", epsilon=0.1)
