"""Interval profiles, folder-level calibrate/apply and the CLI helpers of ConformalSegLib.semcrc."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.cli.interval_options import add_interval_arguments, is_interval_profile  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.semcrc import IntervalInputError, IntervalProfileError, synthetic_intervals  # noqa: E402
from ConformalSegLib.semcrc.profile import load_interval_profile  # noqa: E402
from ConformalSegLib.semcrc.synthetic import ORGANS  # noqa: E402
from ConformalSegLib.semcrc.workflow import (  # noqa: E402
    apply_interval,
    calibrate_interval,
    discover_interval_cases,
    write_interval_table,
)

ORGAN_SPEC = ",".join(f"{label}={name}" for name, label, *_ in ORGANS)
FAST = dict(n_opt=8, d_opt=60, gammas=(0.5,), seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("intervals")
    syn = synthetic_intervals(40, shape=(1, 16, 16), seed=3)
    dirs = {name: root / name for name in ("lower", "upper", "truth", "organs")}
    for d in dirs.values():
        d.mkdir()
    for i in range(40):
        np.save(dirs["lower"] / f"case{i:02d}.npy", syn.lower[i])
        np.save(dirs["upper"] / f"case{i:02d}.npy", syn.upper[i])
        np.save(dirs["truth"] / f"case{i:02d}.npy", syn.truth[i])
        np.save(dirs["organs"] / f"case{i:02d}.npy", syn.labels[i].astype(np.int16))
    return dirs


def calibrate(folders: dict[str, Path], method: str, **options):
    return calibrate_interval(
        method,
        folders["lower"],
        folders["upper"],
        folders["truth"],
        folders["organs"],
        0.1,
        organs=ORGAN_SPEC,
        body="nonzero",
        **{**FAST, **options},
    )


def test_profile_round_trip_keeps_lambda_exactly(folders: dict[str, Path], tmp_path: Path) -> None:
    profile = calibrate(folders, "sem-crc")
    written = profile.save(tmp_path / "p.json")
    assert written == [tmp_path / "p.json", tmp_path / "p.npz"]  # the .npz: per-scan thresholds for recalibration
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["lambda"].keys() == {"liver", "spleen", "kidney", "pancreas", "body"}
    assert doc["organ_labels"]["1"] == "liver" and doc["body"] == "nonzero"
    assert len(doc["provenance"]["cal_cases"]) == 32 and len(doc["provenance"]["opt_cases"]) == 8
    loaded = load_interval_profile(tmp_path / "p.json")
    np.testing.assert_array_equal(loaded.calibration.lam, profile.calibration.lam)
    assert loaded.lambdas == profile.lambdas and is_interval_profile(tmp_path / "p.json")
    with pytest.raises(ConformalSegError, match="already exists"):
        profile.save(tmp_path / "p.json")


def test_kcrc_profile_partition_and_checksum(folders: dict[str, Path], tmp_path: Path) -> None:
    profile = calibrate(folders, "k-crc", k=3)
    json_path, npz_path = profile.save(tmp_path / "k.json")
    loaded = load_interval_profile(json_path)
    np.testing.assert_array_equal(loaded.calibration.partition, profile.calibration.partition)
    npz_path.write_bytes(npz_path.read_bytes() + b"x")
    with pytest.raises(IntervalProfileError, match="checksum"):
        load_interval_profile(json_path)


def test_uncontrollable_organ_is_stored_as_inf(folders: dict[str, Path], tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile = calibrate(folders, "sem-crc-organ", lambda_max=1e-6)
    assert "uncontrollable" in profile.calibration.status
    profile.save(tmp_path / "o.json")
    doc = json.loads((tmp_path / "o.json").read_text())
    bad = [g for g, s in doc["status"].items() if s == "uncontrollable"]
    assert bad and all(doc["lambda"][g] == "inf" for g in bad)
    loaded = load_interval_profile(tmp_path / "o.json")
    assert all(math.isinf(v) for g, v in loaded.lambdas.items() if g in bad)
    doc["lambda"][bad[0]] = 0.1  # hand-edited: an uncontrolled group with a finite lambda
    (tmp_path / "o.json").write_text(json.dumps(doc))
    with pytest.raises(IntervalProfileError, match="inf"):
        load_interval_profile(tmp_path / "o.json")


def test_apply_widens_by_lambda_and_reports_per_organ(folders: dict[str, Path], tmp_path: Path) -> None:
    profile = calibrate(folders, "sem-crc")
    lo, hi = np.load(folders["lower"] / "case05.npy"), np.load(folders["upper"] / "case05.npy")
    labels, truth = np.load(folders["organs"] / "case05.npy"), np.load(folders["truth"] / "case05.npy")
    result = apply_interval(profile, lo, hi, labels, truth=truth)
    new_lo, new_hi, length, table = result
    assert new_lo is result.lower and table is result.table
    lam = profile.lambdas
    liver = labels == 1
    exact_lo = lo[liver].astype(np.float64) - lam["liver"]
    np.testing.assert_allclose(result.lower[liver], exact_lo, rtol=1e-6)
    assert np.all(result.lower[liver] <= exact_lo)  # rounded outward
    assert np.all(result.upper[liver] >= hi[liver].astype(np.float64) + lam["liver"])
    np.testing.assert_allclose(result.length, result.upper - result.lower, rtol=1e-6)
    assert np.all(result.lower[labels == 0] == lo[labels == 0])  # background: raw interval
    rows = {row["group"]: row for row in result.table}
    assert rows["liver"]["voxels"] == int(liver.sum()) and 0 <= rows["liver"]["risk"] <= 1
    csv_path, json_path = write_interval_table(result.table, tmp_path / "t.csv", tmp_path / "t.json")
    assert [r["group"] for r in csv.DictReader(csv_path.open())] == list(profile.calibration.groups)
    assert json.loads(json_path.read_text())["groups"][0]["group"] == "liver"


def test_mismatched_folders_and_missing_organs_are_clear_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    partial = tmp_path / "upper"
    partial.mkdir()
    np.save(partial / "case00.npy", np.load(folders["upper"] / "case00.npy"))
    with pytest.raises(IntervalInputError, match="same case ids"):
        discover_interval_cases(folders["lower"], partial, folders["truth"], folders["organs"])
    with pytest.raises(IntervalInputError, match="organ-labels"):
        calibrate_interval("sem-crc", folders["lower"], folders["upper"], folders["truth"], None, 0.1)


def test_cli_calibrate_then_apply(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the real ``conformalseg`` command line."""
    from ConformalSegLib.cli import main

    profile_path = tmp_path / "sem.json"
    assert (
        main(
            [
                "calibrate",
                "--method",
                "sem-crc-organ",
                "--epsilon",
                "0.1",
                "--out",
                str(profile_path),
                "--lower",
                str(folders["lower"]),
                "--upper",
                str(folders["upper"]),
                "--truth",
                str(folders["truth"]),
                "--organs",
                str(folders["organs"]),
                "--organ-labels",
                ORGAN_SPEC,
                "--body",
                "nonzero",
                "--n-opt",
                "8",
                "--d-opt",
                "60",
                "--gammas",
                "0.5",
                "--organ-omega-from",
                "zero",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    assert "liver: lambda" in capsys.readouterr().out
    assert load_interval_profile(profile_path).calibration.method == "sem-crc-organ"

    out = tmp_path / "applied"
    argv = [
        "apply",
        "--profile",
        str(profile_path),
        "--out",
        str(out),
        "--lower",
        str(folders["lower"] / "case01.npy"),
        "--upper",
        str(folders["upper"] / "case01.npy"),
        "--organs",
        str(folders["organs"] / "case01.npy"),
        "--truth",
        str(folders["truth"] / "case01.npy"),
    ]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "interval_length.nii.gz",
        "intervals.csv",
        "intervals.json",
        "lower_conformal.nii.gz",
        "upper_conformal.nii.gz",
    ]
    capsys.readouterr()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    # apply --epsilon recalibrates from the profile's stored per-scan thresholds (no calibration volume read)
    out2 = tmp_path / "applied_eps"
    assert main([*argv[:4], str(out2), *argv[5:], "--epsilon", "0.3"]) == 0
    table = json.loads((out2 / "intervals.json").read_text())
    assert table["epsilon"] == 0.3
    expected = load_interval_profile(profile_path).recalibrate(0.3).lambdas
    assert {r["group"]: r["lambda"] for r in table["groups"]} == pytest.approx(expected)
    assert (
        main(
            [
                "apply",
                "--profile",
                str(profile_path),
                "--out",
                str(tmp_path / "x"),
                "--lower",
                str(folders["lower"] / "case01.npy"),
                "--upper",
                str(folders["upper"] / "case01.npy"),
            ]
        )
        == 2
    )
    assert "--organs" in capsys.readouterr().err


def test_cli_options_reuse_existing_flags() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=7)
    add_interval_arguments(p)  # must not raise "conflicting option string"
    assert p.parse_args([]).seed == 7


def test_cli_evaluate_writes_table_1_and_figure_3(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ConformalSegLib.cli import main

    n = len(list(folders["lower"].glob("*.npy")))
    out = tmp_path / "ev"
    assert (
        main(
            [
                "evaluate",
                "--lower",
                str(folders["lower"]),
                "--upper",
                str(folders["upper"]),
                "--truth",
                str(folders["truth"]),
                "--organs",
                str(folders["organs"]),
                "--organ-labels",
                ORGAN_SPEC,
                "--body",
                "nonzero",
                "--n-opt",
                "6",
                "--d-opt",
                "40",
                "--gammas",
                "0.5",
                "--runs",
                "2",
                "--n-cal",
                str(n // 2 + 2),
                "--interval-epsilon",
                "0.2",
                "--out",
                str(out),
            ]
        )
        == 0
    ), capsys.readouterr().err
    summary = json.loads((out / "interval_evaluation.json").read_text())
    assert set(summary["methods"]) == {"crc", "k-crc", "sem-crc", "sem-crc-organ"} and summary["runs"] == 2
    assert (out / "interval_evaluation.png").stat().st_size > 0
    assert "| Procedure | Risk |" in (out / "interval_evaluation.md").read_text()


def test_cli_shrinkable_crc_interval_and_its_refusal(folders: dict[str, Path], tmp_path: Path, capsys) -> None:
    from ConformalSegLib.cli import main

    data = ["--lower", str(folders["lower"]), "--upper", str(folders["upper"]), "--truth", str(folders["truth"])]
    out = tmp_path / "shrink.json"
    assert (
        main(["calibrate", "--method", "crc-interval", "--epsilon", "0.2", "--shrinkable", "--out", str(out), *data])
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["shrink_floor"] < 0 and load_interval_profile(out).calibration.shrink_floor == doc["shrink_floor"]
    organs = ["--organs", str(folders["organs"]), "--organ-labels", ORGAN_SPEC]
    per_organ = ["calibrate", "--method", "sem-crc-organ", "--epsilon", "0.2", "--shrinkable", "--n-opt", "8"]
    assert (
        main([*per_organ, "--d-opt", "60", "--gammas", "0.5", "--out", str(tmp_path / "o.json"), *data, *organs]) == 0
    )
    profile = load_interval_profile(tmp_path / "o.json")
    assert profile.calibration.shrink_floor is not None and profile.record is not None  # recalibrates too
    lower = np.load(folders["lower"] / "case01.npy")
    applied = apply_interval(
        profile, lower, np.load(folders["upper"] / "case01.npy"), np.load(folders["organs"] / "case01.npy")
    )
    assert np.all(applied.length >= 0)  # shrunk at most to the midpoint, never inverted
    argv = ["calibrate", "--method", "sem-crc", "--epsilon", "0.2", "--shrinkable", "--out", str(tmp_path / "x.json")]
    assert main([*argv, *data, *organs]) == 2
    assert "--shrinkable is implemented for crc-interval and sem-crc-organ, not sem-crc" in capsys.readouterr().err
