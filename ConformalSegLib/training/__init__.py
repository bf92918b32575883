"""Training a lesion segmentation network whose outputs ConformalSeg then calibrates.

Needs the ``inference`` extra (``torch`` and ``monai``). Typical use::

    from ConformalSegLib.training import TrainingConfig, phantom_cases, train

    cases = phantom_cases(12, seed=1000)
    result = train(TrainingConfig(epochs=5), cases[:10], cases[10:], "models/mine")
    result.heldout["mean_dice"]  # held-out lesion Dice measured with the inference engine

Quantile regression denoisers (``conformalseg train --task denoise``) are trained by
:func:`train_denoiser` (:mod:`.denoise`, pinball loss :class:`PinballLoss`).

The output folder is a model path for :func:`ConformalSegLib.inference.resolve_model`. Modules:
:mod:`.losses` (Dice + cross entropy, uncertainty-aware adaptive loss, deep supervision),
:mod:`.networks` (MONAI UNet / DynUNet), :mod:`.data` (cases, card-identical preprocessing),
:mod:`.patches` and :mod:`.augmentation` (lesion-balanced, augmented patches),
:mod:`.phantom_stream` (a fresh phantom per sample), :mod:`.optimization` (the loop, optimisers,
schedules), :mod:`.checkpoint` (resuming), :mod:`.validation` (held-out metrics),
:mod:`.weight_average` (a moving average of the weights), :mod:`.run_state` (a run between epochs: which
weights are kept), :mod:`.model_folder` (the atomic output folder) and :mod:`.trainer` (the whole run, and
snapshots of an unfinished one).
"""

from __future__ import annotations

from .augmentation import AugmentationConfig
from .config import TrainingConfig
from .data import (
    PatchSampler,
    PreparedCase,
    TrainingCase,
    folder_cases,
    phantom_cases,
    prepare_case,
    prepare_cases,
    split_cases,
)
from .denoise import (
    DenoisingConfig,
    DenoisingPair,
    build_denoiser_card,
    evaluate_denoiser,
    folder_denoising_pairs,
    phantom_denoising_pairs,
    train_denoiser,
)
from .losses import (
    LOSS_NAMES,
    DiceCELoss,
    PinballLoss,
    UncertaintyAwareLoss,
    build_loss,
    mc_dropout_variance,
    weighted_soft_dice,
)
from .model_folder import LOG_FILE, WEIGHTS_FILE, check_output_folder
from .optimization import TrainingCancelled
from .phantom_stream import PhantomStream, PhantomStreamSampler
from .trainer import TrainingResult, build_card, snapshot, train

__all__ = [
    "AugmentationConfig",
    "LOG_FILE",
    "LOSS_NAMES",
    "WEIGHTS_FILE",
    "DenoisingConfig",
    "DenoisingPair",
    "DiceCELoss",
    "PatchSampler",
    "PhantomStream",
    "PhantomStreamSampler",
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
    "snapshot",
    "split_cases",
    "train",
    "train_denoiser",
    "weighted_soft_dice",
]
