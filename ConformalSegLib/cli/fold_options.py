"""nnU-Net fold ensembles on the command line (:mod:`ConformalSegLib.io.nnunet_folds`).

* ``calibrate|evaluate --folds DIR --labels DIR``: the probability map of each case is the mean of its
  folds' maps (``DIR/<fold>/CASE.npz``); the profile records the fold names.
* ``apply --folds DIR [--case ID]``: the same average for one case (``--case`` when the folds hold
  several), written to ``OUT/probability.nii.gz`` with the folds' disagreement as uncertainty maps
  ``OUT/fold_variance.nii.gz`` and ``OUT/fold_mutual_information.nii.gz``. ``--fold-score`` (calibration)
  turns the disagreement into the map the methods see; ``apply`` uses the profile's. A profile calibrated on
  folds is applied only to the same folds (names checked), since the ensemble is part of the pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..conformal.profile import CalibrationProfile
from ..io.atomic import check_can_write
from ..io.nnunet_folds import FoldDataset, fold_files, fold_folders, fold_score_map, load_fold_ensemble
from ..io.volumes import Volume, save_volume

FOLDS_HELP = (
    "nnU-Net fold ensemble: folder with one sub-folder per fold (fold_0/ ...), each holding every case's "
    "--save_probabilities output; the folds' maps are averaged per case"
)


SCORE_HELP = (
    "with --folds: the map the methods see: mean (default), upper:K = mean + K x the folds' standard deviation, "
    "lower:K = mean - K x sd (clipped to [0, 1]); apply uses the profile's"
)


def add_folds_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=Path, default=None, help=FOLDS_HELP + " (instead of --probs)")
    p.add_argument("--fold-score", default="mean", help=SCORE_HELP)


def add_fold_apply_options(p: argparse.ArgumentParser, source: argparse._MutuallyExclusiveGroup) -> None:
    source.add_argument(
        "--folds", type=Path, help=FOLDS_HELP + "; the fold variance and mutual information are written"
    )
    p.add_argument("--case", default=None, help="with --folds: the case id to apply to (when the folds hold several)")


def open_fold_dataset(args: argparse.Namespace, progress: Any) -> FoldDataset:
    if args.probs is not None or args.data is not None:
        raise ConformalSegError("give --folds or --probs/--data, not both")
    if args.labels is None:
        raise ConformalSegError("--folds needs --labels (the true label maps)", fix="pass --labels DIR")
    return FoldDataset(
        args.folds, args.labels, args.lesion_label, args.channel, score=args.fold_score, progress=progress
    )


def fold_provenance(dataset: object) -> dict[str, Any]:
    """``{"folds": [names]}`` for a fold-ensemble dataset, else nothing."""
    if not isinstance(dataset, FoldDataset):
        return {}
    return {"folds": list(dataset.fold_names), "fold_score": dataset.score}


def load_fold_volume(args: argparse.Namespace, profile: CalibrationProfile) -> Volume:
    """The averaged map of ``--case`` (written with the uncertainty maps to OUT); checks the profile's folds."""
    names = [folder.name for folder in fold_folders(args.folds)]
    calibrated = profile.provenance.get("folds")
    if calibrated is not None and list(calibrated) != names:
        raise ConformalSegError(
            f"the profile was calibrated on folds {', '.join(calibrated)}, not {', '.join(names)}",
            path=args.folds,
            fix="apply with the same folds (the ensemble is part of the calibrated pipeline)",
        )
    files = fold_files(args.folds)
    case = args.case
    if case is None:
        if len(files) != 1:
            raise ConformalSegError(
                f"the folds hold {len(files)} cases", path=args.folds, fix=f"pass --case (one of: {', '.join(files)})"
            )
        case = next(iter(files))
    elif case not in files:
        raise ConformalSegError(f"case {case!r} is not in the folds", path=args.folds, fix="check --case")
    outputs = {key: args.out / f"{key}.nii.gz" for key in ("probability", "fold_variance", "fold_mutual_information")}
    if not args.force:
        for path in outputs.values():
            check_can_write(path)
    ensemble = load_fold_ensemble(files[case], args.channel)
    ensemble.probability.array = fold_score_map(ensemble, profile.provenance.get("fold_score", "mean"))
    geometry = ensemble.probability.geometry
    save_volume(ensemble.probability.array, geometry, outputs["probability"], force=args.force)
    save_volume(ensemble.variance, geometry, outputs["fold_variance"], force=args.force)
    save_volume(ensemble.mutual_information, geometry, outputs["fold_mutual_information"], force=args.force)
    print(f"{ensemble.n_folds}-fold ensemble of {case}: wrote {', '.join(str(p) for p in outputs.values())}")
    return Volume(
        ensemble.probability.array, geometry, str(outputs["probability"]), ensemble.probability.geometry_known
    )
