"""Scale-out: calibrate on a process pool and on a Dask cluster of two worker processes, bit-identical to serial;
a worker that raises; --keep-going; cancellation (issue 15)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.executors import ExecutorSpec, MapReport, map_ordered
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

distributed = pytest.importorskip("distributed")

METHODS = {
    "cls": ["--epsilon", "0.1", "--alpha", "0.2"],
    "crc": ["--epsilon", "0.1"],
    "lesion": ["--epsilon", "0.25", "--alpha", "0.2", "--voxel-epsilon", "0.2"],
    "sets": ["--alpha", "0.2", "--transform", "distance"],
    # every per-scan summary at once: lesion-level (lesion-miss), false-positive values and components
    "ltt": ["--delta", "0.3", "--risk", "fnr=0.3", "--risk", "lesion-miss=0.5", "--risk", "fp-components=3"],
    "rcps": ["--epsilon", "0.3", "--delta", "0.3", "--bound", "wsr"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("dask") / "data", 10, seed=3, shape=(16, 28, 28))


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (not threads), one thread each, started by the test."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        yield local.scheduler_address


def calibrate(data, out, method, *extra):
    argv = ["calibrate", "--method", method, "--data", data, "--lesion-label", "2", *METHODS[method], "--out", out]
    argv += extra
    return main([str(a) for a in argv])


def without_run_details(path: Path) -> dict:
    record = json.loads(path.read_text())
    for key in ("created", "executor", "workers"):
        record["provenance"].pop(key, None)
    record["summaries"].pop("file")  # serial.npz / dask.npz; the sha256 of the contents stays compared
    record.pop("content_sha256")  # covers the provenance above
    return record


def assert_identical(serial: Path, other: Path) -> None:
    assert without_run_details(serial) == without_run_details(other)
    a, b = np.load(serial.with_suffix(".npz")), np.load(other.with_suffix(".npz"))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_dask_cluster_is_bit_identical_to_serial(tmp_path, data, cluster, method):
    assert calibrate(data, tmp_path / "serial.json", method) == 0
    assert calibrate(data, tmp_path / "dask.json", method, "--executor", "dask", "--scheduler", cluster) == 0
    assert_identical(tmp_path / "serial.json", tmp_path / "dask.json")
    provenance = json.loads((tmp_path / "dask.json").read_text())["provenance"]
    assert provenance["executor"] == "dask" and provenance["workers"] == 2
    assert json.loads((tmp_path / "serial.json").read_text())["provenance"]["executor"] == "serial"


def test_process_pool_is_bit_identical_to_serial(tmp_path, data):
    assert calibrate(data, tmp_path / "serial.json", "cls", "--precision", "uint16") == 0
    extra = ("--precision", "uint16", "--executor", "processes", "--workers", "2")
    assert calibrate(data, tmp_path / "pool.json", "cls", *extra) == 0
    assert_identical(tmp_path / "serial.json", tmp_path / "pool.json")
    assert json.loads((tmp_path / "pool.json").read_text())["provenance"]["workers"] == 2


def broken_copy(data: Path, root: Path, bad: tuple[str, ...]) -> Path:
    for sub in ("probs", "labels"):
        (root / sub).mkdir(parents=True)
        for name in sorted((data / sub).iterdir())[:5]:
            (root / sub / name.name).write_bytes(name.read_bytes())
    for case in bad:
        target = root / "probs" / f"{case}.nii.gz"
        image = sitk.ReadImage(str(target))
        array = sitk.GetArrayFromImage(image)
        array[0, 0, 0] = np.nan
        new = sitk.GetImageFromArray(array)
        new.CopyInformation(image)
        sitk.WriteImage(new, str(target))
    return root


def test_worker_error_is_the_serial_one_line_error(tmp_path, data, cluster, capsys):
    root = broken_copy(data, tmp_path / "bad", ("synth_002",))
    errors = []
    for extra in ((), ("--executor", "dask", "--scheduler", cluster), ("--executor", "processes", "--workers", "2")):
        assert calibrate(root, tmp_path / "p.json", "cls", *extra) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err and "synth_002" in lines[0], err
        errors.append(lines[0])
        assert not (tmp_path / "p.json").exists() and not (tmp_path / "p.npz").exists()
    assert errors[0] == errors[1] == errors[2]


def test_keep_going_reports_every_bad_case(tmp_path, data, cluster, capsys):
    root = broken_copy(data, tmp_path / "bad", ("synth_001", "synth_003"))
    extra = ("--executor", "dask", "--scheduler", cluster, "--keep-going")
    assert calibrate(root, tmp_path / "p.json", "cls", *extra) == 2
    err = capsys.readouterr().err
    assert "2 of 5 case(s) failed" in err and "synth_001" in err and "synth_003" in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def fails_on_odd(shared: int, item: int) -> int:
    if item % 2:
        raise ConformalSegError(f"case {item} is odd", path=f"/data/{item}.nii.gz", fix="use an even case")
    return shared * item


def sleepy(marker_dir: str, item: int) -> int:
    time.sleep(0.3)
    Path(marker_dir, f"{item}.done").write_text("")
    return item


def test_map_ordered_in_order_with_errors_and_report():
    report = MapReport("serial", 1, [])
    spec = ExecutorSpec("processes", workers=2)
    assert map_ordered(fails_on_odd, 3, [4, 2, 0, 6], spec, report=report) == [12, 6, 0, 18]
    assert report.provenance() == {"executor": "processes", "workers": 2}
    with pytest.raises(ConformalSegError) as caught:
        map_ordered(fails_on_odd, 3, [2, 5], spec)
    assert str(caught.value) == "/data/5.nii.gz: case 5 is odd Fix: use an even case"
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    with pytest.raises(ConformalSegError, match=r"2 of 4 case\(s\) failed"):
        map_ordered(fails_on_odd, 3, [1, 2, 3, 4], ExecutorSpec("serial"), keep_going=True, labels="abcd")
    with pytest.raises(ConformalSegError, match="cannot reach the Dask scheduler at not an address"):
        map_ordered(fails_on_odd, 3, [2], ExecutorSpec("dask", scheduler="not an address"))
    with pytest.raises(ConformalSegError, match="--scheduler needs --executor dask"):
        ExecutorSpec("processes", scheduler="tcp://127.0.0.1:1")


def test_dask_without_a_scheduler_starts_a_local_cluster():
    report = MapReport("serial", 1, [])
    assert map_ordered(fails_on_odd, 3, [2, 4, 0], ExecutorSpec("dask", workers=2), report=report) == [6, 12, 0]
    assert report.provenance() == {"executor": "dask", "workers": 2}


@pytest.mark.parametrize("executor", ["processes", "dask"])
def test_ctrl_c_cancels_the_remaining_tasks(tmp_path, cluster, executor):
    def interrupt(done, total, label):
        raise KeyboardInterrupt

    spec = ExecutorSpec(executor, scheduler=cluster if executor == "dask" else None, workers=2)
    with pytest.raises(KeyboardInterrupt):
        map_ordered(sleepy, str(tmp_path), list(range(40)), spec, progress=interrupt)
    time.sleep(1.0)  # tasks already running may finish; the cancelled ones never start
    assert len(list(tmp_path.glob("*.done"))) < 10


def test_ctrl_c_during_calibrate_writes_no_profile(tmp_path, data, monkeypatch, capsys):
    from ConformalSegLib.conformal import calibration

    real = calibration.summarize_dataset_case
    seen = []

    def interrupted(shared, case_id):
        seen.append(case_id)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(shared, case_id)

    monkeypatch.setattr(calibration, "summarize_dataset_case", interrupted)
    assert calibrate(data, tmp_path / "p.json", "cls", "--keep-going") == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(seen) == 3 and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def mask_data(data, tmp_path_factory):
    """The synthetic cases as a mask-only tool's output: predicted labels (lesion 2 where p >= 0.5, the true
    organ 1 elsewhere) next to the true label maps."""
    root = tmp_path_factory.mktemp("dask_masks")
    (root / "masks").mkdir()
    for path in sorted((data / "probs").glob("*.nii.gz")):
        prob = sitk.ReadImage(str(path))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labels" / path.name)))
        predicted = np.where(sitk.GetArrayFromImage(prob) >= 0.5, 2, np.where(truth == 1, 1, 0)).astype(np.uint8)
        image = sitk.GetImageFromArray(predicted)
        image.CopyInformation(prob)
        sitk.WriteImage(image, str(root / "masks" / path.name))
    return root


def calibrate_masks(data, masks, out, *extra):
    argv = ["calibrate", "--method", "sets", "--transform", "distance", "--alpha", "0.2", "--masks", masks]
    argv += ["--labels", data / "labels", "--structures", "1=organ,2=lesion", "--out", out, *extra]
    return main([str(a) for a in argv])


def test_masks_on_executors_are_bit_identical_to_serial(tmp_path, data, mask_data, cluster):
    masks = mask_data / "masks"
    assert calibrate_masks(data, masks, tmp_path / "serial" / "s.json") == 0
    dask = ("--executor", "dask", "--scheduler", cluster)
    assert calibrate_masks(data, masks, tmp_path / "dask" / "s.json", *dask) == 0
    assert calibrate_masks(data, masks, tmp_path / "pool" / "s.json", "--executor", "processes", "--workers", "2") == 0
    for structure in ("organ", "lesion"):
        serial = tmp_path / "serial" / f"s.{structure}.json"
        for other in ("dask", "pool"):
            assert_identical(serial, tmp_path / other / f"s.{structure}.json")
        provenance = json.loads((tmp_path / "dask" / f"s.{structure}.json").read_text())["provenance"]
        assert provenance["executor"] == "dask" and provenance["workers"] == 2


def test_masks_keep_going_names_every_bad_case(tmp_path, data, mask_data, cluster, capsys):

    masks = tmp_path / "masks"
    shutil.copytree(mask_data / "masks", masks)
    bad = sorted(masks.glob("*.nii.gz"))[1::4]
    for path in bad:
        path.write_bytes(path.read_bytes()[:100])
    dask = ("--executor", "dask", "--scheduler", cluster, "--keep-going")
    assert calibrate_masks(data, masks, tmp_path / "s.json", *dask) == 2
    err = capsys.readouterr().err
    assert all(path.name in err for path in bad) and "Traceback" not in err
    assert not any(tmp_path.glob("s*.json"))


def test_groups_and_weighting_on_executors_are_bit_identical_to_serial(tmp_path, data, cluster, tmp_path_factory):
    """--group-by (lesion volumes) and --target-scans (scan features) are computed on the workers with each
    case's summary: the group-conditional and the weighted profiles equal serial ones."""
    target = write_synthetic_dataset(tmp_path_factory.mktemp("target") / "t", 6, seed=60, shape=(16, 28, 28))
    dask = ("--executor", "dask", "--scheduler", cluster)
    for name, extra in (("size", ("--group-by", "lesion-size:0.05")), ("weighted", ("--target-scans", target))):
        assert calibrate(data, tmp_path / f"{name}_serial.json", "cls", *extra) == 0
        assert calibrate(data, tmp_path / f"{name}_dask.json", "cls", *extra, *dask) == 0
        assert_identical(tmp_path / f"{name}_serial.json", tmp_path / f"{name}_dask.json")
    assert json.loads((tmp_path / "size_dask.json").read_text()).get("groups")
    assert json.loads((tmp_path / "weighted_dask.json").read_text()).get("weighting")


@pytest.fixture(scope="module")
def interval_data(tmp_path_factory):
    """24 interval cases (lower / upper / truth / organs) as NIfTI."""
    import nibabel as nib

    from ConformalSegLib.semcrc import synthetic_intervals

    root = tmp_path_factory.mktemp("dask_intervals")
    syn = synthetic_intervals(24, shape=(2, 8, 8), seed=2)
    for name in ("lower", "upper", "truth", "organs"):
        (root / name).mkdir()
    for i in range(24):
        arrays = {"lower": syn.lower[i], "upper": syn.upper[i], "truth": syn.truth[i]}
        for name, array in arrays.items():
            nib.save(nib.Nifti1Image(array.astype(np.float32).T, np.eye(4)), str(root / name / f"c{i:02d}.nii.gz"))
        organs = (syn.labels[i] % 3).astype(np.int16).T
        nib.save(nib.Nifti1Image(organs, np.eye(4)), str(root / "organs" / f"c{i:02d}.nii.gz"))
    return root


def interval_calibrate(root, out, method, *extra):
    argv = ["calibrate", "--method", method, "--lower", root / "lower", "--upper", root / "upper"]
    argv += ["--truth", root / "truth", "--epsilon", "0.2", "--out", out, *extra]
    if method.startswith("sem-crc"):
        argv += ["--organs", root / "organs", "--organ-labels", "1=liver,2=spleen", "--n-opt", "8"]
    return main([str(a) for a in argv])


def assert_same_interval_profile(serial: Path, other: Path) -> None:
    a, b = (json.loads(p.read_text()) for p in (serial, other))
    for record in (a, b):
        for key in ("created_utc", "executor", "workers"):
            record["provenance"].pop(key, None)
        for key in ("content_sha256", "seconds"):  # the checksum covers the run details above; timings
            record.pop(key, None)
        record["record"].pop("file")  # serial.npz / dask.npz (its sha256 stays compared)
    assert a == b
    x, y = np.load(serial.with_suffix(".npz")), np.load(other.with_suffix(".npz"))
    assert sorted(x.files) == sorted(y.files)
    for name in x.files:
        assert x[name].tobytes() == y[name].tobytes(), name


@pytest.mark.parametrize("method", ["crc-interval", "sem-crc", "sem-crc-organ --shrinkable"])
def test_interval_methods_on_executors_are_bit_identical_to_serial(tmp_path, interval_data, cluster, method):
    method, *flags = method.split()
    assert interval_calibrate(interval_data, tmp_path / "serial.json", method, *flags) == 0
    assert interval_calibrate(interval_data, tmp_path / "dask.json", method, *flags, "--executor", "dask",
                              "--scheduler", cluster) == 0  # fmt: skip
    assert interval_calibrate(interval_data, tmp_path / "pool.json", method, *flags, "--executor", "processes",
                              "--workers", "2") == 0  # fmt: skip
    for other in ("dask", "pool"):
        assert_same_interval_profile(tmp_path / "serial.json", tmp_path / f"{other}.json")
    assert json.loads((tmp_path / "dask.json").read_text())["provenance"]["executor"] == "dask"


def truncated_copy(data: Path, root: Path, cases: tuple[str, ...]) -> Path:
    """A copy of the interval cases whose ``cases`` have a truth file cut after 60 bytes (unreadable)."""

    shutil.copytree(data, root)
    for case in cases:
        path = root / "truth" / f"{case}.nii.gz"
        path.write_bytes(path.read_bytes()[:60])
    return root


def test_interval_keep_going_names_every_bad_case(tmp_path, interval_data, cluster, capsys):
    root = truncated_copy(interval_data, tmp_path / "iv", ("c05", "c17"))
    extra = ("--executor", "dask", "--scheduler", cluster, "--keep-going")
    assert interval_calibrate(root, tmp_path / "p.json", "crc-interval", *extra) == 2
    err = capsys.readouterr().err
    assert "2 of 24 case(s) failed" in err and "c05: " in err and "c17: " in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def interval_evaluate(root, out, *extra):
    argv = ["evaluate", "--lower", root / "lower", "--upper", root / "upper", "--truth", root / "truth"]
    argv += ["--organs", root / "organs", "--organ-labels", "1=liver,2=spleen", "--runs", "3", "--n-cal", "14"]
    argv += ["--n-opt", "6", "--interval-epsilon", "0.2", "--out", out, *extra]
    return main([str(a) for a in argv])


def assert_same_report(a: Path, b: Path) -> None:
    for name in ("interval_evaluation.json", "interval_evaluation.md", "interval_evaluation.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_interval_evaluation_on_executors_is_byte_identical_to_serial(tmp_path, interval_data, cluster, capsys):
    """All four methods (CRC, K-CRC, sem-CRC, per-organ sem-CRC), 3 runs: every file byte-identical."""
    assert interval_evaluate(interval_data, tmp_path / "serial") == 0
    assert "(--executor" not in capsys.readouterr().out
    spill = tmp_path / "spill"
    spill.mkdir()
    dask = ("--executor", "dask", "--scheduler", cluster, "--spill-dir", spill)
    assert interval_evaluate(interval_data, tmp_path / "dask", *dask) == 0
    assert "(--executor dask)" in capsys.readouterr().out
    assert interval_evaluate(interval_data, tmp_path / "pool", "--executor", "processes", "--workers", "2") == 0
    for other in ("dask", "pool"):
        assert_same_report(tmp_path / "serial", tmp_path / other)
    assert list(spill.iterdir()) == []  # the spilled scans are removed at the end
    methods = json.loads((tmp_path / "dask" / "interval_evaluation.json").read_text())["methods"]
    assert sorted(methods) == ["crc", "k-crc", "sem-crc", "sem-crc-organ"]
    assert all(len(m["runs"]["risk"]) == 3 for m in methods.values())


def test_interval_evaluation_keep_going_leaves_bad_scans_out(tmp_path, interval_data, cluster, capsys):
    root = truncated_copy(interval_data, tmp_path / "iv", ("c05", "c17"))
    dask = ("--executor", "dask", "--scheduler", cluster)
    spill = tmp_path / "spill"
    spill.mkdir()
    assert interval_evaluate(root, tmp_path / "stop", *dask, "--spill-dir", spill) == 2  # stops at a bad scan
    assert not (tmp_path / "stop").exists()
    assert list(spill.iterdir()) == []  # removed although the other worker was still spilling scans
    assert "c05.nii.gz: cannot read the image" in capsys.readouterr().err
    assert interval_evaluate(root, tmp_path / "kept", *dask, "--keep-going") == 0
    err = capsys.readouterr().err
    assert "left out 2 unreadable case(s): c05: " in err and "; c17: " in err and "Traceback" not in err
    good = tmp_path / "good"
    shutil.copytree(interval_data, good)
    for sub in ("lower", "upper", "truth", "organs"):
        for case in ("c05", "c17"):
            (good / sub / f"{case}.nii.gz").unlink()
    assert interval_evaluate(good, tmp_path / "serial_good") == 0
    kept = json.loads((tmp_path / "kept" / "interval_evaluation.json").read_text())
    assert [row["case"] for row in kept.pop("left_out")] == ["c05", "c17"]
    assert kept == json.loads((tmp_path / "serial_good" / "interval_evaluation.json").read_text())
    assert (
        "Left out (--keep-going), 2 unreadable scan(s): c05"
        in (tmp_path / "kept" / "interval_evaluation.md").read_text()
    )
    for path in sorted((root / "truth").iterdir())[1:]:  # one readable scan left: too few, said plainly
        path.write_bytes(path.read_bytes()[:60])
    assert interval_evaluate(root, tmp_path / "one", "--keep-going") == 2
    assert "only 1 readable scan(s) of 24: the evaluation needs at least 2" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()


def test_interval_evaluation_spill_dir_refusals(tmp_path, interval_data, capsys):
    assert interval_evaluate(interval_data, tmp_path / "o", "--spill-dir", tmp_path / "absent") == 2
    assert "--spill-dir must be an existing folder" in capsys.readouterr().err
    assert interval_evaluate(interval_data, tmp_path / "o", "--spill-dir", interval_data / "truth") == 2
    assert "--spill-dir is inside the input folder --truth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_worker_that_cannot_see_the_spilled_scans_says_so(tmp_path):
    """A worker on another machine without the spill folder: one message naming the file and --spill-dir."""
    from ConformalSegLib.semcrc import synthetic_intervals
    from ConformalSegLib.semcrc.evaluation import evaluate_interval_methods
    from ConformalSegLib.semcrc.intervals import IntervalData
    from ConformalSegLib.semcrc.spill import spill_scan

    data = synthetic_intervals(6, shape=(1, 6, 6), seed=1).data()
    spilled = IntervalData([spill_scan(s, tmp_path / f"s{i}") for i, s in enumerate(data.scans)], data.groups)
    missing = tmp_path / "s3" / "need.npy"
    missing.unlink()  # what a worker on another machine sees of a local spill folder
    spec = ExecutorSpec("processes", workers=2)

    def map_tasks(task, shared, items, labels):
        return map_ordered(task, shared, items, spec, labels=labels)

    with pytest.raises(ConformalSegError, match="spilled arrays are not on this machine") as caught:
        evaluate_interval_methods(spilled, 0.2, runs=2, n_cal=3, methods=("crc",), map_tasks=map_tasks)
    assert str(caught.value.path) == str(missing) and "--spill-dir" in caught.value.fix
