"""The deployment options end to end on real files: ``calibrate --groups / --group-by / --target-scans``,
``apply --group`` and the predicted-size rule, weighted ``apply``, ``conformalseg monitor`` and its log;
exit codes and error messages naming the file and the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from ConformalSegLib.cli import main
from ConformalSegLib.conformal.monitoring import drift_status
from ConformalSegLib.conformal.profile import load_profile
from ConformalSegLib.io.segmentation import read_seg_nrrd
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

SHAPE = (16, 32, 32)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    write_synthetic_dataset(root / "cal", 24, seed=5, shape=SHAPE)
    write_synthetic_dataset(root / "target", 10, seed=50, shape=SHAPE, spacing=(0.9, 0.9, 2.0))
    write_synthetic_dataset(root / "reviewed", 12, seed=500, shape=SHAPE)
    for sub in ("probs", "labels", "images"):  # reviewed scans are new scans: new case ids
        for f in sorted((root / "reviewed" / sub).iterdir()):
            f.rename(f.with_name("rev_" + f.name))
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (root / "cal" / "probs").iterdir())
    (root / "groups.csv").write_text(
        "case_id,group\n" + "".join(f"{c},{'A' if i % 3 else 'B'}\n" for i, c in enumerate(ids))
    )
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def calibrate(sites, out, *extra, capsys, method="cls"):
    levels = ["--epsilon", "0.2", "--alpha", "0.2"] if method != "sets" else ["--alpha", "0.2", "--joint"]
    return run(
        [
            "calibrate",
            "--method",
            method,
            "--data",
            sites / "cal",
            "--lesion-label",
            "2",
            *levels,
            "--out",
            out,
            *extra,
        ],
        capsys,
    )


def test_groups_file_calibrate_and_apply(tmp_path, sites, capsys):
    code, out, err = calibrate(sites, tmp_path / "g.json", "--groups", sites / "groups.csv", capsys=capsys)
    assert code == 0, err
    assert "- A (n = 16): For a new scan of group 'A'" in out and "- B (n = 8)" in out
    profile = load_profile(tmp_path / "g.json")
    assert profile.groups.grouping.names == ("A", "B")
    prob = sites / "cal" / "probs" / "synth_001.nii.gz"
    code, out, err = run(
        ["apply", "--profile", tmp_path / "g.json", "--prob", prob, "--group", "B", "--out", tmp_path / "a"], capsys
    )
    assert code == 0, err
    assert out.startswith("For a new scan of group 'B'")
    doc = json.loads((tmp_path / "a" / "apply.json").read_text())
    threshold = profile.groups.group("B").calibration.probability_threshold
    assert doc["group"] == "B" and doc["probability_threshold"] == threshold and doc["n"] == 8
    masks, _ = read_seg_nrrd(tmp_path / "a" / "segmentation.seg.nrrd")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(prob)))
    assert np.array_equal(masks["Lesion (FNR-controlled)"], array >= np.float32(threshold))
    # no group, an unknown group: exit 2 with the fix
    code, _, err = run(["apply", "--profile", tmp_path / "g.json", "--prob", prob, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "pass --group with one of: 'A', 'B'" in err
    code, _, err = run(
        ["apply", "--profile", tmp_path / "g.json", "--prob", prob, "--group", "C", "--out", tmp_path / "b"], capsys
    )
    assert code == 2 and "unknown group 'C'" in err
    # recalibration keeps the groups
    code, out, err = run(
        [
            "apply",
            "--profile",
            tmp_path / "g.json",
            "--prob",
            prob,
            "--group",
            "A",
            "--alpha",
            "0.3",
            "--out",
            tmp_path / "c",
        ],
        capsys,
    )
    assert code == 0 and json.loads((tmp_path / "c" / "apply.json").read_text())["alpha"] == 0.3


def test_groups_file_errors_before_streaming(tmp_path, sites, capsys):
    partial = tmp_path / "partial.csv"
    partial.write_text("case_id,group\nsynth_000,A\n")
    code, _, err = calibrate(sites, tmp_path / "x.json", "--groups", partial, capsys=capsys)
    assert code == 2 and "23 calibration scan(s) have no group" in err and "partial.csv" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("case,group\n")
    code, _, err = calibrate(sites, tmp_path / "x.json", "--groups", bad, capsys=capsys)
    assert code == 2 and "no 'case_id' column" in err
    code, _, err = calibrate(sites, tmp_path / "x.json", "--group-by", "size:3", capsys=capsys)
    assert code == 2 and "lesion-size:5,20" in err
    assert not (tmp_path / "x.json").exists()


def test_lesion_size_groups_and_the_predicted_size_rule(tmp_path, sites, capsys):
    code, out, err = calibrate(
        sites, tmp_path / "s.json", "--group-by", "lesion-size:0.5", capsys=capsys, method="sets"
    )
    assert code == 0, err
    assert "- [0, 0.5) mL" in out and "- predicted [0.5, inf) mL" in out
    profile = load_profile(tmp_path / "s.json")
    prob = sites / "cal" / "probs" / "synth_002.nii.gz"
    code, out, err = run(["apply", "--profile", tmp_path / "s.json", "--prob", prob, "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "p" / "apply.json").read_text())
    assert doc["group_by_prediction"] is True and "marginal over the true lesion sizes" in doc["guarantee"]
    chosen = profile.groups.group(doc["group"], predicted=True).calibration
    assert (float(doc["inner_threshold"]), float(doc["outer_threshold"])) == (
        chosen.inner_threshold,
        chosen.outer_threshold,
    )
    code, out, err = run(
        ["apply", "--profile", tmp_path / "s.json", "--prob", prob, "--group", "2.5", "--out", tmp_path / "q"], capsys
    )
    assert code == 0 and json.loads((tmp_path / "q" / "apply.json").read_text())["group"] == "[0.5, inf) mL"


def test_too_small_group_warns_with_the_number_needed(tmp_path, sites, capsys):
    code, out, err = run(
        ["calibrate", "--method", "cls", "--data", sites / "cal", "--lesion-label", "2", "--epsilon", "0.2",
         "--alpha", "0.1", "--groups", sites / "groups.csv", "--out", tmp_path / "t.json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "warning: group 'B': 8 usable calibration scan(s), at least 9 are needed" in err and "1 more" in err
    assert "This group needs 1 more calibration scan(s)." in out


def test_weighted_profile_calibrate_and_apply(tmp_path, sites, capsys):
    code, out, err = calibrate(sites, tmp_path / "w.json", "--target-scans", sites / "target", capsys=capsys)
    assert code == 0, err
    assert "domain classifier: cross-validated AUC" in out and "At the target site, under covariate shift" in out
    profile = load_profile(tmp_path / "w.json")
    assert profile.weighting.classifier.n_target == 10 and profile.weighting.features.shape[0] == 24
    prob = sites / "target" / "probs" / "synth_003.nii.gz"
    code, out, err = run(["apply", "--profile", tmp_path / "w.json", "--prob", prob, "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "a" / "apply.json").read_text())
    assert doc["weight"] > 0 and doc["guarantee"].startswith("At the target site")
    # intensity features: the calibration and target images, and the new scan's image at apply time
    code, out, err = calibrate(
        sites,
        tmp_path / "wi.json",
        "--target-scans",
        sites / "target",
        "--feature-images",
        sites / "cal" / "images",
        capsys=capsys,
    )
    assert code == 0, err
    assert len(load_profile(tmp_path / "wi.json").weighting.classifier.names) > 9
    code, _, err = run(["apply", "--profile", tmp_path / "wi.json", "--prob", prob, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "--feature-image" in err
    image = sites / "target" / "images" / "synth_003.nii.gz"
    code, _, err = run(
        ["apply", "--profile", tmp_path / "wi.json", "--prob", prob, "--feature-image", image, "--out", tmp_path / "b"],
        capsys,
    )
    assert code == 0, err


def test_weighted_refuses_crc_and_groups_together(tmp_path, sites, capsys):
    code, _, err = calibrate(
        sites, tmp_path / "x.json", "--target-scans", sites / "target", capsys=capsys, method="crc"
    )
    assert code == 2 and "weighted calibration supports cls, lesion and sets" in err
    code, _, err = calibrate(
        sites, tmp_path / "x.json", "--target-scans", sites / "target", "--group-by", "lesion-size:1", capsys=capsys
    )
    assert code == 2 and "not both" in err
    code, _, err = calibrate(
        sites, tmp_path / "x.json", "--target-scans", sites / "target", "--pac-delta", "0.1", capsys=capsys
    )
    assert code == 2 and "not PAC" in err


def test_monitor_writes_the_log_the_plot_and_the_badge_reads_it(tmp_path, sites, capsys):
    code, _, err = calibrate(sites, tmp_path / "c.json", capsys=capsys)
    assert code == 0, err
    order = tmp_path / "order.csv"
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (sites / "reviewed" / "probs").iterdir())[::-1]
    order.write_text("case_id,time\n" + "".join(f"{c},2026-12-{i + 1:02d}\n" for i, c in enumerate(ids)))
    argv = ["monitor", "--profile", tmp_path / "c.json", "--probs", sites / "reviewed" / "probs",
            "--labels", sites / "reviewed" / "labels", "--lesion-label", "2", "--order", order]  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "12 reviewed case(s) against 24 calibration scans" in out
    log = json.loads((tmp_path / "c.monitor" / "monitor.json").read_text())
    assert [c["case_id"] for c in log["cases"]] == ids and log["cases"][0]["time"] == "2026-12-01"
    assert (tmp_path / "c.monitor" / "monitor.png").stat().st_size > 1000
    assert drift_status(tmp_path / "c.json").state in ("ok", "drift")
    code, _, err = run(argv, capsys)  # never overwritten without --force
    assert code == 2 and "--force" in err
    # calibration scans are no new observations
    shutil.copy(sites / "cal" / "probs" / "synth_000.nii.gz", tmp_path / "p.nii.gz")
    (tmp_path / "rp").mkdir()
    (tmp_path / "rl").mkdir()
    shutil.copy(sites / "cal" / "probs" / "synth_000.nii.gz", tmp_path / "rp" / "synth_000.nii.gz")
    shutil.copy(sites / "cal" / "labels" / "synth_000.nii.gz", tmp_path / "rl" / "synth_000.nii.gz")
    code, _, err = run(
        ["monitor", "--profile", tmp_path / "c.json", "--probs", tmp_path / "rp", "--labels", tmp_path / "rl",
         "--lesion-label", "2", "--out", tmp_path / "m2"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "are calibration scans of the profile" in err
