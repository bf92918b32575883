"""MC dropout and flip TTA: the stochastic passes of one prediction, with reproducible dropout masks.

MC dropout
----------
``predict(volume, mc_dropout=N)`` runs N stochastic passes **as one batch**: inside the predictor
each window batch of ``B`` patches is repeated N times along the batch axis (``B * N`` rows; with
``tta_flips`` also once per flip) and sent through the network in one forward call (``mc_chunk``
splits it into smaller calls when memory is short). Only dropout modules are stochastic: the network
stays in eval mode, so BatchNorm/InstanceNorm use their running statistics.

* **probability** = mean lesion probability over the passes. *This is what calibration uses*: use
  the same ``mc_dropout`` (and seed) for calibration and test cases (it is part of the pipeline).
* **variance** = variance over the passes of the lesion probability (population variance, per
  window, blended over windows like the probabilities).
* **entropy** = predictive entropy (nats) ``H(p_mean)`` of the mean class distribution (all
  softmax classes; binary entropy of the lesion channel for sigmoid), per window, blended.

**Per-pass seeding.** With ``seed`` set (default 0) dropout masks do not come from the global RNG:
a forward hook on every ``nn.Dropout``/``Dropout1d/2d/3d`` multiplies the (eval-mode, identity)
dropout output by a mask drawn, for each pass, from a generator seeded with ``(seed, dropout module,
pass index, positions of the windows in the batch)`` -- one draw per pass, module and window batch,
the same number of random-number calls as ordinary train-mode dropout. Pass ``n``'s mask therefore
does not depend on which other passes share the forward call: the batched passes draw *exactly* the
masks the sequential passes (``mc_chunk=1``) draw, and repeated runs are reproducible. (The masks do
depend on how windows are grouped, i.e. on ``sw_batch_size``: another batch size gives another,
equally valid, Monte Carlo sample.)

Why bit-identity needs this: with ``seed=None`` (and for TorchScript models, whose submodules cannot
take hooks) the dropout modules are switched to train mode and draw from the global RNG. Then the
batched run makes one ``B*N``-row draw per module while the sequential run makes N ``B``-row draws
interleaved with the other modules' draws: the same random stream is consumed in a different order,
so pass ``n`` of one run gets different masks from pass ``n`` of the other. Both are valid MC samples
of the same distribution and agree statistically (within Monte Carlo error), not bit for bit. Even
with identical masks, results can differ in the last bits where the backend picks another
convolution algorithm for another batch size (cuDNN, TF32; oneDNN for batch 1 vs larger): identical
up to float rounding there, bit-identical where the backend is batch-size invariant (oneDNN CPU
convolutions for batches >= 2, which the tests check).

Flip TTA averages over the 8 combinations of flipping the three spatial axes of each window (flip, predict,
flip back), also in the same batch; or over the first N of them (:func:`flip_count`), for N times the cost of
one pass instead of 8.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..common.errors import ConformalSegError

__all__ = ["ALL_FLIPS", "DROPOUT_NAMES", "MCDropout", "MCDropoutInactiveWarning", "flip_count", "variants"]

#: All flips of the three spatial axes of a (batch, channel, d0, d1, d2) tensor, identity first.
ALL_FLIPS: tuple[tuple[int, ...], ...] = tuple(dims for r in range(4) for dims in itertools.combinations((2, 3, 4), r))
#: Class names of the dropout modules (the first four take seeded hooks).
DROPOUT_NAMES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")


class MCDropoutInactiveWarning(UserWarning):
    """All MC dropout passes were identical (zero variance everywhere): dropout had no effect."""


def flip_count(tta_flips: bool | int | None) -> int:
    """How many flips a prediction averages: ``False``/``None`` -> 1 (none), ``True`` -> all 8, or a count
    ``N`` in 1..8, meaning the first ``N`` of :data:`ALL_FLIPS` (identity, then each single axis, then each pair,
    then all three: ``N = 4`` is the identity and the three single-axis flips)."""
    if tta_flips is None or tta_flips is False:
        return 1
    if tta_flips is True:
        return len(ALL_FLIPS)
    if not isinstance(tta_flips, (int, np.integer)) or not 1 <= int(tta_flips) <= len(ALL_FLIPS):
        raise ConformalSegError(
            f"the number of test-time flips must be 1..{len(ALL_FLIPS)}, got {tta_flips!r}",
            fix="e.g. --tta (all 8) or --tta 4 (the identity and the three single-axis flips)",
        )
    return int(tta_flips)


def variants(mc_dropout: int, tta_flips: bool | int | None) -> list[tuple[tuple[int, ...], int | None]]:
    """The stochastic samples of one prediction, in their fixed order: ``(flip dims, MC pass or None)``
    (``tta_flips`` as :func:`flip_count` reads it)."""
    flips = ALL_FLIPS[: flip_count(tta_flips)]
    passes: tuple[int | None, ...] = tuple(range(mc_dropout)) if mc_dropout else (None,)
    return [(f, n) for f in flips for n in passes]


class MCDropout:
    """The network's dropout modules and how they are switched on for one forward call.

    ``seeded`` (a seed is given, the network is not TorchScript and every dropout module is an
    ``nn.Dropout``/``Dropout1d/2d/3d``): forward hooks draw per-pass masks (:class:`_SeededDropout`);
    otherwise the modules go to train mode and draw from the global RNG (module docstring).
    """

    def __init__(self, network: torch.nn.Module, seed: int | None, is_torchscript: bool):
        self.state = _MCState(seed)
        self.modules = _find_dropouts(network, is_torchscript)
        self.seeded = (
            seed is not None
            and not is_torchscript
            and bool(self.modules)
            and all(type(m).__name__ in DROPOUT_NAMES[:4] for m in self.modules)
        )
        if self.seeded:
            for index, module in enumerate(self.modules):
                module.register_forward_hook(_SeededDropout(self.state, index, type(module) is not torch.nn.Dropout))

    @contextlib.contextmanager
    def active(self, slab_keys: list | None, active: bool) -> Iterator[None]:
        """Switch dropout on for one forward call (seeded hooks or train-mode modules)."""
        if not active:
            yield
            return
        if self.seeded:
            self.state.slab_keys = slab_keys
            try:
                yield
            finally:
                self.state.slab_keys = None
            return
        for module in self.modules:
            module.train(True)
        try:
            yield
        finally:
            for module in self.modules:
                module.train(False)


def _find_dropouts(network: torch.nn.Module, is_torchscript: bool) -> list[torch.nn.Module]:
    found = []
    for _, module in network.named_modules():
        name = getattr(module, "original_name", None) if is_torchscript else type(module).__name__
        if is_torchscript and name in DROPOUT_NAMES:
            found.append(module)
        elif not is_torchscript and isinstance(module, torch.nn.modules.dropout._DropoutNd):
            found.append(module)
    return found


def _slab_seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _SeededDropout:
    """Forward hook giving an eval-mode ``nn.Dropout*`` module reproducible per-pass masks.

    ``state.slab_keys`` switches it on (``None`` keeps the module an identity): one key per *slab*,
    the consecutive batch rows that hold one stochastic sample (MC pass x flip) of the current window
    batch, e.g. ``(sample index, window starts)``. Each slab's mask is drawn in one call from a
    generator seeded with ``(seed, module index, key)``, so it does not depend on which other slabs
    share the forward call. Elementwise masks for ``nn.Dropout``, per-channel masks for
    ``Dropout1d/2d/3d``; kept values are scaled by ``1 / (1 - p)`` exactly like train-mode dropout.
    """

    def __init__(self, state: _MCState, index: int, channelwise: bool):
        self.state = state
        self.index = index
        self.channelwise = channelwise

    def __call__(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        keys = self.state.slab_keys
        p = float(module.p)  # type: ignore[arg-type]  # a float on every nn.Dropout*
        if keys is None or p <= 0.0:
            return None
        rows = output.shape[0]
        if rows % len(keys):
            raise RuntimeError(f"dropout hook got {rows} rows for {len(keys)} slabs")
        if p >= 1.0:
            return torch.zeros_like(output)
        row_shape = (output.shape[1],) + (1,) * (output.dim() - 2) if self.channelwise else tuple(output.shape[1:])
        uniform = torch.empty((rows,) + row_shape, dtype=torch.float32, device=output.device)
        generator = self.state.generator(output.device)
        per_slab = rows // len(keys)
        for slab, key in enumerate(keys):  # one seeded uniform draw per slab, in place
            generator.manual_seed(_slab_seed(self.state.seed, self.index, key))
            uniform[slab * per_slab : (slab + 1) * per_slab].uniform_(generator=generator)
        dropped = uniform >= 1.0 - p  # P(dropped) = p
        return output.masked_fill(dropped, 0).mul_(1.0 / (1.0 - p))


@dataclass
class _MCState:
    seed: int | None
    slab_keys: list | None = None
    _generators: dict = field(default_factory=dict)

    def generator(self, device: torch.device) -> torch.Generator:
        """One reusable generator per device (re-seeded for every draw)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]
