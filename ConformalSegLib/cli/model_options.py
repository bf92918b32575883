"""``--model M --images DIR --labels DIR`` (or ``--cascade CONFIG``): calibration and evaluation data
predicted by a network or by the coarse-to-fine cascade.

Shared by ``calibrate`` and ``evaluate``: the model runs once per case (predictions are cached in
``--probs-cache DIR``, or a temporary folder removed at exit) and only the summaries are kept.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from .cascade_options import add_cascade_argument, cascade_predictor_from_args
from .common import add_trust_option, progress_bar
from .dicom_options import add_series_uid_option


def add_model_options(p: argparse.ArgumentParser) -> None:
    add_trust_option(p)
    g = p.add_argument_group("predicting the probability maps with a model (instead of --probs)")
    g.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model card .json / folder / TorchScript (with --images: run it on every image); with --probs: "
        "the model file the maps came from (its SHA-256 is recorded)",
    )
    g.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of images, or an MSD/nnU-Net dataset folder, or a folder of case folders each holding one "
        "DICOM series (case id = the folder's name), matched to --labels by case id",
    )
    add_series_uid_option(g)
    g.add_argument(
        "--mc-dropout",
        type=int,
        default=0,
        metavar="N",
        help="MC dropout passes; the probability is their mean (use the same N at test time)",
    )
    add_tta_option(g)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="inference device (default auto)")
    g.add_argument("--dropout-seed", type=int, default=0, help="seed of the MC dropout masks (default 0)")
    g.add_argument(
        "--probs-cache",
        type=Path,
        default=None,
        help="keep the predicted probability maps in this folder (default: a temporary folder)",
    )
    add_cascade_argument(p)


def _flip_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 2 <= n <= 8:
        raise argparse.ArgumentTypeError(f"--tta takes a number of flips from 2 to 8, got {text!r}")
    return n


def add_tta_option(parser: argparse._ActionsContainer) -> None:
    """``--tta [N]``: flip test-time augmentation, all 8 flips or the first N (``args.tta``: None or N)."""
    parser.add_argument(
        "--tta",
        type=_flip_count,
        nargs="?",
        const=8,
        default=None,
        metavar="N",
        help="average over flips of the spatial axes: all 8 (--tta), or the first N (--tta 4: none and each "
        "single axis; N passes' time)",
    )


def open_model_dataset(args: argparse.Namespace, description: str):
    """The :class:`~ConformalSegLib.inference.model_dataset.InferenceDataset` of ``--model --images --labels``."""
    if args.model is None and getattr(args, "cascade", None) is None:
        raise ConformalSegError(
            "--images needs --model (the network that predicts the probability maps)",
            fix="pass --model CARD.json or --cascade CONFIG (or use precomputed maps with --probs)",
        )
    if args.labels is None:
        raise ConformalSegError(
            "--images needs --labels DIR (the ground truth of the same cases)", fix="pass --labels DIR"
        )
    if args.probs is not None or args.data is not None:
        raise ConformalSegError("give either --images (with --model) or --probs/--data, not both")
    if getattr(args, "channel", None) is not None:
        raise ConformalSegError(
            "--channel applies to precomputed multi-channel maps, not to --model",
            fix="the model card's output.lesion_channel chooses the channel",
        )
    from ..inference import InferenceEngine, resolve_model
    from ..inference.model_dataset import InferenceDataset

    # a cascade predictor stands in for an engine (it predicts alike)
    engine: Any = cascade_predictor_from_args(args) or InferenceEngine(
        resolve_model(args.model), device=args.device, seed=args.dropout_seed
    )
    temporary = None
    cache = args.probs_cache
    if cache is None:
        temporary = tempfile.TemporaryDirectory(prefix="conformalseg-probs-")
        cache = Path(temporary.name) / "probs"
    dataset = InferenceDataset(
        engine,
        args.images,
        args.labels,
        args.lesion_label,
        cache,
        mc_dropout=args.mc_dropout,
        tta_flips=args.tta,
        progress=progress_bar(description),
        series_uid=args.series_uid,
    )
    # removed when the dataset is garbage collected or at exit
    dataset.temporary_cache = temporary  # type: ignore[attr-defined]
    return dataset
