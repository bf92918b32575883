"""The state of one training run between epochs: the network, its weight average, the best validated weights
so far, the log and the checkpoint written after every epoch.

Selection
---------
After every epoch the held-out validation Dice and CLS cost (:func:`~.validation.validation_dice`:
``val_dice``, ``val_cls_pc``) of the weights are measured, and the configuration's ``select_by`` rule
turns them into a score, higher is better (:func:`selection_score`): ``"dice"`` the Dice, ``"cls-pc"``
minus the CLS cost (the smallest mask the per-scan guarantee needs), ``"last"`` a constant, so the last
epoch wins. The best-scoring epoch's weights are kept (``>=``: on a tie the later epoch). With a weight
average (:mod:`.weight_average`) both the average and the raw weights are validated, and
:func:`epoch_candidate` says which of the two competes for the epoch (under ``"last"`` they tie, so the
last epoch's average is kept). The rule is fixed before the run and scores only the training stream's
held-out phantoms: the test phantoms of ``benchmarks/eval_lesion_model.py`` and the demo's are never seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .config import SELECTION_RULES, TrainingConfig
from .validation import validation_dice
from .weight_average import WeightAverage


@dataclass
class BestWeights:
    """The best selection score so far (:func:`selection_score`), the epoch and weights that gave it, and
    which weights they were (``"raw"`` or ``"average"``; ``None`` for a run without a weight average)."""

    score: float | None = None
    epoch: int | None = None
    state: dict[str, torch.Tensor] | None = None
    weights: str | None = None


def selection_score(rule: str, val_dice: float | None, val_cls_pc: float | None) -> float | None:
    """The score of validated weights under the selection ``rule`` (:data:`~.config.SELECTION_RULES`),
    higher is better: ``"dice"`` -> ``val_dice``; ``"cls-pc"`` -> ``-val_cls_pc``; ``"last"`` -> ``0.0``
    for every epoch (with ``>=`` the last one is kept; with a weight average, its average, as
    :func:`epoch_candidate` gives a tie to the average). ``None`` (no held-out case with a lesion, so
    nothing to score) never displaces a scored epoch; under ``"last"`` there is always a score.

    >>> selection_score("cls-pc", 0.5, 0.04) > selection_score("cls-pc", 0.6, 0.05)
    True
    """
    if rule == "dice":
        return val_dice
    if rule == "cls-pc":
        return None if val_cls_pc is None else -val_cls_pc
    if rule == "last":
        return 0.0
    raise ValueError(f"unknown selection rule {rule!r}; use one of {', '.join(SELECTION_RULES)}")


def selected_values(epochs: list[dict[str, Any]], best: BestWeights) -> tuple[float | None, float | None]:
    """The validation Dice and CLS cost of the kept weights, read from the log (the raw weights' are
    ``val_dice_raw`` / ``val_cls_pc_raw`` in a run with a weight average); ``(None, None)`` when no epoch
    was kept."""
    suffix = "_raw" if best.weights == "raw" else ""
    for record in epochs:
        if best.epoch is not None and record.get("epoch") == best.epoch:
            return record.get(f"val_dice{suffix}"), record.get(f"val_cls_pc{suffix}")
    return None, None


def epoch_candidate(average: float | None, raw: float | None) -> tuple[str, float | None]:
    """Which of an epoch's two validated weights competes for the best: ``("average" | "raw", score)``,
    given their selection scores (:func:`selection_score`).

    The raw weights only when their score is strictly higher (``raw > average``); on a tie,
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


def _state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}


@dataclass
class RunState:
    """The state of one run between epochs: network, validation cases, best weights, log, checkpoint."""

    config: TrainingConfig
    template: Any  # the model card the data are prepared with
    network: torch.nn.Module
    device: torch.device
    validation: list[Any]
    ckpt_path: Path
    started: float = field(default_factory=time.perf_counter)
    best: BestWeights = field(default_factory=BestWeights)
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
        self.best = BestWeights(saved.best_score, saved.best_epoch, saved.best_network, saved.best_weights)
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
        """Validation Dice and CLS cost, the best weights so far by the run's rule, and the checkpoint of
        this epoch."""
        if self.validation:
            rule = self.config.select_by
            record.update(validation_dice(self.selectable, self.validation, self.template, self.device))
            weights, network = None, self.network
            score = selection_score(rule, record["val_dice"], record["val_cls_pc"])
            if self.average is not None:
                raw = validation_dice(self.network, self.validation, self.template, self.device)
                record["val_dice_raw"], record["val_cls_pc_raw"] = raw["val_dice"], raw["val_cls_pc"]
                weights, score = epoch_candidate(score, selection_score(rule, raw["val_dice"], raw["val_cls_pc"]))
                network = self.average.network if weights == "average" else self.network
            if score is not None and (self.best.score is None or score >= self.best.score):
                self.best = BestWeights(score, epoch + 1, _state(network), weights)
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
