"""``conformalseg synth``: write a synthetic calibration dataset (probs/, labels/, images/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.errors import ConformalSegError
from ..phantoms.simulated_dataset import LESION_LABEL, write_synthetic_dataset
from .common import add_force, progress_bar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic dataset (imitated network outputs with ground truth)",
        description="Deterministic synthetic CT-like cases with imperfect probability maps, "
        f"written as DIR/probs, DIR/labels (lesion label {LESION_LABEL}) and DIR/images.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cases", type=int, default=40, help="number of cases (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--empty-fraction", type=float, default=0.0, help="share of lesion-free cases (default 0)")
    p.add_argument(
        "--dicom",
        action="store_true",
        help="also write each case's image as a DICOM CT series in DIR/dicom/CASE/ (the reference series of "
        "apply --dicom-seg; loadable in Slicer's DICOM module)",
    )
    add_force(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folders = [args.out / name for name in ("probs", "labels", "images", "dicom")]
    if not args.force and any(f.is_dir() and any(f.iterdir()) for f in folders):
        raise ConformalSegError(
            "the dataset folder already holds cases: new cases would be mixed with them",
            path=args.out,
            fix="choose a new folder, or pass --force to overwrite",
        )
    write_synthetic_dataset(
        args.out,
        args.cases,
        seed=args.seed,
        force=args.force,
        empty_probability=args.empty_fraction,
        progress=progress_bar("writing"),
        dicom=args.dicom,
    )
    print(
        f"wrote {args.cases} cases to {args.out}{' with DICOM series in dicom/' if args.dicom else ''} (lesion label "
        f"{LESION_LABEL}); "
        f"try: conformalseg calibrate --method cls --data {args.out} --lesion-label {LESION_LABEL} "
        f"--epsilon 0.1 --alpha 0.1 --out profile.json"
    )
    return 0
