"""The options of ``conformalseg train`` (three tasks), their task-dependent defaults, and the canonical
command line that reproduces a run (recorded in the model card).

:data:`DEFAULTS` is the recipe of the shipped phantom lesion model, :data:`ROI_DEFAULTS` of the shipped
ROI models of the cascade, :data:`DENOISE_DEFAULTS` of the shipped quantile denoiser; options a user
leaves unset take their task's default (:func:`apply_task_defaults`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

PHANTOM_LESION_LABEL = 6
#: ``--task lesion`` defaults: the recipe of the shipped phantom model (nnU-Net-style DynUNet with deep
#: supervision on the phantoms' own 1.6 x 1.6 x 3.0 mm grid; five levels, in-plane-only pooling first and
#: last because the slices are ~2x thicker than the pixels; 24 x 250 steps of 2 crops of 48 x 48 x 32 =
#: 12,000 fresh phantom crops, about 1 h on 2 CPU cores). The card's sliding window, 64 x 64 x 48 (four
#: windows per 96 x 96 x 48 phantom), stays close to the training crop, as nnU-Net infers at its training
#: patch size: instance normalisation then sees the statistics it was trained on. The first shipped model
#: used one 96 x 96 x 48 window; with its own weights the smaller window raised the held-out Dice from
#: 0.43 to 0.47 and shrank the demo's CLS mask from 34 % to 20 % of the scan (eval_inference_window.py).
#: ``ConformalSegLib.training.losses.LOSS_NAMES``, spelled out so that parsing options imports no torch
#: (a test keeps the two equal)
LOSS_CHOICES = ("dice-ce", "uncertainty-aware", "blob-dice-ce")
#: ``ConformalSegLib.training.config.SELECTION_RULES``, spelled out for the same reason (a test keeps them equal)
SELECTION_CHOICES = ("dice", "cls-pc", "last")
#: ``ConformalSegLib.training.precision.PRECISIONS``, spelled out for the same reason (a test keeps them equal)
PRECISION_CHOICES = ("fp32", "bf16")

DEFAULTS = {
    "epochs": 24,
    "patch_size": (64, 64, 48),
    "crop_size": (48, 48, 32),
    "spacing_mm": None,
    "window": (-200.0, 300.0),
    "network": "dynunet",
    "channels": (8, 16, 32, 64, 128),
    "strides": ((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1)),
    "dropout": 0.05,
    "lr": 2e-3,
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "lr_schedule": "poly",
    "batch_size": 2,
    "samples_per_case": 4,
    "steps_per_epoch": 250,
    "fg_fraction": 0.33,
    "mc_passes": 4,
}
#: ``--task denoise`` defaults (coarse 24 x 48 x 48 phantoms: one 48 x 48 x 24 window per case)
DENOISE_DEFAULTS = {
    "epochs": 40,
    "patch_size": (48, 48, 24),
    "crop_size": (32, 32, 16),
    "spacing_mm": None,
    "channels": (16, 32, 64),
    "strides": (2, 2),
    "dropout": 0.0,
    "lr": 3e-3,
    "lr_schedule": "cosine",
    "batch_size": 4,
}
#: ``--task roi`` defaults: a smaller DynUNet for the cascade's ROI crops (one 48 x 48 x 32 window covers
#: most ROI-16 crops of phantom nodules; ROI-0 crops are zero-padded to it)
ROI_DEFAULTS = {
    "epochs": 8,
    "patch_size": (48, 48, 32),
    "crop_size": (32, 32, 16),
    "spacing_mm": None,
    "channels": (16, 32, 64),
    "strides": ((2, 2, 1), 2),
    "dropout": 0.1,
    "lr": 2e-3,
    "lr_schedule": "poly",
    "batch_size": 4,
}
#: options whose default depends on the task (None in the parser, filled in by :func:`apply_task_defaults`)
TASK_DEPENDENT = (
    "epochs",
    "patch_size",
    "crop_size",
    "spacing_mm",
    "channels",
    "strides",
    "dropout",
    "lr",
    "lr_schedule",
    "batch_size",
)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Every option of ``conformalseg train``, by group."""
    for add in (_task_options, _data_options, _model_options, _optimisation_options, _weights_options, _run_options):
        add(p)


def _task_options(p: argparse.ArgumentParser) -> None:
    """``--task`` and the ROI task's stage-1 model, phantoms and margins."""
    p.add_argument(
        "--task",
        choices=("lesion", "denoise", "roi"),
        default="lesion",
        help="lesion: softmax lesion segmentation (default); denoise: quantile regression denoiser "
        "(noisy windowed image in, --quantiles of the clean image out, pinball loss); roi: the "
        "cascade's ROI (stage-2) model, trained on crops around --stage1-model's components",
    )
    p.add_argument(
        "--stage1-model",
        type=Path,
        default=None,
        help="--task roi: the coarse model whose components the ROI crops are cut around",
    )
    p.add_argument(
        "--roi-phantoms",
        type=int,
        default=300,
        metavar="N",
        help="--task roi with --phantom-stream: phantoms whose stage-1 components give the training crops",
    )
    p.add_argument(
        "--roi-margins",
        type=int,
        nargs="+",
        default=[0, 16],
        metavar="V",
        help="--task roi: ROI margins in voxels (default 0 16, the paper's two settings)",
    )


def _data_options(p: argparse.ArgumentParser) -> None:
    """Where the training data come from, the held-out cases, the lesion label and the output."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        type=Path,
        help="MSD/nnU-Net dataset folder with imagesTr/ and labelsTr/ (denoise: a folder with noisy/ and clean/)",
    )
    source.add_argument("--phantoms", type=int, metavar="N", help="train on N synthetic phantoms (a fixed set)")
    source.add_argument(
        "--phantom-stream",
        action="store_true",
        help="lesion task: train on a fresh synthetic phantom for every sample (no fixed set; "
        "--epochs x --steps-per-epoch x --batch-size / --crops-per-phantom phantoms in all)",
    )
    p.add_argument(
        "--phantom-seed",
        type=int,
        default=0,
        metavar="S",
        help="phantom seed (--phantoms: phantoms 0..N-1 train, the next --heldout ones are held out; "
        "--phantom-stream: the stream and its held-out phantoms)",
    )
    p.add_argument(
        "--phantom-shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="phantom array shape, numpy (z, y, x) order (default: the phantom default 48 96 96)",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=None,
        metavar="N",
        help="held-out cases for checkpoint selection and the validation Dice (default: max(2, N/5) extra "
        "phantoms; 24 with --phantom-stream; with --data 20%% of the cases, at least 1)",
    )
    p.add_argument(
        "--lesion-label",
        type=int,
        nargs="+",
        default=None,
        metavar="V",
        help=f"label value(s) marking the lesion (default {PHANTOM_LESION_LABEL} with --phantoms; "
        "required with --data)",
    )
    p.add_argument("--out", type=Path, required=True, help="model folder to write")


def _model_options(p: argparse.ArgumentParser) -> None:
    """Loss, epochs, preprocessing and the network."""
    p.add_argument(
        "--loss",
        choices=LOSS_CHOICES,
        default="dice-ce",
        help="dice-ce (soft Dice + cross entropy), uncertainty-aware (MC-dropout weighted, Isler et al.) or "
        "blob-dice-ce (dice-ce plus a soft Dice of every lesion on its own, Kofler et al.'s blob loss: small "
        "lesions weigh as much as large ones)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']} (denoise {DENOISE_DEFAULTS['epochs']})"
    )
    p.add_argument(
        "--patch-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="sliding-window size of the model card, network axes (x, y, z) after resampling "
        "(default 64 64 48; denoise 48 48 24)",
    )
    p.add_argument(
        "--crop-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="training crop size (default 48 48 32, denoise 32 32 16; multiples of the total stride)",
    )
    p.add_argument(
        "--spacing-mm",
        type=float,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="resampling spacing of the model card in mm (x, y, z) (default: none, the images' own grid, "
        "for phantoms 1.6 1.6 3.0)",
    )
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=DEFAULTS["window"],
        metavar=("A_MIN", "A_MAX"),
        help="intensity window in HU mapped to [0, 1] and clipped (default -200 300: soft tissue)",
    )
    p.add_argument(
        "--network",
        choices=("dynunet", "unet"),
        default=None,
        help="dynunet: MONAI's nnU-Net architecture (per-axis strides, deep supervision; default); "
        "unet: MONAI's residual UNet (isotropic strides)",
    )
    p.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=None,
        help="channels per level (default 16 32 64 128; denoise 16 32 64)",
    )
    p.add_argument(
        "--strides",
        type=_stride,
        nargs="+",
        default=None,
        help="downsampling per level: N or AxBxC in network axes x, y, z (default 2x2x1 2 2; denoise 2 2)",
    )
    p.add_argument(
        "--deep-supervision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dynunet: deep supervision over the two coarser heads (default on for dynunet)",
    )
    p.add_argument(
        "--dropout", type=float, default=None, help="dropout probability (MC dropout; default 0.1, denoise 0)"
    )


def _optimisation_options(p: argparse.ArgumentParser) -> None:
    """Optimiser, schedule, batches, patches and augmentation (and the denoiser's levels)."""
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3; denoise 3e-3)")
    p.add_argument(
        "--optimizer",
        choices=("adamw", "adam", "sgd"),
        default=DEFAULTS["optimizer"],
        help="adamw (default), adam, or sgd (Nesterov momentum 0.99, nnU-Net's)",
    )
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"], help="default 1e-4")
    p.add_argument(
        "--quantiles",
        type=float,
        nargs="+",
        default=[0.1, 0.9],
        metavar="TAU",
        help="denoise: quantile levels, increasing in (0, 1) (default 0.1 0.9)",
    )
    p.add_argument(
        "--noise-sigma",
        type=float,
        default=0.2,
        help="denoise with --phantoms: Gaussian noise sigma in windowed units (default 0.2)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("poly", "cosine", "constant"),
        default=None,
        help="poly: nnU-Net's (1 - step/total)^0.9 (lesion default); cosine: decay to 0 (denoise default); constant",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 2 (denoise 4)")
    p.add_argument(
        "--samples-per-case",
        type=int,
        default=DEFAULTS["samples_per_case"],
        help="--phantoms/--data: crops per case and epoch",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=DEFAULTS["steps_per_epoch"],
        help="--phantom-stream: batches per epoch (validation and checkpoint after each epoch)",
    )
    p.add_argument(
        "--crops-per-phantom",
        type=int,
        default=1,
        metavar="K",
        help="--phantom-stream: crops cut from each generated phantom, a divisor of --batch-size (default 1: "
        "a fresh phantom per crop; 2 halves the phantom generation, most of a CPU step's data work, but gave a "
        "larger CLS mask in benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--fg-fraction",
        type=float,
        default=DEFAULTS["fg_fraction"],
        help="fraction of crops centred on a lesion (the lesion chosen uniformly, so small ones count as "
        "much as large ones; default 0.33)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="MONAI spatial and intensity augmentation, seeded per sample (default on)",
    )


def _weights_options(p: argparse.ArgumentParser) -> None:
    """How the weights are computed and which are written: the weight average, the epoch kept, the precision."""
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        metavar="D",
        help="lesion/roi: also keep an exponential moving average of the weights, updated after every step "
        "with decay D (0.999: about the last 1,000 steps), validated beside the raw weights every epoch; the "
        "best of either is written (without held-out cases: the final average). The training itself is "
        "unchanged. Default: off",
    )
    p.add_argument(
        "--select-by",
        choices=SELECTION_CHOICES,
        default="dice",
        help="lesion/roi: which epoch's weights are written: dice (default: the best validation Dice of p >= 0.5), "
        "cls-pc (the smallest validation CLS cost val_cls_pc: the share of each held-out scan that the per-scan "
        "guarantee at eps = alpha = 0.1 needs; a quantile set by a few hard scans, so it needs many held-out "
        "cases: on 48 it picked by noise, benchmarks/RESULTS.md) or last (the last epoch)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="fp32",
        help="lesion/roi: arithmetic of the training forward pass: fp32 (default) or bf16 (bfloat16 mixed "
        "precision, torch.autocast: convolutions in bfloat16, the loss, gradients' accumulation and weights in "
        "float32; on CUDA Ampere or later; on the CPU faster only with AVX-512 or AMX: on the 2-core machine of "
        "benchmarks/RESULTS.md the network step 1.3x, a whole training step 1.17x). Validation and the written "
        "model run in float32 either way",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    """Workers, threads, checkpoints, naming, device and seed."""
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="background processes generating phantoms / patches (default 1 with --phantom-stream, else 0)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="resumable checkpoint written after every epoch (default OUT.checkpoint.pt; removed at the end)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument(
        "--time-limit",
        type=duration_seconds,
        default=None,
        metavar="T",
        help="lesion/roi: wall time this sitting may take (seconds, or with m / h: 90m, 2.5h). After an epoch, "
        "when one more epoch and the final held-out measurement would not fit, the run stops there, writes "
        "--out with the best weights so far (the card's training.snapshot says the epochs done and planned) "
        "and keeps its checkpoint: the same command with --resume --force continues it bit for bit. "
        "Not part of the run: each sitting may have its own. Default: none",
    )
    p.add_argument(
        "--snapshot",
        type=Path,
        default=None,
        metavar="DIR",
        help="lesion/roi: do not train; write the best weights so far of this unfinished run (the same options, "
        "read from its checkpoint) as the model folder DIR, with held-out metrics and the epochs done in its "
        "card. The checkpoint is not changed: the run goes on with --resume (it may be running meanwhile)",
    )
    p.add_argument(
        "--init-weights",
        type=Path,
        default=None,
        metavar="MODEL",
        help="lesion/roi tasks: start from this model folder's weights (fine-tuning; same network options); "
        "the optimiser, schedule and data are this run's own",
    )
    p.add_argument(
        "--mc-passes", type=int, default=DEFAULTS["mc_passes"], help="MC dropout passes for the uncertainty-aware loss"
    )
    p.add_argument("--name", default=None, help="model name in the card (default: the --out folder name)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:N)")
    p.add_argument("--seed", type=int, default=0, help="training seed (weights, dropout, patches)")


def duration_seconds(text: str) -> float:
    """``--time-limit``: ``"600"`` / ``"600s"`` seconds, ``"90m"`` minutes, ``"2.5h"`` hours; positive."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in units else (text, "s")
    try:
        seconds = float(number) * units[unit.lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 600, 90m, 2.5h)") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"the time limit must be positive and finite, got {text!r}")
    return seconds


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
