"""Resumable training: one checkpoint file written atomically after every epoch.

``OUT.checkpoint.pt`` beside the model folder ``OUT`` (or ``--checkpoint FILE``) holds the epoch
reached, the network, optimiser and scheduler states, the best held-out weights so far and their
score, which weights they are (``best_weights``: ``"raw"`` or ``"average"`` when the run keeps a weight
average, :mod:`.weight_average`; absent in checkpoints written before raw weights could be selected),
the log, torch's global RNG state (dropout masks), the weight average and the training configuration
as JSON.
It is saved with ``torch.save`` to a temporary name and renamed over the previous one, so an
interruption (Ctrl-C, a killed job, a full disk) leaves the last complete epoch. It contains only
tensors, numbers and strings and is read with ``torch.load(weights_only=True)``: no code is run.

``--resume`` continues from it when its configuration is identical to the new run's (anything else
would mix two runs into one model, so a difference is refused naming the differing keys; a key that
a newer version added is absent from an older checkpoint and counts as its default then:
:data:`LATER_DEFAULTS`, else ``None``). The file is deleted when the model folder has been written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..common.errors import ConformalSegError

FORMAT = "conformalseg-training-checkpoint"
#: Settings added to the configuration later whose default is not ``None``: what their absence from an
#: older checkpoint's configuration means (``select_by``: before it existed, epochs were chosen by Dice;
#: ``precision``: before it existed, training ran in float32; ``crops_per_phantom``: one crop per phantom).
LATER_DEFAULTS: dict[str, Any] = {"select_by": "dice", "precision": "fp32", "crops_per_phantom": 1}


def default_checkpoint_path(out: Path) -> Path:
    """``OUT.checkpoint.pt`` beside the model folder ``OUT``."""
    return out.parent / f"{out.name}.checkpoint.pt"


@dataclass
class Checkpoint:
    """The state of a run after ``epoch`` complete epochs (see the module docstring)."""

    config_json: str
    epoch: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    best_network: dict[str, torch.Tensor] | None
    best_score: float | None
    best_epoch: int | None
    log: list[dict[str, Any]]
    rng_state: torch.Tensor
    elapsed_seconds: float = 0.0
    weight_average: dict[str, Any] | None = None
    best_weights: str | None = None

    def save(self, path: Path) -> None:
        """Write atomically (temporary file in the same folder, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        payload = {
            "format": FORMAT,
            "format_version": 1,
            "config_json": self.config_json,
            "epoch": self.epoch,
            "network": self.network,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "best_network": self.best_network,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "log_json": json.dumps(self.log),
            "rng_state": self.rng_state,
            "elapsed_seconds": float(self.elapsed_seconds),
            "weight_average": self.weight_average,
            "best_weights": self.best_weights,
        }
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: Path, config_json: str) -> Checkpoint:
        """Read ``path`` and check it belongs to a run with configuration ``config_json``."""
        if not path.is_file():
            raise ConformalSegError(
                "there is no training checkpoint to resume from",
                path=path,
                fix="start without --resume, or pass the checkpoint with --checkpoint FILE",
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
            raise ConformalSegError(
                f"the training checkpoint cannot be read ({exc})",
                path=path,
                fix="delete it and start again without --resume",
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConformalSegError(
                "not a ConformalSeg training checkpoint",
                path=path,
                fix="pass the OUT.checkpoint.pt file written by `conformalseg train`",
            )
        if data.get("best_weights") not in (None, "raw", "average"):
            raise ConformalSegError(
                f"the training checkpoint names unknown best weights {data.get('best_weights')!r}",
                path=path,
                fix="delete it and start again without --resume",
            )
        old, new = json.loads(data["config_json"]), json.loads(config_json)
        # a setting added to TrainingConfig after the checkpoint was written is absent there; absent
        # means its default then (LATER_DEFAULTS; None, i.e. off, for the others), so it is the same run
        keys = sorted(
            k for k in set(old) | set(new) if old.get(k, LATER_DEFAULTS.get(k)) != new.get(k, LATER_DEFAULTS.get(k))
        )
        if keys:
            raise ConformalSegError(
                f"the checkpoint belongs to a run with other settings ({', '.join(keys)})",
                path=path,
                fix="resume with the original command, or start again without --resume",
            )
        return cls(
            data["config_json"],
            int(data["epoch"]),
            data["network"],
            data["optimizer"],
            data["scheduler"],
            data["best_network"],
            data["best_score"],
            data["best_epoch"],
            json.loads(data["log_json"]),
            data["rng_state"],
            float(data.get("elapsed_seconds", 0.0)),
            data.get("weight_average"),
            data.get("best_weights"),
        )
