"""Train a MONAI 3D U-Net for lesion segmentation and write it as a model folder.

What :func:`train` does
-----------------------
1. Builds the model card first (:func:`build_card`): the network (:mod:`.networks`: MONAI ``UNet``,
   or ``DynUNet``, the nnU-Net architecture with per-axis strides and deep supervision; two softmax
   output channels, lesion = channel 1, dropout so MC dropout works), the preprocessing (orientation,
   spacing or the images' own grid, intensity window) and the sliding-window patch size.
2. Prepares the data with that card's own pipeline (:mod:`.data`), so training and inference see
   identical tensors: either a fixed list of cases (patches from :class:`~.data.PatchSampler`) or a
   :class:`~.phantom_stream.PhantomStream` (a fresh phantom for every sample). Patches are
   lesion-balanced foreground-oversampled (``fg_fraction``) and, with ``augment``, augmented
   (:mod:`.augmentation`: MONAI spatial and intensity transforms, seeded per sample).
3. Optimises (:func:`~.optimization.fit`): Adam/AdamW/SGD with a cosine, poly or constant schedule,
   MONAI's Dice + cross entropy (or the uncertainty-aware loss of Isler et al.), summed over the deep
   supervision heads. ``progress(done, total, label)`` is called after every step; ``cancel`` (a
   callable or ``threading.Event``) stops training with :class:`~.optimization.TrainingCancelled`.
4. After every epoch: the held-out validation Dice (:func:`~.validation.validation_dice`) and a
   checkpoint (:mod:`.checkpoint`) from which ``resume=True`` continues. The weights of the epoch with
   the best validation Dice are the ones shipped (the last epoch's without held-out cases).
5. Writes ``weights.pt`` and the card into a staging folder, measures the held-out metrics with the
   real :class:`~ConformalSegLib.inference.engine.InferenceEngine` (:func:`~.validation.evaluate_heldout`),
   completes the card's ``training`` section and ``training.json`` and renames the folder to ``out``
   (:mod:`.model_folder`). Nothing is written at ``out`` unless all of this completes.

Determinism
-----------
``monai.utils.set_determinism(seed)`` seeds torch, numpy and Python's ``random`` before the network
is built; patch sampling and augmentation use their own seeded ``numpy`` generators. On the CPU, the
same seed, data, settings and thread count give bit-identical weights (tested).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ConformalSegError
from ..io.checksums import sha256_file
from .augmentation import AugmentationConfig
from .checkpoint import Checkpoint, default_checkpoint_path
from .data import PatchSampler, TrainingCase, prepare_cases
from .losses import LOSS_NAMES, build_loss, mc_dropout_variance, supervised_loss
from .model_folder import LOG_FILE, LOG_FORMAT, WEIGHTS_FILE, check_output_folder, staged_model_folder, write_json
from .networks import NETWORKS, Stride, build_network, card_network_name, downsampling, format_stride, network_args, \
    outputs_list, stride_triplet
from .optimization import LR_SCHEDULES, OPTIMIZERS, CancelToken, ProgressCallback, TrainingCancelled, fit
from .phantom_stream import PhantomStream, PhantomStreamSampler
from .validation import evaluate_heldout, validation_dice

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
    a fixed list of cases, ``steps_per_epoch`` to a phantom stream. ``mc_passes`` is used by the
    ``uncertainty-aware`` loss only.
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
    fg_fraction: float = 0.5
    augment: bool = False
    mc_passes: int = 4
    overlap: float = 0.25
    sw_batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    name: str = "lesion_unet"

    def validate(self) -> None:
        """Raise :class:`ConformalSegError` for settings that cannot train."""
        if self.loss not in LOSS_NAMES:
            raise ConformalSegError(f"unknown loss {self.loss!r}", fix=f"use one of {', '.join(LOSS_NAMES)}")
        if self.network not in NETWORKS:
            raise ConformalSegError(f"unknown network {self.network!r}", fix=f"use one of {', '.join(NETWORKS)}")
        if not self.lesion_labels or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in self.lesion_labels):
            raise ConformalSegError(f"lesion label values must be positive integers, got {list(self.lesion_labels)}",
                                    fix="pass e.g. --lesion-label 6 (the phantoms' lesion label)")
        check_network_and_batches(self, example_size="48 48 32")
        if self.deep_supervision and self.network != "dynunet":
            raise ConformalSegError("deep supervision needs --network dynunet")
        if self.network == "unet":
            try:
                network_args("unet", self.channels, self.strides, dropout=self.dropout)
            except ValueError as exc:
                raise ConformalSegError(str(exc)) from exc
        if self.spacing_mm is not None and (len(self.spacing_mm) != 3 or
                                            any(not math.isfinite(s) or s <= 0 for s in self.spacing_mm)):
            raise ConformalSegError(f"spacing must be three positive numbers in mm, got {self.spacing_mm}",
                                    fix="e.g. --spacing-mm 2.4 2.4 3.0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConformalSegError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.loss == "uncertainty-aware" and (self.dropout <= 0.0 or self.mc_passes < 2):
            raise ConformalSegError("the uncertainty-aware loss needs dropout > 0 and at least 2 MC passes",
                                    fix="use dropout 0.1-0.2 and mc_passes >= 2, or --loss dice-ce")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConformalSegError(f"unknown learning-rate schedule {self.lr_schedule!r}",
                                    fix=f"use one of {', '.join(LR_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConformalSegError(f"unknown optimizer {self.optimizer!r}", fix=f"use one of {', '.join(OPTIMIZERS)}")
        if not self.learning_rate > 0 or not 0.0 <= self.fg_fraction <= 1.0 or self.weight_decay < 0:
            raise ConformalSegError("the learning rate must be positive, the weight decay >= 0 and the foreground "
                                    "fraction in [0, 1]")
        if isinstance(self.steps_per_epoch, bool) or int(self.steps_per_epoch) != self.steps_per_epoch \
                or self.steps_per_epoch < 1 or self.num_workers < 0:
            raise ConformalSegError("steps per epoch must be an integer >= 1 and the number of workers >= 0")

    @property
    def crops(self) -> tuple[int, int, int]:
        """The training crop size (``crop_size``, or the patch size)."""
        return tuple(int(c) for c in (self.crop_size or self.patch_size))  # type: ignore[return-value]

    def network_args(self) -> dict[str, Any]:
        """Keyword arguments of the MONAI network class (as written in the card)."""
        return network_args(self.network, self.channels, self.strides, dropout=self.dropout,
                            num_res_units=self.num_res_units, deep_supervision=self.deep_supervision)

    def to_json(self) -> str:
        """The configuration as canonical JSON (recorded in checkpoints and logs)."""
        data = asdict(self)
        data["strides"] = [format_stride(s) for s in self.strides]
        return json.dumps(data, sort_keys=True, default=list)


@dataclass
class TrainingResult:
    """What :func:`train` wrote and measured."""

    out: Path
    card_path: Path
    weights_path: Path
    epoch_losses: list[float]
    heldout: dict[str, Any]
    wall_seconds: float
    best_epoch: int | None = None


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
        raise ConformalSegError(f"the U-Net needs one more channel count than strides, got channels "
                                f"{list(config.channels)} and strides {[format_stride(s) for s in config.strides]}")
    factor = downsampling(config.strides)
    for what, size in (("patch size", config.patch_size), ("crop size", config.crops)):
        if len(size) != 3 or any(int(p) != p or p < f or p % f for p, f in zip(size, factor)):
            shown = factor[0] if len(set(factor)) == 1 else "x".join(map(str, factor))
            raise ConformalSegError(f"{what} {list(size)} must be three integers divisible by the U-Net's "
                                    f"total downsampling {shown}",
                                    fix=f"use multiples of {shown}, e.g. --{what.replace(' ', '-')} {example_size}")


def build_card(config: TrainingConfig, base_dir: str | PathLike[str], training: dict[str, Any] | None = None):
    """The model card of a network trained with ``config`` (weights ``base_dir/weights.pt``)."""
    from ..inference.model_card import FORMAT, FORMAT_VERSION, ModelCard

    data = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": config.name,
        "source": {"state_dict": {"network": card_network_name(config.network), "args": config.network_args(),
                                  "weights": WEIGHTS_FILE}},
        "preprocessing": {"orientation": config.orientation,
                          "spacing_mm": None if config.spacing_mm is None else [float(s) for s in config.spacing_mm],
                          "intensity": dict(config.intensity)},
        "inference": {"patch_size": [int(p) for p in config.patch_size], "overlap": float(config.overlap),
                      "blend": "gaussian", "sw_batch_size": int(config.sw_batch_size)},
        "output": {"activation": "softmax", "lesion_channel": LESION_CHANNEL},
        "training": training or {},
    }
    return ModelCard.from_dict(data, None, base_dir=base_dir)


@dataclass
class _Best:
    """The best validation score so far and the weights that gave it."""

    score: float | None = None
    epoch: int | None = None
    state: dict[str, torch.Tensor] | None = None


def _sampler(config: TrainingConfig, card: Any, data: Sequence[TrainingCase] | PhantomStream):
    augmentation = AugmentationConfig() if config.augment else None
    if isinstance(data, PhantomStream):
        return PhantomStreamSampler(data, card, config.lesion_labels, config.crops, batch_size=config.batch_size,
                                    steps_per_epoch=config.steps_per_epoch, fg_fraction=config.fg_fraction,
                                    augmentation=augmentation, num_workers=config.num_workers)
    prepared = prepare_cases(card, data, config.lesion_labels, config.crops)
    return PatchSampler(prepared, config.crops, samples_per_case=config.samples_per_case,
                        fg_fraction=config.fg_fraction, batch_size=config.batch_size, seed=config.seed,
                        augmentation=augmentation)


def _state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}


def train(config: TrainingConfig, train_data: Sequence[TrainingCase] | PhantomStream,
          heldout_cases: Sequence[TrainingCase], out: str | PathLike[str], *, force: bool = False,
          progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
          data_info: dict[str, Any] | None = None, command: str | None = None,
          checkpoint: str | PathLike[str] | None = None, resume: bool = False) -> TrainingResult:
    """Train, evaluate on ``heldout_cases`` and write the model folder ``out`` (see the module docstring).

    ``train_data`` is a list of cases or a :class:`~.phantom_stream.PhantomStream`. ``data_info`` and
    ``command`` (the command line) are recorded in the card's ``training`` section. The checkpoint
    (default ``OUT.checkpoint.pt``) is written after every epoch and removed at the end; with
    ``resume`` the run continues from it.
    """
    from monai.utils import set_determinism

    from ..inference.engine import InferenceCancelled, resolve_device
    from ..inference.model_card import CARD_FILE

    start = time.perf_counter()
    config.validate()
    out = check_output_folder(out, force=force)
    ckpt_path = Path(checkpoint) if checkpoint is not None else default_checkpoint_path(out)
    device = resolve_device(config.device)
    set_determinism(seed=config.seed)
    template = build_card(config, out)
    sampler = _sampler(config, template, train_data)
    validation = prepare_cases(template, heldout_cases, config.lesion_labels, config.patch_size, what="held-out") \
        if heldout_cases else []
    network = build_network(config.network, config.network_args()).to(device)
    loss_fn = build_loss(config.loss, LESION_CHANNEL)
    config_json = config.to_json()
    best, previous_log, start_epoch, resumed, elapsed_before = _Best(), [], 0, None, 0.0
    if resume:
        saved = Checkpoint.load(ckpt_path, config_json)
        network.load_state_dict(saved.network)
        torch.set_rng_state(saved.rng_state)
        best = _Best(saved.best_score, saved.best_epoch, saved.best_network)
        previous_log, start_epoch, elapsed_before = saved.log, saved.epoch, saved.elapsed_seconds
        resumed = {"optimizer": saved.optimizer, "scheduler": saved.scheduler}

    def compute_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        heads = outputs_list(network(images))
        uncertainty = mc_dropout_variance(network, images, config.mc_passes, LESION_CHANNEL) \
            if loss_fn.needs_uncertainty else None
        return supervised_loss(loss_fn, heads, targets, uncertainty)

    def on_epoch_end(epoch: int, record: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
        if validation:
            record.update(validation_dice(network, validation, template, device))
            score = record["val_dice"]
            if score is not None and (best.score is None or score >= best.score):
                best.score, best.epoch, best.state = score, epoch + 1, _state(network)
        Checkpoint(config_json, epoch + 1, _state(network), optimizer.state_dict(),
                   None if scheduler is None else scheduler.state_dict(), best.state, best.score, best.epoch,
                   previous_log + log_so_far + [record], torch.get_rng_state(),
                   elapsed_before + time.perf_counter() - start).save(ckpt_path)
        log_so_far.append(record)

    log_so_far: list[dict[str, Any]] = []
    fit(network, sampler, compute_loss, epochs=config.epochs, learning_rate=config.learning_rate,
        lr_schedule=config.lr_schedule, device=device, progress=progress, cancel=cancel,
        optimizer=config.optimizer, weight_decay=config.weight_decay, start_epoch=start_epoch, resume=resumed,
        on_epoch_end=on_epoch_end)
    epochs = previous_log + log_so_far
    if best.state is not None:
        network.load_state_dict(best.state)
    train_seconds = elapsed_before + time.perf_counter() - start

    with staged_model_folder(out, network, force=force) as staging:
        card = build_card(config, staging)
        try:
            heldout = evaluate_heldout(card, heldout_cases, config.lesion_labels, device, cancel)
        except InferenceCancelled as exc:
            raise TrainingCancelled("training was cancelled during the held-out evaluation") from exc
        wall = elapsed_before + time.perf_counter() - start
        training = _training_record(config, train_data, heldout_cases, epochs, heldout, best, data_info, command,
                                    device, train_seconds, wall)
        training["weights_sha256"] = sha256_file(staging / WEIGHTS_FILE)
        card = build_card(config, staging, training)
        card.save(staging / CARD_FILE)
        write_json(staging / LOG_FILE, {"format": LOG_FORMAT, "format_version": 1, "config": json.loads(config_json),
                                        "epochs": epochs, "heldout": heldout, "training": training})
    ckpt_path.unlink(missing_ok=True)
    return TrainingResult(out=out, card_path=out / CARD_FILE, weights_path=out / WEIGHTS_FILE,
                          epoch_losses=[e["loss"] for e in epochs], heldout=heldout, wall_seconds=wall,
                          best_epoch=best.epoch)


def _training_record(config: TrainingConfig, train_data: Sequence[TrainingCase] | PhantomStream,
                     heldout_cases: Sequence[TrainingCase], epochs: list[dict[str, Any]], heldout: dict[str, Any],
                     best: _Best, data_info: dict[str, Any] | None, command: str | None, device: torch.device,
                     train_seconds: float, wall: float) -> dict[str, Any]:
    """The card's ``training`` section (see :mod:`ConformalSegLib.training`)."""
    import monai

    stream = isinstance(train_data, PhantomStream)
    samples = config.epochs * config.steps_per_epoch * config.batch_size if stream else None
    return {
        "package": "conformalseg", "version": __version__, "torch": torch.__version__, "monai": monai.__version__,
        "command": command, "data": data_info or (train_data.describe() if stream else {}),
        "seed": config.seed, "device": str(device), "threads": torch.get_num_threads(),
        "lesion_labels": [int(v) for v in config.lesion_labels],
        "train_cases": samples if stream else len(train_data),
        "train_case_ids": "a fresh phantom per sample (see data)" if stream else [c.case_id for c in train_data],
        "heldout_cases": len(heldout_cases), "heldout_case_ids": [c.case_id for c in heldout_cases],
        "network": config.network, "epochs": config.epochs, "loss": config.loss,
        "deep_supervision": config.deep_supervision, "augment": config.augment,
        "mc_passes": config.mc_passes if config.loss == "uncertainty-aware" else None,
        "optimizer": {"name": config.optimizer, "learning_rate": config.learning_rate,
                      "weight_decay": config.weight_decay, "schedule": config.lr_schedule},
        "crop_size": list(config.crops), "batch_size": config.batch_size,
        "samples_per_case": None if stream else config.samples_per_case,
        "steps_per_epoch": config.steps_per_epoch if stream else None,
        "fg_fraction": config.fg_fraction, "final_loss": epochs[-1]["loss"] if epochs else None,
        "selected_epoch": best.epoch, "selected_val_dice": best.score,
        "heldout_mean_dice": heldout["mean_dice"], "heldout_pooled_dice": heldout["pooled_dice"],
        "heldout_detection": heldout.get("detection"),
        "heldout_threshold": 0.5, "train_seconds": round(train_seconds, 1), "wall_seconds": round(wall, 1),
    }

