"""``conformalseg train``: train a small 3D U-Net lesion model on phantoms or an MSD/nnU-Net folder,
or (``--task denoise``) a quantile regression denoiser.

The output folder (``model_card.json``, ``weights.pt``, ``training.json``) is a model path for
``conformalseg infer`` and the Slicer module. See :mod:`ConformalSegLib.training.trainer` (lesion)
and :mod:`ConformalSegLib.training.denoise` (denoise).

``--task denoise``: input = the noisy windowed image, target = the clean windowed image (HU
-175..250 -> [0, 1], Gaussian noise ``--noise-sigma`` added after windowing, see
:mod:`ConformalSegLib.semcrc.phantom_denoising`), pinball loss for ``--quantiles`` (default 0.1 0.9).
Data: ``--phantoms N`` (coarse phantoms generated and noised on the fly) or ``--data DIR`` holding
``noisy/`` and ``clean/`` (and optionally ``organs/``) with matching case ids, as written by
``write_denoising_dataset``. Options left unset take the task's defaults (:data:`DEFAULTS` for
lesion, :data:`DENOISE_DEFAULTS` for denoise).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..common.errors import ConformalSegError
from .common import add_force
from .train_canonical import canonical_command
from .train_data import denoise_pairs, lesion_data, roi_data
from .train_options import add_train_options, apply_task_defaults
from .train_progress import step_bar

#: How the card's ``selected_by`` rule is said in the command's summary line.
SELECTED_BY = {"dice": "best validation Dice", "cls-pc": "smallest validation CLS cost", "last": "the last epoch"}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a 3D U-Net lesion model (phantoms or an MSD/nnU-Net dataset) and write a model folder",
        description="Train a small MONAI 3D U-Net (softmax, lesion channel 1, dropout for MC dropout) with the "
        "preprocessing written into its model card, report the held-out lesion Dice measured with the "
        "inference engine, and write --out/model_card.json, weights.pt and training.json atomically.",
    )
    add_train_options(p)
    add_force(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training import check_output_folder

    if args.snapshot is not None:
        _check_snapshot_args(args)
        check_output_folder(args.snapshot, force=args.force)  # fail before generating or reading data
    elif not args.resume:
        check_output_folder(args.out, force=args.force)
    apply_task_defaults(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConformalSegError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.task == "denoise":
        if args.phantom_stream:
            raise ConformalSegError("--phantom-stream trains the lesion task only", fix="use --phantoms N for denoise")
        if args.init_weights is not None:
            raise ConformalSegError("--init-weights serves the lesion and roi tasks", fix="leave it out for denoise")
        if args.ema_decay is not None:
            raise ConformalSegError("--ema-decay serves the lesion and roi tasks", fix="leave it out for denoise")
        if args.select_by != "dice":
            raise ConformalSegError("--select-by serves the lesion and roi tasks", fix="leave it out for denoise")
        if args.precision != "fp32":
            raise ConformalSegError("--precision serves the lesion and roi tasks", fix="leave it out for denoise")
        if args.time_limit is not None:
            raise ConformalSegError("--time-limit serves the lesion and roi tasks", fix="leave it out for denoise")
        if args.crops_per_phantom != 1:
            raise ConformalSegError("--crops-per-phantom serves --phantom-stream", fix="leave it out for denoise")
        return run_denoise(args)
    _check_lesion_args(args)
    train_data, heldout_cases, data_info, lesion_labels = roi_data(args) if args.task == "roi" else lesion_data(args)
    config = _lesion_config(args, lesion_labels)
    if args.snapshot is not None:
        return run_snapshot(args, config, train_data, heldout_cases, data_info)
    what = (
        "a fresh phantom per sample"
        if args.phantom_stream and args.task == "lesion"
        else f"{len(train_data)} {'ROI crop' if args.task == 'roi' else 'case'}(s)"
    )
    print(
        f"training on {what}, {len(heldout_cases)} held out; {args.epochs} epoch(s), loss {args.loss}, "
        f"network {args.network}{' (resuming)' if args.resume else ''}"
    )
    from ..training import train

    result = train(
        config,
        train_data,
        heldout_cases,
        args.out,
        force=args.force,
        progress=step_bar("training"),
        data_info=data_info,
        command=canonical_command(args),
        checkpoint=args.checkpoint,
        resume=args.resume,
        init_weights=args.init_weights,
        time_limit=args.time_limit,
    )
    dice = result.heldout.get("mean_dice")
    chosen = f" (weights of epoch {result.best_epoch}, {SELECTED_BY[config.select_by]})" if result.best_epoch else ""
    print(
        f"final training loss {result.epoch_losses[-1]:.4f}; held-out lesion Dice "
        f"{'n/a (no held-out lesion)' if dice is None else f'{dice:.3f}'}{chosen}; {result.wall_seconds:.0f} s"
    )
    print(f"wrote {result.out}")
    if result.stopped_early:
        from ..training.checkpoint import default_checkpoint_path

        checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint_path(args.out)
        print(
            f"stopped by the time limit after epoch {len(result.epoch_losses)} of {config.epochs}: {result.out} "
            f"holds the best weights so far and {checkpoint} the run; continue with the same command plus "
            "--resume --force"
        )
    return 0


def _check_snapshot_args(args: argparse.Namespace) -> None:
    """``--snapshot`` reads an unfinished lesion or ROI run's checkpoint; it trains nothing."""
    if args.task == "denoise":
        raise ConformalSegError("--snapshot serves the lesion and roi tasks", fix="leave it out for denoise")
    if args.time_limit is not None:
        raise ConformalSegError("--snapshot does not train, so it takes no --time-limit", fix="leave it out")
    if args.resume:
        raise ConformalSegError(
            "--snapshot writes the best weights so far and does not train, so it does not go with --resume",
            fix="take the snapshot with the run's options and --snapshot DIR, then resume with --resume",
        )
    if args.snapshot.resolve() == args.out.resolve():
        raise ConformalSegError(
            "--snapshot must name another folder than --out (the run writes its final model to --out)",
            path=args.snapshot,
            fix="e.g. --snapshot OUT_epoch20",
        )


def run_snapshot(
    args: argparse.Namespace, config: Any, train_data: Any, heldout_cases: Any, data_info: dict[str, Any]
) -> int:
    """``conformalseg train ... --snapshot DIR`` (see :func:`ConformalSegLib.training.snapshot`)."""
    import copy

    from ..training import snapshot
    from ..training.checkpoint import default_checkpoint_path

    checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint_path(args.out)
    run_args = copy.copy(args)
    run_args.force = False  # the recorded command is the run's, not the snapshot's
    print(f"snapshot of the run in {checkpoint} (no training); measuring {len(heldout_cases)} held-out case(s)")
    result = snapshot(
        config,
        train_data,
        heldout_cases,
        args.snapshot,
        checkpoint,
        force=args.force,
        data_info=data_info,
        command=canonical_command(run_args),
    )
    from ..inference import resolve_model

    training = resolve_model(result.out).training
    done = training["snapshot"]
    dice = result.heldout.get("mean_dice")
    chosen = (
        f"weights of epoch {result.best_epoch} ({training['selected_weights']}, {SELECTED_BY[config.select_by]}; "
        f"validation Dice {_number(training['selected_val_dice'])}, "
        f"CLS cost {_number(training['selected_val_cls_pc'])})"
        if result.best_epoch
        else "the last epoch's weights (no validation)"
    )
    print(
        f"after {done['epochs_done']} of {done['epochs_planned']} epoch(s): {chosen}; held-out lesion Dice "
        f"{'n/a (no held-out lesion)' if dice is None else f'{dice:.3f}'}"
    )
    print(f"wrote {result.out}; the run's checkpoint is unchanged (continue with --resume)")
    return 0


def _check_lesion_args(args: argparse.Namespace) -> None:
    """Errors in the lesion and ROI tasks' options that need no data to find."""
    if not args.window[0] < args.window[1]:
        raise ConformalSegError(
            f"--window needs A_MIN < A_MAX, got {args.window[0]:g} {args.window[1]:g}", fix="e.g. --window -200 300"
        )
    if args.heldout is not None and args.heldout < 0:
        raise ConformalSegError(f"--heldout must be >= 0, got {args.heldout}")
    if args.crops_per_phantom != 1 and not (args.phantom_stream and args.task == "lesion"):
        raise ConformalSegError(
            "--crops-per-phantom serves --phantom-stream (lesion task)",
            fix="with --phantoms or --data, --samples-per-case sets the crops per case",
        )
    from ..training.config import check_crops_per_phantom

    check_crops_per_phantom(args.crops_per_phantom, args.batch_size)  # before any phantom is generated
    if (args.task == "roi") != (args.stage1_model is not None):
        raise ConformalSegError(
            "--stage1-model goes with --task roi (and --task roi needs it)",
            fix="e.g. --task roi --stage1-model Resources/models/phantom_lesion_unet",
        )


def _lesion_config(args: argparse.Namespace, lesion_labels: tuple[int, ...]) -> Any:
    """The :class:`~ConformalSegLib.training.TrainingConfig` of the lesion and ROI tasks' options."""
    from ..inference.model_card import resolve_model
    from ..training import TrainingConfig
    from ..training.config import DEFAULT_WINDOW

    return TrainingConfig(
        lesion_labels=lesion_labels,
        loss=args.loss,
        epochs=args.epochs,
        patch_size=tuple(args.patch_size),
        crop_size=tuple(args.crop_size),
        spacing_mm=None if args.spacing_mm is None else tuple(args.spacing_mm),
        intensity={**DEFAULT_WINDOW, "a_min": args.window[0], "a_max": args.window[1]},
        network=args.network,
        channels=tuple(args.channels),
        strides=tuple(args.strides),
        deep_supervision=args.deep_supervision,
        dropout=args.dropout,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        samples_per_case=args.samples_per_case,
        steps_per_epoch=args.steps_per_epoch,
        crops_per_phantom=args.crops_per_phantom,
        fg_fraction=args.fg_fraction,
        augment=args.augment,
        mc_passes=args.mc_passes,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
        name=args.name or args.out.resolve().name,
        init_weights_sha256=None if args.init_weights is None else resolve_model(args.init_weights).sha256(),
        ema_decay=args.ema_decay,
        select_by=args.select_by,
        precision=args.precision,
    )


def run_denoise(args: argparse.Namespace) -> int:
    """``conformalseg train --task denoise`` (see the module docstring)."""
    from ..training.denoise import DenoisingConfig, train_denoiser

    train_pairs, heldout_pairs, data_info = denoise_pairs(args)
    config = DenoisingConfig(
        quantiles=tuple(args.quantiles),
        epochs=args.epochs,
        patch_size=tuple(args.patch_size),
        crop_size=tuple(args.crop_size),
        spacing_mm=None if args.spacing_mm is None else tuple(args.spacing_mm),
        channels=tuple(args.channels),
        strides=tuple(args.strides),
        dropout=args.dropout,
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        samples_per_case=args.samples_per_case,
        seed=args.seed,
        device=args.device,
        name=args.name or args.out.resolve().name,
    )
    print(
        f"training a quantile denoiser (levels {', '.join(f'{q:g}' for q in config.quantiles)}) on "
        f"{len(train_pairs)} case(s), {len(heldout_pairs)} held out; {config.epochs} epoch(s)"
    )
    result = train_denoiser(
        config,
        train_pairs,
        heldout_pairs,
        args.out,
        force=args.force,
        progress=step_bar("training"),
        data_info=data_info,
        command=canonical_command(args),
    )
    coverage, length = result.heldout.get("coverage"), result.heldout.get("mean_length")
    summary = (
        "n/a (no held-out case)"
        if coverage is None
        else f"{coverage:.3f} (nominal {config.quantiles[-1] - config.quantiles[0]:.2f}), mean length {length:.4f}"
    )
    print(f"final pinball loss {result.epoch_losses[-1]:.4f}; held-out coverage {summary}; {result.wall_seconds:.0f} s")
    print(f"wrote {result.out}")
    return 0
