"""``TrainingConfig``: everything that defines a lesion training run (network, preprocessing, data,
optimisation), its checks, and the defaults shared with the command line."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..common.errors import ConformalSegError
from .losses import LOSS_NAMES
from .networks import NETWORKS, Stride, downsampling, format_stride, network_args, stride_triplet
from .optimization import LR_SCHEDULES, OPTIMIZERS
from .precision import check_precision
from .weight_average import check_decay

#: The rules that choose the epoch whose weights a run writes (see :func:`.run_state.selection_score`).
SELECTION_RULES = ("dice", "cls-pc", "last")

LESION_CHANNEL = 1
#: Default intensity window (HU -> [0, 1], clipped): a soft-tissue window, so the 10-50 HU contrast of
#: organ lesions is not squeezed (lung is clipped to 0, where nodules of 0-40 HU stand out anyway).
DEFAULT_WINDOW = {"kind": "window", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True}


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines a training run (network, preprocessing, data, optimisation).

    ``patch_size`` (the card's sliding-window size), ``crop_size`` (training crops; ``None`` = the
    patch size) and ``spacing_mm`` (``None``: the images' own grid) are in network axis order
    ``[d0, d1, d2]`` = ``[x, y, z]``; each patch and crop axis must be divisible by the product of that
    axis' ``strides`` (ints, or ``(sx, sy, sz)`` triplets for ``dynunet``). The networks are fully
    convolutional, so crops may be smaller than the inference window. ``samples_per_case`` applies to
    a fixed list of cases, ``steps_per_epoch`` and ``crops_per_phantom`` (crops cut from each generated
    phantom, a divisor of ``batch_size``; :mod:`.phantom_stream`) to a phantom stream. ``mc_passes`` is used by the
    ``uncertainty-aware`` loss only. ``init_weights_sha256`` is the checksum of the weights the run
    starts from (``train(init_weights=...)``; ``None``: MONAI's random initialisation).
    ``ema_decay`` (``None``: off) keeps an exponential moving average of the weights, validated beside
    the raw ones every epoch; the best of either is written (:mod:`.weight_average`). ``select_by`` is
    the rule that picks the epoch whose weights are written (:data:`SELECTION_RULES`,
    :func:`~.run_state.selection_score`): ``"dice"`` (the best validation Dice), ``"cls-pc"`` (the
    smallest validation CLS cost ``val_cls_pc``) or ``"last"``. ``precision`` is the arithmetic of the
    training forward pass (:mod:`.precision`: ``"fp32"``, or ``"bf16"`` mixed precision); validation and
    the written model run in float32 either way.
    """

    lesion_labels: tuple[int, ...] = (6,)
    loss: str = "dice-ce"
    epochs: int = 30
    patch_size: tuple[int, int, int] = (64, 64, 48)
    crop_size: tuple[int, int, int] | None = (48, 48, 32)
    spacing_mm: tuple[float, float, float] | None = (2.4, 2.4, 3.0)
    orientation: str | None = "RAS"
    intensity: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_WINDOW))
    network: str = "unet"
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[Stride, ...] = (2, 2, 2)
    num_res_units: int = 1
    deep_supervision: bool = False
    dropout: float = 0.1
    optimizer: str = "adam"
    weight_decay: float = 0.0
    learning_rate: float = 5e-3
    lr_schedule: str = "cosine"
    batch_size: int = 4
    samples_per_case: int = 4
    steps_per_epoch: int = 100
    crops_per_phantom: int = 1
    fg_fraction: float = 0.5
    augment: bool = False
    mc_passes: int = 4
    overlap: float = 0.25
    sw_batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    name: str = "lesion_unet"
    init_weights_sha256: str | None = None
    ema_decay: float | None = None
    select_by: str = "dice"
    precision: str = "fp32"

    def validate(self) -> None:
        """Raise :class:`ConformalSegError` for settings that cannot train."""
        if self.loss not in LOSS_NAMES:
            raise ConformalSegError(f"unknown loss {self.loss!r}", fix=f"use one of {', '.join(LOSS_NAMES)}")
        if self.network not in NETWORKS:
            raise ConformalSegError(f"unknown network {self.network!r}", fix=f"use one of {', '.join(NETWORKS)}")
        if not self.lesion_labels or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in self.lesion_labels):
            raise ConformalSegError(
                f"lesion label values must be positive integers, got {list(self.lesion_labels)}",
                fix="pass e.g. --lesion-label 6 (the phantoms' lesion label)",
            )
        check_network_and_batches(self, example_size="48 48 32")
        if self.deep_supervision and self.network != "dynunet":
            raise ConformalSegError("deep supervision needs --network dynunet")
        if self.network == "unet":
            try:
                network_args("unet", self.channels, self.strides, dropout=self.dropout)
            except ValueError as exc:
                raise ConformalSegError(str(exc)) from exc
        if self.spacing_mm is not None and (
            len(self.spacing_mm) != 3 or any(not math.isfinite(s) or s <= 0 for s in self.spacing_mm)
        ):
            raise ConformalSegError(
                f"spacing must be three positive numbers in mm, got {self.spacing_mm}",
                fix="e.g. --spacing-mm 2.4 2.4 3.0",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConformalSegError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.loss == "uncertainty-aware" and (self.dropout <= 0.0 or self.mc_passes < 2):
            raise ConformalSegError(
                "the uncertainty-aware loss needs dropout > 0 and at least 2 MC passes",
                fix="use dropout 0.1-0.2 and mc_passes >= 2, or --loss dice-ce",
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConformalSegError(
                f"unknown learning-rate schedule {self.lr_schedule!r}", fix=f"use one of {', '.join(LR_SCHEDULES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConformalSegError(f"unknown optimizer {self.optimizer!r}", fix=f"use one of {', '.join(OPTIMIZERS)}")
        if not self.learning_rate > 0 or not 0.0 <= self.fg_fraction <= 1.0 or self.weight_decay < 0:
            raise ConformalSegError(
                "the learning rate must be positive, the weight decay >= 0 and the foreground fraction in [0, 1]"
            )
        check_decay(self.ema_decay)
        if self.select_by not in SELECTION_RULES:
            raise ConformalSegError(
                f"unknown epoch selection rule {self.select_by!r}", fix=f"use one of {', '.join(SELECTION_RULES)}"
            )
        check_precision(self.precision)
        if (
            isinstance(self.steps_per_epoch, bool)
            or int(self.steps_per_epoch) != self.steps_per_epoch
            or self.steps_per_epoch < 1
            or self.num_workers < 0
        ):
            raise ConformalSegError("steps per epoch must be an integer >= 1 and the number of workers >= 0")
        check_crops_per_phantom(self.crops_per_phantom, self.batch_size)

    @property
    def crops(self) -> tuple[int, int, int]:
        """The training crop size (``crop_size``, or the patch size)."""
        return tuple(int(c) for c in (self.crop_size or self.patch_size))  # type: ignore[return-value]

    def network_args(self) -> dict[str, Any]:
        """Keyword arguments of the MONAI network class (as written in the card)."""
        return network_args(
            self.network,
            self.channels,
            self.strides,
            dropout=self.dropout,
            num_res_units=self.num_res_units,
            deep_supervision=self.deep_supervision,
        )

    def to_json(self) -> str:
        """The configuration as canonical JSON (recorded in checkpoints and logs)."""
        data = asdict(self)
        data["strides"] = [format_stride(s) for s in self.strides]
        return json.dumps(data, sort_keys=True, default=list)


def check_crops_per_phantom(crops: int, batch_size: int) -> None:
    """Refuse a number of crops per phantom that is not a whole number >= 1 dividing the batch size."""
    if isinstance(crops, bool) or int(crops) != crops or crops < 1 or batch_size % crops:
        raise ConformalSegError(
            f"crops per phantom must be a whole number >= 1 that divides the batch size ({batch_size}), got {crops}",
            fix=f"e.g. --crops-per-phantom {2 if batch_size % 2 == 0 else 1} with --batch-size {batch_size}",
        )


def check_network_and_batches(config: Any, *, example_size: str) -> None:
    """Checks shared by the training configs: positive integer epochs / batch size / samples per
    case, one more U-Net channel count than strides, and patch and crop sizes divisible on each axis
    by the network's total downsampling on that axis (``example_size`` is the suggestion in the error)."""
    for key in ("epochs", "batch_size", "samples_per_case"):
        value = getattr(config, key)
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ConformalSegError(f"{key.replace('_', ' ')} must be an integer >= 1, got {value!r}")
    try:
        triplets = [stride_triplet(s) for s in config.strides]
    except (TypeError, ValueError) as exc:
        raise ConformalSegError(f"strides must be integers or AxBxC triplets, got {list(config.strides)}") from exc
    if len(config.channels) != len(config.strides) + 1 or any(s < 1 for t in triplets for s in t):
        raise ConformalSegError(
            f"the U-Net needs one more channel count than strides, got channels "
            f"{list(config.channels)} and strides {[format_stride(s) for s in config.strides]}"
        )
    factor = downsampling(config.strides)
    for what, size in (("patch size", config.patch_size), ("crop size", config.crops)):
        if len(size) != 3 or any(int(p) != p or p < f or p % f for p, f in zip(size, factor)):
            shown = factor[0] if len(set(factor)) == 1 else "x".join(map(str, factor))
            raise ConformalSegError(
                f"{what} {list(size)} must be three integers divisible by the U-Net's total downsampling {shown}",
                fix=f"use multiples of {shown}, e.g. --{what.replace(' ', '-')} {example_size}",
            )
