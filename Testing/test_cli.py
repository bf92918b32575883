"""The ``conformalseg`` command line end to end on real files: outputs, exit codes and error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.conformal.profile import load_profile
from ConformalSegLib.io.segmentation import read_seg_nrrd
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "data"
    write_synthetic_dataset(root, 14, seed=5, shape=(20, 40, 40))
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_calibrate_apply_recalibrate(tmp_path, data, capsys):
    profile = tmp_path / "cls.json"
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "cls",
            "--data",
            data,
            "--lesion-label",
            "2",
            "--epsilon",
            "0.2",
            "--alpha",
            "0.2",
            "--out",
            profile,
        ],
        capsys,
    )
    assert code == 0, err
    assert "With probability at least 80%" in out
    doc = json.loads(profile.read_text())
    assert doc["method"] == "cls" and doc["n"] == 14 and doc["provenance"]["lesion_labels"] == [2]

    prob = data / "probs" / "synth_000.nii.gz"
    code, out, err = run(
        ["apply", "--profile", profile, "--prob", prob, "--compare-threshold", "--out", tmp_path / "a"], capsys
    )
    assert code == 0, err
    masks, geometry = read_seg_nrrd(tmp_path / "a" / "segmentation.seg.nrrd")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(prob)))
    threshold = load_profile(profile).calibration.probability_threshold
    assert np.array_equal(masks["Lesion (FNR-controlled)"], array >= np.float32(threshold))
    assert np.array_equal(masks["Lesion (threshold 0.5)"], array >= 0.5)
    assert (tmp_path / "a" / "lesion_fnr_controlled.nii.gz").exists()

    # recalibration from summaries: a larger alpha gives a larger cutoff, hence a smaller mask
    code, out, err = run(
        ["apply", "--profile", profile, "--prob", prob, "--alpha", "0.4", "--out", tmp_path / "b"], capsys
    )
    assert code == 0, err
    wider = json.loads((tmp_path / "b" / "apply.json").read_text())
    narrower = json.loads((tmp_path / "a" / "apply.json").read_text())
    assert wider["alpha"] == 0.4 and wider["probability_threshold"] >= narrower["probability_threshold"]
    # outputs are never overwritten silently
    code, out, err = run(["apply", "--profile", profile, "--prob", prob, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "--force" in err


def test_sets_and_crc(tmp_path, data, capsys):
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "sets",
            "--probs",
            data / "probs",
            "--labels",
            data / "labels",
            "--lesion-label",
            "2",
            "--alpha",
            "0.3",
            "--joint",
            "--inner-transform",
            "identity",
            "--outer-transform",
            "distance",
            "--out",
            tmp_path / "sets.json",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "sets.json").read_text())
    assert doc["transform"] == {"inner": "identity", "outer": "distance:0.5"} and doc["mode"] == "joint-split"
    code, out, err = run(
        [
            "apply",
            "--profile",
            tmp_path / "sets.json",
            "--prob",
            data / "probs" / "synth_001.nii.gz",
            "--out",
            tmp_path / "s",
        ],
        capsys,
    )
    assert code == 0, err
    masks, _ = read_seg_nrrd(tmp_path / "s" / "segmentation.seg.nrrd")
    assert set(masks) == {"Inner set", "Outer set"}
    assert not (masks["Inner set"] & ~masks["Outer set"]).any()
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "crc",
            "--data",
            data,
            "--lesion-label",
            "2",
            "--epsilon",
            "0.1",
            "--out",
            tmp_path / "crc.json",
        ],
        capsys,
    )
    assert code == 0 and "On average" in out


def test_tiny_calibration_set_warns_not_fails(tmp_path, data, capsys):
    small = tmp_path / "small"
    for sub in ("probs", "labels"):
        (small / sub).mkdir(parents=True)
        for name in sorted((data / sub).iterdir())[:4]:
            (small / sub / name.name).write_bytes(name.read_bytes())
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "cls",
            "--data",
            small,
            "--lesion-label",
            "2",
            "--epsilon",
            "0.1",
            "--alpha",
            "0.1",
            "--out",
            tmp_path / "p.json",
        ],
        capsys,
    )
    assert code == 0
    assert "warning:" in err and "at least 9" in err
    assert json.loads((tmp_path / "p.json").read_text())["probability_threshold"] == "-inf"


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("nan", "NaN"),
        ("range", "[0,1]"),
        ("geometry", "spacing"),
        ("corrupt", "corrupt"),
        ("label", "label value 7"),
        ("unmatched", "have no label file"),
    ],
)
def test_bad_input_exits_2_with_file_and_fix(tmp_path, data, capsys, problem, expected):
    root = tmp_path / "bad"
    for sub in ("probs", "labels"):
        (root / sub).mkdir(parents=True)
        for name in sorted((data / sub).iterdir())[:3]:
            (root / sub / name.name).write_bytes(name.read_bytes())
    target = root / "probs" / "synth_001.nii.gz"
    label = 2
    if problem in ("nan", "range", "geometry"):
        image = sitk.ReadImage(str(target))
        array = sitk.GetArrayFromImage(image)
        if problem == "nan":
            array[0, 0, 0] = np.nan
        elif problem == "range":
            array[0, 0, 0] = 1.5
        new = sitk.GetImageFromArray(array)
        new.CopyInformation(image)
        if problem == "geometry":
            new.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(new, str(target))
    elif problem == "corrupt":
        target.write_bytes(b"this is not a nifti file")
    elif problem == "label":
        label = 7
    elif problem == "unmatched":
        (root / "labels" / "synth_001.nii.gz").unlink()
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "cls",
            "--data",
            root,
            "--lesion-label",
            label,
            "--epsilon",
            "0.1",
            "--alpha",
            "0.2",
            "--out",
            tmp_path / "p.json",
        ],
        capsys,
    )
    assert code == 2
    assert expected in err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in err and "Fix:" in error_lines[0]
    assert not (tmp_path / "p.json").exists()


def test_debug_shows_traceback(tmp_path, capsys):
    with pytest.raises(ConformalSegError):
        main(
            ["--debug", "apply", "--profile", str(tmp_path / "none.json"), "--prob", "x.nii.gz", "--out", str(tmp_path)]
        )


def test_refuses_existing_profile_before_streaming(tmp_path, data, capsys):
    (tmp_path / "p.json").write_text("{}")
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "crc",
            "--data",
            data,
            "--lesion-label",
            "2",
            "--epsilon",
            "0.1",
            "--out",
            tmp_path / "p.json",
        ],
        capsys,
    )
    assert code == 2 and "exists" in err and (tmp_path / "p.json").read_text() == "{}"


def test_evaluate_writes_report(tmp_path, data, capsys):
    code, out, err = run(
        [
            "evaluate",
            "--data",
            data,
            "--lesion-label",
            "2",
            "--splits",
            "5",
            "--epsilons",
            "0.1",
            "0.2",
            "--alphas",
            "0.2",
            "0.3",
            "--transforms",
            "identity",
            "--no-hd95",
            "--out",
            tmp_path / "ev",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["config"]["splits"] == 5
    for name in ("report.md", "ecr_vs_alpha.png", "fnr_before_after.png", "pc_vs_alpha.png", "coverage_vs_alpha.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0


def test_demo_small_synthetic(tmp_path, capsys):
    code, out, err = run(["demo", "--synthetic", "--out", tmp_path / "demo", "--cases", "16", "--splits", "4"], capsys)
    assert code == 0, err
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "With probability at least 90%" in report and "slice_overlay.png" in report
    masks, geometry = read_seg_nrrd(tmp_path / "demo" / "example" / "segmentation.seg.nrrd")
    assert {"Lesion (FNR-controlled)", "Inner set", "Outer set", "Lesion (threshold 0.5)"} <= set(masks)
    image = sitk.ReadImage(str(tmp_path / "demo" / "example" / "image.nrrd"))
    assert image.GetSize() == masks["Inner set"].shape[::-1]
    code, out, err = run(["demo", "--synthetic", "--out", tmp_path / "demo", "--cases", "16", "--splits", "4"], capsys)
    assert code == 2 and "--force" in err


def test_demo_with_the_shipped_model(tmp_path, capsys):
    """The README's main job: phantoms + the shipped network (small sizes)."""
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    code, out, err = run(
        [
            "demo",
            "--out",
            tmp_path / "demo",
            "--cases",
            "12",
            "--splits",
            "3",
            "--device",
            "cpu",
            "--semcrc-cases",
            "16",
        ],
        capsys,
    )
    assert code == 0, err
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "segmented by the shipped 3D U-Net" in report and "With probability at least 90%" in report
    assert len(list((tmp_path / "demo" / "data" / "probs").glob("*.nii.gz"))) == 12
    masks, geometry = read_seg_nrrd(tmp_path / "demo" / "example" / "segmentation.seg.nrrd")
    assert {"Lesion (FNR-controlled)", "Inner set", "Outer set", "Lesion (ground truth)"} <= set(masks)
    assert (tmp_path / "demo" / "example" / "uncertainty_variance.nrrd").stat().st_size > 0
    assert "](semcrc/interval_evaluation.png)" in report and (tmp_path / "demo" / "semcrc" / "profile.json").is_file()
    from ConformalSegLib.common.shipped_models import LESION_MODEL, shipped_model
    from ConformalSegLib.inference import resolve_model

    shipped = resolve_model(shipped_model(LESION_MODEL))
    for name in ("cls", "lesion", "sets"):  # the profiles record the shipped model's pipeline, so `apply
        record = json.loads((tmp_path / "demo" / "profiles" / f"{name}.json").read_text())["provenance"]
        assert record["inference"]["pipeline_sha256"] == shipped.pipeline_sha256()  # --model` can use them
    # the shipped model's own run, its shipped parent's, unshipped runs on its chain (their cards in ancestors/)
    # and v1's, the first
    for seed in ("1010", "1009", "1008", "1005", "1000"):
        code, out, err = run(
            ["demo", "--out", tmp_path / "d2", "--cases", "4", "--seed", seed, "--device", "cpu"], capsys
        )
        assert code == 2 and "trained on" in err and "1010, 1009, 1008, 1006, 1005, 1002, 1001, 1000" in err
        assert not (tmp_path / "d2" / "data").exists()


def test_transform_auto_uses_separate_learning_data(tmp_path, data, capsys):
    learning = tmp_path / "learning"
    write_synthetic_dataset(learning, 6, seed=77, shape=(20, 40, 40))
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "sets",
            "--data",
            data,
            "--lesion-label",
            "2",
            "--alpha",
            "0.3",
            "--transform",
            "auto",
            "--learning-data",
            learning,
            "--out",
            tmp_path / "auto.json",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "auto.json").read_text())
    chosen = doc["provenance"]["transform_selection"]
    assert doc["transform"] == {"inner": chosen["inner"], "outer": chosen["outer"]}
    assert chosen["mean_inner_voxels"][chosen["inner"]] == max(chosen["mean_inner_voxels"].values())
    assert chosen["mean_outer_voxels"][chosen["outer"]] == min(chosen["mean_outer_voxels"].values())
    # learning on the calibration cases themselves is refused
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "sets",
            "--data",
            data,
            "--lesion-label",
            "2",
            "--alpha",
            "0.3",
            "--transform",
            "auto",
            "--learning-data",
            data,
            "--out",
            tmp_path / "bad.json",
        ],
        capsys,
    )
    assert code == 2 and "identical" in err
    code, out, err = run(
        [
            "calibrate",
            "--method",
            "sets",
            "--data",
            data,
            "--lesion-label",
            "2",
            "--alpha",
            "0.3",
            "--transform",
            "auto",
            "--out",
            tmp_path / "bad.json",
        ],
        capsys,
    )
    assert code == 2 and "--learning-data" in err


def test_lesion_level_calibrate_and_apply(tmp_path, data, capsys):
    profile = tmp_path / "lesion.json"
    code, out, _ = run(
        [
            "calibrate",
            "--method",
            "lesion",
            "--data",
            data,
            "--lesion-label",
            2,
            "--epsilon",
            0.5,
            "--alpha",
            0.2,
            "--voxel-epsilon",
            0.3,
            "--out",
            profile,
        ],  # fmt: skip
        capsys,
    )
    assert code == 0 and "of the lesions of a new scan are missed" in out and "30% of its lesion voxels" in out
    loaded = load_profile(profile)
    assert loaded.method == "lesion" and loaded.calibration.voxel_epsilon == 0.3
    out_dir = tmp_path / "applied"
    code, out, _ = run(
        [
            "apply",
            "--profile",
            profile,
            "--prob",
            data / "probs" / "synth_000.nii.gz",
            "--no-voxel-epsilon",
            "--alpha",
            0.3,
            "--out",
            out_dir,
        ],  # fmt: skip
        capsys,
    )
    assert code == 0 and "lesion voxels" not in out.splitlines()[0]
    summary = json.loads((out_dir / "apply.json").read_text())
    assert summary["method"] == "lesion" and summary["voxel_epsilon"] is None and summary["alpha"] == 0.3
    assert "Lesion (lesion-level)" in summary["voxels"]
    cls_profile = tmp_path / "cls.json"
    run(["calibrate", "--method", "cls", "--data", data, "--lesion-label", 2, "--epsilon", 0.1, "--alpha", 0.2,
         "--out", cls_profile], capsys)  # fmt: skip
    code, _, err = run(
        [
            "apply",
            "--profile",
            cls_profile,
            "--prob",
            data / "probs" / "synth_000.nii.gz",
            "--voxel-epsilon",
            0.1,
            "--out",
            tmp_path / "x",
        ],  # fmt: skip
        capsys,
    )
    assert code == 2 and "lesion-level profiles only" in err and not (tmp_path / "x").exists()
