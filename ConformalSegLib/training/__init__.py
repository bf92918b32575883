"""Training a lesion segmentation network whose outputs ConformalSeg then calibrates.

Needs the ``inference`` extra (``torch`` and ``monai``). Typical use::

    from ConformalSegLib.training import TrainingConfig, phantom_cases, train

    cases = phantom_cases(12, seed=1000)
    result = train(TrainingConfig(epochs=5), cases[:10], cases[10:], "models/mine")
    result.heldout["mean_dice"]  # held-out lesion Dice measured with the inference engine

Quantile regression denoisers (``conformalseg train --task denoise``) are trained by
:func:`train_denoiser` (:mod:`.denoise`, pinball loss :class:`PinballLoss`).

The output folder is a model path for :func:`ConformalSegLib.inference.resolve_model`. Modules:
:mod:`.losses` (Dice + cross entropy, uncertainty-aware adaptive loss), :mod:`.data` (cases,
card-identical preprocessing, patch sampling), :mod:`.trainer` (the training loop and output folder).
"""

from __future__ import annotations

from .data import PatchSampler, PreparedCase, TrainingCase, folder_cases, phantom_cases, prepare_case, prepare_cases, split_cases
from .losses import LOSS_NAMES, DiceCELoss, UncertaintyAwareLoss, build_loss, mc_dropout_variance, weighted_soft_dice
from .denoise import (DenoisingConfig, DenoisingPair, build_denoiser_card, evaluate_denoiser, folder_denoising_pairs,
                      phantom_denoising_pairs, train_denoiser)
from .losses import PinballLoss
from .trainer import (LOG_FILE, WEIGHTS_FILE, TrainingCancelled, TrainingConfig, TrainingResult, build_card,
                      check_output_folder, train)

__all__ = [
    "LOG_FILE",
    "LOSS_NAMES",
    "WEIGHTS_FILE",
    "DenoisingConfig",
    "DenoisingPair",
    "DiceCELoss",
    "PatchSampler",
    "PinballLoss",
    "PreparedCase",
    "TrainingCancelled",
    "TrainingCase",
    "TrainingConfig",
    "TrainingResult",
    "UncertaintyAwareLoss",
    "build_card",
    "build_denoiser_card",
    "build_loss",
    "check_output_folder",
    "evaluate_denoiser",
    "folder_cases",
    "folder_denoising_pairs",
    "mc_dropout_variance",
    "phantom_cases",
    "phantom_denoising_pairs",
    "prepare_case",
    "prepare_cases",
    "split_cases",
    "train",
    "train_denoiser",
    "weighted_soft_dice",
]
