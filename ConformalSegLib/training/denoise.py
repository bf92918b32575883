"""Train a quantile regression 3D U-Net for CT denoising and write it as a model folder.

Task
----
Input: a noisy image ``y``; target: the clean image ``x`` (both in the same units, for the
phantom task windowed HU -175..250 -> [0, 1] with Gaussian noise sigma 0.2 added *before* the data
reach this module, see :mod:`ConformalSegLib.semcrc.phantom_denoising`). The network (MONAI
``UNet``, one input channel, one output channel per quantile level, no activation) is trained with
the pinball loss (:class:`~ConformalSegLib.training.losses.PinballLoss`), by default for the 10th and
90th percentiles, so ``[q_0.1(y), q_0.9(y)]`` is a heuristic 80 % interval for each voxel of ``x``
-- the intervals that CRC / sem-CRC (:mod:`ConformalSegLib.semcrc`) then calibrate.

Pipeline (exchangeability)
--------------------------
The model card's preprocessing is applied with :func:`~ConformalSegLib.inference.preprocessing.build_preprocessing`
exactly as the inference engine does (the default card has no resampling and intensity ``none``:
the noisy windowed image goes in as it is); the clean target gets the same spatial transforms and
no intensity transform (the outputs are in the input's units). Training uses seeded uniformly
random crops of ``crop_size`` (network axes ``[d0, d1, d2]`` = ``[x, y, z]``); inference slides
windows of ``patch_size`` with Gaussian blending.

Held-out metrics (written to the card's ``training`` section and ``training.json``): with the real
:class:`~ConformalSegLib.inference.engine.InferenceEngine` on each held-out case's own grid,

* ``coverage``: fraction of voxels with ``q_lo <= x <= q_hi`` (nominal ``q_hi - q_lo`` levels, 0.8);
* ``mean_length``: mean of ``q_hi - q_lo`` (output units);

pooled over all voxels of all held-out cases, and over the voxels with a positive label
(``body_*``: inside the phantom, excluding air) when label maps are given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..common.errors import ConformalSegError
from ..io.checksums import sha256_file
from ..io.volumes import Volume, check_same_geometry
from .config import check_network_and_batches
from .losses import DEFAULT_QUANTILES, PinballLoss
from .model_folder import LOG_FILE, LOG_FORMAT, WEIGHTS_FILE, check_output_folder, staged_model_folder, write_json
from .optimization import LR_SCHEDULES, CancelToken, ProgressCallback, TrainingCancelled, fit
from .trainer import TrainingResult

TASK = "denoise"
#: ``TrainingResult.heldout`` without held-out pairs.
NO_HELDOUT: dict[str, Any] = {
    "cases": [],
    "coverage": None,
    "mean_length": None,
    "body_coverage": None,
    "body_mean_length": None,
}


@dataclass(frozen=True)
class DenoisingPair:
    """One training / held-out case: ``noisy`` input, ``clean`` target (same grid), optional ``labels``
    (organ label map, only used for the held-out ``body_*`` metrics)."""

    case_id: str
    noisy: Volume
    clean: Volume
    labels: Volume | None = None


@dataclass(frozen=True)
class DenoisingConfig:
    """A quantile denoiser training run. Sizes are in network axes ``[x, y, z]``; each patch and crop
    axis must be divisible by the product of ``strides``. The defaults fit the coarse phantoms of
    :mod:`ConformalSegLib.semcrc.phantom_denoising` (48 x 48 x 24 voxels: one window per case)."""

    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    epochs: int = 40
    patch_size: tuple[int, int, int] = (48, 48, 24)
    crop_size: tuple[int, int, int] | None = (32, 32, 16)
    spacing_mm: tuple[float, float, float] | None = None
    orientation: str | None = None
    intensity: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    channels: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (2, 2)
    num_res_units: int = 1
    dropout: float = 0.0
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"  #: "cosine" (decay to 0 over all steps), "poly" or "constant"
    batch_size: int = 4
    samples_per_case: int = 4
    overlap: float = 0.25
    sw_batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    name: str = "denoiser_quantile"

    @property
    def crops(self) -> tuple[int, int, int]:
        return tuple(int(c) for c in (self.crop_size or self.patch_size))  # type: ignore[return-value]

    def validate(self) -> None:
        """Raise :class:`ConformalSegError` for settings that cannot train."""
        levels = self.quantiles
        if len(levels) < 2 or any(not 0 < q < 1 for q in levels) or any(b <= a for a, b in zip(levels, levels[1:])):
            raise ConformalSegError(
                f"quantile levels must be at least two, strictly increasing in (0, 1), got {list(levels)}",
                fix="e.g. --quantiles 0.1 0.9",
            )
        check_network_and_batches(self, example_size="32 32 16")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConformalSegError(
                f"unknown learning-rate schedule {self.lr_schedule!r}", fix=f"use one of {', '.join(LR_SCHEDULES)}"
            )
        if not 0.0 <= self.dropout < 1.0 or not self.learning_rate > 0:
            raise ConformalSegError("dropout must lie in [0, 1) and the learning rate must be positive")

    def network_args(self) -> dict[str, Any]:
        return {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(self.quantiles),
            "channels": [int(c) for c in self.channels],
            "strides": [int(s) for s in self.strides],
            "num_res_units": int(self.num_res_units),
            "dropout": float(self.dropout),
        }


def build_denoiser_card(config: DenoisingConfig, base_dir: str | PathLike[str], training: dict[str, Any] | None = None):
    """The quantile model card of a denoiser trained with ``config`` (weights ``base_dir/weights.pt``)."""
    from ..inference.card_format import FORMAT, FORMAT_VERSION, QUANTILE_ACTIVATION
    from ..inference.model_card import ModelCard

    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": config.name,
        "source": {"state_dict": {"network": "UNet", "args": config.network_args(), "weights": WEIGHTS_FILE}},
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
        "output": {"activation": QUANTILE_ACTIVATION, "quantiles": [float(q) for q in config.quantiles]},
        "training": training or {},
    }
    return ModelCard.from_dict(data, None, base_dir=base_dir)


# ----------------------------------------------------------------------------- data


def prepare_pair(card, pair: DenoisingPair, crop_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, target)`` tensors ``(1, d0, d1, d2)`` on the network grid (module docstring)."""
    from monai.transforms import ResampleToMatch

    from ..inference.preprocessing import build_preprocessing
    from .data import _pad_to, to_meta_tensor

    check_same_geometry(pair.noisy, pair.clean, what="noisy and clean images")
    spatial, intensity = build_preprocessing(card)
    image, target = to_meta_tensor(pair.noisy), to_meta_tensor(pair.clean)
    if not (bool(torch.isfinite(image.as_tensor()).all()) and bool(torch.isfinite(target.as_tensor()).all())):
        raise ConformalSegError(
            f"case {pair.case_id!r} has NaN or infinite voxels", path=pair.noisy.path, fix="fix or re-export the images"
        )
    if spatial is not None:
        image = spatial(image)
        target = ResampleToMatch(mode="bilinear", padding_mode="border")(target, img_dst=image)
    image_t = image.as_tensor() if hasattr(image, "as_tensor") else image
    if intensity is not None:
        image_t = intensity(image_t)
        image_t = image_t.as_tensor() if hasattr(image_t, "as_tensor") else image_t
    target_t = target.as_tensor() if hasattr(target, "as_tensor") else target
    return (
        _pad_to(image_t.to(torch.float32), crop_size).contiguous(),
        _pad_to(target_t.to(torch.float32), crop_size).contiguous(),
    )


class CropSampler:
    """Seeded uniformly random crops; an epoch's batches depend only on ``(seed, epoch)``."""

    def __init__(
        self,
        tensors: Sequence[tuple[torch.Tensor, torch.Tensor]],
        crop_size: Sequence[int],
        *,
        samples_per_case: int,
        batch_size: int,
        seed: int,
    ):
        if not tensors:
            raise ConformalSegError("the training set is empty", fix="give training cases (e.g. --phantoms N, N >= 1)")
        self.tensors = list(tensors)
        self.crop = np.array([int(c) for c in crop_size])
        self.samples_per_case = int(samples_per_case)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return -(-len(self.tensors) * self.samples_per_case // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng((self.seed, int(epoch)))
        crops = []
        for image, target in self.tensors:
            shape = np.array(image.shape[1:])
            for _ in range(self.samples_per_case):
                start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.crop)]
                box = (slice(None),) + tuple(slice(a, a + c) for a, c in zip(start, self.crop))
                crops.append((image[box], target[box]))
        order = rng.permutation(len(crops))
        for first in range(0, len(order), self.batch_size):
            chosen = [crops[int(i)] for i in order[first : first + self.batch_size]]
            yield torch.stack([c[0] for c in chosen]), torch.stack([c[1] for c in chosen])


# ----------------------------------------------------------------------------- evaluation


def interval_metrics(
    lower: np.ndarray, upper: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """``coverage`` (fraction with ``lower <= truth <= upper``), ``mean_length`` and ``voxels``."""
    lo, hi, x = (np.asarray(a, dtype=np.float64) for a in (lower, upper, truth))
    if mask is not None:
        lo, hi, x = lo[mask], hi[mask], x[mask]
    if lo.size == 0:
        return {"coverage": math.nan, "mean_length": math.nan, "voxels": 0}
    return {
        "coverage": float(np.mean((lo <= x) & (x <= hi))),
        "mean_length": float(np.mean(hi - lo)),
        "voxels": int(lo.size),
    }


def evaluate_denoiser(
    card_or_engine,
    pairs: Sequence[DenoisingPair],
    *,
    device: str | torch.device = "auto",
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Held-out coverage of ``[q_lo, q_hi]`` and mean length (module docstring), per case and pooled."""
    from ..inference.engine import InferenceEngine

    engine = (
        card_or_engine
        if isinstance(card_or_engine, InferenceEngine)
        else InferenceEngine(card_or_engine, device=device, cancel=cancel)
    )
    rows = []
    sums = {"all": [0.0, 0.0, 0], "body": [0.0, 0.0, 0]}
    for pair in pairs:
        prediction = engine.predict_quantiles(pair.noisy)
        row: dict[str, Any] = {"case_id": pair.case_id, "seconds": round(float(prediction.seconds), 4)}
        masks: dict[str, np.ndarray | None] = {"all": None}
        if pair.labels is not None:
            masks["body"] = np.asarray(pair.labels.array) > 0
        for key, mask in masks.items():
            m = interval_metrics(prediction.lower, prediction.upper, pair.clean.array, mask)
            row.update({f"{key}_coverage": m["coverage"], f"{key}_mean_length": m["mean_length"]})
            if m["voxels"]:
                sums[key][0] += m["coverage"] * m["voxels"]
                sums[key][1] += m["mean_length"] * m["voxels"]
                sums[key][2] += m["voxels"]
        rows.append(row)
    levels = list(engine.card.output.quantiles or ())
    out: dict[str, Any] = {"cases": rows, "quantiles": levels, "nominal_coverage": levels[-1] - levels[0]}
    for key, (cov, length, n) in sums.items():
        out[f"{key}_coverage"] = cov / n if n else None
        out[f"{key}_mean_length"] = length / n if n else None
    out["coverage"], out["mean_length"] = out["all_coverage"], out["all_mean_length"]
    out["mean_seconds_per_case"] = float(np.mean([r["seconds"] for r in rows])) if rows else None
    return out


# ----------------------------------------------------------------------------- training


def train_denoiser(
    config: DenoisingConfig,
    train_pairs: Sequence[DenoisingPair],
    heldout_pairs: Sequence[DenoisingPair],
    out: str | PathLike[str],
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    data_info: dict[str, Any] | None = None,
    command: str | None = None,
) -> TrainingResult:
    """Train, evaluate on ``heldout_pairs`` and write the model folder ``out`` (``model_card.json``,
    ``weights.pt``, ``training.json``; atomically, like :func:`~ConformalSegLib.training.train`).
    ``TrainingResult.heldout`` holds :func:`evaluate_denoiser`'s metrics (empty cases when none)."""
    from monai.networks.nets import UNet
    from monai.utils import set_determinism

    from ..inference.card_format import CARD_FILE
    from ..inference.engine import InferenceCancelled, resolve_device

    start = time.perf_counter()
    config.validate()
    out = check_output_folder(out, force=force)
    device = resolve_device(config.device)
    set_determinism(seed=config.seed)
    template = build_denoiser_card(config, out)
    tensors = [prepare_pair(template, pair, config.crops) for pair in train_pairs]
    sampler = CropSampler(
        tensors, config.crops, samples_per_case=config.samples_per_case, batch_size=config.batch_size, seed=config.seed
    )
    network = UNet(**config.network_args()).to(device)
    loss_fn = PinballLoss(config.quantiles).to(device)
    epochs = fit(
        network,
        sampler,
        lambda images, targets: loss_fn(network(images), targets),
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_schedule=config.lr_schedule,
        device=device,
        progress=progress,
        cancel=cancel,
        loss_label="pinball",
    )
    train_seconds = time.perf_counter() - start

    with staged_model_folder(out, network, force=force) as staging:
        card = build_denoiser_card(config, staging)
        try:
            heldout = evaluate_denoiser(card, heldout_pairs, device=device, cancel=cancel) if heldout_pairs else {}
            heldout = heldout or dict(NO_HELDOUT)
        except InferenceCancelled as exc:
            raise TrainingCancelled("training was cancelled during the held-out evaluation") from exc
        wall = time.perf_counter() - start
        training = _denoiser_record(
            config, train_pairs, heldout_pairs, epochs, heldout, data_info, command, device, train_seconds, wall
        )
        training["weights_sha256"] = sha256_file(staging / WEIGHTS_FILE)
        build_denoiser_card(config, staging, training).save(staging / CARD_FILE)
        log = {"format": LOG_FORMAT, "format_version": 1, "task": TASK, "config": asdict(config), "epochs": epochs,
               "heldout": heldout, "training": training}  # fmt: skip
        write_json(staging / LOG_FILE, log)
    return TrainingResult(
        out=out,
        card_path=out / CARD_FILE,
        weights_path=out / WEIGHTS_FILE,
        epoch_losses=[e["loss"] for e in epochs],
        heldout=heldout,
        wall_seconds=wall,
    )


def _denoiser_record(
    config: DenoisingConfig,
    train_pairs: Sequence[DenoisingPair],
    heldout_pairs: Sequence[DenoisingPair],
    epochs: list[dict[str, Any]],
    heldout: dict[str, Any],
    data_info: dict[str, Any] | None,
    command: str | None,
    device: torch.device,
    train_seconds: float,
    wall: float,
) -> dict[str, Any]:
    """The card's ``training`` section of a denoiser (without the weights' SHA-256)."""
    import monai

    return {
        "package": "conformalseg",
        "version": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "task": TASK,
        "command": command,
        "data": data_info or {},
        "seed": config.seed,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "train_cases": len(train_pairs),
        "train_case_ids": [p.case_id for p in train_pairs],
        "heldout_cases": len(heldout_pairs),
        "heldout_case_ids": [p.case_id for p in heldout_pairs],
        "epochs": config.epochs,
        "loss": "pinball",
        "quantiles": list(config.quantiles),
        "optimizer": {"name": "Adam", "learning_rate": config.learning_rate, "schedule": config.lr_schedule},
        "crop_size": list(config.crops),
        "batch_size": config.batch_size,
        "samples_per_case": config.samples_per_case,
        "final_loss": epochs[-1]["loss"],
        "heldout_coverage": heldout.get("coverage"),
        "heldout_mean_length": heldout.get("mean_length"),
        "heldout_body_coverage": heldout.get("body_coverage"),
        "heldout_body_mean_length": heldout.get("body_mean_length"),
        "heldout_nominal_coverage": config.quantiles[-1] - config.quantiles[0],
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
    }


def phantom_denoising_pairs(n: int, seed: int, *, first: int = 0, **options: Any) -> list[DenoisingPair]:
    """``n`` pairs from :func:`ConformalSegLib.semcrc.phantom_denoising.denoising_cases` (in memory;
    ``options``: ``shape``, ``spacing``, ``sigma``)."""
    from ..semcrc.phantom_denoising import denoising_cases

    return [
        DenoisingPair(
            c.case_id,
            Volume(c.noisy, c.geometry, None),
            Volume(c.clean, c.geometry, None),
            Volume(c.organs, c.geometry, None),
        )
        for c in denoising_cases(n, seed, first=first, **options)
    ]


def folder_denoising_pairs(root: str | PathLike[str]) -> list[DenoisingPair]:
    """Pairs from a folder holding ``noisy/`` and ``clean/`` (and optionally ``organs/``) with the same
    case ids (as written by :func:`~ConformalSegLib.semcrc.phantom_denoising.write_denoising_dataset`),
    sorted by case id. The volumes are read here."""
    from ..io.dataset import scan_folder
    from ..io.volumes import load_image, load_label_map

    root = Path(root)
    if not (root / "noisy").is_dir() or not (root / "clean").is_dir():
        raise ConformalSegError(
            "the denoising data folder has no noisy/ and clean/ folders",
            path=root,
            fix="write one with write_denoising_dataset(out, n, seed), or use --phantoms N",
        )
    noisy, clean = scan_folder(root / "noisy", probability=False), scan_folder(root / "clean", probability=False)
    organs = scan_folder(root / "organs", probability=False) if (root / "organs").is_dir() else {}
    unmatched = sorted(set(noisy) ^ set(clean))
    if unmatched:
        raise ConformalSegError(
            f"noisy/ and clean/ do not hold the same case ids (e.g. {unmatched[0]!r})",
            path=root,
            fix="give every noisy image a clean image with the same file name",
        )
    return [
        DenoisingPair(
            cid, load_image(noisy[cid]), load_image(clean[cid]), load_label_map(organs[cid]) if cid in organs else None
        )
        for cid in sorted(noisy)
    ]
