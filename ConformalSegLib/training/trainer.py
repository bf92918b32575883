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
   supervision heads; the forward pass in float32 or bfloat16 mixed precision (:mod:`.precision`), the
   loss and the weights in float32. ``progress(done, total, label)`` is called after every step; ``cancel`` (a
   callable or ``threading.Event``) stops training with :class:`~.optimization.TrainingCancelled`.
4. After every epoch: the held-out validation Dice and CLS cost (:func:`~.validation.validation_dice`)
   and a checkpoint (:mod:`.checkpoint`) from which ``resume=True`` continues. The weights of the epoch
   that scores best under ``select_by`` are the ones shipped (:func:`.run_state.selection_score`: the best
   validation Dice by default, the smallest ``val_cls_pc`` with ``"cls-pc"``, the last epoch with
   ``"last"``; the last epoch's without held-out cases). With ``ema_decay`` both the exponential moving
   average (:mod:`.weight_average`) and the raw weights are validated every epoch (``val_dice`` and
   ``val_dice_raw`` in the log) and the better of either is shipped (:func:`.run_state.epoch_candidate`;
   the card's ``selected_weights`` says which); without held-out cases the final average is. The card
   records the rule (``selected_by``) and the kept weights' ``selected_val_dice`` and
   ``selected_val_cls_pc``.
5. Writes ``weights.pt`` and the card into a staging folder, measures the held-out metrics with the
   real :class:`~ConformalSegLib.inference.engine.InferenceEngine` (:func:`~.validation.evaluate_heldout`),
   completes the card's ``training`` section and ``training.json`` and renames the folder to ``out``
   (:mod:`.model_folder`). Nothing is written at ``out`` unless all of this completes.

:func:`snapshot` writes step 5 for an unfinished run: the best weights so far from its checkpoint, measured
and recorded the same way (the card's ``training.snapshot`` gives the epochs done and planned), without
training and without touching the checkpoint, so that a run spread over several sittings can be looked at
(or shipped) between them and then resumed.

Determinism
-----------
``monai.utils.set_determinism(seed)`` seeds torch, numpy and Python's ``random`` before the network
is built; patch sampling and augmentation use their own seeded ``numpy`` generators. On the CPU, the
same seed, data, settings and thread count give bit-identical weights (tested).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..common.errors import ConformalSegError
from ..io.checksums import sha256_file
from .augmentation import AugmentationConfig
from .checkpoint import default_checkpoint_path
from .config import LESION_CHANNEL, TrainingConfig
from .data import PatchSampler, TrainingCase, prepare_cases
from .initial_weights import initial_weights
from .losses import build_loss, mc_dropout_variance, supervised_loss
from .model_folder import LOG_FILE, LOG_FORMAT, WEIGHTS_FILE, check_output_folder, staged_model_folder, write_json
from .networks import (
    build_network,
    card_network_name,
    outputs_list,
)
from .optimization import CancelToken, ProgressCallback, TrainingCancelled, fit
from .phantom_stream import PhantomStream, PhantomStreamSampler
from .precision import check_precision, forward_precision
from .run_state import BestWeights, RunState, selected_values
from .validation import evaluate_heldout


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
    #: ``True`` when the time limit ended the run before its last epoch (the checkpoint is kept)
    stopped_early: bool = False


def build_card(config: TrainingConfig, base_dir: str | PathLike[str], training: dict[str, Any] | None = None):
    """The model card of a network trained with ``config`` (weights ``base_dir/weights.pt``)."""
    from ..inference.card_format import FORMAT, FORMAT_VERSION
    from ..inference.model_card import ModelCard

    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": config.name,
        "source": {
            "state_dict": {
                "network": card_network_name(config.network),
                "args": config.network_args(),
                "weights": WEIGHTS_FILE,
            }
        },
        "preprocessing": {
            "orientation": config.orientation,
            "spacing_mm": None if config.spacing_mm is None else [float(s) for s in config.spacing_mm],
            "intensity": dict(config.intensity),
        },
        "inference": {
            "patch_size": [int(p) for p in config.patch_size],
            "overlap": float(config.overlap),
            "blend": "gaussian",
            "sw_batch_size": int(config.sw_batch_size),
        },
        "output": {"activation": "softmax", "lesion_channel": LESION_CHANNEL},
        "training": training or {},
    }
    return ModelCard.from_dict(data, None, base_dir=base_dir)


def _sampler(config: TrainingConfig, card: Any, data: Sequence[TrainingCase] | PhantomStream):
    augmentation = AugmentationConfig() if config.augment else None
    if isinstance(data, PhantomStream):
        return PhantomStreamSampler(
            data,
            card,
            config.lesion_labels,
            config.crops,
            batch_size=config.batch_size,
            steps_per_epoch=config.steps_per_epoch,
            fg_fraction=config.fg_fraction,
            augmentation=augmentation,
            num_workers=config.num_workers,
            crops_per_phantom=config.crops_per_phantom,
        )
    prepared = prepare_cases(card, data, config.lesion_labels, config.crops)
    return PatchSampler(
        prepared,
        config.crops,
        samples_per_case=config.samples_per_case,
        fg_fraction=config.fg_fraction,
        batch_size=config.batch_size,
        seed=config.seed,
        augmentation=augmentation,
    )


def train(
    config: TrainingConfig,
    train_data: Sequence[TrainingCase] | PhantomStream,
    heldout_cases: Sequence[TrainingCase],
    out: str | PathLike[str],
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    data_info: dict[str, Any] | None = None,
    command: str | None = None,
    checkpoint: str | PathLike[str] | None = None,
    resume: bool = False,
    init_weights: str | PathLike[str] | None = None,
    time_limit: float | None = None,
) -> TrainingResult:
    """Train, evaluate on ``heldout_cases`` and write the model folder ``out`` (see the module docstring).

    ``train_data`` is a list of cases or a :class:`~.phantom_stream.PhantomStream`. ``data_info`` and
    ``command`` (the command line) are recorded in the card's ``training`` section. The checkpoint
    (default ``OUT.checkpoint.pt``) is written after every epoch and removed at the end; with
    ``resume`` the run continues from it. ``init_weights`` (a model folder or card) gives the starting
    weights (:mod:`.initial_weights`); its checksum must equal ``config.init_weights_sha256``.

    ``time_limit`` (seconds of this call's wall time, ``None``: none) ends the run early, cleanly: after
    an epoch, when another epoch and the final held-out measurement would not fit (each reckoned at the
    last epoch's wall time, its validation included), the run stops there and writes ``out`` exactly as
    :func:`snapshot` would (the best weights so far, measured; the card's ``training.snapshot`` gives
    the epochs done and planned, with ``"stopped_by": "time limit"``) and keeps the checkpoint, so the
    same call with ``resume=True`` (and ``force=True``, to replace ``out``) continues the run bit for bit.
    At least one epoch runs. The limit is not part of the run's configuration: each sitting may have its own.
    """
    started = time.perf_counter()
    config.validate()
    out_of_time = _time_limit(time_limit, started)
    out = check_output_folder(out, force=force)
    run, sampler = _start_run(config, train_data, heldout_cases, out, started, checkpoint, init_weights)
    if resume:
        run.restore()
    network, device, ckpt_path = run.network, run.device, run.ckpt_path
    fit(
        network,
        sampler,
        training_loss(network, config, device),
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_schedule=config.lr_schedule,
        device=device,
        progress=progress,
        cancel=cancel,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        start_epoch=run.start_epoch,
        resume=run.resumed,
        on_epoch_end=run.on_epoch_end,
        after_step=None if run.average is None else run.average.update,
        stop_after_epoch=out_of_time,
    )
    run.keep_selected()
    stopped = len(run.epochs) < config.epochs
    result = _publish(
        run, out, force, train_data, heldout_cases, data_info, command, cancel, snapshot=stopped,
        stopped_by="time limit" if stopped else None,
    )  # fmt: skip
    if stopped:
        result.stopped_early = True
    else:
        ckpt_path.unlink(missing_ok=True)
    return result


def _time_limit(time_limit: float | None, started: float) -> Callable[[], bool] | None:
    """The question :func:`~.optimization.fit` asks after each epoch under ``time_limit`` (see :func:`train`):
    would one more epoch and the final measurement, each as long as the epoch just ended, pass the limit?"""
    if time_limit is None:
        return None
    if not time_limit > 0:
        raise ConformalSegError(f"the time limit must be a positive number of seconds, got {time_limit}")
    last_end = [time.perf_counter()]

    def out_of_time() -> bool:
        now = time.perf_counter()
        epoch_wall, last_end[0] = now - last_end[0], now
        return (now - started) + 2.0 * epoch_wall > time_limit

    return out_of_time


def _start_run(
    config: TrainingConfig,
    train_data: Sequence[TrainingCase] | PhantomStream,
    heldout_cases: Sequence[TrainingCase],
    out: Path,
    started: float,
    checkpoint: str | PathLike[str] | None,
    init_weights: str | PathLike[str] | None,
) -> tuple[RunState, Any]:
    """A run's state before its first step (``config`` already validated): the device, seeds, the card
    template, the sampler, the prepared held-out cases and the network with its starting weights."""
    from monai.utils import set_determinism

    from ..inference.engine import resolve_device

    device = resolve_device(config.device)
    check_precision(config.precision, device)
    set_determinism(seed=config.seed)
    template = build_card(config, out)
    sampler = _sampler(config, template, train_data)
    validation = (
        prepare_cases(template, heldout_cases, config.lesion_labels, config.patch_size, what="held-out")
        if heldout_cases
        else []
    )
    network = build_network(config.network, config.network_args())
    _load_initial_weights(network, config, init_weights)
    network = network.to(device)
    ckpt_path = Path(checkpoint) if checkpoint is not None else default_checkpoint_path(out)
    return RunState(config, template, network, device, validation, ckpt_path, started), sampler


def training_loss(
    network: torch.nn.Module, config: TrainingConfig, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``compute_loss(images, targets)`` of a run of ``config``: the forward pass (and the uncertainty-aware
    loss's MC dropout passes) in ``config.precision`` (:mod:`.precision`), every head's logits cast to
    float32, then the loss summed over the deep supervision heads."""
    loss_fn = build_loss(config.loss, LESION_CHANNEL)

    def compute_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with forward_precision(device, config.precision):
            heads = outputs_list(network(images))
            uncertainty = (
                mc_dropout_variance(network, images, config.mc_passes, LESION_CHANNEL)
                if loss_fn.needs_uncertainty
                else None
            )
        return supervised_loss(loss_fn, [head.float() for head in heads], targets, uncertainty)

    return compute_loss


def snapshot(
    config: TrainingConfig,
    train_data: Sequence[TrainingCase] | PhantomStream,
    heldout_cases: Sequence[TrainingCase],
    out: str | PathLike[str],
    checkpoint: str | PathLike[str],
    *,
    force: bool = False,
    cancel: CancelToken | None = None,
    data_info: dict[str, Any] | None = None,
    command: str | None = None,
) -> TrainingResult:
    """Write the best weights so far of the unfinished run of ``config`` as the model folder ``out``.

    The weights are the ones :func:`train` would write if the run ended now: the epoch's that scores best
    under the run's ``select_by`` (raw or average, see :func:`.run_state.epoch_candidate`), else the
    average's, else the last epoch's. The held-out metrics, the card and ``training.json`` are made
    exactly as at the end of a run, with ``training["snapshot"] = {"epochs_done": k, "epochs_planned": n}``.
    ``checkpoint`` is only read (it must belong to a run with the same ``config``), so the run can go on,
    even while this runs: checkpoints are replaced atomically. Nothing is written at ``out`` unless all of
    this completes.
    """
    from ..inference.engine import resolve_device

    config.validate()
    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise ConformalSegError(
            "there is no training checkpoint to take a snapshot of",
            path=ckpt_path,
            fix="pass the unfinished run's own options (the same --out) or its --checkpoint FILE; a finished run "
            "has removed its checkpoint and its model folder is its --out",
        )
    out = check_output_folder(out, force=force)
    device = resolve_device(config.device)
    template = build_card(config, out)
    # building the network draws initial weights, restoring sets the run's RNG state and the held-out
    # measurement may draw too: the caller's torch random numbers are given back afterwards (CPU generator)
    with torch.random.fork_rng(devices=[]):
        network = build_network(config.network, config.network_args()).to(device)
        run = RunState(config, template, network, device, [], ckpt_path)
        run.restore()
        run.keep_selected()
        run.started = time.perf_counter()  # the run's own time is the checkpoint's; this adds the measuring only
        return _publish(run, out, force, train_data, heldout_cases, data_info, command, cancel, snapshot=True)


def _load_initial_weights(network: torch.nn.Module, config: TrainingConfig, model: Any) -> None:
    """Load ``model``'s weights into ``network`` when the configuration asks for a start from them."""
    if (model is None) != (config.init_weights_sha256 is None):
        raise ConformalSegError(
            "the initial weights and the configuration's init_weights_sha256 go together",
            fix="pass init_weights together with the checksum of its weights file",
        )
    if model is None:
        return
    state, sha = initial_weights(model, config.network, config.network_args(), seed=config.seed)
    if sha != config.init_weights_sha256:
        raise ConformalSegError(
            "the initial weights changed: their SHA-256 is not the one in the configuration",
            path=Path(model),
            fix="use the model the run was configured with",
        )
    network.load_state_dict(state)


def _publish(
    run: RunState,
    out: Path,
    force: bool,
    train_data: Sequence[TrainingCase] | PhantomStream,
    heldout_cases: Sequence[TrainingCase],
    data_info: dict[str, Any] | None,
    command: str | None,
    cancel: CancelToken | None,
    *,
    snapshot: bool = False,
    stopped_by: str | None = None,
) -> TrainingResult:
    """Held-out metrics with the real engine, the card's training record and log, the model folder."""
    from ..inference.card_format import CARD_FILE
    from ..inference.engine import InferenceCancelled

    config, train_seconds = run.config, run.elapsed()
    with staged_model_folder(out, run.network, force=force) as staging:
        card = build_card(config, staging)
        try:
            heldout = evaluate_heldout(card, heldout_cases, config.lesion_labels, run.device, cancel)
        except InferenceCancelled as exc:
            raise TrainingCancelled("training was cancelled during the held-out evaluation") from exc
        wall = run.elapsed()
        training = _training_record(
            config, train_data, heldout_cases, run.epochs, heldout, run.best, data_info, command, run.device,
            train_seconds, wall,
        )  # fmt: skip
        if snapshot:
            training["snapshot"] = {"epochs_done": len(run.epochs), "epochs_planned": config.epochs}
            if stopped_by is not None:
                training["snapshot"]["stopped_by"] = stopped_by
        training["weights_sha256"] = sha256_file(staging / WEIGHTS_FILE)
        build_card(config, staging, training).save(staging / CARD_FILE)
        log = {"format": LOG_FORMAT, "format_version": 1, "config": json.loads(config.to_json()),
               "epochs": run.epochs, "heldout": heldout, "training": training}  # fmt: skip
        write_json(staging / LOG_FILE, log)
    return TrainingResult(
        out=out,
        card_path=out / CARD_FILE,
        weights_path=out / WEIGHTS_FILE,
        epoch_losses=[e["loss"] for e in run.epochs],
        heldout=heldout,
        wall_seconds=wall,
        best_epoch=run.best.epoch,
    )


def _training_record(
    config: TrainingConfig,
    train_data: Sequence[TrainingCase] | PhantomStream,
    heldout_cases: Sequence[TrainingCase],
    epochs: list[dict[str, Any]],
    heldout: dict[str, Any],
    best: BestWeights,
    data_info: dict[str, Any] | None,
    command: str | None,
    device: torch.device,
    train_seconds: float,
    wall: float,
) -> dict[str, Any]:
    """The card's ``training`` section (see :mod:`ConformalSegLib.training`)."""
    import monai

    if isinstance(train_data, PhantomStream):
        data = data_info or train_data.describe(config.crops_per_phantom)
        train_cases: Any = len(epochs) * config.steps_per_epoch * config.batch_size  # samples drawn so far
        per = "sample" if config.crops_per_phantom == 1 else f"{config.crops_per_phantom} samples"
        train_ids: Any = f"a fresh phantom per {per} (see data)"
    else:
        data, train_cases, train_ids = data_info or {}, len(train_data), [c.case_id for c in train_data]
    stream = isinstance(train_data, PhantomStream)
    selected_dice, selected_pc = selected_values(epochs, best)
    return {
        "package": "conformalseg",
        "version": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "command": command,
        "data": data,
        "seed": config.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": config.precision,
        "lesion_labels": [int(v) for v in config.lesion_labels],
        "train_cases": train_cases,
        "train_case_ids": train_ids,
        "heldout_cases": len(heldout_cases),
        "heldout_case_ids": [c.case_id for c in heldout_cases],
        "network": config.network,
        "init_weights_sha256": config.init_weights_sha256,
        "ema_decay": config.ema_decay,
        "epochs": config.epochs,
        "loss": config.loss,
        "deep_supervision": config.deep_supervision,
        "augment": config.augment,
        "mc_passes": config.mc_passes if config.loss == "uncertainty-aware" else None,
        "optimizer": {
            "name": config.optimizer,
            "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay,
            "schedule": config.lr_schedule,
        },
        "crop_size": list(config.crops),
        "batch_size": config.batch_size,
        "samples_per_case": None if stream else config.samples_per_case,
        "steps_per_epoch": config.steps_per_epoch if stream else None,
        "crops_per_phantom": config.crops_per_phantom if stream else None,
        "fg_fraction": config.fg_fraction,
        "final_loss": epochs[-1]["loss"] if epochs else None,
        "selected_by": config.select_by,
        "selected_epoch": best.epoch,
        "selected_val_dice": selected_dice,
        "selected_val_cls_pc": selected_pc,
        "selected_weights": _selected_weights(config, best),
        "heldout_mean_dice": heldout["mean_dice"],
        "heldout_pooled_dice": heldout["pooled_dice"],
        "heldout_detection": heldout.get("detection"),
        "heldout_threshold": 0.5,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
    }


def _selected_weights(config: TrainingConfig, best: BestWeights) -> str:
    """Which weights were written: ``"raw"``, or ``"average"`` (the best epoch's, or without held-out
    cases the final average)."""
    if config.ema_decay is None:
        return "raw"
    return best.weights or "average"
