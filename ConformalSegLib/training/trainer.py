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
   the best validation Dice are the ones shipped (the last epoch's without held-out cases). With
   ``ema_decay`` both the exponential moving average (:mod:`.weight_average`) and the raw weights are
   validated every epoch (``val_dice`` and ``val_dice_raw`` in the log) and the best of either is
   shipped (:func:`epoch_candidate`; the card's ``selected_weights`` says which); without held-out
   cases the final average is.
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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..common.errors import ConformalSegError
from ..io.checksums import sha256_file
from .augmentation import AugmentationConfig
from .checkpoint import Checkpoint, default_checkpoint_path
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
from .validation import evaluate_heldout, validation_dice
from .weight_average import WeightAverage


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


@dataclass
class _Best:
    """The best validation score so far, the weights that gave it, and which weights they were
    (``"raw"`` or ``"average"``; ``None`` for a run without a weight average)."""

    score: float | None = None
    epoch: int | None = None
    state: dict[str, torch.Tensor] | None = None
    weights: str | None = None


def epoch_candidate(average: float | None, raw: float | None) -> tuple[str, float | None]:
    """Which of an epoch's two validated weights competes for the best: ``("average" | "raw", score)``.

    The raw weights only when their validation Dice is strictly higher (``raw > average``); on a tie,
    or when neither could be scored (``None``: no held-out case with a lesion), the average, the less
    noisy of the two. Why both: the lesion_v4 run (RESULTS, "A weight average over another warm
    restart") recovered from a warm restart faster in its raw weights (0.568 at epoch 20) than in its
    average with decay 0.999 (at most 0.545), which trails the raw weights by about four epochs.
    Choosing among two candidates per epoch makes the best validation Dice a little more optimistic;
    the test phantoms of ``benchmarks/eval_lesion_model.py`` are not used for it.
    """
    if raw is not None and (average is None or raw > average):
        return "raw", raw
    return "average", average


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


def _state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}


@dataclass
class _Run:
    """The state of one run between epochs: network, validation cases, best weights, log, checkpoint."""

    config: TrainingConfig
    template: Any  # the model card the data are prepared with
    network: torch.nn.Module
    device: torch.device
    validation: list[Any]
    ckpt_path: Path
    started: float = field(default_factory=time.perf_counter)
    best: _Best = field(default_factory=_Best)
    previous_log: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    elapsed_before: float = 0.0
    resumed: dict[str, Any] | None = None
    average: WeightAverage | None = None

    def __post_init__(self) -> None:
        if self.config.ema_decay is not None:
            self.average = WeightAverage(self.network, self.config.ema_decay)

    def keep_selected(self) -> None:
        """Put the weights to write into the network: the best validated ones, else the average's, else
        the last step's."""
        if self.best.state is not None:
            self.network.load_state_dict(self.best.state)
        elif self.average is not None:
            self.network.load_state_dict(_state(self.average.network))

    def restore(self) -> None:
        """Continue from the checkpoint (weights, RNG, best so far, log, optimiser state)."""
        saved = Checkpoint.load(self.ckpt_path, self.config.to_json())
        self.network.load_state_dict(saved.network)
        torch.set_rng_state(saved.rng_state)
        self.best = _Best(saved.best_score, saved.best_epoch, saved.best_network, saved.best_weights)
        if self.average is not None and self.best.state is not None and self.best.weights is None:
            self.best.weights = "average"  # written before raw weights could be selected
        self.previous_log, self.start_epoch, self.elapsed_before = saved.log, saved.epoch, saved.elapsed_seconds
        self.resumed = {"optimizer": saved.optimizer, "scheduler": saved.scheduler}
        if self.average is not None and saved.weight_average is not None:
            self.average.load_state_dict(saved.weight_average)

    @property
    def selectable(self) -> torch.nn.Module:
        """The weights validated first: the average's when there is one, else the raw ones."""
        return self.network if self.average is None else self.average.network

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return self.previous_log + self.log

    def on_epoch_end(self, epoch: int, record: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
        """Validation Dice, best weights so far, and the checkpoint of this epoch."""
        if self.validation:
            record.update(validation_dice(self.selectable, self.validation, self.template, self.device))
            weights, network, score = None, self.network, record["val_dice"]
            if self.average is not None:
                raw = validation_dice(self.network, self.validation, self.template, self.device)
                record["val_dice_raw"] = raw["val_dice"]
                weights, score = epoch_candidate(record["val_dice"], raw["val_dice"])
                network = self.average.network if weights == "average" else self.network
            if score is not None and (self.best.score is None or score >= self.best.score):
                self.best = _Best(score, epoch + 1, _state(network), weights)
        self.log.append(record)
        Checkpoint(
            self.config.to_json(),
            epoch + 1,
            _state(self.network),
            optimizer.state_dict(),
            None if scheduler is None else scheduler.state_dict(),
            self.best.state,
            self.best.score,
            self.best.epoch,
            self.epochs,
            torch.get_rng_state(),
            self.elapsed(),
            None if self.average is None else self.average.state_dict(),
            self.best.weights,
        ).save(self.ckpt_path)


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
) -> TrainingResult:
    """Train, evaluate on ``heldout_cases`` and write the model folder ``out`` (see the module docstring).

    ``train_data`` is a list of cases or a :class:`~.phantom_stream.PhantomStream`. ``data_info`` and
    ``command`` (the command line) are recorded in the card's ``training`` section. The checkpoint
    (default ``OUT.checkpoint.pt``) is written after every epoch and removed at the end; with
    ``resume`` the run continues from it. ``init_weights`` (a model folder or card) gives the starting
    weights (:mod:`.initial_weights`); its checksum must equal ``config.init_weights_sha256``.
    """
    from monai.utils import set_determinism

    from ..inference.engine import resolve_device

    started = time.perf_counter()
    config.validate()
    out = check_output_folder(out, force=force)
    device = resolve_device(config.device)
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
    run = _Run(config, template, network, device, validation, ckpt_path, started)
    if resume:
        run.restore()
    loss_fn = build_loss(config.loss, LESION_CHANNEL)

    def compute_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        heads = outputs_list(network(images))
        uncertainty = (
            mc_dropout_variance(network, images, config.mc_passes, LESION_CHANNEL)
            if loss_fn.needs_uncertainty
            else None
        )
        return supervised_loss(loss_fn, heads, targets, uncertainty)

    fit(
        network,
        sampler,
        compute_loss,
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
    )
    run.keep_selected()
    result = _publish(run, out, force, train_data, heldout_cases, data_info, command, cancel)
    ckpt_path.unlink(missing_ok=True)
    return result


def _load_initial_weights(network: torch.nn.Module, config: TrainingConfig, model: Any) -> None:
    """Load ``model``'s weights into ``network`` when the configuration asks for a start from them."""
    if (model is None) != (config.init_weights_sha256 is None):
        raise ConformalSegError(
            "the initial weights and the configuration's init_weights_sha256 go together",
            fix="pass init_weights together with the checksum of its weights file",
        )
    if model is None:
        return
    state, sha = initial_weights(model, config.network, config.network_args())
    if sha != config.init_weights_sha256:
        raise ConformalSegError(
            "the initial weights changed: their SHA-256 is not the one in the configuration",
            path=Path(model),
            fix="use the model the run was configured with",
        )
    network.load_state_dict(state)


def _publish(
    run: _Run,
    out: Path,
    force: bool,
    train_data: Sequence[TrainingCase] | PhantomStream,
    heldout_cases: Sequence[TrainingCase],
    data_info: dict[str, Any] | None,
    command: str | None,
    cancel: CancelToken | None,
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
    best: _Best,
    data_info: dict[str, Any] | None,
    command: str | None,
    device: torch.device,
    train_seconds: float,
    wall: float,
) -> dict[str, Any]:
    """The card's ``training`` section (see :mod:`ConformalSegLib.training`)."""
    import monai

    if isinstance(train_data, PhantomStream):
        data = data_info or train_data.describe()
        train_cases: Any = config.epochs * config.steps_per_epoch * config.batch_size
        train_ids: Any = "a fresh phantom per sample (see data)"
    else:
        data, train_cases, train_ids = data_info or {}, len(train_data), [c.case_id for c in train_data]
    stream = isinstance(train_data, PhantomStream)
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
        "fg_fraction": config.fg_fraction,
        "final_loss": epochs[-1]["loss"] if epochs else None,
        "selected_epoch": best.epoch,
        "selected_val_dice": best.score,
        "selected_weights": _selected_weights(config, best),
        "heldout_mean_dice": heldout["mean_dice"],
        "heldout_pooled_dice": heldout["pooled_dice"],
        "heldout_detection": heldout.get("detection"),
        "heldout_threshold": 0.5,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
    }


def _selected_weights(config: TrainingConfig, best: _Best) -> str:
    """Which weights were written: ``"raw"``, or ``"average"`` (the best epoch's, or without held-out
    cases the final average)."""
    if config.ema_decay is None:
        return "raw"
    return best.weights or "average"
