"""``conformalseg calibrate``: stream a calibration dataset and write a calibration profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.errors import ConformalSegError
from ..conformal.calibration import CalibrationRequest, calibrate_dataset
from ..conformal.confidence_sets import select_transforms
from ..conformal.fp_summaries import DEFAULT_FP_ML_CAP
from ..conformal.lesion_level import DEFAULT_DETECT_FRACTION
from ..conformal.score_selection import select_score
from ..conformal.score_transforms import DEFAULT_CANDIDATES
from ..conformal.threshold_scores import DEFAULT_SCORE, parse_threshold_score
from ..io.atomic import check_can_write
from ..io.checksums import sha256_file
from ..io.dataset import CalibrationDataset
from ..io.dicom_series import image_input_sha256 as input_sha256
from .common import (
    add_empty_option,
    add_force,
    add_lesion_options,
    input_folders,
    progress_bar,
    refuse_output_in_inputs,
    segment_map,
)
from .deploy_options import add_calibrate_options, recorder_for, report
from .executor_options import add_executor_options, executor_spec
from .fold_options import add_folds_option, fold_provenance, open_fold_dataset
from .interval_options import INTERVAL_METHODS, add_interval_arguments, run_interval_calibrate
from .mask_options import add_mask_calibrate_options, run_mask_calibrate
from .model_options import add_model_options, open_model_dataset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate CLS, expected-FNR control, lesion-level control or confidence sets on a dataset",
        description="Calibrate on cases in --probs/--labels (matched by case id) and write a profile "
        "(JSON + .npz of summaries) that `apply` uses and can recalibrate from.",
    )
    add_data_options(p)
    add_mask_calibrate_options(p)
    add_method_options(p)
    p.add_argument(
        "--precision",
        choices=("float32", "uint16"),
        default="float32",
        help="storage of the lesion summaries (uint16: half the size, conservative by <= 1/65535)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="profile file to write (PROFILE.json; PROFILE.npz beside it)"
    )
    add_force(p)
    add_calibrate_options(p)
    add_interval_arguments(p)
    add_executor_options(p)
    p.set_defaults(func=run)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--probs",
        type=Path,
        help="folder of probability maps (.nii.gz/.nrrd/.mha/.npy/nnU-Net .npz, or one DICOM series folder per case, "
        "values in [0, 1] after the rescale slope/intercept)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        help="folder of label maps, same case ids as --probs (NIfTI/NRRD, or DICOM SEG CASE.dcm: segment number = "
        "label value unless --seg-segments names them, placed on the map's grid)",
    )
    p.add_argument("--data", type=Path, help="folder with probs/ and labels/ subfolders (instead of --probs/--labels)")
    add_folds_option(p)
    add_lesion_options(p)
    add_model_options(p)


def add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        choices=("cls", "crc", "rcps", "ltt", "lesion", "sets", *INTERVAL_METHODS),
        required=True,
        help="cls: P(FNR <= epsilon) >= 1 - alpha; crc: E[FNR] <= epsilon; rcps: with confidence 1 - delta, "
        "E[FNR] <= epsilon; ltt: several expected risks at once with confidence 1 - delta (--risk); lesion: "
        "P(missed lesions <= epsilon x lesions) >= 1 - alpha (joint with the voxel FNR with --voxel-epsilon); "
        "sets: inner/outer confidence sets; crc-interval, k-crc, sem-crc, sem-crc-organ: risk control of voxel "
        "intervals (--lower/--upper/--truth/--organs)",
    )
    p.add_argument("--epsilon", type=float, help="FNR tolerance (cls, crc, rcps); missed-lesion tolerance (lesion)")
    p.add_argument("--alpha", type=float, help="risk level (cls, lesion, sets)")
    p.add_argument(
        "--pac-delta",
        type=float,
        default=None,
        metavar="D",
        help="cls, lesion, sets: calibration-conditional guarantee -- with confidence 1 - D over the draw of the "
        "calibration scans, THIS profile covers at least 1 - alpha of new scans (needs more scans; e.g. 0.05)",
    )
    p.add_argument(
        "--delta", type=float, help="rcps, ltt: 1 - delta is the confidence over the calibration draw (e.g. 0.1)"
    )
    p.add_argument(
        "--risk",
        action="append",
        default=[],
        metavar="NAME=TARGET",
        help="ltt (repeatable): fnr=0.1 (expected voxel FNR), lesion-miss=0.2 (expected missed-lesion fraction), "
        "fp-ml=5 (expected false-positive mL, each scan counted up to --fp-ml-cap), fp-components=3 (expected "
        "false-positive components, counted up to 10, thresholds 0.05..0.95 only)",
    )
    p.add_argument(
        "--fp-ml-cap",
        type=float,
        default=DEFAULT_FP_ML_CAP,
        metavar="B",
        help="ltt fp-ml: each scan's false-positive volume is counted up to B mL (bounded loss; default 100)",
    )
    p.add_argument(
        "--bound",
        choices=("hb", "wsr"),
        default="hb",
        help="rcps: upper confidence bound, hb (Hoeffding-Bentkus, default) or wsr (Waudby-Smith-Ramdas, tighter)",
    )
    p.add_argument(
        "--tie-breaking",
        choices=("none", "random"),
        default="none",
        help="cls, crc: 'random' breaks ties between equal probabilities (maps saturated at 0/1) with seeded "
        "random keys, so the coverage is close to 1 - alpha instead of far above it (default none)",
    )
    p.add_argument("--tie-seed", type=int, default=0, metavar="S", help="seed of --tie-breaking random (default 0)")
    add_lesion_level_options(p)
    add_score_option(p, auto=True)
    p.add_argument("--alpha-inner", type=float, help="sets: risk level of the inner set")
    p.add_argument("--alpha-outer", type=float, help="sets: risk level of the outer set")
    p.add_argument("--joint", action="store_true", help="sets: joint guarantee for inner and outer at once")
    p.add_argument(
        "--joint-method",
        choices=("split", "max"),
        default="split",
        help="sets --joint: split alpha between the sets (Corollary 2.3, default) or max-based (Theorem 2.4)",
    )
    p.add_argument(
        "--transform",
        default="identity",
        help="sets: score transform for both sets: identity, distance[:LEVEL] (mm), gaussian:SIGMA_MM, "
        "or auto (chosen on --learning-data, kept apart from calibration)",
    )
    p.add_argument(
        "--learning-data",
        type=Path,
        default=None,
        help="sets --transform auto: folder with probs/ and labels/ of cases NOT used for calibration",
    )
    p.add_argument("--inner-transform", default=None, help="sets: transform of the inner set (overrides --transform)")
    p.add_argument("--outer-transform", default=None, help="sets: transform of the outer set (overrides --transform)")
    add_empty_option(p)


def add_score_option(p: argparse.ArgumentParser, auto: bool = False) -> None:
    """``--score`` (threshold methods; shared with ``evaluate``, which has no ``auto``)."""
    p.add_argument(
        "--score",
        default=DEFAULT_SCORE,
        metavar="SCORE",
        help="cls, crc, rcps, ltt, lesion: the score the cutoff applies to: identity (the probability, default), "
        "margin[:LEVEL] (the network's LEVEL mask grown by a calibrated number of mm; for targets whose outer "
        "layers the network ranks with the background) or gaussian:SIGMA_MM (smoothed probability)"
        + (", or auto (the smallest masks on --learning-data, scans kept apart from calibration)" if auto else ""),
    )


def add_lesion_level_options(p: argparse.ArgumentParser) -> None:
    """The options of ``--method lesion`` (shared with ``evaluate``)."""
    p.add_argument(
        "--detect-fraction",
        type=float,
        default=DEFAULT_DETECT_FRACTION,
        metavar="TAU",
        help="lesion: a lesion is found when at least ceil(TAU x its voxels) are in the mask (default 0.5; "
        "in (0, 1], a tiny TAU means one voxel)",
    )
    p.add_argument(
        "--voxel-epsilon",
        type=float,
        default=None,
        help="lesion: also at most this fraction of the lesion voxels missed, jointly (one guarantee for both)",
    )
    p.add_argument(
        "--min-lesion-voxels", type=int, default=0, help="lesion: do not count lesions of fewer voxels (default 0)"
    )
    p.add_argument(
        "--min-lesion-mm3", type=float, default=0.0, help="lesion: do not count lesions under this volume (default 0)"
    )


def open_dataset(args: argparse.Namespace, description: str) -> CalibrationDataset:
    segments = segment_map(args)  # a malformed --seg-segments fails before any case is read
    dataset = _open_dataset(args, description)
    dataset.seg_segments = segments
    return dataset


def _open_dataset(args: argparse.Namespace, description: str) -> CalibrationDataset:
    if getattr(args, "images", None) is not None:
        return open_model_dataset(args, description)
    progress = progress_bar(description)
    if getattr(args, "folds", None) is not None:  # nnU-Net fold ensembles, averaged per case
        return open_fold_dataset(args, progress)
    if args.data is not None:
        if args.probs or args.labels:
            raise ConformalSegError("give either --data or --probs/--labels, not both")
        return CalibrationDataset.from_root(args.data, args.lesion_label, args.channel, progress=progress)
    if args.probs is None or args.labels is None:
        raise ConformalSegError("no calibration data given", fix="pass --probs DIR --labels DIR (or --data DIR)")
    return CalibrationDataset(args.probs, args.labels, args.lesion_label, args.channel, progress=progress)


def request_from_args(args: argparse.Namespace, provenance: dict) -> CalibrationRequest:
    return CalibrationRequest(
        method=args.method,
        epsilon=args.epsilon,
        alpha=args.alpha,
        alpha_inner=args.alpha_inner,
        alpha_outer=args.alpha_outer,
        joint=args.joint_method if args.joint else None,
        inner_transform=args.inner_transform or args.transform,
        outer_transform=args.outer_transform or args.transform,
        empty=args.empty,
        precision=getattr(args, "precision", "float32"),
        provenance=provenance,
        detect_fraction=args.detect_fraction,
        voxel_epsilon=args.voxel_epsilon,
        min_lesion_voxels=args.min_lesion_voxels,
        min_lesion_mm3=args.min_lesion_mm3,
        pac_delta=args.pac_delta,
        delta=getattr(args, "delta", None),
        bound=getattr(args, "bound", "hb"),
        risks=tuple(getattr(args, "risk", ())),
        fp_ml_cap=getattr(args, "fp_ml_cap", DEFAULT_FP_ML_CAP),
        tie_breaking=getattr(args, "tie_breaking", "none"),
        tie_seed=getattr(args, "tie_seed", 0),
        score=parse_threshold_score(getattr(args, "score", DEFAULT_SCORE)).name,
    )


def choose_score_from_learning_data(args: argparse.Namespace, provenance: dict) -> None:
    """Resolve ``--score auto``: the threshold score with the smallest masks on a separate learning set."""
    learning = _learning_data(args, "--score auto", "name a score (identity, margin, gaussian:2)", "learning scores")
    request = request_from_args(argparse.Namespace(**{**vars(args), "score": DEFAULT_SCORE}), {})
    cases = ((case.case_id, case.probability.array, case.lesion.array, case.probability.geometry) for case in learning)
    selection = select_score(cases, request)
    args.score = selection.score
    provenance["score_selection"] = {
        "learning_cases": learning.case_ids,
        "mean_fraction": selection.mean_fraction,
        "score": selection.score,
    }
    shares = ", ".join(f"{name} {share:.4f}" for name, share in selection.mean_fraction.items())
    print(f"score chosen on {selection.n_learning} learning cases: {selection.score} (mean mask share {shares})")


def _learning_data(args: argparse.Namespace, option: str, alternative: str, description: str) -> CalibrationDataset:
    """The ``--learning-data`` cases, refused when any of their maps is also a calibration map."""
    if args.learning_data is None:
        raise ConformalSegError(
            f"{option} needs --learning-data DIR (cases kept apart from calibration)",
            fix=f"pass --learning-data, or {alternative}",
        )
    learning = CalibrationDataset.from_root(
        args.learning_data, args.lesion_label, args.channel, progress=progress_bar(description)
    )
    calibration = open_dataset(args, "")
    shared_ids = sorted(set(calibration.case_ids) & set(learning.case_ids))
    if hasattr(calibration, "provenance"):  # calibration maps not made yet: any shared case id is suspect
        same = shared_ids
    else:
        same = [
            cid for cid in shared_ids if input_sha256(calibration.paths(cid)[0]) == input_sha256(learning.paths(cid)[0])
        ]
    if same:
        raise ConformalSegError(
            f"{len(same)} probability map(s) are identical in the learning and the calibration data "
            f"(e.g. {same[0]}): choosing the {option.split()[0][2:]} on calibration cases breaks the guarantee",
            path=args.learning_data,
            fix="use learning cases kept apart from calibration",
        )
    return learning


def choose_transforms_from_learning_data(args: argparse.Namespace, provenance: dict) -> None:
    """Resolve ``--transform auto``: pick inner/outer transforms on a separate learning set."""
    learning = _learning_data(
        args, "--transform auto", "name a transform (identity, distance, gaussian:2)", "learning transforms"
    )
    alpha_inner = args.alpha_inner if args.alpha_inner is not None else (args.alpha or 0.1)
    alpha_outer = args.alpha_outer if args.alpha_outer is not None else (args.alpha or 0.1)
    selection = select_transforms(
        ((c.probability.array, c.lesion.array, c.probability.geometry) for c in learning),
        DEFAULT_CANDIDATES,
        alpha_inner=alpha_inner,
        alpha_outer=alpha_outer,
    )
    args.inner_transform, args.outer_transform = selection.inner.name, selection.outer.name
    provenance["transform_selection"] = {
        "learning_cases": learning.case_ids,
        "mean_inner_voxels": selection.mean_inner_size,
        "mean_outer_voxels": selection.mean_outer_size,
        "inner": selection.inner.name,
        "outer": selection.outer.name,
    }
    print(
        f"transforms chosen on {len(learning)} learning cases: inner {selection.inner.name}, "
        f"outer {selection.outer.name}"
    )


INPUT_FOLDERS = ("data", "probs", "labels", "images", "lower", "upper", "truth", "organs", "learning_data")


def run(args: argparse.Namespace) -> int:
    refuse_output_in_inputs(args.out, input_folders(args, INPUT_FOLDERS), output_is_folder=False, nested=True)
    spec = executor_spec(args)
    if args.method in INTERVAL_METHODS:  # the calibration split's scans on any executor
        return run_interval_calibrate(args)
    if args.masks is not None:  # a mask-only tool's predicted label maps (on any executor)
        return run_mask_calibrate(args, request_from_args)
    if args.out.suffix.lower() != ".json":
        raise ConformalSegError("the profile file name must end in .json", path=args.out, fix="e.g. --out profile.json")
    if not args.force:  # fail before the long streaming pass, not after it
        check_can_write(args.out)
        check_can_write(args.out.with_suffix(".npz"))
    dataset = open_dataset(args, "calibrating")
    provenance = {
        "probs_dir": str(dataset.probs_dir.resolve()),
        "labels_dir": str(dataset.labels_dir.resolve()),
        "lesion_labels": list(dataset.lesion_labels),
        "seg_segments": dataset.seg_segments,
        "probability_channel": args.channel,
        **fold_provenance(dataset),
    }
    if hasattr(dataset, "provenance"):  # predicted by --model from --images
        provenance["inference"] = dataset.provenance()
        if args.probs_cache is None:
            provenance["probs_dir"] = None  # a temporary folder, gone after this command
    elif args.model is not None:
        if not args.model.is_file():
            raise ConformalSegError("model file not found", path=args.model, fix="check the --model path")
        provenance.update(model_file=str(args.model.resolve()), model_sha256=sha256_file(args.model))
    if args.method == "sets" and "auto" in (args.transform, args.inner_transform, args.outer_transform):
        choose_transforms_from_learning_data(args, provenance)
    if args.score == "auto":
        choose_score_from_learning_data(args, provenance)
    request = request_from_args(args, provenance)
    recorder = recorder_for(args, dataset)  # groups / weighting: None without those options
    if recorder is not None and request.tie_breaking != "none":
        raise ConformalSegError(
            "--tie-breaking random is not implemented for group-conditional or weighted profiles",
            fix="leave out --tie-breaking, or the group / weighting options",
        )
    if recorder is None:
        profile = calibrate_dataset(dataset, request, spec, progress=dataset.progress, keep_going=args.keep_going)
    else:  # the volumes / features the groups or the weighting need come back with each case's summary
        profile = recorder.attach(
            calibrate_dataset(
                dataset,
                request,
                spec,
                progress=dataset.progress,
                keep_going=args.keep_going,
                extras=recorder.extras(),
                collect=recorder.collect,
            )
        )
    _check_geometry_known(dataset, request)
    json_path, npz_path = profile.save(args.out, force=args.force)
    print(lesion_line(dataset, args.channel))
    print(profile.guarantee)
    for line in report(profile):
        print(line)
    print(f"wrote {json_path} and {npz_path}")
    return 0


def lesion_line(dataset: CalibrationDataset, channel: int | None) -> str:
    """Which label value(s) were the lesion (and which channel the probability), for the user to check."""
    seen = sorted(set().union(*dataset.labels_seen.values())) if dataset.labels_seen else []
    labels = ", ".join(map(str, dataset.lesion_labels))
    return (
        f"lesion = label value {labels} of the label maps (values present: {', '.join(map(str, seen)) or 'none'})"
        + ("" if channel is None else f"; probability channel {channel}")
    )


def _check_geometry_known(dataset: CalibrationDataset, request: CalibrationRequest) -> None:
    """Bare arrays (``.npy`` maps and label maps) have no spacing: refuse a calibration that works in mm."""
    missing = sorted(getattr(dataset, "without_geometry", ()))
    if not missing:
        return
    transforms = (
        {request.inner_transform, request.outer_transform} - {"identity"} if request.method == "sets" else set()
    )
    if request.score != DEFAULT_SCORE:
        transforms.add(f"--score {request.score}")
    if transforms or (request.method == "lesion" and request.min_lesion_mm3):
        raise ConformalSegError(
            f"{len(missing)} case(s) have no voxel spacing (bare arrays, e.g. {missing[0]}), and this calibration "
            "works in mm (" + (", ".join(sorted(transforms)) or "--min-lesion-mm3") + ")",
            path=dataset.labels_dir,
            fix="give the label maps as NIfTI/NRRD (their spacing is then used), or use --transform identity "
            "(--score identity)",
        )
    print(f"note: {len(missing)} case(s) have no voxel spacing (bare arrays): 1 mm assumed for volumes")
