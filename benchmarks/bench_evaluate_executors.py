"""`evaluate` on a process pool and on a Dask LocalCluster against serial (issue 15), in one run.

``n = 60`` on-disk cases (``--quick``: 16), NIfTI probability and label maps of 24 x 48 x 48 voxels written by
``phantoms.simulated_dataset``. Each executor runs ``evaluate_dataset`` (20 splits, epsilons 0.1 / 0.2,
alphas 0.1 / 0.2, the identity and distance confidence sets, lesion-wise false positives, no HD95): both
passes read every case on a worker (pass 1 returns the case's summary, pass 2 its additions to the per-split
sums) and the driver merges them in case order.

* serial (this process), ``processes`` (one pool of 2 spawned processes for both passes, started inside the timing),
  ``dask`` on a LocalCluster of 2 worker processes, 1 thread each (started once, outside the timing; its
  start-up is reported apart, and one untimed run lets the workers import the library), as wall time and as
  a ratio to serial. The results must be identical: ``results.json`` is written for each and compared byte
  for byte.

Run: ``.venv/bin/python benchmarks/bench_evaluate_executors.py [--quick]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common as C

from ConformalSegLib.common.executors import ExecutorSpec
from ConformalSegLib.evaluation.protocol import evaluate_dataset
from ConformalSegLib.evaluation.report import write_report
from ConformalSegLib.io.dataset import CalibrationDataset
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

WORKERS = 2


def timed_evaluation(root: Path, spec: ExecutorSpec, splits: int, out: Path) -> float:
    dataset = CalibrationDataset.from_root(root, [2])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate_dataset(
            dataset,
            epsilons=[0.1, 0.2],
            alphas=[0.1, 0.2],
            splits=splits,
            transforms=("identity", "distance"),
            hd95=False,
            executor=spec,
        )
    seconds = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report(result, out, force=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    from distributed import LocalCluster

    n, splits = (16, 5) if args.quick else (60, 20)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        C.log(f"writing {n} cases ...")
        write_synthetic_dataset(root, n, seed=args.seed, shape=(24, 48, 48))
        outs = {name: Path(tmp) / name for name in ("serial", "pool", "dask")}
        timed_evaluation(root, ExecutorSpec(), splits, outs["serial"])  # warm the file cache and the imports
        C.log("serial ...")
        t_serial = timed_evaluation(root, ExecutorSpec(), splits, outs["serial"])
        C.log("processes ...")
        t_pool = timed_evaluation(root, ExecutorSpec("processes", workers=WORKERS), splits, outs["pool"])
        t0 = time.perf_counter()
        with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            t_start = time.perf_counter() - t0
            spec = ExecutorSpec("dask", scheduler=cluster.scheduler_address)
            C.log("dask ...")
            timed_evaluation(root, spec, splits, outs["dask"])  # workers import the library once
            t_dask = timed_evaluation(root, spec, splits, outs["dask"])
        reference = (outs["serial"] / "results.json").read_bytes()
        for name in ("pool", "dask"):
            if (outs[name] / "results.json").read_bytes() != reference:
                raise SystemExit(f"results.json of {name} differs from serial")
    quick = " --quick" if args.quick else ""
    print(f"### evaluate: serial vs process pool vs Dask (bench_evaluate_executors.py{quick})\n")
    print(
        f"- {C.machine_line()}; n = {n} on-disk cases of 24 x 48 x 48 voxels, {splits} splits, 2 x 2 (epsilon, "
        f"alpha), identity + distance sets, no HD95; {WORKERS} workers.\n"
    )
    runs = [
        ("serial (this process)", t_serial),
        (f"processes ({WORKERS}, one pool for both passes, start included)", t_pool),
        (f"dask LocalCluster ({WORKERS} processes)", t_dask),
    ]
    rows = [[name, C.fmt_s(t), f"{n / t:.1f}", C.fmt_ratio(t / t_serial)] for name, t in runs]
    print(C.md_table(["executor", "wall time", "cases/s", "time vs serial"], rows))
    print(
        f"\n`results.json` byte-identical for all three. LocalCluster start-up {C.fmt_s(t_start)} (once, not in "
        "the table)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
