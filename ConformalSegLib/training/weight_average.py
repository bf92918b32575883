"""An exponential moving average (EMA) of the weights during training, validated beside the raw weights;
the better of the two at the best epoch is shipped.

Why
---
With two crops per batch and AdamW at lr 1e-3, the raw weights move a lot from one step to the next:
the fine-tuning of the shipped lesion model saw its validation Dice jump between 0.33 and 0.49 from one
epoch to the next, so the epoch picked as "best" is partly the luck of where the last steps left the
weights. Polyak averaging smooths that walk without changing it.

What
----
After every optimiser step, ``w_ema <- d * w_ema + (1 - d) * w`` for every parameter and buffer
(``d`` = ``TrainingConfig.ema_decay``; the average weighs roughly the last ``1 / (1 - d)`` steps, e.g.
1,000 steps = 4 epochs of 250 at ``d = 0.999``). The first update copies the weights. It is
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(d)`` and ``use_buffers=True``
(the networks' instance normalisation has no running statistics, so nothing needs recomputing after
averaging, unlike batch normalisation in SWA).

The training itself is untouched: the raw weights, the optimiser, the learning-rate schedule and the
random numbers are the same as without the average, so on the CPU the raw trajectory is bit-identical
to a run without it (tested). Only which weights are validated, kept as the best and written changes.
Every epoch validates both: the log records the average's Dice (``val_dice``) and the raw weights'
(``val_dice_raw``), the epoch's candidate is the raw weights when they score strictly higher, else the
average (:func:`~.run_state.epoch_candidate`), and the best candidate over all epochs is written; the card's
``selected_weights`` says which. Validating the raw weights too matters after a warm restart: the
average trails the raw weights by about ``1 / (1 - d)`` steps, and in the lesion_v4 run (decay 0.999)
the raw weights recovered to 0.568 while the average never passed its first epoch's 0.545. Without
held-out cases the final average is written.
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.errors import ConformalSegError


def check_decay(decay: float | None) -> None:
    """``None`` (no average) or a decay strictly between 0 and 1."""
    if decay is not None and (isinstance(decay, bool) or not 0.0 < float(decay) < 1.0):
        raise ConformalSegError(
            f"the weight-average decay must lie strictly between 0 and 1, got {decay!r}",
            fix="use e.g. --ema-decay 0.999 (an average over about the last 1,000 steps), or leave it out",
        )


class WeightAverage:
    """The EMA of ``network``'s weights (see the module docstring); :meth:`update` after every step."""

    def __init__(self, network: torch.nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        check_decay(decay)
        self.decay = float(decay)
        self._source = network
        self._averaged = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    @property
    def network(self) -> torch.nn.Module:
        """The averaged network (same class and state-dict keys as the trained one)."""
        return self._averaged.module

    @property
    def updates(self) -> int:
        """How many steps have been averaged."""
        return int(self._averaged.n_averaged.item())

    def update(self) -> None:
        """Fold the trained network's current weights into the average."""
        self._averaged.update_parameters(self._source)

    def state_dict(self) -> dict[str, Any]:
        """The average and its step count, for the checkpoint (tensors only)."""
        return self._averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""
        self._averaged.load_state_dict(state)
