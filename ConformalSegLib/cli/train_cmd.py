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
import shlex
import sys
from pathlib import Path
from typing import Callable

from ..errors import ConformalSegError
from .common import add_force

PHANTOM_LESION_LABEL = 6
#: ``--task lesion`` defaults: the recipe of the shipped phantom model (nnU-Net-style DynUNet with deep
#: supervision on the phantoms' own 1.6 x 1.6 x 3.0 mm grid; one 96 x 96 x 48 window covers a phantom)
DEFAULTS = {"epochs": 40, "patch_size": (96, 96, 48), "crop_size": (64, 64, 32), "spacing_mm": None,
            "window": (-200.0, 300.0), "network": "dynunet", "channels": (16, 32, 64, 128),
            "strides": ((2, 2, 1), (2, 2, 2), (2, 2, 2)), "dropout": 0.1, "lr": 2e-3, "optimizer": "adamw",
            "weight_decay": 1e-4, "lr_schedule": "poly", "batch_size": 2, "samples_per_case": 4,
            "steps_per_epoch": 100, "fg_fraction": 0.33, "mc_passes": 4}
#: ``--task denoise`` defaults (coarse 24 x 48 x 48 phantoms: one 48 x 48 x 24 window per case)
DENOISE_DEFAULTS = {"epochs": 40, "patch_size": (48, 48, 24), "crop_size": (32, 32, 16), "spacing_mm": None,
                    "channels": (16, 32, 64), "strides": (2, 2), "dropout": 0.0, "lr": 3e-3, "lr_schedule": "cosine",
                    "batch_size": 4}
#: ``--task roi`` defaults: a smaller DynUNet for the cascade's ROI crops (one 48 x 48 x 32 window covers
#: most ROI-16 crops of phantom nodules; ROI-0 crops are zero-padded to it)
ROI_DEFAULTS = {"epochs": 8, "patch_size": (48, 48, 32), "crop_size": (32, 32, 16), "spacing_mm": None,
                "channels": (16, 32, 64), "strides": ((2, 2, 1), 2), "dropout": 0.1, "lr": 2e-3, "lr_schedule": "poly",
                "batch_size": 4}
#: options whose default depends on the task (None in the parser, filled in by :func:`apply_task_defaults`)
TASK_DEPENDENT = ("epochs", "patch_size", "crop_size", "spacing_mm", "channels", "strides", "dropout", "lr",
                  "lr_schedule", "batch_size")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a 3D U-Net lesion model (phantoms or an MSD/nnU-Net dataset) and write a model folder",
        description="Train a small MONAI 3D U-Net (softmax, lesion channel 1, dropout for MC dropout) with the "
                    "preprocessing written into its model card, report the held-out lesion Dice measured with the "
                    "inference engine, and write --out/model_card.json, weights.pt and training.json atomically.")
    p.add_argument("--task", choices=("lesion", "denoise", "roi"), default="lesion",
                   help="lesion: softmax lesion segmentation (default); denoise: quantile regression denoiser "
                        "(noisy windowed image in, --quantiles of the clean image out, pinball loss); roi: the "
                        "cascade's ROI (stage-2) model, trained on crops around --stage1-model's components")
    p.add_argument("--stage1-model", type=Path, default=None,
                   help="--task roi: the coarse model whose components the ROI crops are cut around")
    p.add_argument("--roi-phantoms", type=int, default=300, metavar="N",
                   help="--task roi with --phantom-stream: phantoms whose stage-1 components give the training crops")
    p.add_argument("--roi-margins", type=int, nargs="+", default=[0, 16], metavar="V",
                   help="--task roi: ROI margins in voxels (default 0 16, the paper's two settings)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="MSD/nnU-Net dataset folder with imagesTr/ and labelsTr/ "
                                                  "(denoise: a folder with noisy/ and clean/)")
    source.add_argument("--phantoms", type=int, metavar="N", help="train on N synthetic phantoms (a fixed set)")
    source.add_argument("--phantom-stream", action="store_true",
                        help="lesion task: train on a fresh synthetic phantom for every sample (no fixed set; "
                             "--epochs x --steps-per-epoch x --batch-size phantoms in all)")
    p.add_argument("--phantom-seed", type=int, default=0, metavar="S",
                   help="phantom seed (--phantoms: phantoms 0..N-1 train, the next --heldout ones are held out; "
                        "--phantom-stream: the stream and its held-out phantoms)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="phantom array shape, numpy (z, y, x) order (default: the phantom default 48 96 96)")
    p.add_argument("--heldout", type=int, default=None, metavar="N",
                   help="held-out cases for checkpoint selection and the validation Dice (default: max(2, N/5) extra "
                        "phantoms; 24 with --phantom-stream; with --data 20%% of the cases, at least 1)")
    p.add_argument("--lesion-label", type=int, nargs="+", default=None, metavar="V",
                   help=f"label value(s) marking the lesion (default {PHANTOM_LESION_LABEL} with --phantoms; "
                        "required with --data)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--loss", choices=("dice-ce", "uncertainty-aware"), default="dice-ce",
                   help="dice-ce (soft Dice + cross entropy) or uncertainty-aware (MC-dropout weighted, Isler et al.)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {DEFAULTS['epochs']} (denoise {DENOISE_DEFAULTS['epochs']})")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="sliding-window size of the model card, network axes (x, y, z) after resampling "
                        "(default 64 64 48; denoise 48 48 24)")
    p.add_argument("--crop-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="training crop size (default 48 48 32, denoise 32 32 16; multiples of the total stride)")
    p.add_argument("--spacing-mm", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="resampling spacing of the model card in mm (x, y, z) (default: none, the images' own grid, "
                        "for phantoms 1.6 1.6 3.0)")
    p.add_argument("--window", type=float, nargs=2, default=DEFAULTS["window"], metavar=("A_MIN", "A_MAX"),
                   help="intensity window in HU mapped to [0, 1] and clipped (default -200 300: soft tissue)")
    p.add_argument("--network", choices=("dynunet", "unet"), default=None,
                   help="dynunet: MONAI's nnU-Net architecture (per-axis strides, deep supervision; default); "
                        "unet: MONAI's residual UNet (isotropic strides)")
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="channels per level (default 16 32 64 128; denoise 16 32 64)")
    p.add_argument("--strides", type=_stride, nargs="+", default=None,
                   help="downsampling per level: N or AxBxC in network axes x, y, z (default 2x2x1 2 2; denoise 2 2)")
    p.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, default=None,
                   help="dynunet: deep supervision over the two coarser heads (default on for dynunet)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout probability (MC dropout; default 0.1, denoise 0)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3; denoise 3e-3)")
    p.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default=DEFAULTS["optimizer"],
                   help="adamw (default), adam, or sgd (Nesterov momentum 0.99, nnU-Net's)")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"], help="default 1e-4")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.9], metavar="TAU",
                   help="denoise: quantile levels, increasing in (0, 1) (default 0.1 0.9)")
    p.add_argument("--noise-sigma", type=float, default=0.2,
                   help="denoise with --phantoms: Gaussian noise sigma in windowed units (default 0.2)")
    p.add_argument("--lr-schedule", choices=("poly", "cosine", "constant"), default=None,
                   help="poly: nnU-Net's (1 - step/total)^0.9 (lesion default); cosine: decay to 0 (denoise default); "
                        "constant")
    p.add_argument("--batch-size", type=int, default=None, help="default 2 (denoise 4)")
    p.add_argument("--samples-per-case", type=int, default=DEFAULTS["samples_per_case"],
                   help="--phantoms/--data: crops per case and epoch")
    p.add_argument("--steps-per-epoch", type=int, default=DEFAULTS["steps_per_epoch"],
                   help="--phantom-stream: batches per epoch (validation and checkpoint after each epoch)")
    p.add_argument("--fg-fraction", type=float, default=DEFAULTS["fg_fraction"],
                   help="fraction of crops centred on a lesion (the lesion chosen uniformly, so small ones count as "
                        "much as large ones; default 0.33)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="MONAI spatial and intensity augmentation, seeded per sample (default on)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="background processes generating phantoms / patches (default 1 with --phantom-stream, else 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="resumable checkpoint written after every epoch (default OUT.checkpoint.pt; removed at the end)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--mc-passes", type=int, default=DEFAULTS["mc_passes"],
                   help="MC dropout passes for the uncertainty-aware loss")
    p.add_argument("--name", default=None, help="model name in the card (default: the --out folder name)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:N)")
    p.add_argument("--seed", type=int, default=0, help="training seed (weights, dropout, patches)")
    add_force(p)
    p.set_defaults(func=run)


def _stride(text: str):  # noqa: ANN202 - int or a triplet
    from ..training.networks import parse_stride

    try:
        return parse_stride(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def apply_task_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the task-dependent options the user left unset (see :data:`TASK_DEPENDENT`)."""
    defaults = {"denoise": DENOISE_DEFAULTS, "roi": ROI_DEFAULTS}.get(getattr(args, "task", "lesion"), DEFAULTS)
    for key in TASK_DEPENDENT:
        if getattr(args, key, None) is None and defaults[key] is not None:
            setattr(args, key, defaults[key])
    if getattr(args, "task", "lesion") != "denoise":
        if getattr(args, "network", None) is None:
            args.network = DEFAULTS["network"]
        if getattr(args, "deep_supervision", None) is None:
            args.deep_supervision = args.network == "dynunet"
        if getattr(args, "num_workers", None) is None:
            args.num_workers = 1 if getattr(args, "phantom_stream", False) and args.task == "lesion" else 0
    return args


def canonical_command(args: argparse.Namespace) -> str:
    """The full ``conformalseg train`` command with every option explicit (reproduces the run)."""
    apply_task_defaults(args)
    if getattr(args, "task", "lesion") == "denoise":
        return _canonical_denoise_command(args)
    parts = ["conformalseg", "train"]
    from ..training.networks import format_stride

    if args.task == "roi":
        parts += ["--task", "roi", "--stage1-model", str(args.stage1_model), "--roi-margins",
                  *map(str, args.roi_margins)]
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
    parts += ["--out", str(args.out), "--loss", args.loss, "--epochs", str(args.epochs),
              "--patch-size", *map(str, args.patch_size), "--crop-size", *map(str, args.crop_size)]
    if args.spacing_mm is not None:
        parts += ["--spacing-mm", *map(str, args.spacing_mm)]
    parts += ["--window", *map(str, args.window), "--network", args.network, "--channels", *map(str, args.channels),
              "--strides", *map(format_stride, args.strides),
              "--deep-supervision" if args.deep_supervision else "--no-deep-supervision",
              "--dropout", str(args.dropout), "--optimizer", args.optimizer, "--lr", str(args.lr),
              "--weight-decay", str(args.weight_decay), "--lr-schedule", args.lr_schedule,
              "--batch-size", str(args.batch_size)]
    if getattr(args, "phantom_stream", False) and args.task == "lesion":
        parts += ["--steps-per-epoch", str(args.steps_per_epoch)]
    else:
        parts += ["--samples-per-case", str(args.samples_per_case)]
    parts += ["--fg-fraction", str(args.fg_fraction), "--augment" if args.augment else "--no-augment",
              "--num-workers", str(args.num_workers)]
    if args.loss == "uncertainty-aware":
        parts += ["--mc-passes", str(args.mc_passes)]
    if args.name:
        parts += ["--name", args.name]
    parts += ["--device", args.device, "--seed", str(args.seed)]
    if getattr(args, "threads", None):
        parts += ["--threads", str(args.threads)]
    if args.force:
        parts.append("--force")
    return shlex.join(parts)


def _canonical_denoise_command(args: argparse.Namespace) -> str:
    parts = ["conformalseg", "train", "--task", "denoise"]
    if args.data is not None:
        parts += ["--data", str(args.data)]
    else:
        parts += ["--phantoms", str(args.phantoms), "--phantom-seed", str(args.phantom_seed),
                  "--noise-sigma", str(args.noise_sigma)]
        if args.phantom_shape:
            parts += ["--phantom-shape", *map(str, args.phantom_shape)]
    if args.heldout is not None:
        parts += ["--heldout", str(args.heldout)]
    parts += ["--out", str(args.out), "--quantiles", *map(str, args.quantiles), "--epochs", str(args.epochs),
              "--patch-size", *map(str, args.patch_size), "--crop-size", *map(str, args.crop_size)]
    if args.spacing_mm is not None:
        parts += ["--spacing-mm", *map(str, args.spacing_mm)]
    parts += ["--channels", *map(str, args.channels), "--strides", *map(str, args.strides),
              "--dropout", str(args.dropout), "--lr", str(args.lr)]
    if getattr(args, "lr_schedule", "cosine") != "cosine":
        parts += ["--lr-schedule", args.lr_schedule]
    parts += ["--batch-size", str(args.batch_size), "--samples-per-case", str(args.samples_per_case)]
    if args.name:
        parts += ["--name", args.name]
    parts += ["--device", args.device, "--seed", str(args.seed)]
    if args.force:
        parts.append("--force")
    return shlex.join(parts)


def _step_bar(description: str) -> Callable[[int, int, str], None]:
    """A tqdm bar over training steps (on stderr)."""
    from tqdm import tqdm

    state: dict[str, object] = {}

    def update(done: int, total: int, label: str = "") -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=description, unit="step", file=sys.stderr,
                                      dynamic_ncols=True, mininterval=1.0)
        bar.set_postfix_str(label, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state.pop("bar")

    return update


def run(args: argparse.Namespace) -> int:
    from ..training import TrainingConfig, check_output_folder

    from ..training.trainer import DEFAULT_WINDOW

    if not args.resume:
        check_output_folder(args.out, force=args.force)  # fail before generating or reading data
    apply_task_defaults(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConformalSegError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.task == "denoise":
        if args.phantom_stream:
            raise ConformalSegError("--phantom-stream trains the lesion task only", fix="use --phantoms N for denoise")
        return run_denoise(args)
    if not args.window[0] < args.window[1]:
        raise ConformalSegError(f"--window needs A_MIN < A_MAX, got {args.window[0]:g} {args.window[1]:g}",
                                fix="e.g. --window -200 300")
    if args.heldout is not None and args.heldout < 0:
        raise ConformalSegError(f"--heldout must be >= 0, got {args.heldout}")
    if (args.task == "roi") != (args.stage1_model is not None):
        raise ConformalSegError("--stage1-model goes with --task roi (and --task roi needs it)",
                                fix="e.g. --task roi --stage1-model Resources/models/phantom_lesion_unet")
    train_data, heldout_cases, data_info, lesion_labels = _roi_data(args) if args.task == "roi" else _lesion_data(args)
    config = TrainingConfig(
        lesion_labels=lesion_labels, loss=args.loss, epochs=args.epochs, patch_size=tuple(args.patch_size),
        crop_size=tuple(args.crop_size), spacing_mm=None if args.spacing_mm is None else tuple(args.spacing_mm),
        intensity={**DEFAULT_WINDOW, "a_min": args.window[0], "a_max": args.window[1]}, network=args.network,
        channels=tuple(args.channels), strides=tuple(args.strides), deep_supervision=args.deep_supervision,
        dropout=args.dropout, optimizer=args.optimizer, weight_decay=args.weight_decay, learning_rate=args.lr,
        lr_schedule=args.lr_schedule, batch_size=args.batch_size, samples_per_case=args.samples_per_case,
        steps_per_epoch=args.steps_per_epoch, fg_fraction=args.fg_fraction, augment=args.augment,
        mc_passes=args.mc_passes, seed=args.seed, device=args.device, num_workers=args.num_workers,
        name=args.name or args.out.resolve().name)
    what = "a fresh phantom per sample" if args.phantom_stream and args.task == "lesion" else \
        f"{len(train_data)} {'ROI crop' if args.task == 'roi' else 'case'}(s)"
    print(f"training on {what}, {len(heldout_cases)} held out; {args.epochs} epoch(s), loss {args.loss}, "
          f"network {args.network}{' (resuming)' if args.resume else ''}")
    from ..training import train

    result = train(config, train_data, heldout_cases, args.out, force=args.force, progress=_step_bar("training"),
                   data_info=data_info, command=canonical_command(args), checkpoint=args.checkpoint,
                   resume=args.resume)
    dice = result.heldout.get("mean_dice")
    chosen = f" (weights of epoch {result.best_epoch}, best validation Dice)" if result.best_epoch else ""
    print(f"final training loss {result.epoch_losses[-1]:.4f}; held-out lesion Dice "
          f"{'n/a (no held-out lesion)' if dice is None else f'{dice:.3f}'}{chosen}; {result.wall_seconds:.0f} s")
    print(f"wrote {result.out}")
    return 0


def _roi_data(args: argparse.Namespace):  # noqa: ANN202 - as _lesion_data, with ROI crops
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
        phantoms, held_cases, data_info, labels = _lesion_data(args)
        n_phantoms, heldout = len(phantoms), held_cases
    if any(m < 0 for m in args.roi_margins):
        raise ConformalSegError(f"--roi-margins must be >= 0 voxels, got {args.roi_margins}")
    crops, info = roi_training_cases(engine, phantoms, margins=args.roi_margins, lesion_labels=labels,
                                     progress=_step_bar("stage 1 on training phantoms"), total=n_phantoms)
    held_crops, held_info = roi_training_cases(engine, heldout, margins=args.roi_margins, lesion_labels=labels)
    if not crops:
        raise ConformalSegError("the stage-1 model found no component to cut a ROI around",
                                fix="check --stage1-model, or use more phantoms")
    data_info = {**data_info, "roi": info, "roi_heldout": held_info,
                 "stage1_model": {"name": engine.card.name, "pipeline_sha256": engine.card.pipeline_sha256()}}
    return crops, held_crops, data_info, labels


def _lesion_data(args: argparse.Namespace):  # noqa: ANN202 - (train data, held-out cases, data info, labels)
    """The lesion task's training data (cases or a phantom stream), held-out cases, record and labels."""
    from ..training import PhantomStream, folder_cases, phantom_cases, split_cases

    if args.data is not None:
        if not args.lesion_label:
            raise ConformalSegError("--data needs --lesion-label V (the label value that marks the lesion)",
                                    fix="e.g. --lesion-label 2 for KiTS tumour, 1 for MSD tasks with one foreground")
        cases = folder_cases(args.data)
        n_val = args.heldout if args.heldout is not None else (max(1, round(0.2 * len(cases))) if len(cases) > 1 else 0)
        train_cases, heldout_cases = split_cases(cases, n_val, args.seed)
        return train_cases, heldout_cases, {"source": "folder", "path": str(args.data.resolve())}, \
            tuple(args.lesion_label)
    options = {"shape": tuple(args.phantom_shape)} if args.phantom_shape else {}
    labels = tuple(args.lesion_label or (PHANTOM_LESION_LABEL,))
    if args.phantom_stream:
        stream = PhantomStream(args.phantom_seed, options)
        n_val = args.heldout if args.heldout is not None else 24
        return stream, stream.heldout_cases(n_val), stream.describe(), labels
    if args.phantoms < 1:
        raise ConformalSegError(f"--phantoms must be at least 1, got {args.phantoms}",
                                fix="train on some phantoms, e.g. --phantoms 40")
    n_val = args.heldout if args.heldout is not None else max(2, args.phantoms // 5)
    cases = phantom_cases(args.phantoms + n_val, args.phantom_seed, **options)
    data_info = {"source": "phantoms", "phantom_seed": args.phantom_seed,
                 "phantom_options": {k: list(v) for k, v in options.items()},
                 "train": f"make_phantoms({args.phantoms + n_val}, seed={args.phantom_seed})[:{args.phantoms}]",
                 "heldout": f"make_phantoms({args.phantoms + n_val}, seed={args.phantom_seed})[{args.phantoms}:]"}
    return cases[:args.phantoms], cases[args.phantoms:], data_info, labels


def run_denoise(args: argparse.Namespace) -> int:
    """``conformalseg train --task denoise`` (see the module docstring)."""
    from ..semcrc.phantom_denoising import DEFAULT_SHAPE, DEFAULT_SPACING
    from ..training.denoise import DenoisingConfig, folder_denoising_pairs, phantom_denoising_pairs, train_denoiser

    if args.heldout is not None and args.heldout < 0:
        raise ConformalSegError(f"--heldout must be >= 0, got {args.heldout}")
    if args.data is not None:
        pairs = folder_denoising_pairs(args.data)
        n_val = args.heldout if args.heldout is not None else (max(1, round(0.2 * len(pairs))) if len(pairs) > 1 else 0)
        if not 0 <= n_val < len(pairs):
            raise ConformalSegError(f"cannot hold out {n_val} of {len(pairs)} case(s) and still train",
                                    fix="use more cases or a smaller --heldout")
        train_pairs, heldout_pairs = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
        data_info = {"source": "folder", "path": str(args.data.resolve()), "heldout": "the last cases by case id"}
    else:
        if args.phantoms < 1:
            raise ConformalSegError(f"--phantoms must be at least 1, got {args.phantoms}",
                                    fix="train on some phantoms, e.g. --phantoms 48")
        n_val = args.heldout if args.heldout is not None else max(2, args.phantoms // 5)
        shape = tuple(args.phantom_shape) if args.phantom_shape else DEFAULT_SHAPE
        # keep the voxel size of the default coarse phantom's field of view for other shapes
        spacing = DEFAULT_SPACING if not args.phantom_shape else tuple(
            d * n / s for d, n, s in zip(DEFAULT_SPACING, reversed(DEFAULT_SHAPE), reversed(shape)))
        pairs = phantom_denoising_pairs(args.phantoms + n_val, args.phantom_seed, shape=shape, spacing=spacing,
                                        sigma=args.noise_sigma)
        train_pairs, heldout_pairs = pairs[:args.phantoms], pairs[args.phantoms:]
        data_info = {"source": "phantoms", "phantom_seed": args.phantom_seed, "shape_zyx": list(shape),
                     "spacing_mm_xyz": [float(v) for v in spacing], "noise_sigma": args.noise_sigma,
                     "window_hu": [-175.0, 250.0], "noise_added": "after windowing, in [0, 1] units, not clipped",
                     "train": f"denoising_cases({args.phantoms + n_val}, seed={args.phantom_seed})[:{args.phantoms}]",
                     "heldout": f"denoising_cases({args.phantoms + n_val}, seed={args.phantom_seed})[{args.phantoms}:]"}
    config = DenoisingConfig(
        quantiles=tuple(args.quantiles), epochs=args.epochs, patch_size=tuple(args.patch_size),
        crop_size=tuple(args.crop_size), spacing_mm=None if args.spacing_mm is None else tuple(args.spacing_mm),
        channels=tuple(args.channels), strides=tuple(args.strides), dropout=args.dropout, learning_rate=args.lr,
        lr_schedule=args.lr_schedule, batch_size=args.batch_size,
        samples_per_case=args.samples_per_case, seed=args.seed, device=args.device,
        name=args.name or args.out.resolve().name)
    print(f"training a quantile denoiser (levels {', '.join(f'{q:g}' for q in config.quantiles)}) on "
          f"{len(train_pairs)} case(s), {len(heldout_pairs)} held out; {config.epochs} epoch(s)")
    result = train_denoiser(config, train_pairs, heldout_pairs, args.out, force=args.force,
                            progress=_step_bar("training"), data_info=data_info, command=canonical_command(args))
    coverage, length = result.heldout.get("coverage"), result.heldout.get("mean_length")
    summary = "n/a (no held-out case)" if coverage is None else \
        f"{coverage:.3f} (nominal {config.quantiles[-1] - config.quantiles[0]:.2f}), mean length {length:.4f}"
    print(f"final pinball loss {result.epoch_losses[-1]:.4f}; held-out coverage {summary}; "
          f"{result.wall_seconds:.0f} s")
    print(f"wrote {result.out}")
    return 0
