"""``conformalseg profile add-case``: a new profile with one reviewed case added to its calibration set.

    conformalseg profile add-case --profile P.json --prob F --label L --out P2.json [--case-id ID]

Reads the reviewed scan's probability map and its corrected label map (same grid), appends the case's
summaries to the profile's and recalibrates at the profile's own parameters
(:func:`ConformalSegLib.conformal.reviewed_cases.add_case`: bit for bit a calibration on the grown set
from scratch). ``--out`` must be a new file: the old profile is never modified, and the new one records
the old one's SHA-256, the case id and the time. The reviewed cases must be representative of the scans
the profile is used on (not only the hard ones), or the guarantee no longer holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.errors import ConformalSegError
from .common import add_force


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="work on calibration profiles (add a reviewed case)")
    actions = p.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    a = actions.add_parser(
        "add-case",
        help="write a new profile with one reviewed case (probability map + corrected lesion) added",
        description="Append one reviewed scan (its probability map and corrected label map) to a profile's "
        "calibration set and recalibrate at the profile's parameters, as a new profile file; the old profile is "
        "never modified. Add reviewed scans as they come, not only the hard ones: the guarantee assumes they are "
        "exchangeable with the scans the profile is applied to.",
    )
    a.add_argument("--profile", type=Path, required=True, help="the profile JSON to grow (left unchanged)")
    a.add_argument(
        "--prob",
        type=Path,
        required=True,
        help="probability map of the reviewed scan (a file, or a DICOM series folder)",
    )
    a.add_argument("--label", type=Path, required=True, help="its corrected label map (same grid)")
    a.add_argument("--out", type=Path, required=True, help="the new profile JSON (its .npz is written beside it)")
    a.add_argument("--case-id", default=None, help="id of the reviewed case (default: the label file's name)")
    a.add_argument(
        "--lesion-label",
        type=int,
        nargs="+",
        default=None,
        metavar="V",
        help="label value(s) of the lesion (default: the profile's, else 1)",
    )
    a.add_argument("--channel", type=int, default=None, help="channel of a multi-channel probability map")
    add_force(a)
    a.set_defaults(func=run_add_case)


def run_add_case(args: argparse.Namespace) -> int:
    from ..conformal.profile import load_profile
    from ..conformal.reviewed_cases import add_case
    from ..io.checksums import sha256_file
    from ..io.dicom_series import load_probability_input
    from ..io.volumes import check_same_geometry, load_label_map, mask_from_labels, volume_extension

    if args.out.resolve() in (args.profile.resolve(), args.profile.with_suffix(".npz").resolve()):
        raise ConformalSegError(
            "--out is the profile being grown: the old profile is never modified",
            path=args.out,
            fix="give a new file name, e.g. profile_plus1.json",
        )
    profile = load_profile(args.profile)
    probability = load_probability_input(args.prob, channel=args.channel)  # a file or a DICOM series folder
    label = load_label_map(args.label, probability.geometry, profile.provenance.get("seg_segments"))
    check_same_geometry(probability, label)
    labels = args.lesion_label or profile.provenance.get("lesion_labels") or [1]
    extension = volume_extension(args.label) or args.label.suffix
    case_id = args.case_id or args.label.name[: len(args.label.name) - len(extension)]
    grown = add_case(
        profile,
        case_id,
        probability.array,
        mask_from_labels(label.array, labels),
        probability.geometry,
        previous_sha256=sha256_file(args.profile),
    )
    path, _ = grown.save(args.out, force=args.force)
    print(f"wrote {path}: {grown.summaries.n} calibration scans (case {case_id!r} added)")
    print(grown.guarantee)
    return 0
