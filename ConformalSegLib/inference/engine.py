"""The inference engine: a CT volume in, a lesion probability map on exactly the same grid out.

Pipeline (everything fixed by the :class:`~ConformalSegLib.inference.model_card.ModelCard`)
---------------------------------------------------------------------------------------------
1. **Axes and world space** (written once, in :func:`network_affine` / :func:`to_network_axes`).
   A :class:`~ConformalSegLib.io.volumes.Volume` holds a numpy ``(z, y, x)`` array and an ITK geometry
   (spacing/origin/direction in ``(x, y, z)`` order, world space **LPS**: +x = patient Left,
   +y = Posterior, +z = Superior). MONAI (like nibabel) expects channel-first tensors whose spatial
   axes are the index axes ``(i, j, k)`` = ``(x, y, z)`` and an affine to world space **RAS**
   (+x = Right, +y = Anterior). So the engine

   * transposes the array ``(z, y, x) -> (x, y, z)`` (a view; no copy until the tensor is built), and
   * builds the affine ``A_ras = diag(-1, -1, 1, 1) @ A_lps`` with ``A_lps = [D @ diag(spacing) | origin]``
     (:meth:`Geometry.ijk_to_lps`): flipping the sign of the first two world coordinates converts
     LPS to RAS; the voxel axes are untouched.

   This is exactly what ``monai.transforms.LoadImage`` produces for the same file (its readers
   convert ITK's LPS to RAS and reverse the index order), so a network trained with a MONAI
   ``LoadImage -> Orientation -> Spacing`` pipeline sees the same tensor here (tested).
2. **Preprocessing** on a :class:`monai.data.MetaTensor`: ``Orientation`` (card ``orientation``,
   RAS axis codes), ``Spacing`` (card ``spacing_mm``, trilinear, border padding), then intensity
   (``ScaleIntensityRange`` / ``NormalizeIntensity``). Spatial transforms record themselves in the
   MetaTensor, so their exact inverse is known.
3. **Sliding window**: :func:`monai.inferers.sliding_window_inference` with the card's patch size,
   overlap and blending (Gaussian), on the chosen device, under ``torch.inference_mode`` and, on
   CUDA with ``amp``, ``torch.autocast(float16)``. The predictor applies the activation per window, so
   windows are blended in **probability** space: the probability map is the Gaussian-weighted average
   over overlapping windows of each window's probability (mean over the stochastic samples with MC
   dropout / flips). Only the lesion channel is stitched (plus variance and entropy with MC dropout),
   which keeps the stitching buffer small for many-class networks.
4. **Back to the input grid**: the stitched maps are given the preprocessed image's metadata and
   the recorded spatial transforms are inverted (``Spacing`` inverse = trilinear resampling onto the
   original affine and shape; ``Orientation`` inverse = exact axis permutation/flip), then transposed
   back to ``(z, y, x)``. The result has the input volume's exact shape, spacing, origin and direction.

Quantile regression cards
-------------------------
For a card with ``output.quantiles`` (see :mod:`~ConformalSegLib.inference.model_card`)
:meth:`InferenceEngine.predict_quantiles` runs the same pipeline with **no activation**: every
output channel (one per quantile level) is blended over windows (the same Gaussian weighting, now
of regression values) and mapped back to the input grid by the same inverse resampling; nothing is
clipped. Quantiles that cross after blending and resampling are put in order per voxel (sorting the
channels, the monotone rearrangement of Chernozhukov et al.); the number of crossing voxels is
reported in ``info["crossing_voxels"]``. MC dropout and flip TTA are lesion-only options.
:meth:`InferenceEngine.predict` refuses quantile cards and :meth:`~InferenceEngine.predict_quantiles`
refuses probability cards, so the lesion path is unchanged.

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

Flip TTA averages over all 8 combinations of flipping the three spatial axes of each window
(flip, predict, flip back), also in the same batch.

CUDA out of memory
------------------
On ``torch.cuda.OutOfMemoryError`` the window pass is retried with half the stochastic samples per
forward call (MC passes x flips, down to 1: the masks stay the same), then with half the
``sw_batch_size`` (down to 1), then with the stitching buffer on the CPU
(``sliding_window_inference(device="cpu", sw_device="cuda")``); an OOM outside the network (the
stitching buffer) goes straight to CPU stitching. What worked is kept for the next cases. If nothing
works a :class:`ConformalSegError` explains what to change. Tests inject OOMs on the CPU through
``engine._oom_if(rows, stage) -> bool`` (``stage`` is ``"device"`` or ``"host"``), called before
every forward.

The engine is not thread safe (one ``predict`` at a time); ``cancel`` may be set from another thread.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import torch

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry, geometry_from_ijk_to_ras
from ..io.volumes import Volume
from .model_card import ModelCard, resolve_model

ProgressCallback = Callable[[int, int, str], None]
CancelToken = Callable[[], bool] | threading.Event

#: MONAI's RAS axis labels (given explicitly so ``Orientation`` never guesses the space).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: All flips of the three spatial axes of a (batch, channel, d0, d1, d2) tensor, identity first.
ALL_FLIPS: tuple[tuple[int, ...], ...] = tuple(
    dims for r in range(4) for dims in itertools.combinations((2, 3, 4), r))
#: numpy dtypes uploaded as they are (converted to float32 on the device).
_TORCH_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int16, np.int32, np.int64,
                                            np.uint8, np.int8, np.bool_))
_DROPOUT_NAMES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")


class InferenceCancelled(Exception):
    """Raised by :meth:`InferenceEngine.predict` when its ``cancel`` token is set (checked between
    window batches and between the forward calls of one batch)."""


class DeviceFallbackWarning(UserWarning):
    """``device="cuda"`` was asked for but CUDA is not available: the engine runs on the CPU."""


class MCDropoutInactiveWarning(UserWarning):
    """All MC dropout passes were identical (zero variance everywhere): dropout had no effect."""


# ----------------------------------------------------------------------------- axes and world space


def network_affine(geometry: Geometry) -> np.ndarray:
    """4x4 affine mapping the MONAI voxel index ``(d0, d1, d2) = (i, j, k)`` to **RAS** mm.

    :meth:`Geometry.ijk_to_ras`: the ITK index-to-LPS matrix with the x and y world coordinates
    negated. The voxel axes are the ITK index axes, i.e. the numpy ``(z, y, x)`` array transposed
    (:func:`to_network_axes`).
    """
    return geometry.ijk_to_ras()


def to_network_axes(array_zyx: np.ndarray) -> np.ndarray:
    """numpy ``(z, y, x)`` -> MONAI ``(x, y, z)`` (a view)."""
    return np.asarray(array_zyx).transpose(2, 1, 0)


def from_network_axes(array_xyz):
    """MONAI ``(x, y, z)`` -> numpy ``(z, y, x)`` (numpy array or torch tensor; a view)."""
    if isinstance(array_xyz, torch.Tensor):
        return array_xyz.permute(2, 1, 0)
    return np.asarray(array_xyz).transpose(2, 1, 0)


def geometry_from_affine(affine_ras: np.ndarray, shape_xyz: Sequence[int]) -> Geometry:
    """The :class:`Geometry` of a MONAI tensor with RAS ``affine`` and spatial shape ``(x, y, z)``."""
    return geometry_from_ijk_to_ras(affine_ras, tuple(reversed(tuple(shape_xyz))))


# ----------------------------------------------------------------------------- preprocessing


def build_preprocessing(card: ModelCard):
    """The card's preprocessing as MONAI transforms: ``(spatial, intensity)``, either may be None.

    ``spatial`` is a ``Compose`` of ``Orientation`` (card ``orientation``, RAS axis codes) and
    ``Spacing`` (card ``spacing_mm``, trilinear, border padding) for a channel-first
    :class:`monai.data.MetaTensor` in network axes (see :func:`network_affine`); being invertible,
    the engine uses it to map outputs back to the input grid. ``intensity`` is
    ``ScaleIntensityRange`` (``window``) or ``NormalizeIntensity`` (``zscore``). The engine and the
    trainer (:mod:`ConformalSegLib.training`) both build their transforms here, so training and
    inference preprocess identically (exchangeability needs that).
    """
    from monai.transforms import Compose, NormalizeIntensity, Orientation, ScaleIntensityRange, Spacing

    pre = card.preprocessing
    spatial = []
    if pre.orientation is not None:
        spatial.append(Orientation(axcodes=pre.orientation, labels=RAS_LABELS))
    if pre.spacing_mm is not None:
        spatial.append(Spacing(pixdim=pre.spacing_mm, mode="bilinear", padding_mode="border"))
    intensity = pre.intensity
    if intensity.kind == "window":
        norm = ScaleIntensityRange(a_min=intensity.a_min, a_max=intensity.a_max, b_min=intensity.b_min,
                                   b_max=intensity.b_max, clip=intensity.clip)
    elif intensity.kind == "zscore":
        norm = NormalizeIntensity(subtrahend=intensity.mean, divisor=intensity.std, nonzero=False,
                                  channel_wise=False)  # one input channel
    else:
        norm = None
    return (Compose(spatial) if spatial else None), norm


# ----------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """A network's output on the input volume's grid (numpy ``(z, y, x)``, float32)."""

    probability: np.ndarray
    geometry: Geometry
    variance: np.ndarray | None = None  # MC dropout only
    entropy: np.ndarray | None = None  # MC dropout only (nats)
    mc_passes: int = 0
    tta_flips: int = 1  # number of flip combinations averaged (1 = none, 8 = all)
    seconds: float = 0.0
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    def volume(self, which: str = "probability", path: str | None = None) -> Volume:
        """``probability``/``variance``/``entropy`` as a :class:`Volume` on the input grid."""
        array = getattr(self, which)
        if array is None:
            raise ValueError(f"this prediction has no {which} map (run with mc_dropout > 0)")
        return Volume(array, self.geometry, path)


@dataclass
class QuantilePrediction:
    """A quantile regression network's output on the input volume's grid.

    ``maps`` is float32 ``(Q, z, y, x)``: ``maps[c]`` estimates the ``levels[c]`` quantile, in the
    card's output units (for the phantom denoiser: windowed intensity, nominally [0, 1]);
    ``maps`` is non-decreasing along ``c`` at every voxel.
    """

    levels: tuple[float, ...]
    maps: np.ndarray
    geometry: Geometry
    seconds: float = 0.0
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lower(self) -> np.ndarray:
        """The lowest-level quantile map (the interval's lower bound), ``(z, y, x)``."""
        return self.maps[0]

    @property
    def upper(self) -> np.ndarray:
        """The highest-level quantile map (the interval's upper bound), ``(z, y, x)``."""
        return self.maps[-1]

    def volume(self, which: str | int = "lower", path: str | None = None) -> Volume:
        """``"lower"``, ``"upper"`` or channel index ``c`` as a :class:`Volume` on the input grid."""
        array = {"lower": self.lower, "upper": self.upper}.get(which) if isinstance(which, str) else self.maps[which]
        if array is None:
            raise ValueError(f"unknown quantile map {which!r}: use 'lower', 'upper' or a channel index")
        return Volume(array, self.geometry, path)


# ----------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU. ``"cuda[:N]"`` without CUDA: CPU plus a
    :class:`DeviceFallbackWarning` (not an error)."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConformalSegError(f"unknown device {device!r}", fix="use auto, cpu or cuda (cuda:N)") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ConformalSegError(f"unsupported device {device!r}", fix="use auto, cpu or cuda (cuda:N)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("device 'cuda' was requested but CUDA is not available (no GPU, or PyTorch was "
                      "built without CUDA): running on the CPU instead", DeviceFallbackWarning, stacklevel=3)
        return torch.device("cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConformalSegError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPU(s))",
                                fix="use cuda:0 .. cuda:N-1, or auto")
    return resolved


def count_windows(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI uses for one image (same rule as ``sliding_window_inference``:
    the image is padded to at least the patch size; interval ``int(patch * (1 - overlap))``)."""
    from monai.data.utils import dense_patch_slices

    size = [max(int(i), int(p)) for i, p in zip(image_size, patch_size)]
    interval = [p if p == i else max(int(p * (1 - overlap)), 1) for i, p in zip(size, patch_size)]
    return len(dense_patch_slices(size, list(patch_size), interval))


# ----------------------------------------------------------------------------- seeded dropout


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

    def __init__(self, state: "_MCState", index: int, channelwise: bool):
        self.state = state
        self.index = index
        self.channelwise = channelwise

    def __call__(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        keys = self.state.slab_keys
        p = float(module.p)
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
            uniform[slab * per_slab:(slab + 1) * per_slab].uniform_(generator=generator)
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


# ----------------------------------------------------------------------------- the engine


class InferenceEngine:
    """Run a model card's network on volumes (see the module docstring).

    Parameters
    ----------
    card:
        A :class:`ModelCard` or anything :func:`resolve_model` accepts (card JSON, folder, TorchScript file).
    device:
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``/``"cuda:N"`` (CPU with a
        :class:`DeviceFallbackWarning` when CUDA is missing).
    amp:
        Mixed precision (``torch.autocast`` float16) on CUDA; ignored on the CPU.
    sw_batch_size:
        Windows per forward call (default: the card's). Changes speed and memory, not the maths.
    progress:
        ``progress(done, total, label)`` called after every window batch (``total`` = windows).
    cancel:
        A callable returning True, or a :class:`threading.Event`; when set, :meth:`predict` raises
        :class:`InferenceCancelled` before the next forward call.
    seed:
        Seed of the per-pass dropout masks (MC dropout reproducible, batched == sequential);
        ``None``: dropout modules in train mode drawing from the global RNG.
    mc_chunk:
        Stochastic samples (MC passes x flips) per forward call; ``None`` = all in one batch,
        ``1`` = one pass at a time (sequential).
    """

    def __init__(self, card: ModelCard | str | PathLike[str], *, device: str | torch.device = "auto",
                 amp: bool = True, sw_batch_size: int | None = None, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, seed: int | None = 0, mc_chunk: int | None = None):
        self.card = card if isinstance(card, ModelCard) else resolve_model(card)
        self.device = resolve_device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        if sw_batch_size is not None and (isinstance(sw_batch_size, bool) or int(sw_batch_size) < 1):
            raise ConformalSegError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if mc_chunk is not None and int(mc_chunk) < 1:
            raise ConformalSegError(f"mc_chunk must be >= 1, got {mc_chunk}")
        self.sw_batch_size = int(sw_batch_size or self.card.inference.sw_batch_size)
        self.mc_chunk = None if mc_chunk is None else int(mc_chunk)
        self.progress = progress
        self.cancel = cancel
        self.seed = seed
        self._oom_if: Callable[[int, str], bool] | None = None  # test hook: simulate CUDA OOM
        self._host_stitching = False  # sticky after an OOM of the stitching buffer
        self._mc_state = _MCState(seed)
        self.network = self.card.load_network().to(self.device).eval()
        self.is_torchscript = isinstance(self.network, torch.jit.ScriptModule)
        self._dropouts = self._find_dropouts()
        self.seeded_dropout = seed is not None and not self.is_torchscript and bool(self._dropouts) and all(
            type(m).__name__ in _DROPOUT_NAMES[:4] for m in self._dropouts)
        if self.seeded_dropout:
            for index, module in enumerate(self._dropouts):
                module.register_forward_hook(_SeededDropout(self._mc_state, index, type(module) is not torch.nn.Dropout))
        self._spatial, self._intensity = self._build_transforms()

    # ------------------------------------------------------------------ setup

    def _find_dropouts(self) -> list[torch.nn.Module]:
        found = []
        for _, module in self.network.named_modules():
            name = getattr(module, "original_name", None) if self.is_torchscript else type(module).__name__
            if self.is_torchscript and name in _DROPOUT_NAMES:
                found.append(module)
            elif not self.is_torchscript and isinstance(module, torch.nn.modules.dropout._DropoutNd):
                found.append(module)
        return found

    def _build_transforms(self):
        return build_preprocessing(self.card)

    # ------------------------------------------------------------------ helpers

    def _check_cancel(self) -> None:
        token = self.cancel
        if token is None:
            return
        is_set = token.is_set() if hasattr(token, "is_set") else bool(token())
        if is_set:
            raise InferenceCancelled("inference was cancelled")

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _stochastic(self, slab_keys: list | None, active: bool):
        """Switch dropout on for one forward call (seeded hooks or train-mode modules)."""
        if not active:
            yield
            return
        if self.seeded_dropout:
            self._mc_state.slab_keys = slab_keys
            try:
                yield
            finally:
                self._mc_state.slab_keys = None
            return
        for module in self._dropouts:
            module.train(True)
        try:
            yield
        finally:
            for module in self._dropouts:
                module.train(False)

    def _card_error(self, message: str, fix: str) -> ConformalSegError:
        return ConformalSegError(message, path=self.card.path, fix=fix)

    # ------------------------------------------------------------------ public

    def predict(self, volume: Volume, *, mc_dropout: int = 0, tta_flips: bool = False) -> Prediction:
        """Probability map (and, with ``mc_dropout > 0``, variance and entropy maps) of ``volume``
        on exactly its grid. Raises :class:`InferenceCancelled` when cancelled."""
        if isinstance(mc_dropout, bool) or not isinstance(mc_dropout, (int, np.integer)) or mc_dropout < 0:
            raise ConformalSegError(f"mc_dropout must be a number of passes >= 0, got {mc_dropout!r}")
        mc_dropout = int(mc_dropout)
        if self.card.output.is_quantile:
            raise self._card_error(f"{self.card.describe()} is a quantile regression model "
                                   f"(output.quantiles {list(self.card.output.quantiles)}), not a lesion model",
                                   "use InferenceEngine.predict_quantiles (conformalseg infer writes lower/ and "
                                   "upper/ for such models)")
        if mc_dropout and not self._dropouts:
            raise self._card_error(f"MC dropout was requested but the network of {self.card.describe()} has no "
                                   "dropout layers", "train the network with dropout, or run without MC dropout")
        array = _checked_array(volume)
        start = time.perf_counter()
        self._check_cancel()
        flips = ALL_FLIPS if tta_flips else ((),)
        passes: tuple[int | None, ...] = tuple(range(mc_dropout)) if mc_dropout else (None,)
        variants = [(f, n) for f in flips for n in passes]
        rng = contextlib.nullcontext()
        if mc_dropout and not self.seeded_dropout and self.seed is not None:
            cuda_devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=cuda_devices)
        with torch.inference_mode(), rng:
            if mc_dropout and not self.seeded_dropout and self.seed is not None:
                torch.manual_seed(self.seed)
            image = self._preprocess(array, volume)
            maps, info = self._run_windows(image, variants, mc=bool(mc_dropout))
            if not bool(image.finite):
                raise ConformalSegError("image contains NaN or infinite voxels", path=volume.path,
                                        fix="fix or re-export the image")
            channels, any_variance = self._postprocess(maps, image, mc=bool(mc_dropout))
        probability = channels[0]
        variance = entropy = None
        if mc_dropout:
            variance, entropy = channels[1], channels[2]
            if mc_dropout > 1 and not any_variance:
                warnings.warn(f"all {mc_dropout} MC dropout passes gave identical probabilities: dropout has no "
                              "effect in this model (a traced TorchScript model keeps dropout frozen in eval mode; "
                              "export with torch.jit.script or use a state_dict card)", MCDropoutInactiveWarning,
                              stacklevel=2)
        info.update(mc_passes=mc_dropout, tta_flips=len(flips), seeded_dropout=self.seeded_dropout and bool(mc_dropout),
                    seed=self.seed if mc_dropout else None)
        return Prediction(probability=probability, geometry=volume.geometry, variance=variance, entropy=entropy,
                          mc_passes=mc_dropout, tta_flips=len(flips), seconds=time.perf_counter() - start,
                          device=str(self.device), info=info)

    def predict_quantiles(self, volume: Volume) -> QuantilePrediction:
        """The quantile maps of a quantile regression card (see the module docstring) on exactly the
        grid of ``volume``. Raises :class:`InferenceCancelled` when cancelled."""
        levels = self.card.output.quantiles
        if levels is None:
            raise self._card_error(f"{self.card.describe()} is a lesion probability model, not a quantile regression "
                                   "model (its output has no 'quantiles')", "use InferenceEngine.predict")
        array = _checked_array(volume)
        start = time.perf_counter()
        self._check_cancel()
        with torch.inference_mode():
            image = self._preprocess(array, volume)
            maps, info = self._run_windows(image, [((), None)], mc=False)
            if not bool(image.finite):
                raise ConformalSegError("image contains NaN or infinite voxels", path=volume.path,
                                        fix="fix or re-export the image")
            channels, _ = self._postprocess(maps, image, mc=False, quantile=True)
        stacked = np.stack(channels)
        crossing = int(np.count_nonzero(np.any(np.diff(stacked, axis=0) < 0, axis=0)))
        if crossing:
            stacked.sort(axis=0)  # monotone rearrangement: non-crossing quantiles
        info.update(quantiles=list(levels), crossing_voxels=crossing)
        return QuantilePrediction(levels=tuple(levels), maps=stacked, geometry=volume.geometry,
                                  seconds=time.perf_counter() - start, device=str(self.device), info=info)

    # ------------------------------------------------------------------ steps

    def _preprocess(self, array: np.ndarray, volume: Volume):
        from monai.data import MetaTensor

        if array.dtype not in _TORCH_DTYPES:
            array = array.astype(np.float32)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        affine = torch.as_tensor(network_affine(volume.geometry), dtype=torch.float64)
        device = torch.device("cpu") if self._host_stitching else self.device
        try:
            return self._preprocess_on(array, affine, device, MetaTensor, volume)
        except torch.cuda.OutOfMemoryError:
            pass
        _free_cuda()
        self._host_stitching = True
        return self._preprocess_on(array, affine, torch.device("cpu"), MetaTensor, volume)

    def _preprocess_on(self, array: np.ndarray, affine: torch.Tensor, device: torch.device, meta_tensor,
                       volume: Volume):
        # upload in the stored dtype and (z, y, x) order; convert and transpose on the device
        data = torch.from_numpy(array).to(device).to(torch.float32)
        finite = torch.isfinite(data).all()  # checked after the windows are queued (no early device sync)
        data = from_network_axes(data).contiguous()  # (z, y, x) -> (x, y, z); the permutation is its own inverse
        image = meta_tensor(data[None], affine=affine)
        if self._spatial is not None:
            image = self._spatial(image)
        tensor = image.as_tensor()
        if self._intensity is not None:
            tensor = self._intensity(tensor)
            tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
        return _Preprocessed(tensor=tensor.to(torch.float32).contiguous(), meta=image, finite=finite)

    def _run_windows(self, image: "_Preprocessed", variants: list, *, mc: bool):
        """Sliding-window pass with the OOM fallback ladder; returns (maps (K, d0, d1, d2), info)."""
        n_variants = len(variants)
        batch = self.sw_batch_size
        chunk = min(n_variants, self.mc_chunk or n_variants)
        host = self._host_stitching
        attempts: list[dict[str, Any]] = []
        total = count_windows(image.tensor.shape[1:], self.card.inference.patch_size, self.card.inference.overlap)
        while True:
            stage = "host" if host else "device"
            attempts.append({"sw_batch_size": batch, "samples_per_forward": chunk, "stage": stage,
                             "stitching": "cpu" if host else str(self.device)})
            predictor = _WindowPredictor(self, variants, chunk, mc=mc, stage=stage, total=total,
                                         retry=len(attempts) > 1)
            try:
                maps = self._sliding_window(image.tensor, batch, predictor, host)
                break
            except torch.cuda.OutOfMemoryError as exc:
                attempts[-1]["error"] = "out of memory" + ("" if predictor.oom_in_forward else " (stitching)")
                in_forward = predictor.oom_in_forward
                message = str(exc).splitlines()[0][:200] if str(exc) else "CUDA out of memory"
            del predictor
            _free_cuda()
            if not in_forward and not host:
                host = True  # the stitching buffer did not fit: smaller batches would not help
            elif chunk > 1:  # first: fewer MC passes/flips per forward call (the same dropout masks)
                chunk = max(1, chunk // 2)
            elif batch > 1:
                batch = max(1, batch // 2)
            elif not host:
                host = True
            else:
                raise self._card_error(
                    f"CUDA out of memory even with one sample per forward call, sw_batch_size=1 and the "
                    f"stitching buffer on the CPU ({message})",
                    "use a smaller patch_size in the model card, fewer --mc-dropout passes, --device cpu, or a GPU "
                    "with more free memory")
        if batch != self.sw_batch_size:
            self.sw_batch_size = batch  # remember what fits for the next cases
        if chunk < n_variants:
            self.mc_chunk = chunk if self.mc_chunk is None else min(self.mc_chunk, chunk)
        self._host_stitching = host
        info = {"windows": total, "sw_batch_size": batch, "samples_per_forward": chunk,
                "stitching": "cpu" if host else str(self.device), "attempts": attempts,
                "network_grid_xyz": list(image.tensor.shape[1:])}
        return maps, info

    def _sliding_window(self, tensor: torch.Tensor, batch: int, predictor: "_WindowPredictor",
                        host: bool) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        settings = self.card.inference
        inputs = tensor[None]
        stitch_device = torch.device("cpu") if host else self.device
        if host:
            inputs = inputs.cpu()
        out = sliding_window_inference(inputs, roi_size=list(settings.patch_size), sw_batch_size=batch,
                                       predictor=predictor, overlap=settings.overlap, mode=settings.blend,
                                       sw_device=self.device, device=stitch_device, with_coord=True)
        predictor.finish()
        return out[0]

    def _postprocess(self, maps: torch.Tensor, image: "_Preprocessed", *, mc: bool,
                     quantile: bool = False) -> tuple[list[np.ndarray], bool]:
        """Invert the spatial preprocessing; return float32 numpy ``(z, y, x)`` arrays per channel
        (probability clipped to [0, 1], variance to [0, 1/4], entropy >= 0: interpolation and
        float rounding can step outside by a few ulps; quantile maps are not clipped) and whether
        any variance is positive."""
        try:
            restored = self._invert(maps, image)
        except torch.cuda.OutOfMemoryError:
            restored = None
        if restored is None:
            _free_cuda()
            restored = self._invert(maps.cpu(), image)
        restored = restored.to(torch.float32)
        if quantile:
            return [_to_host(from_network_axes(restored[c])) for c in range(restored.shape[0])], False
        restored[0].clamp_(0.0, 1.0)
        any_variance = False
        if mc:
            restored[1].clamp_(0.0, 0.25)
            restored[2].clamp_(min=0.0)
            any_variance = bool((restored[1] > 0).any())
        # clip and transpose on the device (fast on a GPU), then one copy to host memory per map
        return [_to_host(from_network_axes(restored[c])) for c in range(restored.shape[0])], any_variance

    def _invert(self, maps: torch.Tensor, image: "_Preprocessed") -> torch.Tensor:
        if self._spatial is None:
            return maps
        from monai.data import MetaTensor

        meta = dict(image.meta.meta)
        meta["affine"] = image.meta.affine.clone()
        out = MetaTensor(maps, meta=meta)
        out.applied_operations = list(image.meta.applied_operations)
        inverted = self._spatial.inverse(out)
        return inverted.as_tensor() if hasattr(inverted, "as_tensor") else inverted


def _checked_array(volume: Volume) -> np.ndarray:
    """The volume's array after checking it is a 3D scalar image matching its geometry."""
    array = np.asarray(volume.array)
    if array.ndim != 3 or array.shape != volume.geometry.shape:
        raise ConformalSegError(f"image array shape {array.shape} does not match its geometry "
                                f"{volume.geometry.shape}", path=volume.path, fix="give a 3D image")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ConformalSegError(f"image has non-numeric voxels ({array.dtype})", path=volume.path,
                                fix="give a scalar image")
    return array


@dataclass
class _Preprocessed:
    tensor: torch.Tensor  # (1, d0, d1, d2) float32, network input
    meta: Any  # MetaTensor after the spatial transforms (affine + applied operations)
    finite: torch.Tensor  # 0-d bool: the input image had no NaN/Inf voxel


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy copy; CUDA tensors go through page-locked memory (several times faster
    than a copy into pageable memory; PyTorch caches the pinned blocks between calls)."""
    if tensor.device.type != "cuda":
        return tensor.contiguous().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host.numpy()


def _free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _WindowPredictor:
    """The ``predictor`` given to ``sliding_window_inference``: runs every stochastic sample (MC pass x
    flip) of a window batch, applies the activation, and returns per-window maps:

    * no MC: ``[mean lesion probability]``;
    * MC: ``[mean lesion probability, variance over samples, predictive entropy]``.

    Sums over samples are accumulated in float64 in a fixed sample order, so the result does not
    depend on how samples are split into forward calls (and N identical samples average back to the
    exact single-sample value).
    """

    def __init__(self, engine: InferenceEngine, variants: list, chunk: int, *, mc: bool, stage: str,
                 total: int, retry: bool):
        self.engine = engine
        self.variants = variants
        self.chunk = chunk
        self.mc = mc
        self.stage = stage
        self.total = total
        self.done = 0
        self.label = "sliding window" + (" (retry after CUDA out of memory)" if retry else "")
        self.oom_in_forward = False
        self.checked = False

    def __call__(self, window: torch.Tensor, coords: list | None = None) -> torch.Tensor:
        engine = self.engine
        engine._check_cancel()
        n_rows = window.shape[0]
        starts = [tuple(int(s.start or 0) for s in c[2:]) for c in coords] if coords else list(range(n_rows))
        single = len(self.variants) == 1 and not self.mc
        total_p = total_p2 = None
        out_card = engine.card.output
        for first in range(0, len(self.variants), self.chunk):
            if first:
                engine._check_cancel()
            part = self.variants[first:first + self.chunk]
            rows = len(part) * n_rows
            x = torch.cat([window.flip(f) if f else window for f, _ in part]) if len(part) > 1 else (
                window.flip(part[0][0]) if part[0][0] else window)
            keys = [(first + j, tuple(starts)) for j in range(len(part))] if self.mc else None
            try:
                if engine._oom_if is not None and engine._oom_if(rows, self.stage):
                    raise torch.cuda.OutOfMemoryError(f"simulated CUDA out of memory for {rows} rows ({self.stage})")
                with engine._stochastic(keys, self.mc), engine._autocast():
                    logits = engine.network(x)
            except torch.cuda.OutOfMemoryError:
                self.oom_in_forward = True
                raise
            except RuntimeError as exc:
                raise engine._card_error(
                    f"the network failed on a batch of shape {tuple(x.shape)}: {str(exc).strip().splitlines()[0][:300]}",
                    "check inference.patch_size (each axis usually must be divisible by the network's total "
                    "downsampling), source args (in_channels) and the network") from exc
            if isinstance(logits, (list, tuple)):
                logits = logits[0]  # deep supervision: the full-resolution head
            logits = logits.float()
            self._check_output(logits, x)
            if out_card.is_quantile:  # regression: every channel, no activation (one variant only)
                return self._report(logits.contiguous(), n_rows)
            probs = torch.softmax(logits, dim=1) if out_card.activation == "softmax" else torch.sigmoid(logits)
            if single:
                result = probs[:, out_card.lesion_channel:out_card.lesion_channel + 1]
                return self._report(result.contiguous(), n_rows)
            for j, (flip, _) in enumerate(part):
                p = probs[j * n_rows:(j + 1) * n_rows]
                if flip:
                    p = p.flip(flip)
                p = p.double()
                lesion = p[:, out_card.lesion_channel:out_card.lesion_channel + 1]
                keep = p if (self.mc and out_card.activation == "softmax") else lesion
                total_p = keep.clone() if total_p is None else total_p.add_(keep)
                if self.mc:
                    sq = lesion * lesion
                    total_p2 = sq if total_p2 is None else total_p2.add_(sq)
        n = float(len(self.variants))
        mean = total_p / n
        if not self.mc:
            return self._report(mean.float(), n_rows)
        lesion_mean = mean[:, out_card.lesion_channel:out_card.lesion_channel + 1]
        variance = (total_p2 / n - lesion_mean * lesion_mean).clamp_(min=0.0)
        if out_card.activation == "softmax":
            entropy = torch.special.entr(mean).sum(dim=1, keepdim=True)
        else:
            entropy = torch.special.entr(lesion_mean) + torch.special.entr(1.0 - lesion_mean)
        return self._report(torch.cat([lesion_mean, variance, entropy], dim=1).float(), n_rows)

    def _check_output(self, logits: torch.Tensor, x: torch.Tensor) -> None:
        if self.checked:
            return
        engine, out_card = self.engine, self.engine.card.output
        channels = logits.shape[1] if logits.dim() == x.dim() else None
        if channels is None or tuple(logits.shape[2:]) != tuple(x.shape[2:]):
            raise engine._card_error(f"the network output has shape {tuple(logits.shape)} for an input of shape "
                                     f"{tuple(x.shape)}; expected (batch, classes, same spatial size)",
                                     "use a segmentation network whose output has the input's spatial size")
        if out_card.is_quantile:
            if channels != len(out_card.quantiles):
                raise engine._card_error(f"output.quantiles lists {len(out_card.quantiles)} level(s) but the network "
                                         f"has {channels} output channel(s)",
                                         "give one quantile level per output channel")
            self.checked = True
            return
        if out_card.activation == "softmax" and channels < 2:
            raise engine._card_error("output.activation is softmax but the network has a single output channel "
                                     "(softmax over one channel is always 1)",
                                     "use \"activation\": \"sigmoid\" with lesion_channel 0")
        if out_card.lesion_channel >= channels:
            raise engine._card_error(f"output.lesion_channel is {out_card.lesion_channel} but the network has "
                                     f"{channels} output channel(s)",
                                     f"set lesion_channel between 0 and {channels - 1}")
        self.checked = True

    def _report(self, result: torch.Tensor, n_rows: int) -> torch.Tensor:
        self.done += n_rows
        if self.engine.progress is not None:
            self.engine.progress(min(self.done, self.total), self.total, self.label)
        return result

    def finish(self) -> None:
        if self.engine.progress is not None and self.done < self.total:
            self.engine.progress(self.total, self.total, self.label)


def predict_volume(card: ModelCard | str | PathLike[str], volume: Volume, **kwargs: Any) -> Prediction:
    """One-off convenience: build an engine (engine keyword arguments) and predict one volume
    (``mc_dropout``/``tta_flips`` go to :meth:`InferenceEngine.predict`)."""
    predict_args = {k: kwargs.pop(k) for k in ("mc_dropout", "tta_flips") if k in kwargs}
    return InferenceEngine(card, **kwargs).predict(volume, **predict_args)
