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

from ..common.errors import ConformalSegError
from .common import add_force

PHANTOM_LESION_LABEL = 6
DEFAULTS = {"epochs": 30, "patch_size": (64, 64, 48), "crop_size": (48, 48, 32), "spacing_mm": (2.4, 2.4, 3.0),
            "window": (-200.0, 300.0),
            "channels": (8, 16, 32, 64), "strides": (2, 2, 2), "dropout": 0.1, "lr": 5e-3, "batch_size": 4,
            "samples_per_case": 4, "mc_passes": 4}
#: ``--task denoise`` defaults (coarse 24 x 48 x 48 phantoms: one 48 x 48 x 24 window per case)
DENOISE_DEFAULTS = {"epochs": 40, "patch_size": (48, 48, 24), "crop_size": (32, 32, 16), "spacing_mm": None,
                    "channels": (16, 32, 64), "strides": (2, 2), "dropout": 0.0, "lr": 3e-3}
#: options whose default depends on the task (None in the parser, filled in by :func:`apply_task_defaults`)
TASK_DEPENDENT = ("epochs", "patch_size", "crop_size", "spacing_mm", "channels", "strides", "dropout", "lr")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a 3D U-Net lesion model (phantoms or an MSD/nnU-Net dataset) and write a model folder",
        description="Train a small MONAI 3D U-Net (softmax, lesion channel 1, dropout for MC dropout) with the "
                    "preprocessing written into its model card, report the held-out lesion Dice measured with the "
                    "inference engine, and write --out/model_card.json, weights.pt and training.json atomically.")
    p.add_argument("--task", choices=("lesion", "denoise"), default="lesion",
                   help="lesion: softmax lesion segmentation (default); denoise: quantile regression denoiser "
                        "(noisy windowed image in, --quantiles of the clean image out, pinball loss)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="MSD/nnU-Net dataset folder with imagesTr/ and labelsTr/ "
                                                  "(denoise: a folder with noisy/ and clean/)")
    source.add_argument("--phantoms", type=int, metavar="N", help="train on N synthetic phantoms")
    p.add_argument("--phantom-seed", type=int, default=0, metavar="S",
                   help="phantom stream seed (phantoms 0..N-1 train, the next --heldout ones are held out)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="phantom array shape, numpy (z, y, x) order (default: the phantom default 48 96 96)")
    p.add_argument("--heldout", type=int, default=None, metavar="N",
                   help="held-out cases for the validation Dice (default: max(2, N/5) extra phantoms; with --data "
                        "20%% of the cases, at least 1)")
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
                   help="resampling spacing of the model card in mm (x, y, z) (default 2.4 2.4 3.0; denoise: "
                        "none, the images' own grid)")
    p.add_argument("--window", type=float, nargs=2, default=DEFAULTS["window"], metavar=("A_MIN", "A_MAX"),
                   help="intensity window in HU mapped to [0, 1] and clipped (default -200 300: soft tissue)")
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="U-Net channels per level (default 8 16 32 64; denoise 16 32 64)")
    p.add_argument("--strides", type=int, nargs="+", default=None, help="U-Net strides (default 2 2 2; denoise 2 2)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout probability (MC dropout; default 0.1, denoise 0)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-3; denoise 3e-3)")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.9], metavar="TAU",
                   help="denoise: quantile levels, increasing in (0, 1) (default 0.1 0.9)")
    p.add_argument("--noise-sigma", type=float, default=0.2,
                   help="denoise with --phantoms: Gaussian noise sigma in windowed units (default 0.2)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: decay the learning rate to 0 over the run (default); constant")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--samples-per-case", type=int, default=DEFAULTS["samples_per_case"],
                   help="crops per case and epoch (half centred on lesion voxels)")
    p.add_argument("--mc-passes", type=int, default=DEFAULTS["mc_passes"],
                   help="MC dropout passes for the uncertainty-aware loss")
    p.add_argument("--name", default=None, help="model name in the card (default: the --out folder name)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:N)")
    p.add_argument("--seed", type=int, default=0, help="training seed (weights, dropout, patches)")
    add_force(p)
    p.set_defaults(func=run)


def apply_task_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the task-dependent options the user left unset (see :data:`TASK_DEPENDENT`)."""
    defaults = DENOISE_DEFAULTS if getattr(args, "task", "lesion") == "denoise" else DEFAULTS
    for key in TASK_DEPENDENT:
        if getattr(args, key, None) is None and defaults[key] is not None:
            setattr(args, key, defaults[key])
    return args


def canonical_command(args: argparse.Namespace) -> str:
    """The full ``conformalseg train`` command with every option explicit (reproduces the run)."""
    apply_task_defaults(args)
    if getattr(args, "task", "lesion") == "denoise":
        return _canonical_denoise_command(args)
    parts = ["conformalseg", "train"]
    if args.data is not None:
        parts += ["--data", str(args.data)]
    else:
        parts += ["--phantoms", str(args.phantoms), "--phantom-seed", str(args.phantom_seed)]
        if args.phantom_shape:
            parts += ["--phantom-shape", *map(str, args.phantom_shape)]
    if args.heldout is not None:
        parts += ["--heldout", str(args.heldout)]
    if args.lesion_label:
        parts += ["--lesion-label", *map(str, args.lesion_label)]
    parts += ["--out", str(args.out), "--loss", args.loss, "--epochs", str(args.epochs),
              "--patch-size", *map(str, args.patch_size), "--crop-size", *map(str, args.crop_size),
              "--spacing-mm", *map(str, args.spacing_mm), "--window", *map(str, args.window), "--channels", *map(str, args.channels),
              "--strides", *map(str, args.strides), "--dropout", str(args.dropout), "--lr", str(args.lr),
              "--lr-schedule", args.lr_schedule,
              "--batch-size", str(args.batch_size), "--samples-per-case", str(args.samples_per_case)]
    if args.loss == "uncertainty-aware":
        parts += ["--mc-passes", str(args.mc_passes)]
    if args.name:
        parts += ["--name", args.name]
    parts += ["--device", args.device, "--seed", str(args.seed)]
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
    from ..training import TrainingConfig, check_output_folder, folder_cases, phantom_cases, split_cases, train

    from ..training.trainer import DEFAULT_WINDOW

    check_output_folder(args.out, force=args.force)  # fail before generating or reading data
    apply_task_defaults(args)
    if args.task == "denoise":
        return run_denoise(args)
    if not args.window[0] < args.window[1]:
        raise ConformalSegError(f"--window needs A_MIN < A_MAX, got {args.window[0]:g} {args.window[1]:g}",
                                fix="e.g. --window -200 300")
    if args.heldout is not None and args.heldout < 0:
        raise ConformalSegError(f"--heldout must be >= 0, got {args.heldout}")
    if args.data is not None:
        if not args.lesion_label:
            raise ConformalSegError("--data needs --lesion-label V (the label value that marks the lesion)",
                                    fix="e.g. --lesion-label 2 for KiTS tumour, 1 for MSD tasks with one foreground")
        cases = folder_cases(args.data)
        n_val = args.heldout if args.heldout is not None else (max(1, round(0.2 * len(cases))) if len(cases) > 1 else 0)
        train_cases, heldout_cases = split_cases(cases, n_val, args.seed)
        data_info = {"source": "folder", "path": str(args.data.resolve())}
        lesion_labels = tuple(args.lesion_label)
    else:
        if args.phantoms < 1:
            raise ConformalSegError(f"--phantoms must be at least 1, got {args.phantoms}",
                                    fix="train on some phantoms, e.g. --phantoms 40")
        n_val = args.heldout if args.heldout is not None else max(2, args.phantoms // 5)
        options = {"shape": tuple(args.phantom_shape)} if args.phantom_shape else {}
        cases = phantom_cases(args.phantoms + n_val, args.phantom_seed, **options)
        train_cases, heldout_cases = cases[:args.phantoms], cases[args.phantoms:]
        data_info = {"source": "phantoms", "phantom_seed": args.phantom_seed,
                     "phantom_options": {k: list(v) for k, v in options.items()},
                     "train": f"make_phantoms({args.phantoms + n_val}, seed={args.phantom_seed})[:{args.phantoms}]",
                     "heldout": f"make_phantoms({args.phantoms + n_val}, seed={args.phantom_seed})[{args.phantoms}:]"}
        lesion_labels = tuple(args.lesion_label or (PHANTOM_LESION_LABEL,))
    config = TrainingConfig(
        lesion_labels=lesion_labels, loss=args.loss, epochs=args.epochs, patch_size=tuple(args.patch_size),
        crop_size=tuple(args.crop_size), spacing_mm=tuple(args.spacing_mm),
        intensity={**DEFAULT_WINDOW, "a_min": args.window[0], "a_max": args.window[1]}, channels=tuple(args.channels),
        strides=tuple(args.strides), dropout=args.dropout, learning_rate=args.lr, lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        samples_per_case=args.samples_per_case, mc_passes=args.mc_passes, seed=args.seed, device=args.device,
        name=args.name or args.out.resolve().name)
    print(f"training on {len(train_cases)} case(s), {len(heldout_cases)} held out; {args.epochs} epoch(s), "
          f"loss {args.loss}")
    result = train(config, train_cases, heldout_cases, args.out, force=args.force, progress=_step_bar("training"),
                   data_info=data_info, command=canonical_command(args))
    dice = result.heldout.get("mean_dice")
    print(f"final training loss {result.epoch_losses[-1]:.4f}; held-out lesion Dice "
          f"{'n/a (no held-out lesion)' if dice is None else f'{dice:.3f}'}; {result.wall_seconds:.0f} s")
    print(f"wrote {result.out}")
    return 0


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
        lr_schedule=getattr(args, "lr_schedule", "cosine"), batch_size=args.batch_size,
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
