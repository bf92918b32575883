"""Scale-out of `evaluate` (issue 15): one task per case on a process pool and on a Dask cluster of two worker
processes, every output file byte-identical to serial; a worker that raises; --keep-going; refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.executors import ExecutorSpec
from ConformalSegLib.evaluation.protocol import evaluate_dataset
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset
from ConformalSegLib.phantoms.simulated_maps import make_cases

distributed = pytest.importorskip("distributed")

SMALL = ["--splits", "4", "--epsilons", "0.1", "0.2", "--alphas", "0.1", "0.2", "--main-epsilon", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("eval_dask") / "data", 8, seed=5, shape=(16, 20, 20))


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (not threads), one thread each, started by the test module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        yield local.scheduler_address


def evaluate(data: Path, out: Path, *extra: str) -> int:
    argv = ["evaluate", "--data", str(data), "--lesion-label", "2", *SMALL, "--out", str(out), *extra]
    return main(argv)


def assert_same_files(serial: Path, other: Path) -> None:
    names = sorted(p.name for p in serial.iterdir())
    assert names == sorted(p.name for p in other.iterdir()) and "results.json" in names and "report.md" in names
    for name in names:
        assert (serial / name).read_bytes() == (other / name).read_bytes(), name


def test_dask_cluster_and_process_pool_are_byte_identical_to_serial(tmp_path, data, cluster):
    assert evaluate(data, tmp_path / "serial", "--transforms", "identity", "distance") == 0
    dask = ("--executor", "dask", "--scheduler", cluster)
    assert evaluate(data, tmp_path / "dask", "--transforms", "identity", "distance", *dask) == 0
    assert_same_files(tmp_path / "serial", tmp_path / "dask")
    pool = ("--executor", "processes", "--workers", "2", "--no-hd95", "--transforms", "identity")
    assert evaluate(data, tmp_path / "serial_fast", "--no-hd95", "--transforms", "identity") == 0
    assert evaluate(data, tmp_path / "pool", *pool) == 0
    assert_same_files(tmp_path / "serial_fast", tmp_path / "pool")


def test_splits_run_as_tasks_in_chunks_bit_identical(tmp_path, data, cluster, monkeypatch):
    """The splits are drawn on the driver and calibrated in chunks on the workers (two splits per task here:
    13 splits = 7 tasks, the last one short): every file equals the serial run's, one chunk per 10 splits."""
    from ConformalSegLib.evaluation import split_tasks

    calls = []
    chunk = split_tasks.calibrate_split_chunk
    monkeypatch.setattr(
        split_tasks, "calibrate_split_chunk", lambda shared, perms: calls.append(len(perms)) or chunk(shared, perms)
    )
    grid = ["--splits", "13", "--no-hd95", "--transforms", "identity", "distance"]
    assert evaluate(data, tmp_path / "serial", *grid) == 0
    assert calls == [10, 3]  # serially: the same chunks, run here
    monkeypatch.setattr(split_tasks, "calibrate_split_chunk", chunk)  # the workers import the real one
    monkeypatch.setattr(split_tasks, "SPLITS_PER_TASK", 2)
    assert evaluate(data, tmp_path / "dask", *grid, "--executor", "dask", "--scheduler", cluster) == 0
    assert_same_files(tmp_path / "serial", tmp_path / "dask")


def nan_copy(data: Path, root: Path, bad: tuple[str, ...]) -> Path:
    shutil.copytree(data, root)
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
    root = nan_copy(data, tmp_path / "bad", ("synth_002",))
    errors = []
    for extra in ((), ("--executor", "dask", "--scheduler", cluster)):
        assert evaluate(root, tmp_path / "out", "--no-hd95", "--transforms", "identity", *extra) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err and "synth_002" in lines[0], err
        errors.append(lines[0])
        assert not (tmp_path / "out" / "results.json").exists()
    assert errors[0] == errors[1]


def test_keep_going_leaves_out_bad_cases_named_in_one_warning(tmp_path, data, cluster, capsys):
    root = nan_copy(data, tmp_path / "bad", ("synth_001", "synth_006"))
    (root / "probs" / "synth_004.nii.gz").write_bytes(b"not a NIfTI file")
    fast = ("--no-hd95", "--transforms", "identity")
    dask = ("--executor", "dask", "--scheduler", cluster, "--keep-going")
    assert evaluate(root, tmp_path / "kept", *fast, *dask) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "left out 3 unreadable case(s)" in line]
    assert len(warned) == 1 and all(f"synth_00{i}" in warned[0] for i in (1, 4, 6)), err
    good = tmp_path / "good"
    shutil.copytree(data, good)
    for case in ("synth_001", "synth_004", "synth_006"):
        for sub in ("probs", "labels"):
            (good / sub / f"{case}.nii.gz").unlink()
    assert evaluate(good, tmp_path / "serial", *fast) == 0
    assert_same_files(tmp_path / "serial", tmp_path / "kept")
    assert evaluate(root, tmp_path / "serial_kept", *fast, "--keep-going") == 0  # serially too
    assert_same_files(tmp_path / "serial", tmp_path / "serial_kept")


def test_refusals(tmp_path, data, capsys):
    assert evaluate(data, tmp_path / "o", "--keep-going", "--risk-delta", "0.2") == 2
    assert "--keep-going cannot be combined with --risk-delta" in capsys.readouterr().err
    cases = list(make_cases(4, seed=0, shape=(16, 16, 16)))
    with pytest.raises(ConformalSegError, match="need a dataset"):
        evaluate_dataset(
            cases, epsilons=[0.1], alphas=[0.2], splits=2, hd95=False, executor=ExecutorSpec("processes", workers=2)
        )


def test_one_local_cluster_serves_both_passes(tmp_path, data, monkeypatch):
    from ConformalSegLib.common.executors import executor_session
    from ConformalSegLib.io.dataset import CalibrationDataset

    for spec in (ExecutorSpec(), ExecutorSpec("dask", scheduler="tcp://h:1")):
        with executor_session(spec) as same:
            assert same is spec
    started = []
    original = distributed.LocalCluster

    def counting(*args, **kwargs):
        started.append(kwargs.get("n_workers"))
        return original(*args, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", counting)
    dataset = CalibrationDataset.from_root(data, [2])
    result = evaluate_dataset(
        dataset,
        epsilons=[0.1],
        alphas=[0.2],
        splits=2,
        hd95=False,
        transforms=(),
        executor=ExecutorSpec("dask", workers=1),
    )
    assert started == [1] and result.n_cases == 8


def scaled(shared: int, item: int) -> int:
    if item < 0:
        raise ConformalSegError(f"case {item} is negative", fix="use a positive case")
    return shared * item


def test_a_session_pool_serves_several_maps_with_their_own_shared_values():
    from ConformalSegLib.common.executors import MapReport, executor_session, map_ordered

    with executor_session(ExecutorSpec("processes", workers=2)) as spec:
        assert spec.pool is not None and spec == ExecutorSpec("processes", workers=2)
        assert map_ordered(scaled, 2, list(range(6)), spec) == [0, 2, 4, 6, 8, 10]
        assert map_ordered(scaled, 3, list(range(6)), spec) == [0, 3, 6, 9, 12, 15]
        with pytest.raises(ConformalSegError, match="case -1 is negative"):
            map_ordered(scaled, 1, [1, -1, 2], spec)
        report = MapReport("processes", 1, [])
        kept = map_ordered(scaled, 5, [1, -1, 2, -3], spec, keep_going=True, skip_failed=True, report=report)
        assert kept == [5, 10] and [name for name, _ in report.failures] == ["-1", "-3"]
