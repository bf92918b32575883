"""``conformalseg monitor``: test reviewed cases, in time order, for a shift away from the calibration scans.

Reads the reviewed cases (probability maps and the reviewed, corrected label maps, matched by case id),
computes each case's conformal p-value and a conformal test martingale
(:mod:`ConformalSegLib.conformal.monitoring`), and writes ``OUT/monitor.json`` (the reviewed-case log the
Slicer panel's drift badge reads) and ``OUT/monitor.png`` (martingale and running ECR). ``OUT`` defaults to
``PROFILE.monitor/`` beside the profile. Time order: the rows of ``--order FILE`` (``case_id[,time]``;
only the cases listed), else the case ids sorted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.errors import ConformalSegError
from ..conformal.monitoring import LOG_NAME, MARTINGALES, default_log_dir, monitor_profile, reviewed_data, write_log
from ..conformal.profile import load_profile
from ..evaluation.monitor_figure import monitor_png
from ..io.atomic import check_can_write
from ..io.case_table import read_order
from ..io.dataset import CalibrationDataset, discover_pairs
from .common import add_force, add_lesion_options, progress_bar, segment_map


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="drift monitoring: a conformal test martingale over reviewed cases in time order",
        description="Flag when reviewed cases stop being exchangeable with a profile's calibration scans "
        "(the martingale reaches 1/delta: a false alarm has probability at most delta, by Ville's inequality).",
    )
    p.add_argument("--profile", type=Path, required=True, help="profile JSON written by `calibrate`")
    p.add_argument("--probs", type=Path, required=True, help="probability maps of the reviewed cases")
    p.add_argument("--labels", type=Path, required=True, help="their reviewed (corrected) label maps")
    add_lesion_options(p)
    p.add_argument("--order", type=Path, help="CSV case_id[,time]: the reviewed cases in time order")
    p.add_argument("--delta", type=float, default=0.01, help="false-alarm probability (default 0.01: alarm at 100)")
    p.add_argument("--martingale", choices=MARTINGALES, default="jumper", help="betting strategy (default jumper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the p-values' tie-breaking (default 0)")
    p.add_argument("--out", type=Path, help="output folder (default PROFILE.monitor/ beside the profile)")
    add_force(p)
    p.set_defaults(func=run)


def _ordered_pairs(args: argparse.Namespace) -> tuple[dict[str, tuple[Path, Path]], dict[str, str]]:
    pairs = {cid: (prob, label) for cid, prob, label in discover_pairs(args.probs, args.labels)}
    if args.order is None:
        return pairs, {}
    order = read_order(args.order)
    missing = [cid for cid, _ in order if cid not in pairs]
    if missing:
        raise ConformalSegError(
            f"{len(missing)} case(s) of the order file have no maps: {', '.join(missing[:10])}",
            path=args.order,
            fix="list only reviewed cases present in --probs and --labels",
        )
    return {cid: pairs[cid] for cid, _ in order}, dict(order)


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else default_log_dir(args.profile)
    if not args.force:  # before the long pass
        check_can_write(out / LOG_NAME)
        check_can_write(out / "monitor.png")
    profile = load_profile(args.profile)
    pairs, times = _ordered_pairs(args)
    labels = args.lesion_label if args.lesion_label is not None else profile.provenance.get("lesion_labels")
    channel = args.channel if args.channel is not None else profile.provenance.get("probability_channel")
    dataset = CalibrationDataset(
        args.probs, args.labels, labels, channel, progress=progress_bar("reviewed cases"), pairs=pairs
    )
    dataset.seg_segments = segment_map(args) or profile.provenance.get("seg_segments")
    reviewed = reviewed_data(dataset, profile)
    result = monitor_profile(profile, reviewed, times=times, delta=args.delta, kind=args.martingale, seed=args.seed)
    log = write_log(result, args.profile, out / LOG_NAME, force=args.force)
    monitor_png(result, out / "monitor.png", force=args.force)
    n = result.martingale.size
    print(
        f"{n} reviewed case(s) against {result.n_calibration} calibration scans"
        + (f" ({len(result.skipped)} without a lesion skipped)" if result.skipped else "")
        + f"; {result.running_label} {result.running[-1]:.3f} (target {result.target:g}); "
        f"martingale max {result.martingale.max():.3g}, alarm at 1/delta = {1 / result.delta:g}."
    )
    if result.alarm is None:
        print("No drift detected: no evidence that the reviewed cases differ from the calibration scans.")
    else:
        k = result.alarm
        when = f", {result.times[k]}" if result.times[k] else ""
        print(
            f"DRIFT: the martingale reached 1/delta at reviewed case {k + 1} ({result.case_ids[k]}{when}); "
            "the scans are no longer exchangeable with the calibration scans: recalibrate on recent scans."
        )
    print(f"wrote {log} and {out / 'monitor.png'}")
    return 0
