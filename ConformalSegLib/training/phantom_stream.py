"""Training on phantoms generated on the fly: a fresh phantom for every training sample.

A fixed set of a few dozen phantoms is memorised by a 3D U-Net long before it has seen enough
lesions; generating a new phantom per sample (0.1-0.3 s on one core) removes that ceiling. The
phantom generator (:mod:`ConformalSegLib.phantoms.generator`) is used exactly as it is, with its own lesion
distribution: it is the benchmark, not a knob.

Seeds (all disjoint from :func:`~ConformalSegLib.phantoms.generator.make_phantoms`' ``spawn_key=(index,)``)
------------------------------------------------------------------------------------------------
* training sample ``i``: ``make_phantom(SeedSequence(seed, spawn_key=(0, i)))``;
* held-out phantom ``j`` (checkpoint selection): ``make_phantom(SeedSequence(seed, spawn_key=(1, j)))``.

So sample ``i`` of a run depends only on ``(seed, i)``: epochs, batches and worker processes do not
change what is drawn, and a resumed run continues the same stream. Each sample's patch position and
augmentation come from ``numpy.random.default_rng((seed, 2, i))``.

Several crops per phantom
-------------------------
Generating a phantom is most of a sample's data work on a CPU (``benchmarks/bench_training_step.py``).
With ``crops_per_phantom = K`` training sample ``i`` is a crop of training phantom ``i // K``, so
samples ``K j .. K j + K - 1`` are ``K`` crops of phantom ``j`` (each with its own position, foreground
draw and augmentation from ``default_rng((seed, 2, i))``), as MONAI's ``RandCropByPosNegLabeld`` with
``num_samples = K`` cuts several crops from each loaded volume. ``K`` divides the batch size, so a batch
holds whole phantoms and each phantom is generated once. ``K = 1`` is the stream above, sample for
sample.

Loading
-------
:class:`PhantomStreamSampler` yields batches of an epoch through a ``torch.utils.data.DataLoader``
with ``num_workers`` background processes (0: in the training process), so phantom generation
overlaps the network's forward and backward passes. Batch ``b`` holds samples ``b * B .. b * B + B - 1``
whichever worker builds it, and the loader returns batches in order, so the batches are the same for
any ``num_workers``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..io.volumes import Volume
from .augmentation import AugmentationConfig
from .data import TrainingCase, prepare_case
from .patches import sample_patch


@dataclass(frozen=True)
class PhantomStream:
    """The phantoms of a run (see the module docstring); ``options`` go to ``make_phantom``."""

    seed: int
    options: dict[str, Any] = field(default_factory=dict)

    def training_case(self, index: int) -> TrainingCase:
        """Training sample ``index`` as an in-memory case."""
        return self._case(np.random.SeedSequence(int(self.seed), spawn_key=(0, int(index))), f"stream_{index:07d}")

    def heldout_cases(self, n: int) -> list[TrainingCase]:
        """The ``n`` held-out phantoms used for checkpoint selection."""
        return [
            self._case(np.random.SeedSequence(int(self.seed), spawn_key=(1, j)), f"heldout_{j:03d}")
            for j in range(int(n))
        ]

    def _case(self, seed: np.random.SeedSequence, case_id: str) -> TrainingCase:
        from ..phantoms.generator import make_phantom

        p = make_phantom(seed, case_id=case_id, **self.options)
        return TrainingCase(p.case_id, Volume(p.image, p.geometry, None), Volume(p.labels, p.geometry, None))

    def describe(self, crops_per_phantom: int = 1) -> dict[str, Any]:
        """How the run's phantoms are drawn (recorded in the model card)."""
        crops = int(crops_per_phantom)
        index = "i" if crops == 1 else f"i // {crops}"
        phantom = f"make_phantom(SeedSequence({self.seed}, spawn_key=(0, {index})))"
        return {
            "source": "phantom-stream",
            "phantom_seed": int(self.seed),
            "phantom_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()},
            "train": f"sample i = {phantom}, a fresh phantom per training sample"
            if crops == 1
            else f"sample i = a crop of {phantom}, a fresh phantom per {crops} training samples",
            "heldout": f"phantom j = make_phantom(SeedSequence({self.seed}, spawn_key=(1, j)))",
        }


class _EpochBatches(torch.utils.data.IterableDataset):
    """Batches ``first .. first + count - 1`` of a stream; loader worker ``w`` of ``W`` builds the
    batches ``b`` with ``b % W == w`` (the loader interleaves workers in that order)."""

    def __init__(self, sampler: PhantomStreamSampler, first: int, count: int):
        super().__init__()
        self.sampler, self.first, self.count = sampler, first, count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        size = self.sampler.batch_size
        for batch in range(self.first + worker, self.first + self.count, workers):
            samples = [self.sampler.sample(batch * size + k) for k in range(size)]
            yield torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


class PhantomStreamSampler:
    """Batches of fresh-phantom patches, ``steps_per_epoch`` batches per epoch (see the module docstring)."""

    def __init__(
        self,
        stream: PhantomStream,
        card: Any,
        lesion_labels: Sequence[int],
        patch_size: Sequence[int],
        *,
        batch_size: int,
        steps_per_epoch: int,
        fg_fraction: float,
        augmentation: AugmentationConfig | None,
        num_workers: int = 0,
        crops_per_phantom: int = 1,
    ):
        if crops_per_phantom < 1 or batch_size % crops_per_phantom:
            raise ValueError(f"crops_per_phantom ({crops_per_phantom}) must be >= 1 and divide the batch size")
        self.stream, self.card = stream, card
        self.lesion_labels = tuple(int(v) for v in lesion_labels)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size, self.steps_per_epoch = int(batch_size), int(steps_per_epoch)
        self.fg_fraction, self.augmentation, self.num_workers = float(fg_fraction), augmentation, int(num_workers)
        self.crops_per_phantom = int(crops_per_phantom)
        self._last: tuple[int, Any] | None = None  # (phantom index, prepared case): the batch's phantom

    def __len__(self) -> int:
        return self.steps_per_epoch

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (1, *patch), lesion (1, *patch))`` of training sample ``index`` (a crop of training
        phantom ``index // crops_per_phantom``)."""
        prepared = self._prepared(int(index) // self.crops_per_phantom)
        rng = np.random.default_rng((int(self.stream.seed), 2, int(index)))
        image, lesion, _ = sample_patch(
            prepared, self.patch_size, rng, fg_fraction=self.fg_fraction, augmentation=self.augmentation
        )
        return image, lesion

    def _prepared(self, phantom: int) -> Any:
        """Training phantom ``phantom`` prepared for the network; the last one is kept for its next crops."""
        if self._last is None or self._last[0] != phantom:
            case = self.stream.training_case(phantom)
            self._last = (phantom, prepare_case(self.card, case, self.lesion_labels, self.patch_size))
        return self._last[1]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset = _EpochBatches(self, int(epoch) * self.steps_per_epoch, self.steps_per_epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        yield from loader
