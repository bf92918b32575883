"""The training data of ``conformalseg train``: lesion cases (a folder, fixed phantoms or a phantom
stream), the ROI task's crops around a stage-1 model's components, and the denoiser's pairs."""

from __future__ import annotations

import argparse
from typing import Any

from ..common.errors import ConformalSegError
from .train_options import PHANTOM_LESION_LABEL
from .train_progress import step_bar


def roi_data(args: argparse.Namespace) -> tuple[list[Any], list[Any], dict[str, Any], tuple[int, ...]]:
    """``--task roi``: crops around the stage-1 components of the lesion task's cases (see
    :mod:`ConformalSegLib.training.roi_data`)."""
    from ..inference import InferenceEngine, resolve_model
    from ..training.roi_data import roi_training_cases

    engine = InferenceEngine(resolve_model(args.stage1_model), device=args.device)
    if args.phantom_stream:
        from ..training import PhantomStream

        if args.roi_phantoms < 1:
            raise ConformalSegError(f"--roi-phantoms must be at least 1, got {args.roi_phantoms}")
        options = {"shape": tuple(args.phantom_shape)} if args.phantom_shape else {}
        stream = PhantomStream(args.phantom_seed, options)
        phantoms = (stream.training_case(i) for i in range(args.roi_phantoms))
        n_phantoms = args.roi_phantoms
        heldout = stream.heldout_cases(args.heldout if args.heldout is not None else 24)
        labels = tuple(args.lesion_label or (PHANTOM_LESION_LABEL,))
        data_info = stream.describe()
        data_info["train"] = f"ROI crops of phantoms i < {args.roi_phantoms} of that stream"
    else:
        phantoms, held_cases, data_info, labels = lesion_data(args)
        n_phantoms, heldout = len(phantoms), held_cases
    if any(m < 0 for m in args.roi_margins):
        raise ConformalSegError(f"--roi-margins must be >= 0 voxels, got {args.roi_margins}")
    crops, info = roi_training_cases(
        engine,
        phantoms,
        margins=args.roi_margins,
        lesion_labels=labels,
        progress=step_bar("stage 1 on training phantoms"),
        total=n_phantoms,
    )
    held_crops, held_info = roi_training_cases(engine, heldout, margins=args.roi_margins, lesion_labels=labels)
    if not crops:
        raise ConformalSegError(
            "the stage-1 model found no component to cut a ROI around", fix="check --stage1-model, or use more phantoms"
        )
    data_info = {
        **data_info,
        "roi": info,
        "roi_heldout": held_info,
        "stage1_model": {"name": engine.card.name, "pipeline_sha256": engine.card.pipeline_sha256()},
    }
    return crops, held_crops, data_info, labels


def lesion_data(args: argparse.Namespace) -> tuple[Any, list[Any], dict[str, Any], tuple[int, ...]]:
    """The lesion task's training data (cases or a phantom stream), held-out cases, record and labels."""
    from ..training import PhantomStream, folder_cases, phantom_cases, split_cases

    if args.data is not None:
        if not args.lesion_label:
            raise ConformalSegError(
                "--data needs --lesion-label V (the label value that marks the lesion)",
                fix="e.g. --lesion-label 2 for KiTS tumour, 1 for MSD tasks with one foreground",
            )
        cases = folder_cases(args.data)
        n_val = args.heldout if args.heldout is not None else (max(1, round(0.2 * len(cases))) if len(cases) > 1 else 0)
        train_cases, heldout_cases = split_cases(cases, n_val, args.seed)
        return (
            train_cases,
            heldout_cases,
            {"source": "folder", "path": str(args.data.resolve())},
            tuple(args.lesion_label),
        )
    options = {"shape": tuple(args.phantom_shape)} if args.phantom_shape else {}
    labels = tuple(args.lesion_label or (PHANTOM_LESION_LABEL,))
    if args.phantom_stream:
        stream = PhantomStream(args.phantom_seed, options)
        n_val = args.heldout if args.heldout is not None else 24
        return stream, stream.heldout_cases(n_val), stream.describe(getattr(args, "crops_per_phantom", 1)), labels
    if args.phantoms < 1:
        raise ConformalSegError(
            f"--phantoms must be at least 1, got {args.phantoms}", fix="train on some phantoms, e.g. --phantoms 40"
        )
    n_val = args.heldout if args.heldout is not None else max(2, args.phantoms // 5)
    cases = phantom_cases(args.phantoms + n_val, args.phantom_seed, **options)
    data_info = {
        "source": "phantoms",
        "phantom_seed": args.phantom_seed,
        "phantom_options": {k: list(v) for k, v in options.items()},
        "train": f"make_phantoms({args.phantoms + n_val}, seed={args.phantom_seed})[:{args.phantoms}]",
        "heldout": f"make_phantoms({args.phantoms + n_val}, seed={args.phantom_seed})[{args.phantoms}:]",
    }
    return cases[: args.phantoms], cases[args.phantoms :], data_info, labels


def denoise_pairs(args: argparse.Namespace) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """``--task denoise``: the training and held-out (noisy, clean) pairs and the data record."""
    from ..semcrc.phantom_denoising import DEFAULT_SHAPE, DEFAULT_SPACING
    from ..training.denoise import folder_denoising_pairs, phantom_denoising_pairs

    if args.heldout is not None and args.heldout < 0:
        raise ConformalSegError(f"--heldout must be >= 0, got {args.heldout}")
    if args.data is not None:
        pairs = folder_denoising_pairs(args.data)
        n_val = args.heldout if args.heldout is not None else (max(1, round(0.2 * len(pairs))) if len(pairs) > 1 else 0)
        if not 0 <= n_val < len(pairs):
            raise ConformalSegError(
                f"cannot hold out {n_val} of {len(pairs)} case(s) and still train",
                fix="use more cases or a smaller --heldout",
            )
        train_pairs, heldout_pairs = pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :]
        data_info: dict[str, Any] = {
            "source": "folder",
            "path": str(args.data.resolve()),
            "heldout": "the last cases by case id",
        }
    else:
        if args.phantoms < 1:
            raise ConformalSegError(
                f"--phantoms must be at least 1, got {args.phantoms}", fix="train on some phantoms, e.g. --phantoms 48"
            )
        n_val = args.heldout if args.heldout is not None else max(2, args.phantoms // 5)
        shape = tuple(args.phantom_shape) if args.phantom_shape else DEFAULT_SHAPE
        # keep the voxel size of the default coarse phantom's field of view for other shapes
        spacing = (
            DEFAULT_SPACING
            if not args.phantom_shape
            else tuple(d * n / s for d, n, s in zip(DEFAULT_SPACING, reversed(DEFAULT_SHAPE), reversed(shape)))
        )
        pairs = phantom_denoising_pairs(
            args.phantoms + n_val, args.phantom_seed, shape=shape, spacing=spacing, sigma=args.noise_sigma
        )
        train_pairs, heldout_pairs = pairs[: args.phantoms], pairs[args.phantoms :]
        data_info = {
            "source": "phantoms",
            "phantom_seed": args.phantom_seed,
            "shape_zyx": list(shape),
            "spacing_mm_xyz": [float(v) for v in spacing],
            "noise_sigma": args.noise_sigma,
            "window_hu": [-175.0, 250.0],
            "noise_added": "after windowing, in [0, 1] units, not clipped",
            "train": f"denoising_cases({args.phantoms + n_val}, seed={args.phantom_seed})[:{args.phantoms}]",
            "heldout": f"denoising_cases({args.phantoms + n_val}, seed={args.phantom_seed})[{args.phantoms}:]",
        }
    return train_pairs, heldout_pairs, data_info
