"""The interval methods' ``evaluate`` on a process pool and on a Dask LocalCluster against serial (issue 15).

``n = 40`` on-disk scans (``--quick``: 16) of ``synthetic_intervals`` (lower / upper quantile maps, truth, an
organ label map with two organs) as NIfTI, 4 x 64 x 64 voxels. Each executor runs ``conformalseg evaluate
--lower ...`` in this process (CRC, K-CRC, sem-CRC, per-organ sem-CRC; ``--runs 8``, ``--quick``: 3): one map
reads, checks and spills every scan on a worker, one map runs every (run, method) calibration and its test.

* serial, ``processes`` (2 spawned processes for both maps, started inside the timing), ``dask`` on a
  LocalCluster of 2 worker processes, 1 thread each (started once outside the timing; one untimed run lets the
  workers import the library), as wall time and ratio to serial. ``interval_evaluation.json`` must be
  byte-identical across the three: the benchmark compares it.

Run: ``.venv/bin/python benchmarks/bench_interval_evaluate_executors.py [--quick]``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import nibabel as nib
import numpy as np

from ConformalSegLib.cli import main as cli
from ConformalSegLib.semcrc import synthetic_intervals

WORKERS = 2
SHAPE = (4, 64, 64)


def write_scans(root: Path, n: int, seed: int) -> None:
    """``n`` scans as NIfTI: lower, upper, truth and an organ label map (values 0, 1, 2)."""
    syn = synthetic_intervals(n, shape=SHAPE, seed=seed)
    for name in ("lower", "upper", "truth", "organs"):
        (root / name).mkdir(parents=True)
    for i in range(n):
        for name, array in (("lower", syn.lower[i]), ("upper", syn.upper[i]), ("truth", syn.truth[i])):
            nib.save(nib.Nifti1Image(array.astype(np.float32).T, np.eye(4)), str(root / name / f"s{i:03d}.nii.gz"))
        organs = (syn.labels[i] % 3).astype(np.int16).T
        nib.save(nib.Nifti1Image(organs, np.eye(4)), str(root / "organs" / f"s{i:03d}.nii.gz"))


def timed_evaluate(root: Path, out: Path, runs: int, *extra: str) -> float:
    argv = ["evaluate", "--lower", root / "lower", "--upper", root / "upper", "--truth", root / "truth"]
    argv += ["--organs", root / "organs", "--organ-labels", "1=liver,2=spleen", "--runs", str(runs)]
    argv += ["--interval-epsilon", "0.1", "--out", out, "--force", *extra]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = cli([str(a) for a in argv])
    if status != 0:
        raise SystemExit(f"evaluate {' '.join(extra) or 'serial'} exited {status}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    from distributed import LocalCluster

    n, runs = (16, 3) if args.quick else (40, 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        C.log(f"writing {n} scans ...")
        write_scans(root, n, args.seed)
        outs = {name: Path(tmp) / name for name in ("serial", "pool", "dask")}
        for out in outs.values():
            out.mkdir()
        timed_evaluate(root, outs["serial"], runs)  # warm the file cache and the imports
        C.log("serial ...")
        t_serial = timed_evaluate(root, outs["serial"], runs)
        C.log("processes ...")
        t_pool = timed_evaluate(root, outs["pool"], runs, "--executor", "processes", "--workers", str(WORKERS))
        t0 = time.perf_counter()
        with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            t_start = time.perf_counter() - t0
            dask = ("--executor", "dask", "--scheduler", cluster.scheduler_address)
            C.log("dask ...")
            timed_evaluate(root, outs["dask"], runs, *dask)  # the workers import the library once
            t_dask = timed_evaluate(root, outs["dask"], runs, *dask)
        reference = (outs["serial"] / "interval_evaluation.json").read_bytes()
        for name in ("pool", "dask"):
            if (outs[name] / "interval_evaluation.json").read_bytes() != reference:
                raise SystemExit(f"interval_evaluation.json of {name} differs from serial")
    quick = " --quick" if args.quick else ""
    print(
        "### Interval methods' evaluate: serial vs process pool vs Dask "
        f"(bench_interval_evaluate_executors.py{quick})\n"
    )
    print(
        f"- {C.machine_line()}; n = {n} on-disk scans of {' x '.join(map(str, SHAPE))} voxels, two organs, {runs} "
        f"runs x 4 methods = {4 * runs} calibration tasks; {WORKERS} workers.\n"
    )
    rows = [
        [name, C.fmt_s(t), C.fmt_ratio(t / t_serial)]
        for name, t in (
            ("serial (this process)", t_serial),
            (f"processes ({WORKERS}, one pool for both maps, start included)", t_pool),
            (f"dask LocalCluster ({WORKERS} processes)", t_dask),
        )
    ]
    print(C.md_table(["executor", "wall time", "time vs serial"], rows))
    print(
        f"\n`interval_evaluation.json` byte-identical for all three. LocalCluster start-up {C.fmt_s(t_start)} "
        "(once, not in the table)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
