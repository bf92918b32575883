"""Train a small MONAI 3D U-Net for lesion segmentation and write it as a model folder.

What :func:`train` does
-----------------------
1. Builds the model card first (:func:`build_card`): network ``monai.networks.nets.UNet`` (3D, one
   input channel, two output channels, softmax, lesion = channel 1, dropout so MC dropout works),
   the preprocessing (orientation, spacing, intensity window) and the sliding-window patch size.
2. Preprocesses the training and held-out cases with that card's pipeline
   (:mod:`ConformalSegLib.training.data`), so training and inference see identical tensors.
3. Trains with Adam (cosine learning-rate decay by default) for a fixed number of epochs on seeded positive/negative balanced patches of the
   card's patch size, with the ``dice-ce`` or ``uncertainty-aware`` loss
   (:mod:`ConformalSegLib.training.losses`). ``progress(done, total, label)`` is called after every
   step; ``cancel`` (a callable or ``threading.Event``) is checked before every step and stops
   training with :class:`TrainingCancelled`. Nothing is written at ``out`` unless training
   completes (Ctrl-C included).
4. Writes ``weights.pt`` and the card into a hidden staging folder beside ``out``, loads them back
   with the real :class:`~ConformalSegLib.inference.engine.InferenceEngine` and computes the held-out
   lesion Dice (probability >= 0.5, no MC dropout, on each case's own grid).
5. Completes the card's ``training`` section and ``training.json`` and renames the staging folder
   to ``out`` (replacing an existing ``out`` only with ``force``).

Output folder
-------------
* ``model_card.json`` -- the model card (``conformalseg-model-card`` v1, see
  :mod:`ConformalSegLib.inference.model_card`); the name :func:`~ConformalSegLib.inference.resolve_model`
  looks for, so the folder itself is a model path. Its ``training`` section records the seed, data
  source, case counts and ids, epochs, loss, held-out Dice, package versions, wall time, command
  line and ``weights_sha256``.
* ``weights.pt`` -- the network's ``state_dict`` (float32 tensors, loadable with
  ``torch.load(weights_only=True)``).
* ``training.json`` -- the loss per epoch and the held-out metrics per case.

Determinism
-----------
``monai.utils.set_determinism(seed)`` seeds torch, numpy and Python's ``random`` (global state;
it also makes cuDNN deterministic) before the network is built; patch sampling uses its own
``numpy`` generators. On the CPU, the same seed, data, settings and thread count give bit-identical
weights (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..common.errors import ConformalSegError
from ..io.atomic import OVERWRITE_FIX
from ..io.checksums import sha256_file
from .data import PatchSampler, TrainingCase, prepare_cases
from .losses import LOSS_NAMES, build_loss, mc_dropout_variance

ProgressCallback = Callable[[int, int, str], None]
CancelToken = Callable[[], bool] | threading.Event

WEIGHTS_FILE = "weights.pt"
LOG_FILE = "training.json"
LOG_FORMAT = "conformalseg-training-log"
LESION_CHANNEL = 1
#: ``constant``, or ``cosine``: the learning rate falls from ``learning_rate`` to 0 over all steps (per step).
LR_SCHEDULES = ("cosine", "constant")
#: Default intensity window (HU -> [0, 1], clipped): a soft-tissue window, so the 10-50 HU contrast of
#: organ lesions is not squeezed (lung is clipped to 0, where nodules of 0-40 HU stand out anyway).
DEFAULT_WINDOW = {"kind": "window", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True}


class TrainingCancelled(Exception):
    """Raised by :func:`train` when its ``cancel`` token is set (nothing is written)."""


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines a training run (network, preprocessing, optimisation).

    ``patch_size`` (the card's sliding-window size), ``crop_size`` (training crops; ``None`` = the
    patch size) and ``spacing_mm`` are in network axis order ``[d0, d1, d2]`` = ``[x, y, z]``; each
    patch and crop axis must be divisible by the product of ``strides``. The U-Net is fully
    convolutional, so crops may be smaller than the inference window (a window covering the whole
    resampled volume makes inference one forward pass). ``mc_passes`` is used by the
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
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.1
    learning_rate: float = 5e-3
    lr_schedule: str = "cosine"
    batch_size: int = 4
    samples_per_case: int = 4
    pos_fraction: float = 0.5
    mc_passes: int = 4
    overlap: float = 0.25
    sw_batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    name: str = "lesion_unet"

    def validate(self) -> None:
        """Raise :class:`ConformalSegError` for settings that cannot train."""
        if self.loss not in LOSS_NAMES:
            raise ConformalSegError(f"unknown loss {self.loss!r}", fix=f"use one of {', '.join(LOSS_NAMES)}")
        if not self.lesion_labels or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in self.lesion_labels):
            raise ConformalSegError(f"lesion label values must be positive integers, got {list(self.lesion_labels)}",
                                    fix="pass e.g. --lesion-label 6 (the phantoms' lesion label)")
        check_network_and_batches(self, example_size="48 48 32")
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
        if not self.learning_rate > 0 or not 0.0 <= self.pos_fraction <= 1.0:
            raise ConformalSegError("learning rate must be positive and pos_fraction in [0, 1]")

    @property
    def crops(self) -> tuple[int, int, int]:
        """The training crop size (``crop_size``, or the patch size)."""
        return tuple(int(c) for c in (self.crop_size or self.patch_size))  # type: ignore[return-value]

    def network_args(self) -> dict[str, Any]:
        """Keyword arguments of ``monai.networks.nets.UNet`` (as written in the card)."""
        return {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [int(c) for c in self.channels],
                "strides": [int(s) for s in self.strides], "num_res_units": int(self.num_res_units),
                "dropout": float(self.dropout)}


@dataclass
class TrainingResult:
    """What :func:`train` wrote and measured."""

    out: Path
    card_path: Path
    weights_path: Path
    epoch_losses: list[float]
    heldout: dict[str, Any]
    wall_seconds: float


# ----------------------------------------------------------------------------- the card


def build_card(config: TrainingConfig, base_dir: str | PathLike[str], training: dict[str, Any] | None = None):
    """The model card of a network trained with ``config`` (weights ``base_dir/weights.pt``)."""
    from ..inference.card_format import FORMAT, FORMAT_VERSION
    from ..inference.model_card import ModelCard

    data = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": config.name,
        "source": {"state_dict": {"network": "UNet", "args": config.network_args(), "weights": WEIGHTS_FILE}},
        "preprocessing": {"orientation": config.orientation,
                          "spacing_mm": None if config.spacing_mm is None else [float(s) for s in config.spacing_mm],
                          "intensity": dict(config.intensity)},
        "inference": {"patch_size": [int(p) for p in config.patch_size], "overlap": float(config.overlap),
                      "blend": "gaussian", "sw_batch_size": int(config.sw_batch_size)},
        "output": {"activation": "softmax", "lesion_channel": LESION_CHANNEL},
        "training": training or {},
    }
    return ModelCard.from_dict(data, None, base_dir=base_dir)


# ----------------------------------------------------------------------------- output folder


def check_output_folder(out: str | PathLike[str], *, force: bool = False) -> Path:
    """Raise :class:`ConformalSegError` when ``out`` may not be written (exists without ``force``,
    or is a file); return it as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConformalSegError("the output path is an existing file, not a folder", path=out,
                                fix="give a new folder name with --out")
    if out.exists() and not force:
        raise ConformalSegError("the output folder already exists", path=out, fix=OVERWRITE_FIX)
    return out


@contextlib.contextmanager
def staged_model_folder(out: Path, network: torch.nn.Module, *, force: bool) -> Iterator[Path]:
    """A hidden staging folder beside ``out`` holding ``network``'s float32 state dict
    (:data:`WEIGHTS_FILE`); the caller adds the card and logs, and on a clean exit the folder
    replaces ``out`` in one rename (:func:`_publish`). On any error it is removed and ``out`` is
    left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(staging, _default_dir_mode())
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
        torch.save(state, staging / WEIGHTS_FILE)
        yield staging
        _publish(staging, out, force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to ``out`` (replacing an old ``out`` only with ``force``)."""
    check_output_folder(out, force=force)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_dir_mode() -> int:
    """Permissions a normally created folder would get (0o777 minus the umask; mkdtemp uses 0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- training


def _is_set(cancel: CancelToken | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if hasattr(cancel, "is_set") else bool(cancel())


def _evaluate(card, cases: Sequence[TrainingCase], lesion_labels: Sequence[int], device: torch.device,
              cancel: CancelToken | None) -> dict[str, Any]:
    """Held-out lesion Dice with the real inference engine (threshold 0.5, no MC dropout)."""
    from ..inference.engine import InferenceEngine
    from ..evaluation.metrics import dice_from_masks

    if not cases:
        return {"cases": [], "mean_dice": None, "pooled_dice": None, "threshold": 0.5, "mc_dropout": 0}
    engine = InferenceEngine(card, device=device, cancel=cancel)
    rows = []
    tp = predicted = truth_total = 0
    for case in cases:
        image, labels = case.volumes()
        prediction = engine.predict(image)
        mask = prediction.probability >= 0.5
        truth = np.isin(np.asarray(labels.array), np.asarray(list(lesion_labels)))
        tp += int(np.count_nonzero(mask & truth))
        predicted += int(np.count_nonzero(mask))
        truth_total += int(np.count_nonzero(truth))
        rows.append({"case_id": case.case_id, "dice": dice_from_masks(mask, truth),
                     "lesion_voxels": int(np.count_nonzero(truth)), "predicted_voxels": int(np.count_nonzero(mask)),
                     "seconds": round(float(prediction.seconds), 4)})
    with_lesion = [r["dice"] for r in rows if r["lesion_voxels"] > 0]
    return {"cases": rows, "threshold": 0.5, "mc_dropout": 0,
            "mean_dice": float(np.mean(with_lesion)) if with_lesion else None,
            "cases_with_lesion": len(with_lesion),
            "pooled_dice": float(2 * tp / (predicted + truth_total)) if predicted + truth_total else None,
            "mean_seconds_per_case": float(np.mean([r["seconds"] for r in rows]))}


def train(config: TrainingConfig, train_cases: Sequence[TrainingCase], heldout_cases: Sequence[TrainingCase],
          out: str | PathLike[str], *, force: bool = False, progress: ProgressCallback | None = None,
          cancel: CancelToken | None = None, data_info: dict[str, Any] | None = None,
          command: str | None = None) -> TrainingResult:
    """Train, evaluate on ``heldout_cases`` and write the model folder ``out`` (see the module docstring).

    ``data_info`` (e.g. ``{"source": "phantoms", "phantom_seed": 0}``) and ``command`` (the command
    line) are recorded in the card's ``training`` section.
    """
    from monai.networks.nets import UNet
    from monai.utils import set_determinism

    from ..inference.engine import InferenceCancelled, resolve_device
    from ..inference.card_format import CARD_FILE

    start = time.perf_counter()
    config.validate()
    out = check_output_folder(out, force=force)
    device = resolve_device(config.device)
    set_determinism(seed=config.seed)
    template = build_card(config, out)
    train_prepared = prepare_cases(template, train_cases, config.lesion_labels, config.crops)
    sampler = PatchSampler(train_prepared, config.crops, samples_per_case=config.samples_per_case,
                           pos_fraction=config.pos_fraction, batch_size=config.batch_size, seed=config.seed)
    network = UNet(**config.network_args()).to(device)
    loss_fn = build_loss(config.loss, LESION_CHANNEL)

    def compute_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = network(images)
        if loss_fn.needs_uncertainty:
            return loss_fn(logits, targets, mc_dropout_variance(network, images, config.mc_passes, LESION_CHANNEL))
        return loss_fn(logits, targets)

    epochs = fit(network, sampler, compute_loss, epochs=config.epochs, learning_rate=config.learning_rate,
                 lr_schedule=config.lr_schedule, device=device, progress=progress, cancel=cancel)
    train_seconds = time.perf_counter() - start

    with staged_model_folder(out, network, force=force) as staging:
        card = build_card(config, staging)
        try:
            heldout = _evaluate(card, heldout_cases, config.lesion_labels, device, cancel)
        except InferenceCancelled as exc:
            raise TrainingCancelled("training was cancelled during the held-out evaluation") from exc
        wall = time.perf_counter() - start
        training = {
            "package": "conformalseg", "version": __version__, "torch": torch.__version__,
            "monai": _monai_version(), "command": command, "data": data_info or {},
            "seed": config.seed, "device": str(device), "lesion_labels": [int(v) for v in config.lesion_labels],
            "train_cases": len(train_cases), "train_case_ids": [c.case_id for c in train_cases],
            "heldout_cases": len(heldout_cases), "heldout_case_ids": [c.case_id for c in heldout_cases],
            "epochs": config.epochs, "loss": config.loss,
            "mc_passes": config.mc_passes if config.loss == "uncertainty-aware" else None,
            "optimizer": {"name": "Adam", "learning_rate": config.learning_rate, "schedule": config.lr_schedule},
            "crop_size": list(config.crops), "batch_size": config.batch_size,
            "samples_per_case": config.samples_per_case,
            "pos_fraction": config.pos_fraction, "final_loss": epochs[-1]["loss"],
            "heldout_mean_dice": heldout["mean_dice"], "heldout_pooled_dice": heldout["pooled_dice"],
            "heldout_threshold": 0.5, "train_seconds": round(train_seconds, 1), "wall_seconds": round(wall, 1),
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
        }
        card = build_card(config, staging, training)
        card.save(staging / CARD_FILE)
        config_dict = asdict(config)
        _write_json(staging / LOG_FILE, {"format": LOG_FORMAT, "format_version": 1, "config": config_dict,
                                         "epochs": epochs, "heldout": heldout, "training": training})
    return TrainingResult(out=out, card_path=out / CARD_FILE, weights_path=out / WEIGHTS_FILE,
                          epoch_losses=[e["loss"] for e in epochs], heldout=heldout, wall_seconds=wall)


def check_network_and_batches(config: Any, *, example_size: str) -> None:
    """Checks shared by the training configs: positive integer epochs / batch size / samples per
    case, one more U-Net channel count than strides, and patch and crop sizes divisible by the
    U-Net's total downsampling (``example_size`` is the suggestion in the error)."""
    for key in ("epochs", "batch_size", "samples_per_case"):
        value = getattr(config, key)
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ConformalSegError(f"{key.replace('_', ' ')} must be an integer >= 1, got {value!r}")
    if len(config.channels) != len(config.strides) + 1 or any(s < 1 for s in config.strides):
        raise ConformalSegError(f"the U-Net needs one more channel count than strides, got channels "
                                f"{list(config.channels)} and strides {list(config.strides)}")
    factor = math.prod(config.strides)
    for what, size in (("patch size", config.patch_size), ("crop size", config.crops)):
        if len(size) != 3 or any(int(p) != p or p < factor or p % factor for p in size):
            raise ConformalSegError(f"{what} {list(size)} must be three integers divisible by the U-Net's "
                                    f"total downsampling {factor}",
                                    fix=f"use multiples of {factor}, e.g. --{what.replace(' ', '-')} {example_size}")


def fit(network: torch.nn.Module, sampler: Any, compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
        epochs: int, learning_rate: float, lr_schedule: str | None, device: torch.device,
        progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
        loss_label: str = "loss") -> list[dict[str, Any]]:
    """The optimisation loop shared by the lesion and the denoising trainers.

    Adam at ``learning_rate`` (with ``lr_schedule == "cosine"``: cosine decay over all steps), one
    step per batch of ``sampler.epoch(e)`` with ``compute_loss(images, targets)`` on ``device``; a
    non-finite loss is an error; ``cancel`` is checked before every step. Returns one
    ``{"epoch", "loss" (mean), "seconds"}`` record per epoch.
    """
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    total = epochs * len(sampler)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total) if lr_schedule == "cosine" else None
    log: list[dict[str, Any]] = []
    done = 0
    for epoch in range(epochs):
        network.train()
        epoch_start, losses = time.perf_counter(), []
        for images, targets in sampler.epoch(epoch):
            if _is_set(cancel):
                raise TrainingCancelled("training was cancelled")
            loss = compute_loss(images.to(device), targets.to(device))
            if not torch.isfinite(loss):
                raise ConformalSegError(f"the training loss became {float(loss)} in epoch {epoch + 1}",
                                        fix="lower the learning rate or check the images for extreme values")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            done += 1
            if progress is not None:
                progress(done, total, f"epoch {epoch + 1}/{epochs} {loss_label} {np.mean(losses):.4f}")
        log.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                    "seconds": round(time.perf_counter() - epoch_start, 3)})
    return log


def _monai_version() -> str:
    import monai

    return monai.__version__
