"""``conformalseg evaluate --lower DIR ...``: the interval methods' repeated-calibration evaluation (Teneggi et
al.'s Table 1 and Fig. 3) on any ``--executor``.

Two maps run on the executor:

1. every scan is read, checked and spilled to disk on a worker, one task per scan
   (:func:`~ConformalSegLib.semcrc.workflow.load_and_spill`); only its folder name comes back;
2. every (run, method) pair is one task: its split, its calibration and its test metrics
   (:func:`~ConformalSegLib.semcrc.evaluation.run_method_task`), reading the spilled scans as memory maps.

Results are merged in order, so the files are byte-identical to ``--executor serial``. The scans are spilled into
a temporary folder on this machine, or inside ``--spill-dir`` (a cluster whose workers run on other machines
needs a folder they all see); it is removed at the end, on an error and on Ctrl-C. ``--keep-going`` leaves out
the scans that cannot be read or fail their checks, names them in one warning and in the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..common.executors import ExecutorSpec, MapReport, executor_session
from ..io.atomic import check_can_write
from .common import progress_bar
from .interval_options import add_interval_arguments, add_option, default_n_opt, task_map

INTERVAL_INPUTS = ("lower", "upper", "truth", "organs")


def add_interval_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``evaluate --lower DIR ...`` (the paper's Table 1 and Fig. 3)."""
    add_interval_arguments(parser)
    g = parser.add_argument_group("interval evaluation")
    add_option(g, "--interval-epsilon", type=float, default=0.1, help="risk level epsilon of the interval methods")
    add_option(g, "--runs", type=int, default=20, help="independent calibrations (default 20, as in the paper)")
    add_option(g, "--n-cal", type=int, default=None, help="calibration scans per run (default: half of the scans)")
    add_option(
        g,
        "--spill-dir",
        type=Path,
        default=None,
        help="interval methods: folder in which the scans' arrays are kept on disk during the evaluation (default: "
        "a temporary folder on this machine; with --scheduler and workers on other machines, a folder on a "
        "filesystem they all share); a subfolder is made there and removed at the end",
    )


def run_interval_evaluate(args: argparse.Namespace, spec: ExecutorSpec) -> int:
    """``evaluate`` for the interval methods: CRC, K-CRC, sem-CRC and per-organ sem-CRC over ``--runs``
    random calibration/test splits; writes interval_evaluation.json/.md/.png into ``--out``."""
    from ..semcrc.workflow import as_organ_map

    for flag in ("upper", "truth"):
        if getattr(args, flag, None) is None:
            raise ConformalSegError(
                f"interval evaluation needs --{flag} DIR",
                fix="pass --lower DIR --upper DIR --truth DIR --organs DIR --organ-labels ...",
            )
    if getattr(args, "shrinkable", False):
        raise ConformalSegError(
            "--shrinkable is not implemented in the interval evaluation", fix="leave out --shrinkable"
        )
    organ_map = as_organ_map(args.organ_labels)
    methods = ("crc", "k-crc") + (("sem-crc", "sem-crc-organ") if args.organs is not None and organ_map.labels else ())
    if not args.force:
        check_can_write(args.out / "interval_evaluation.json")
    spill_parent = _spill_parent(args)
    with executor_session(spec) as running, _spill_folder(spill_parent) as spill:  # one LocalCluster / pool
        return _evaluate_spilled(args, organ_map, methods, spill, running)


@contextmanager
def _spill_folder(parent: Path | None) -> Iterator[Path]:
    """A new temporary folder in ``parent``, removed at the end, on an error and on Ctrl-C. After an error the
    executor cancels the tasks not started, but a task already running on a worker may still be writing a scan:
    it cannot recreate the removed folder (:func:`~ConformalSegLib.semcrc.spill.spill_scan` makes no parents),
    and the removal is retried until such a write has failed or finished."""
    folder = Path(tempfile.mkdtemp(prefix="conformalseg-intervals-", dir=parent))
    try:
        yield folder
    finally:
        for _ in range(50):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                break
            time.sleep(0.1)


def _spill_parent(args: argparse.Namespace) -> Path | None:
    """``--spill-dir``, checked: an existing folder outside the input folders (None: the system's temp folder)."""
    folder = getattr(args, "spill_dir", None)
    if folder is None:
        return None
    if not Path(folder).is_dir():
        raise ConformalSegError(
            "--spill-dir must be an existing folder", path=folder, fix="create it first, or leave out --spill-dir"
        )
    where = Path(os.path.abspath(folder)).resolve()
    for name in INTERVAL_INPUTS:
        given = getattr(args, name, None)
        inside = given is not None and Path(os.path.abspath(given)).resolve() in (where, *where.parents)
        if inside:
            raise ConformalSegError(
                f"--spill-dir is inside the input folder --{name} {given}: its scan folders would be read as cases",
                path=folder,
                fix="use a folder outside the input folders",
            )
    return Path(folder)


def _evaluate_spilled(
    args: argparse.Namespace, organ_map: Any, methods: tuple[str, ...], spill: Path, spec: ExecutorSpec
) -> int:
    """The two maps of the module docstring, then the report files."""
    from ..semcrc.evaluation import evaluate_interval_methods, write_interval_evaluation
    from ..semcrc.workflow import load_interval_data

    report = MapReport(spec.name, 1, [])
    data = load_interval_data(
        args.lower, args.upper, args.truth, args.organs, organ_map, args.body, spill_to=spill,
        map_scans=task_map(
            spec, progress_bar("loading"), keep_going=args.keep_going, skip_failed=args.keep_going, report=report
        ),
    )  # fmt: skip
    if report.failures:
        listed = "; ".join(f"{cid}: {error}" for cid, error in report.failures)
        warnings.warn(f"--keep-going: left out {len(report.failures)} unreadable case(s): {listed}", stacklevel=2)
    if data.n < 2:
        raise ConformalSegError(
            f"only {data.n} readable scan(s) of {data.n + len(report.failures)}: the evaluation needs at least 2 "
            "(one to calibrate, one to test)",
            path=args.truth,
            fix="fix the scans listed above, or add scans",
        )
    n_cal = args.n_cal if args.n_cal is not None else data.n // 2
    options = {
        "lambda_max": args.lambda_max,
        "n_opt": args.n_opt if args.n_opt is not None else default_n_opt(n_cal),
        "gammas": args.gammas,
        "d_min": args.d_min,
        "k": args.k_groups,
        "from_anchor": args.organ_omega_from == "anchor",
    }
    if args.d_opt is not None:
        options["d_opt"] = args.d_opt
    summary = evaluate_interval_methods(
        data, args.interval_epsilon, runs=args.runs, n_cal=n_cal, methods=methods, seed=args.seed,
        map_tasks=task_map(spec, progress_bar("evaluating", unit="calibration")), **options,
    )  # fmt: skip
    if report.failures:
        summary["left_out"] = [{"case": cid, "error": error} for cid, error in report.failures]
    written = write_interval_evaluation(summary, args.out, force=args.force)
    where = "" if spec.name == "serial" else f" (--executor {spec.name})"
    print(
        f"evaluated {', '.join(methods)} over {args.runs} calibrations of {n_cal} scans{where}; wrote "
        + ", ".join(str(p) for p in written)
    )
    return 0
