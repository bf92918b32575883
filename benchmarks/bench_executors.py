"""Calibrating on a process pool and on a Dask LocalCluster against serial (issue 15), in one run.

``n = 200`` small on-disk cases (``--quick``: 30), NIfTI probability and label maps of 16 x 32 x 32 voxels
written by ``phantoms.simulated_dataset``. Each executor runs ``calibrate_dataset`` (CLS, epsilon 0.1,
alpha 0.1): every case is read, checked and summarized on a worker, the driver merges the summaries in case
order and computes the exact threshold.

* serial (this process), ``processes`` (a pool of 2 processes, started inside the timing), ``dask`` on a
  LocalCluster of 2 worker processes, 1 thread each (started once, outside the timing; its start-up time is
  reported apart), as wall time and as a ratio to serial; every profile's threshold and summaries are
  checked identical to serial's;
* Dask's scheduler overhead per task: a map of no-op tasks over the same cluster, wall time / tasks.

Cases this small are the worst case for scale-out (reading a case takes milliseconds, so per-task overhead
weighs most); real scans take seconds each and the ratios move towards 1 / workers.

Run: ``.venv/bin/python benchmarks/bench_executors.py [--quick]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np

from ConformalSegLib.common.executors import ExecutorSpec, map_ordered
from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate_dataset
from ConformalSegLib.io.dataset import CalibrationDataset
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

WORKERS = 2


def noop(shared: object, item: int) -> int:
    return item


def timed_calibration(root: Path, spec: ExecutorSpec) -> tuple[float, object]:
    dataset = CalibrationDataset.from_root(root, [1])
    request = CalibrationRequest(method="cls", epsilon=0.1, alpha=0.1)
    t0 = time.perf_counter()
    profile = calibrate_dataset(dataset, request, spec)
    return time.perf_counter() - t0, profile


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    from distributed import LocalCluster

    n = 30 if args.quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        C.log(f"writing {n} cases ...")
        write_synthetic_dataset(root, n, seed=args.seed, shape=(16, 32, 32))
        timed_calibration(root, ExecutorSpec())  # warm the file cache and the imports
        t_serial, serial = timed_calibration(root, ExecutorSpec())
        t_pool, pool = timed_calibration(root, ExecutorSpec("processes", workers=WORKERS))
        t0 = time.perf_counter()
        with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            t_start = time.perf_counter() - t0
            spec = ExecutorSpec("dask", scheduler=cluster.scheduler_address)
            timed_calibration(root, spec)  # workers import the library once
            t_dask, dask = timed_calibration(root, spec)
            m = 10 * n
            t1 = time.perf_counter()
            map_ordered(noop, None, list(range(m)), spec)
            t_task = (time.perf_counter() - t1) / m
    for other in (pool, dask):
        assert other.calibration.probability_threshold == serial.calibration.probability_threshold
        assert np.array_equal(other.summaries.values, serial.summaries.values)
    print(f"### Scale-out: serial vs process pool vs Dask (bench_executors.py{' --quick' if args.quick else ''})\n")
    print(f"- {C.machine_line()}; n = {n} on-disk cases of 16 x 32 x 32 voxels, CLS; {WORKERS} workers.\n")
    runs = [
        ("serial (this process)", t_serial),
        (f"processes ({WORKERS}, pool start included)", t_pool),
        (f"dask LocalCluster ({WORKERS} processes)", t_dask),
    ]
    rows = [[name, C.fmt_s(t), f"{n / t:.0f}", C.fmt_ratio(t / t_serial)] for name, t in runs]
    print(C.md_table(["executor", "wall time", "cases/s", "time vs serial"], rows))
    print(
        f"\nAll three profiles identical (threshold and summaries). LocalCluster start-up {C.fmt_s(t_start)} "
        f"(once, not in the table); Dask scheduler overhead {C.fmt_s(t_task)} per task ({m} no-op tasks)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
