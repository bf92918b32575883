"""``--executor``, ``--scheduler``, ``--workers`` and ``--keep-going``: where the per-scan work runs."""

from __future__ import annotations

import argparse

from ..common.executors import EXECUTORS, ExecutorSpec


def add_executor_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out (one task per scan; the result is identical to serial)")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="serial",
        help="serial (default, this process), processes (a local process pool), or dask (a Dask cluster: "
        "--scheduler, or a LocalCluster sized to this machine)",
    )
    g.add_argument("--scheduler", default=None, metavar="ADDRESS", help="dask: scheduler address, tcp://HOST:8786")
    g.add_argument(
        "--workers", type=int, default=None, metavar="N", help="processes, dask LocalCluster: workers (default: cores)"
    )
    g.add_argument(
        "--keep-going",
        action="store_true",
        help="read every scan and report all bad ones at once (instead of stopping at the first); evaluate: "
        "leave the unreadable scans out, named in one warning",
    )


def executor_spec(args: argparse.Namespace) -> ExecutorSpec:
    return ExecutorSpec(getattr(args, "executor", "serial"), getattr(args, "scheduler", None), args.workers)
