"""The optimisation loop shared by the lesion and the denoising trainers: optimiser, learning-rate
schedule, cancellation, per-epoch callbacks and resuming.

Optimisers: ``adam`` (``torch.optim.Adam``), ``adamw`` (decoupled weight decay) and ``sgd`` (Nesterov
momentum 0.99, nnU-Net's choice). Schedules, per optimisation step over the whole run:
``cosine`` (to 0), ``poly`` (nnU-Net's ``lr * (1 - step / total) ** 0.9``) and ``constant``.

Resuming: :func:`fit` takes the optimiser and scheduler states and the epoch to start from (saved by
:mod:`ConformalSegLib.training.checkpoint` after each epoch), so an interrupted run continues with
the same learning-rate curve. Batches of epoch ``e`` come from ``sampler.epoch(e)``, which depends
only on the seed and ``e``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..common.errors import ConformalSegError

ProgressCallback = Callable[[int, int, str], None]
CancelToken = Callable[[], bool] | threading.Event
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "poly", "constant")
POLY_EXPONENT = 0.9


class TrainingCancelled(Exception):
    """Raised when a trainer's ``cancel`` token is set (nothing is written)."""


def is_set(cancel: CancelToken | None) -> bool:
    """Whether a cancel token (callable or ``threading.Event``) asks to stop."""
    if cancel is None:
        return False
    return cancel.is_set() if hasattr(cancel, "is_set") else bool(cancel())


def build_optimizer(
    name: str, parameters: Any, learning_rate: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimiser ``name`` (one of :data:`OPTIMIZERS`)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    raise ConformalSegError(f"unknown optimizer {name!r}", fix=f"use one of {', '.join(OPTIMIZERS)}")


def build_scheduler(name: str | None, optimizer: torch.optim.Optimizer, total_steps: int):  # noqa: ANN201
    """The per-step schedule ``name`` over ``total_steps`` (None for ``constant``)."""
    if name in (None, "constant"):
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if name == "poly":
        total = max(1, total_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total) ** POLY_EXPONENT)
    raise ConformalSegError(f"unknown learning-rate schedule {name!r}", fix=f"use one of {', '.join(LR_SCHEDULES)}")


EpochCallback = Callable[[int, dict[str, Any], torch.optim.Optimizer, Any], None]


def fit(
    network: torch.nn.Module,
    sampler: Any,
    compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    learning_rate: float,
    lr_schedule: str | None,
    device: torch.device,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    loss_label: str = "loss",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    start_epoch: int = 0,
    resume: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
    after_step: Callable[[], None] | None = None,
    stop_after_epoch: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Optimise ``network`` for epochs ``start_epoch .. epochs - 1``.

    One step per batch of ``sampler.epoch(e)`` with ``compute_loss(images, targets)`` on ``device``; a
    non-finite loss is an error; ``cancel`` is checked before every step. ``resume`` holds the
    ``optimizer`` and ``scheduler`` states of an interrupted run. After each epoch
    ``on_epoch_end(epoch, record, optimizer, scheduler)`` may add keys to the record (validation) and
    save a checkpoint. ``after_step()`` runs after every optimiser step (the weight average of
    :mod:`.weight_average`). ``stop_after_epoch()`` is asked after ``on_epoch_end`` of every epoch but the
    last; ``True`` ends the run there (a time limit, :func:`.trainer.train`). Returns one ``{"epoch", "loss"
    (mean), "seconds", ...}`` record per epoch run.
    """
    opt = build_optimizer(optimizer, network.parameters(), learning_rate, weight_decay)
    total = epochs * len(sampler)
    scheduler = build_scheduler(lr_schedule, opt, total)
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
    log: list[dict[str, Any]] = []
    done = start_epoch * len(sampler)
    for epoch in range(start_epoch, epochs):
        network.train()
        epoch_start, losses = time.perf_counter(), []
        for images, targets in sampler.epoch(epoch):
            if is_set(cancel):
                raise TrainingCancelled("training was cancelled")
            loss = compute_loss(images.to(device), targets.to(device))
            if not torch.isfinite(loss):
                raise ConformalSegError(
                    f"the training loss became {float(loss)} in epoch {epoch + 1}",
                    fix="lower the learning rate or check the images for extreme values",
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            done += 1
            if progress is not None:
                progress(done, total, f"epoch {epoch + 1}/{epochs} {loss_label} {np.mean(losses):.4f}")
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "seconds": round(time.perf_counter() - epoch_start, 3),
            "learning_rate": float(opt.param_groups[0]["lr"]),
        }
        if on_epoch_end is not None:
            on_epoch_end(epoch, record, opt, scheduler)
        log.append(record)
        if stop_after_epoch is not None and epoch + 1 < epochs and stop_after_epoch():
            break
    return log
