"""``conformalseg apply``: apply (optionally recalibrated) thresholds to one probability map."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.cls import ThresholdCalibration, apply_threshold
from ..conformal.guarantee_sentences import band_sentence
from ..conformal.profile import UNCHANGED, CalibrationProfile, Unchanged, load_profile
from ..conformal.threshold_scores import DEFAULT_SCORE, score_sentence
from ..io.atomic import atomic_write_text, check_can_write, staged_folder
from ..io.checksums import sha256_file
from ..io.dicom_series import load_image_input, load_probability_input
from ..io.segmentation import LESION_THRESHOLD, write_masks_nifti, write_seg_nrrd
from ..io.volumes import Volume, save_volume
from .cascade_options import add_cascade_argument, cascade_predictor_from_args
from .common import add_force, add_seg_segments_option, add_trust_option, input_files, refuse_output_in_inputs
from .deploy_options import add_apply_options, deploy_for_scan
from .dicom_options import add_dicom_options, check_dicom_reference, dicom_seg_path, write_seg_output
from .fold_options import add_fold_apply_options, load_fold_volume
from .interval_options import add_interval_apply_arguments, is_interval_profile, run_interval_apply
from .mask_options import is_mask_apply, run_mask_apply


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="apply a calibration profile to a probability map",
        description="Write the calibrated masks/sets as NIfTI files and one Slicer .seg.nrrd. "
        "With --epsilon/--alpha the thresholds are recalibrated from the profile's "
        "summaries first (no volume is re-read).",
    )
    p.add_argument("--profile", type=Path, required=True, help="profile JSON written by `calibrate`")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prob", type=Path, help="probability map of the new scan (a file, or a DICOM series folder)")
    source.add_argument(
        "--image",
        type=Path,
        help="the new scan itself (a file, or a DICOM series folder), predicted with --model exactly as in "
        "calibration (profiles calibrated with --model --images); the probability map is written to OUT too",
    )
    source.add_argument(
        "--mask",
        type=Path,
        help="predicted label map of a mask-only tool (profiles calibrated with calibrate --masks); a DICOM SEG "
        ".dcm is placed on the --reference-dicom series' grid when given",
    )
    add_fold_apply_options(p, source)
    p.add_argument("--model", type=Path, help="with --image: the model card the profile was calibrated with")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="with --image: inference device")
    add_cascade_argument(p)
    add_trust_option(p)
    add_seg_segments_option(p)  # --mask given as a DICOM SEG (default: the names recorded at calibration)
    add_interval_apply_arguments(p)
    p.add_argument(
        "--channel",
        type=int,
        default=None,
        help="channel of a multi-channel probability map (default: the one the profile was calibrated on)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="voxel spacing (mm) of a map without geometry (.npy, .npz without its nnU-Net segmentation)",
    )
    p.add_argument("--epsilon", type=float, help="recalibrate for this FNR (lesion: missed-lesion) tolerance")
    p.add_argument(
        "--voxel-epsilon",
        type=float,
        default=None,
        help="lesion profiles: recalibrate jointly with this voxel-FNR tolerance",
    )
    p.add_argument(
        "--no-voxel-epsilon", action="store_true", help="lesion profiles: recalibrate without the voxel-FNR part"
    )
    p.add_argument(
        "--slider-safe",
        action="store_true",
        help="cls/lesion profiles: use the slider-safe band (valid for every epsilon of the 0.01 grid at once) at "
        "--epsilon, instead of the threshold for that one epsilon",
    )
    p.add_argument("--alpha", type=float, help="recalibrate for this risk level (rcps profiles: delta)")
    p.add_argument("--alpha-inner", type=float, help="sets: recalibrate the inner level")
    p.add_argument("--alpha-outer", type=float, help="sets: recalibrate the outer level")
    p.add_argument(
        "--compare-threshold", action="store_true", help="also write the fixed 0.5-threshold mask for comparison"
    )
    add_apply_options(p)
    add_dicom_options(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_force(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    inputs = input_files(args, ("prob", "image", "lower", "upper", "organs", "truth"))
    refuse_output_in_inputs(args.out, inputs, output_is_folder=True)
    if is_interval_profile(args.profile):
        return run_interval_apply(args)
    if is_mask_apply(args):
        return run_mask_apply(args, dicom_seg_path(args))
    if args.prob is None and args.image is None and args.folds is None:
        raise ConformalSegError("no scan given", fix="pass --prob PROBABILITY_MAP (or --image SCAN --model CARD)")
    profile = load_profile(args.profile)
    profile = _recalibrated(args, profile)
    channel = _channel(args, profile)
    dicom_seg = dicom_seg_path(args)  # checked before the (possibly long) prediction
    seg_path = args.out / "segmentation.seg.nrrd"
    summary_path = args.out / "apply.json"
    if not args.force:
        check_can_write(seg_path)
        check_can_write(summary_path)
    with staged_folder(args.out, force=args.force) as stage:  # Ctrl-C or an error: no partial result folder
        if args.image is not None:
            volume = _predict(args, profile, stage)
        elif args.folds is not None:
            volume = load_fold_volume(argparse.Namespace(**{**vars(args), "out": stage}), profile)
        else:
            if profile.provenance.get("inference"):
                print(
                    "note: this profile was calibrated on maps its model predicted; the map given with --prob must "
                    "come from the identical pipeline (not checked: use --image --model to have it checked)"
                )
            volume = load_probability_input(
                args.prob, channel=channel, series_uid=_series_uid(args, args.prob), spacing=args.spacing
            )
            _check_geometry_known(args, profile, volume)
        if dicom_seg is not None:
            check_dicom_reference(args, volume.geometry)  # a grid mismatch fails before any output is written
        profile, deployed = deploy_for_scan(args, profile, volume)  # the group's or the weighted calibration
        masks = profile.masks(volume.array, volume.geometry)
        guarantee = deployed["guarantee"]
        if args.slider_safe:
            masks, guarantee = _slider_safe_masks(args, profile, volume)
        if args.compare_threshold:
            masks[LESION_THRESHOLD] = apply_threshold(volume.array, 0.5)
        written = write_masks_nifti(masks, volume.geometry, stage)
        write_seg_nrrd(masks, volume.geometry, stage / seg_path.name)
        doc = profile.to_json_dict("", "")
        for key in ("summaries", "provenance", "format", "format_version"):
            doc.pop(key, None)
        doc.update(probability_map=str(volume.path), voxels={name: int(m.sum()) for name, m in masks.items()})
        doc.update(deployed, profile_file=str(args.profile), profile_sha256=sha256_file(args.profile))
        if args.slider_safe:
            doc.update(slider_safe=True, guarantee=guarantee)
        if dicom_seg is not None:
            write_seg_output(args, stage / dicom_seg.name, masks, volume.geometry, doc)
            doc["dicom_seg"] = str(dicom_seg)
        atomic_write_text(stage / summary_path.name, json.dumps(doc, indent=2) + "\n")
    print(guarantee)
    for name, mask in masks.items():
        print(f"{name}: {int(mask.sum())} voxels ({mask.sum() * volume.geometry.voxel_volume_mm3 / 1000:.2f} mL)")
    print(f"wrote {seg_path}, {summary_path} and {len(written)} NIfTI mask(s) in {args.out}")
    if dicom_seg is not None:
        print(f"wrote the DICOM SEG {dicom_seg}")
    return 0


def _recalibrated(args: argparse.Namespace, profile: CalibrationProfile) -> CalibrationProfile:
    """The profile recalibrated for the parameters given on the command line (as it is without any)."""
    voxel: float | None | Unchanged = UNCHANGED
    if args.voxel_epsilon is not None or args.no_voxel_epsilon:
        if profile.method != "lesion":
            raise ConformalSegError(
                "--voxel-epsilon and --no-voxel-epsilon apply to lesion-level profiles only",
                path=args.profile,
                fix="leave them out, or calibrate with --method lesion",
            )
        if args.voxel_epsilon is not None and args.no_voxel_epsilon:
            raise ConformalSegError("give --voxel-epsilon or --no-voxel-epsilon, not both")
        voxel = None if args.no_voxel_epsilon else args.voxel_epsilon
    if profile.method == "ltt" and args.epsilon is not None:
        raise ConformalSegError(
            "a Learn-Then-Test profile has one target per risk, not one --epsilon",
            path=args.profile,
            fix="recalibrate delta with --alpha, or calibrate again with other --risk targets",
        )
    if all(v is None for v in (args.epsilon, args.alpha, args.alpha_inner, args.alpha_outer)) and voxel is UNCHANGED:
        return profile
    return profile.recalibrate(
        epsilon=args.epsilon,
        alpha=args.alpha,
        alpha_inner=args.alpha_inner,
        alpha_outer=args.alpha_outer,
        voxel_epsilon=voxel,
    )


def _slider_safe_masks(
    args: argparse.Namespace, profile: CalibrationProfile, volume: Volume
) -> tuple[dict[str, np.ndarray], str]:
    """The mask of the slider-safe band at ``--epsilon`` and the band's sentence."""
    if profile.method not in ("cls", "lesion"):
        raise ConformalSegError(
            "--slider-safe applies to cls and lesion-level profiles", path=args.profile, fix="leave it out"
        )
    band = profile.slider_band(alpha=args.alpha)
    calibration = profile.calibration
    assert isinstance(calibration, ThresholdCalibration)  # cls and lesion-level profiles
    epsilon = calibration.epsilon if args.epsilon is None else args.epsilon
    cutoff = band.threshold(epsilon)
    mask = apply_threshold(profile.score_map(volume.array, volume.geometry), cutoff)
    sentence = band_sentence(band, profile.method, epsilon)
    if profile.score != DEFAULT_SCORE:
        sentence += score_sentence(profile.score, cutoff)
    return {profile.mask_name: mask}, sentence


def mm_based(profile: CalibrationProfile) -> str | None:
    """What of ``profile`` depends on the voxel spacing (a transform in mm, a size in mm^3 or mL), or None."""
    c = profile.calibration
    transforms = {getattr(c, "inner_transform", "identity"), getattr(c, "outer_transform", "identity")}
    if profile.score != DEFAULT_SCORE:
        return f"its score ({profile.score}) works in mm"
    if transforms - {"identity"}:
        return f"its score transform ({', '.join(sorted(transforms - {'identity'}))}) works in mm"
    if getattr(c, "min_lesion_mm3", 0):
        return "its smallest counted lesion is a volume in mm^3"
    if profile.groups is not None:
        return "its groups are chosen by volume"
    return None


def _check_geometry_known(args: argparse.Namespace, profile: CalibrationProfile, volume: Volume) -> None:
    """A map without geometry (``.npy``, ``.npz`` without sibling) needs ``--spacing`` with a mm-based profile;
    otherwise the 1 mm assumption is said (it changes every mL figure)."""
    if volume.geometry_known or args.spacing is not None:
        return
    reason = mm_based(profile)
    if reason is not None:
        raise ConformalSegError(
            f"the probability map has no voxel spacing (a bare array), and this profile needs it: {reason}",
            path=args.prob,
            fix="pass --spacing X Y Z (mm), or give the map as NIfTI/NRRD (or an .npz beside its nnU-Net seg)",
        )
    print("note: the probability map has no voxel spacing: 1 mm assumed for the mL figures (pass --spacing X Y Z)")


def _channel(args: argparse.Namespace, profile: CalibrationProfile) -> int | None:
    """The channel to read: the profile's (recorded at calibration); a different ``--channel`` is refused."""
    recorded = profile.provenance.get("probability_channel")
    if args.channel is not None and recorded is not None and args.channel != recorded:
        raise ConformalSegError(
            f"--channel {args.channel} differs from channel {recorded}, the class the profile was calibrated on",
            path=args.profile,
            fix=f"leave --channel out (channel {recorded} is used), or calibrate a profile for that class",
        )
    if args.channel is None and recorded is not None:
        print(f"channel {recorded} (recorded in the profile)")
    return recorded if args.channel is None else args.channel


def _predict(args: argparse.Namespace, profile: CalibrationProfile, stage: Path) -> Volume:
    """Run the profile's inference pipeline on ``--image``; write ``OUT/probability.nii.gz`` (staged)."""
    if args.model is None and args.cascade is None:
        raise ConformalSegError(
            "--image needs --model (the model card the profile was calibrated with)",
            fix="pass --model CARD.json (or --cascade CONFIG)",
        )
    from ..inference.model_dataset import engine_for_profile

    record = profile.provenance.get("inference")
    if args.cascade is not None:
        args.seed = (record or {}).get("seed") or 0
    engine, options = engine_for_profile(
        record, args.model, device=args.device, profile_path=args.profile, engine=cascade_predictor_from_args(args)
    )
    prob_path = args.out / "probability.nii.gz"
    if not args.force:
        check_can_write(prob_path)
    image = load_image_input(args.image, _series_uid(args, args.image))
    prediction = engine.predict(image, **options)
    save_volume(prediction.probability, image.geometry, stage / prob_path.name)
    return Volume(prediction.probability, image.geometry, str(prob_path))


def _series_uid(args: argparse.Namespace, source: Path) -> str | None:
    """``--series-uid`` for a DICOM series folder (a file needs none; the UID may be the reference's)."""
    return args.series_uid if Path(source).is_dir() else None
