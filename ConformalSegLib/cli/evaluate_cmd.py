"""``conformalseg evaluate``: the papers' protocol over repeated random calibration/test splits."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..common.errors import ConformalSegError
from ..common.executors import ExecutorSpec, executor_session
from ..conformal.calibration import CalibrationRequest, calibrate_dataset
from ..conformal.fp_summaries import DEFAULT_FP_ML_CAP
from ..conformal.ltt import RiskData, parse_risks
from ..conformal.threshold_scores import parse_threshold_score
from ..evaluation.progress import TqdmProgress
from ..evaluation.protocol import evaluate_dataset
from ..evaluation.report import REPORT_FILES, write_report
from ..evaluation.risk_control import evaluate_risk_control, markdown_table
from ..io.atomic import OVERWRITE_FIX, atomic_write_text
from .calibrate_cmd import INPUT_FOLDERS, add_data_options, add_score_option, open_dataset
from .common import add_empty_option, add_force, input_folders, refuse_output_in_inputs
from .executor_options import add_executor_options, executor_spec
from .interval_evaluate import add_interval_evaluate_arguments, run_interval_evaluate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="test ECR, FNR, PC, set coverage, lesion-wise detection, Dice and HD95 over random splits",
        description="Repeated random calibration/test splits (Tan et al.: 100 splits, half for "
        "calibration): test FNR and ECR for the fixed 0.5 threshold, CLS, expected-FNR and "
        "lesion-level control across epsilon and alpha grids, the slider-safe bands (every epsilon at "
        "once), lesion-wise sensitivity by lesion size and false positives for every method, "
        "prediction compactness, confidence-set coverage and sizes, Dice and HD95. Writes "
        "results.json, report.md and PNG plots.",
    )
    add_data_options(p)
    p.add_argument("--splits", type=int, default=100, help="number of random splits (default 100)")
    p.add_argument("--cal-fraction", type=float, default=0.5, help="share of cases used for calibration (default 0.5)")
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3], help="FNR tolerances")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3], help="risk levels")
    p.add_argument(
        "--main-epsilon",
        type=float,
        default=None,
        help="setting for HD95 and the FNR plot (default: 0.1 if listed, else the first)",
    )
    p.add_argument(
        "--main-alpha", type=float, default=None, help="setting for HD95 and the FNR plot (default: 0.1 if listed)"
    )
    p.add_argument(
        "--transforms",
        nargs="+",
        default=["identity", "distance"],
        help="score transforms for the confidence sets (identity, distance[:LEVEL], gaussian:SIGMA_MM)",
    )
    add_score_option(p)
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest metric)")
    p.add_argument(
        "--detect-fraction",
        type=float,
        default=0.5,
        metavar="TAU",
        help="lesion-level method and lesion-wise metrics: a lesion is found when ceil(TAU x its voxels) are in "
        "the mask (default 0.5)",
    )
    p.add_argument(
        "--voxel-epsilon", type=float, default=None, help="lesion-level method: joint with this voxel-FNR tolerance"
    )
    p.add_argument(
        "--no-false-positives",
        action="store_true",
        help="skip false-positive components and mL (one connected-component labelling per test case and cutoff)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random splits")
    p.add_argument(
        "--risk-delta",
        type=float,
        default=None,
        metavar="D",
        help="also evaluate CRC and RCPS (hb, wsr) at the main epsilon with confidence 1 - D, and Learn-Then-Test "
        "with the --risk targets, over the same splits: risk_control.md",
    )
    p.add_argument(
        "--risk", action="append", default=[], metavar="NAME=TARGET", help="with --risk-delta: a Learn-Then-Test risk"
    )
    p.add_argument("--fp-ml-cap", type=float, default=DEFAULT_FP_ML_CAP, help="with --risk fp-ml: the cap B in mL")
    add_interval_evaluate_arguments(p)
    add_empty_option(p)
    add_executor_options(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_force(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_output_in_inputs(args.out, input_folders(args, INPUT_FOLDERS), output_is_folder=True, nested=True)
    if args.main_epsilon is None and 0.1 in args.epsilons:
        args.main_epsilon = 0.1  # a smaller one makes HD95 run on near-whole-image masks (twice the time)
    spec = executor_spec(args)
    if args.lower is not None:  # interval methods (sem-CRC): the paper's Table 1 and Fig. 3
        return run_interval_evaluate(args, spec)
    if args.keep_going and args.risk_delta is not None:
        raise ConformalSegError(
            "--keep-going cannot be combined with --risk-delta (risk control reads every case)",
            fix="drop --keep-going, or run the risk control separately on the readable cases",
        )
    existing = [name for name in REPORT_FILES if (args.out / name).exists()]
    if existing and not args.force:  # before the long run, not after it
        raise ConformalSegError(
            f"output file(s) already exist: {', '.join(existing)}", path=args.out, fix=OVERWRITE_FIX
        )
    dataset = open_dataset(args, "loading")
    dataset.progress = None  # the evaluation draws its own bars
    main_alpha = args.main_alpha if args.main_alpha is not None else (0.1 if 0.1 in args.alphas else None)
    with executor_session(spec) as running:  # one LocalCluster (dask without --scheduler) for every pass
        with TqdmProgress() as progress:
            result = evaluate_dataset(
                dataset,
                epsilons=args.epsilons,
                alphas=args.alphas,
                main_alpha=main_alpha,
                main_epsilon=args.main_epsilon,
                splits=args.splits,
                cal_fraction=args.cal_fraction,
                seed=args.seed,
                transforms=tuple(args.transforms),
                hd95=not args.no_hd95,
                empty=args.empty or "exclude",
                progress=progress,
                detect_fraction=args.detect_fraction,
                voxel_epsilon=args.voxel_epsilon,
                lesionwise=not args.no_false_positives,
                executor=running,
                keep_going=args.keep_going,
                score=parse_threshold_score(args.score).name,
            )
        written = write_report(result, args.out, force=args.force)  # its warnings were shown once, as they arose
        if args.risk_delta is not None:
            written.append(_risk_control(args, dataset, args.main_epsilon or args.epsilons[0], running))
    where = "" if spec.name == "serial" else f" (--executor {spec.name})"
    print(
        f"evaluated {result.n_cases} cases over {args.splits} splits{where}; wrote {len(written)} files to "
        f"{args.out} (start with {args.out / 'report.md'})"
    )
    return 0


def _risk_control(args: argparse.Namespace, dataset: object, epsilon: float, spec: ExecutorSpec) -> Path:
    """One more pass building the Learn-Then-Test summaries, then :mod:`ConformalSegLib.evaluation.risk_control`."""
    risks = parse_risks(args.risk) if args.risk else ()
    request = CalibrationRequest(
        method="ltt" if risks else "rcps",
        epsilon=epsilon,
        delta=args.risk_delta,
        risks=tuple(args.risk),
        empty=None if risks else args.empty,
        detect_fraction=args.detect_fraction,
        fp_ml_cap=args.fp_ml_cap,
        score=parse_threshold_score(args.score).name,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only the summaries are used: this whole-dataset calibration is not reported
        profile = calibrate_dataset(dataset, request, spec)
    data = RiskData(profile.summaries, profile.lesion_level, profile.false_positives)
    rows = evaluate_risk_control(
        data, epsilon=epsilon, delta=args.risk_delta, risks=risks, splits=args.splits,
        cal_fraction=args.cal_fraction, seed=args.seed,
    )  # fmt: skip
    path = Path(args.out) / "risk_control.md"
    text = (
        f"# Risk control over {args.splits} splits (epsilon {epsilon:g}, delta {args.risk_delta:g})\n\n"
        f"{markdown_table(rows)}\n"
    )
    atomic_write_text(path, text, force=args.force)
    print(f"risk control (RCPS, LTT): {path}")
    return path
