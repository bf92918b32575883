"""CLI options and runners for the interval methods (CRC / K-CRC / sem-CRC / per-organ sem-CRC).

Wiring (done by the ``calibrate`` / ``apply`` commands):

* ``calibrate``: add ``crc-interval``, ``k-crc``, ``sem-crc``, ``sem-crc-organ`` to ``--method``'s
  choices, call :func:`add_interval_arguments` on its parser, and in ``run`` dispatch
  ``if args.method in INTERVAL_METHODS: return run_interval_calibrate(args)`` before the lesion path.
* ``apply``: call :func:`add_interval_apply_arguments` on its parser (the ``--prob``/``--image`` group
  must then not be ``required``), and in ``run`` dispatch
  ``if is_interval_profile(args.profile): return run_interval_apply(args)``.

Options already present on a parser (e.g. ``--seed``) are reused, not added twice.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..common.executors import MapReport, map_ordered
from ..io.atomic import check_can_write, staged_folder
from ..io.checksums import sha256_file
from ..io.volumes import check_same_geometry, load_label_map, save_volume
from ..semcrc.anchor import DEFAULT_GAMMAS
from ..semcrc.profile import is_interval_profile, load_interval_profile
from ..semcrc.workflow import (
    CLI_METHODS,
    apply_interval,
    calibrate_interval,
    discover_interval_cases,
    load_float_volume,
    write_interval_table,
)
from .common import progress_bar

INTERVAL_METHODS: tuple[str, ...] = tuple(CLI_METHODS)
__all__ = [
    "INTERVAL_METHODS",
    "add_interval_arguments",
    "add_interval_apply_arguments",
    "is_interval_profile",
    "run_interval_apply",
    "run_interval_calibrate",
]


def add_option(parser: argparse._ActionsContainer, flag: str, **kwargs: Any) -> None:
    """``parser.add_argument(flag, ...)`` unless the parser already has ``flag`` (e.g. ``--seed``)."""
    if flag not in parser._option_string_actions:  # noqa: SLF001 - argparse has no public query
        parser.add_argument(flag, **kwargs)


def _gammas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--gammas must be comma-separated numbers, got {text!r}") from exc


def add_interval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``calibrate --method crc-interval|k-crc|sem-crc|sem-crc-organ``."""
    g = parser.add_argument_group("interval methods (crc-interval, k-crc, sem-crc, sem-crc-organ)")
    add_option(g, "--lower", type=Path, help="folder of lower quantile maps (q_lo), one file per case id")
    add_option(g, "--upper", type=Path, help="folder of upper quantile maps (q_hi), same case ids")
    add_option(g, "--truth", type=Path, help="folder of ground-truth images, same case ids")
    add_option(
        g, "--organs", type=Path, help="folder of organ label maps s(y) (segmentation model output), same case ids"
    )
    add_option(
        g,
        "--organ-labels",
        default=None,
        help="organ label values and names, e.g. 1=spleen,2=kidney,3=kidney,6=liver (other voxels are 'body')",
    )
    add_option(
        g,
        "--body",
        choices=("all", "nonzero"),
        default="all",
        help="voxels that count: all (default) or label > 0 in the organ map (excludes background)",
    )
    add_option(
        g,
        "--n-opt",
        type=int,
        default=None,
        help="k-crc/sem-crc: scans of the optimisation split S_opt (default: a quarter of the scans, 2 to 32)",
    )
    add_option(
        g,
        "--d-opt",
        type=int,
        default=None,
        help="voxels per S_opt scan for the anchor problem "
        "(default: k-crc 50; sem-crc d_min / smallest organ fraction)",
    )
    add_option(g, "--d-min", type=int, default=2, help="sem-crc: at least this many sampled voxels per organ and scan")
    add_option(g, "--k-groups", type=int, default=4, help="k-crc: number of loss-quantile groups K (default 4)")
    add_option(
        g,
        "--gammas",
        type=_gammas,
        default=DEFAULT_GAMMAS,
        help="surrogate gamma grid, comma-separated in (0,1) (default 0.1,0.3,0.5,0.7,0.9)",
    )
    add_option(g, "--lambda-max", type=float, default=None, help="upper bound on lambda (image units; default none)")
    add_option(
        g,
        "--organ-omega-from",
        choices=("anchor", "zero"),
        default="zero",
        help="sem-crc-organ: lambda_k >= 0 (zero, default: shorter, same guarantee) or lambda_k = anchor_k + "
        "omega_k with omega_k >= 0 (anchor: the paper's eq. 12, literally)",
    )
    add_option(
        g,
        "--shrinkable",
        action="store_true",
        help="crc-interval, sem-crc-organ: lambda may go below 0, down to minus each voxel's half-width, so an "
        "under-confident quantile model is tightened (same guarantee)",
    )
    add_option(g, "--seed", type=int, default=0, help="seed of the S_opt/S_cal split and the voxel subsampling")


def add_interval_apply_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``apply --profile INTERVAL_PROFILE.json``."""
    g = parser.add_argument_group("interval profiles")
    add_option(g, "--lower", type=Path, help="lower quantile map of the new scan")
    add_option(g, "--upper", type=Path, help="upper quantile map of the new scan")
    add_option(g, "--organs", type=Path, help="organ label map of the new scan (required for sem-crc profiles)")
    add_option(g, "--truth", type=Path, help="optional ground truth: adds the per-organ risk to the table")


def _options(args: argparse.Namespace, method: str) -> dict:
    options: dict = {"lambda_max": args.lambda_max}
    if getattr(args, "shrinkable", False):
        options["shrinkable"] = True
    if method != "crc":
        options.update(n_opt=args.n_opt, gammas=args.gammas, seed=args.seed)
    if method == "k-crc":
        options.update(k=args.k_groups, d_opt=50 if args.d_opt is None else args.d_opt)
    if method.startswith("sem-crc"):
        options.update(d_opt=args.d_opt, d_min=args.d_min)
    if method == "sem-crc-organ":
        options["from_anchor"] = args.organ_omega_from == "anchor"
    return options


def task_map(
    spec: Any, progress: Any, *, keep_going: bool = False, skip_failed: bool = False, report: MapReport | None = None
) -> Any:
    """``map_tasks(task, shared, items, labels)``: :func:`~ConformalSegLib.common.executors.map_ordered` on
    ``spec`` (what :mod:`ConformalSegLib.semcrc`'s ``map_scans`` / ``map_tasks`` arguments take)."""

    def map_tasks(task: Any, shared: Any, items: list[Any], labels: list[str]) -> list[Any]:
        return map_ordered(
            task, shared, items, spec, labels=labels, progress=progress, keep_going=keep_going,
            skip_failed=skip_failed, report=report,
        )  # fmt: skip

    return map_tasks


def _scan_map(args: argparse.Namespace, progress: Any) -> tuple[Any, MapReport | None]:
    """The calibration split on ``--executor`` (None: serial, in this process) and its report."""
    from .executor_options import executor_spec

    spec = executor_spec(args)
    if spec.name == "serial":
        return None, None
    report = MapReport(spec.name, 1, [])
    return task_map(spec, progress, keep_going=args.keep_going, report=report), report


def run_interval_calibrate(args: argparse.Namespace) -> int:
    """``calibrate`` for an interval method: read the folders (or predict ``--lower``/``--upper`` with a
    quantile model ``--model`` from ``--images``), calibrate, write the profile."""
    if getattr(args, "images", None) is not None and args.lower is None and args.upper is None:
        return _calibrate_from_model(args)
    for flag in ("lower", "upper", "truth"):
        if getattr(args, flag, None) is None:
            raise ConformalSegError(
                f"--method {args.method} needs --{flag} DIR",
                fix="pass --lower DIR --upper DIR --truth DIR [--organs DIR --organ-labels ...]",
            )
    if args.epsilon is None:
        raise ConformalSegError(f"--method {args.method} needs --epsilon", fix="pass e.g. --epsilon 0.1")
    if args.out.suffix.lower() != ".json":
        raise ConformalSegError(
            "the profile file name must end in .json", path=args.out, fix="e.g. --out intervals.json"
        )
    if not args.force:
        check_can_write(args.out)
    method = CLI_METHODS[args.method]
    if args.n_opt is None:
        args.n_opt = default_n_opt(len(discover_interval_cases(args.lower, args.upper, args.truth, args.organs)))
    progress = progress_bar("reading scans")
    map_scans, report = _scan_map(args, progress)
    profile = calibrate_interval(
        method,
        args.lower,
        args.upper,
        args.truth,
        args.organs,
        args.epsilon,
        organs=args.organ_labels,
        body=args.body,
        progress=progress,
        anchor_progress=progress_bar("anchor (cvxpy)", unit="gamma"),
        map_scans=map_scans,
        **_options(args, method),
    )
    if report is not None:
        profile.provenance.update(report.provenance())
    if getattr(args, "inference_record", None):
        profile.provenance["inference"] = args.inference_record
    written = profile.save(args.out, force=args.force)
    print(profile.calibration.guarantee)
    for name, lam, status in zip(profile.calibration.groups, profile.calibration.lam, profile.calibration.status):
        print(f"  {name}: lambda = {lam:.6g} ({status})")
    print("wrote " + " and ".join(str(p) for p in written))
    if "controlled" not in profile.calibration.status:
        print(
            f"WARNING: no group is controlled: every interval of this profile is infinite (S_opt took "
            f"{args.n_opt} scans, calibration kept {max(profile.calibration.n_cal, default=0)}); use more scans, a "
            "smaller --n-opt or a larger --epsilon. Exit status 3.",
            file=sys.stderr,
        )
        return NOTHING_CONTROLLED
    return 0


#: Exit status of ``calibrate`` when the interval profile was written but controls no group.
NOTHING_CONTROLLED = 3


def default_n_opt(n_scans: int) -> int:
    """S_opt size when ``--n-opt`` is not given: a quarter of the scans, at least 2 and at most 32 (a fixed
    32 left 8 calibration scans of 40, too few to control any organ)."""
    return max(2, min(32, n_scans // 4))


def run_interval_apply(args: argparse.Namespace) -> int:
    """``apply`` with an interval profile: write lower/upper/length volumes and the per-group table."""
    profile = load_interval_profile(args.profile)
    if getattr(args, "epsilon", None) is not None:
        profile = profile.recalibrate(args.epsilon)  # from the stored per-scan thresholds, no volume
    if args.lower is None or args.upper is None:
        raise ConformalSegError(
            "an interval profile needs --lower FILE and --upper FILE",
            path=args.profile,
            fix="pass the new scan's quantile maps",
        )
    lower = load_float_volume(args.lower, "lower quantile map")
    upper = load_float_volume(args.upper, "upper quantile map")
    check_same_geometry(lower, upper, what="lower and upper quantile maps")
    organs = None
    if args.organs is not None:
        label_map = load_label_map(args.organs)
        check_same_geometry(lower, label_map, what="lower quantile map and organ label map")
        organs = label_map.array
    elif profile.calibration.method.startswith("sem-crc") or profile.body == "nonzero":
        raise ConformalSegError(
            f"a {profile.calibration.method} profile needs the scan's organ label map",
            path=args.profile,
            fix="pass --organs FILE (same segmentation model as calibration)",
        )
    truth = None
    if args.truth is not None:
        truth_volume = load_float_volume(args.truth, "ground-truth image")
        check_same_geometry(lower, truth_volume, what="lower quantile map and ground truth")
        truth = truth_volume.array
    result = apply_interval(profile, lower.array, upper.array, organs, truth=truth)
    out: Path = args.out
    names = {"lower": "lower_conformal.nii.gz", "upper": "upper_conformal.nii.gz", "length": "interval_length.nii.gz"}
    table_csv, table_json = out / "intervals.csv", out / "intervals.json"
    if not args.force:
        for path in [out / n for n in names.values()] + [table_csv, table_json]:
            check_can_write(path)
    with staged_folder(out, force=args.force) as stage:  # Ctrl-C or an error: no partial result folder
        for key, name in names.items():
            save_volume(getattr(result, key), lower.geometry, stage / name)
        write_interval_table(
            result.table,
            stage / table_csv.name,
            stage / table_json.name,
            extra={
                "profile": str(Path(args.profile).resolve()),
                "profile_sha256": sha256_file(args.profile),
                "method": profile.calibration.method,
                "epsilon": profile.calibration.epsilon,
                "guarantee": profile.calibration.guarantee,
            },
        )
    print(json.dumps({row["group"]: row["lambda"] if math.isfinite(row["lambda"]) else "inf" for row in result.table}))
    print(f"wrote {', '.join(names.values())}, {table_csv.name} and {table_json.name} to {out}")
    return 0


def _calibrate_from_model(args: argparse.Namespace) -> int:
    """``--model QUANTILE_CARD --images DIR``: predict the quantile maps into a temporary folder (or
    ``--probs-cache DIR``), then calibrate on them; the model's fingerprint goes into the profile."""
    import tempfile

    from ..inference import resolve_model
    from ..semcrc.workflow import predict_quantile_folder

    if args.model is None:
        raise ConformalSegError(
            "--images needs --model (a quantile regression model card)",
            fix="pass --model CARD.json, or give --lower/--upper folders",
        )
    with tempfile.TemporaryDirectory(prefix="conformalseg-quantiles-") as tmp:
        folder = args.probs_cache if getattr(args, "probs_cache", None) is not None else Path(tmp)
        card = resolve_model(args.model)
        predict_quantile_folder(card, args.images, folder, device=args.device, force=args.force)
        args.lower, args.upper = folder / "lower", folder / "upper"
        args.inference_record = {
            "model": {"name": card.name, "card": str(card.path) if card.path else None, "sha256": card.sha256()},
            "pipeline_sha256": card.pipeline_sha256(),
            "images": str(args.images.resolve()),
        }
        return run_interval_calibrate(args)
