"""The canonical ``conformalseg train`` command of a run: every option explicit, so that the line recorded
in the model card reproduces the run."""

from __future__ import annotations

import argparse
import shlex

from .train_options import apply_task_defaults


def canonical_command(args: argparse.Namespace) -> str:
    """The full ``conformalseg train`` command with every option explicit (reproduces the run)."""
    apply_task_defaults(args)
    if getattr(args, "task", "lesion") == "denoise":
        return _canonical_denoise_command(args)
    parts = ["conformalseg", "train", *_data_parts(args), *_model_parts(args)]
    if args.loss == "uncertainty-aware":
        parts += ["--mc-passes", str(args.mc_passes)]
    if args.name:
        parts += ["--name", args.name]
    if getattr(args, "init_weights", None) is not None:
        parts += ["--init-weights", str(args.init_weights)]
    parts += ["--device", args.device, "--seed", str(args.seed)]
    if getattr(args, "threads", None):
        parts += ["--threads", str(args.threads)]
    if args.force:
        parts.append("--force")
    return shlex.join(parts)


def _data_parts(args: argparse.Namespace) -> list[str]:
    """The task, data, held-out and label options of the canonical command."""
    parts: list[str] = []
    if args.task == "roi":
        parts += [
            "--task",
            "roi",
            "--stage1-model",
            str(args.stage1_model),
            "--roi-margins",
            *map(str, args.roi_margins),
        ]
        if args.phantom_stream:
            parts += ["--roi-phantoms", str(args.roi_phantoms)]
    if args.data is not None:
        parts += ["--data", str(args.data)]
    elif getattr(args, "phantom_stream", False):
        parts += ["--phantom-stream", "--phantom-seed", str(args.phantom_seed)]
    else:
        parts += ["--phantoms", str(args.phantoms), "--phantom-seed", str(args.phantom_seed)]
    if args.data is None and args.phantom_shape:
        parts += ["--phantom-shape", *map(str, args.phantom_shape)]
    if args.heldout is not None:
        parts += ["--heldout", str(args.heldout)]
    if args.lesion_label:
        parts += ["--lesion-label", *map(str, args.lesion_label)]
    return parts


def _model_parts(args: argparse.Namespace) -> list[str]:
    """The output, loss, preprocessing, network and optimisation options of the canonical command."""
    from ..training.networks import format_stride

    parts = [
        "--out",
        str(args.out),
        "--loss",
        args.loss,
        "--epochs",
        str(args.epochs),
        "--patch-size",
        *map(str, args.patch_size),
        "--crop-size",
        *map(str, args.crop_size),
    ]
    if args.spacing_mm is not None:
        parts += ["--spacing-mm", *map(str, args.spacing_mm)]
    parts += [
        "--window",
        *map(str, args.window),
        "--network",
        args.network,
        "--channels",
        *map(str, args.channels),
        "--strides",
        *map(format_stride, args.strides),
        "--deep-supervision" if args.deep_supervision else "--no-deep-supervision",
        "--dropout",
        str(args.dropout),
        "--optimizer",
        args.optimizer,
        "--lr",
        str(args.lr),
        "--weight-decay",
        str(args.weight_decay),
        *(["--ema-decay", str(args.ema_decay)] if getattr(args, "ema_decay", None) is not None else []),
        *(["--select-by", args.select_by] if getattr(args, "select_by", "dice") != "dice" else []),
        *(["--precision", args.precision] if getattr(args, "precision", "fp32") != "fp32" else []),
        "--lr-schedule",
        args.lr_schedule,
        "--batch-size",
        str(args.batch_size),
    ]
    if getattr(args, "phantom_stream", False) and args.task == "lesion":
        parts += ["--steps-per-epoch", str(args.steps_per_epoch)]
        crops = getattr(args, "crops_per_phantom", 1)
        parts += ["--crops-per-phantom", str(crops)] if crops != 1 else []
    else:
        parts += ["--samples-per-case", str(args.samples_per_case)]
    parts += [
        "--fg-fraction",
        str(args.fg_fraction),
        "--augment" if args.augment else "--no-augment",
        "--num-workers",
        str(args.num_workers),
    ]
    return parts


def _canonical_denoise_command(args: argparse.Namespace) -> str:
    parts = ["conformalseg", "train", "--task", "denoise"]
    if args.data is not None:
        parts += ["--data", str(args.data)]
    else:
        parts += [
            "--phantoms",
            str(args.phantoms),
            "--phantom-seed",
            str(args.phantom_seed),
            "--noise-sigma",
            str(args.noise_sigma),
        ]
        if args.phantom_shape:
            parts += ["--phantom-shape", *map(str, args.phantom_shape)]
    if args.heldout is not None:
        parts += ["--heldout", str(args.heldout)]
    parts += [
        "--out",
        str(args.out),
        "--quantiles",
        *map(str, args.quantiles),
        "--epochs",
        str(args.epochs),
        "--patch-size",
        *map(str, args.patch_size),
        "--crop-size",
        *map(str, args.crop_size),
    ]
    if args.spacing_mm is not None:
        parts += ["--spacing-mm", *map(str, args.spacing_mm)]
    parts += [
        "--channels",
        *map(str, args.channels),
        "--strides",
        *map(str, args.strides),
        "--dropout",
        str(args.dropout),
        "--lr",
        str(args.lr),
    ]
    if getattr(args, "lr_schedule", "cosine") != "cosine":
        parts += ["--lr-schedule", args.lr_schedule]
    parts += ["--batch-size", str(args.batch_size), "--samples-per-case", str(args.samples_per_case)]
    if args.name:
        parts += ["--name", args.name]
    parts += ["--device", args.device, "--seed", str(args.seed)]
    if args.force:
        parts.append("--force")
    return shlex.join(parts)
