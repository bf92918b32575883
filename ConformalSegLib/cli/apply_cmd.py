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
from ..io.atomic import atomic_write_text, check_can_write
from ..io.segmentation import LESION_THRESHOLD, write_masks_nifti, write_seg_nrrd
from ..io.volumes import Volume, load_image, load_probability_map, save_volume
from .cascade_options import add_cascade_argument, cascade_predictor_from_args
from .common import add_force
from .deploy_options import add_apply_options, deploy_for_scan
from .interval_options import add_interval_apply_arguments, is_interval_profile, run_interval_apply


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
    source.add_argument("--prob", type=Path, help="probability map of the new scan")
    source.add_argument(
        "--image",
        type=Path,
        help="the new scan itself, predicted with --model exactly as in calibration (profiles "
        "calibrated with --model --images); the probability map is written to OUT too",
    )
    p.add_argument("--model", type=Path, help="with --image: the model card the profile was calibrated with")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="with --image: inference device")
    add_cascade_argument(p)
    add_interval_apply_arguments(p)
    p.add_argument("--channel", type=int, default=None, help="channel of a multi-channel probability map")
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
    p.add_argument("--alpha", type=float, help="recalibrate for this risk level")
    p.add_argument("--alpha-inner", type=float, help="sets: recalibrate the inner level")
    p.add_argument("--alpha-outer", type=float, help="sets: recalibrate the outer level")
    p.add_argument(
        "--compare-threshold", action="store_true", help="also write the fixed 0.5-threshold mask for comparison"
    )
    add_apply_options(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_force(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if is_interval_profile(args.profile):
        return run_interval_apply(args)
    if args.prob is None and args.image is None:
        raise ConformalSegError("no scan given", fix="pass --prob PROBABILITY_MAP (or --image SCAN --model CARD)")
    profile = load_profile(args.profile)
    profile = _recalibrated(args, profile)
    if args.image is not None:
        volume = _predict(args, profile)
    else:
        volume = load_probability_map(args.prob, channel=args.channel)
    profile, deployed = deploy_for_scan(args, profile, volume)  # the group's or the weighted calibration
    masks = profile.masks(volume.array, volume.geometry)
    guarantee = deployed["guarantee"]
    if args.slider_safe:
        masks, guarantee = _slider_safe_masks(args, profile, volume)
    if args.compare_threshold:
        masks[LESION_THRESHOLD] = apply_threshold(volume.array, 0.5)
    seg_path = args.out / "segmentation.seg.nrrd"
    summary_path = args.out / "apply.json"
    if not args.force:
        check_can_write(seg_path)
        check_can_write(summary_path)
    written = write_masks_nifti(masks, volume.geometry, args.out, force=args.force)
    write_seg_nrrd(masks, volume.geometry, seg_path, force=args.force)
    doc = profile.to_json_dict("", "")
    for key in ("summaries", "provenance", "format", "format_version"):
        doc.pop(key, None)
    doc.update(probability_map=str(volume.path), voxels={name: int(m.sum()) for name, m in masks.items()})
    doc.update(deployed)
    if args.slider_safe:
        doc.update(slider_safe=True, guarantee=guarantee)
    atomic_write_text(summary_path, json.dumps(doc, indent=2) + "\n", force=args.force)
    print(guarantee)
    for name, mask in masks.items():
        print(f"{name}: {int(mask.sum())} voxels ({mask.sum() * volume.geometry.voxel_volume_mm3 / 1000:.2f} mL)")
    print(f"wrote {seg_path}, {summary_path} and {len(written)} NIfTI mask(s) in {args.out}")
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
    mask = apply_threshold(volume.array, band.threshold(epsilon))
    return {profile.mask_name: mask}, band_sentence(band, profile.method, epsilon)


def _predict(args: argparse.Namespace, profile: CalibrationProfile) -> Volume:
    """Run the profile's inference pipeline on ``--image``; write ``OUT/probability.nii.gz``."""
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
    image = load_image(args.image)
    prediction = engine.predict(image, **options)
    save_volume(prediction.probability, image.geometry, prob_path, force=args.force)
    return Volume(prediction.probability, image.geometry, str(prob_path))
