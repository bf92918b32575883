"""The inference engine: a CT volume in, a lesion probability map on exactly the same grid out.

Pipeline (everything fixed by the :class:`~ConformalSegLib.inference.model_card.ModelCard`), one module per step:

1. **Axes, world space and preprocessing** (:mod:`.preprocessing`): the numpy ``(z, y, x)`` array
   and its LPS geometry become a channel-first MONAI tensor in RAS index axes; the card's
   ``Orientation`` / ``Spacing`` / intensity transforms are applied and recorded.
2. **Sliding window** (:mod:`.sliding_window`): MONAI's sliding window with the card's patch size,
   overlap and Gaussian blending, windows blended in probability space; on CUDA out of memory, a
   ladder of smaller batches and CPU stitching.
3. **MC dropout and flip TTA** (:mod:`.mc_passes`): N stochastic passes in one batch with
   reproducible per-pass dropout masks, and/or the 8 flips of each window.
4. **Back to the input grid** (:mod:`.outputs`): the recorded spatial transforms inverted, the maps
   clipped and returned as a :class:`~.outputs.Prediction` (or :class:`~.outputs.QuantilePrediction`
   for quantile regression cards).

:class:`InferenceEngine` holds the network and runs these steps; it is not thread safe (one
``predict`` at a time); ``cancel`` may be set from another thread.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import warnings
from collections.abc import Callable
from os import PathLike
from typing import Any

import numpy as np
import torch

from ..common.errors import ConformalSegError
from ..io.volumes import Volume
from .mc_passes import MCDropout, MCDropoutInactiveWarning, flip_count, variants
from .model_card import ModelCard, resolve_model
from .outputs import Prediction, QuantilePrediction, free_cuda, restore
from .preprocessing import TORCH_DTYPES, Preprocessed, build_preprocessing, checked_array, network_affine, preprocess_on
from .sliding_window import WindowPredictor, run_windows, stitch

__all__ = ["DeviceFallbackWarning", "InferenceCancelled", "InferenceEngine", "predict_volume", "resolve_device"]

ProgressCallback = Callable[[int, int, str], None]
CancelToken = Callable[[], bool] | threading.Event


class InferenceCancelled(Exception):
    """Raised by :meth:`InferenceEngine.predict` when its ``cancel`` token is set (checked between
    window batches and between the forward calls of one batch)."""


class DeviceFallbackWarning(UserWarning):
    """``device="cuda"`` was asked for but CUDA is not available: the engine runs on the CPU."""


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
        warnings.warn(
            "device 'cuda' was requested but CUDA is not available (no GPU, or PyTorch was "
            "built without CUDA): running on the CPU instead",
            DeviceFallbackWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConformalSegError(
            f"device {device!r} does not exist ({torch.cuda.device_count()} GPU(s))",
            fix="use cuda:0 .. cuda:N-1, or auto",
        )
    return resolved


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

    def __init__(
        self,
        card: ModelCard | str | PathLike[str],
        *,
        device: str | torch.device = "auto",
        amp: bool = True,
        sw_batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        seed: int | None = 0,
        mc_chunk: int | None = None,
    ):
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
        self.network = self.card.load_network().to(self.device).eval()
        self.is_torchscript = isinstance(self.network, torch.jit.ScriptModule)
        self._mc = MCDropout(self.network, seed, self.is_torchscript)
        self._dropouts = self._mc.modules
        self.seeded_dropout = self._mc.seeded
        self._spatial, self._intensity = build_preprocessing(self.card)

    # ------------------------------------------------------------------ pickling (executors)

    def __getstate__(self) -> dict[str, Any]:
        """What goes to a process or Dask worker: the engine with its network (weights included, once per
        worker). A TorchScript network cannot be pickled: it travels as its serialized archive, which the
        driver already loaded (so its code was trusted there) and the worker loads back. Progress and cancel
        callbacks stay on the driver."""
        state = self.__dict__.copy()
        state.update(progress=None, cancel=None, _oom_if=None)
        if self.is_torchscript:
            buffer = io.BytesIO()
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; it still saves and loads
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(self.network, buffer)
            state["network"] = buffer.getvalue()
            del state["_mc"], state["_dropouts"]  # they hold the network's modules: rebuilt on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.network, bytes):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.network = torch.jit.load(io.BytesIO(self.network), map_location=self.device).eval()
            self._mc = MCDropout(self.network, self.seed, True)
            self._dropouts = self._mc.modules

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

    def _stochastic(self, slab_keys: list | None, active: bool) -> contextlib.AbstractContextManager[None]:
        """Switch dropout on for one forward call (:meth:`.mc_passes.MCDropout.active`)."""
        return self._mc.active(slab_keys, active)

    def _card_error(self, message: str, fix: str) -> ConformalSegError:
        return ConformalSegError(message, path=self.card.path, fix=fix)

    # ------------------------------------------------------------------ public

    def predict(self, volume: Volume, *, mc_dropout: int = 0, tta_flips: bool | int = False) -> Prediction:
        """Probability map (and, with ``mc_dropout > 0``, variance and entropy maps) of ``volume``
        on exactly its grid; ``tta_flips``: ``True`` (all 8 flips), ``False`` or a count (the first N,
        :func:`~.mc_passes.flip_count`). Raises :class:`InferenceCancelled` when cancelled."""
        if isinstance(mc_dropout, bool) or not isinstance(mc_dropout, (int, np.integer)) or mc_dropout < 0:
            raise ConformalSegError(f"mc_dropout must be a number of passes >= 0, got {mc_dropout!r}")
        mc_dropout = int(mc_dropout)
        if self.card.output.is_quantile:
            raise self._card_error(
                f"{self.card.describe()} is a quantile regression model "
                f"(output.quantiles {list(self.card.output.quantiles or ())}), not a lesion model",
                "use InferenceEngine.predict_quantiles (conformalseg infer writes lower/ and upper/ for such models)",
            )
        if mc_dropout and not self._dropouts:
            raise self._card_error(
                f"MC dropout was requested but the network of {self.card.describe()} has no dropout layers",
                "train the network with dropout, or run without MC dropout",
            )
        array = checked_array(volume)
        start = time.perf_counter()
        self._check_cancel()
        n_flips = flip_count(tta_flips)
        samples = variants(mc_dropout, n_flips)
        rng: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if mc_dropout and not self.seeded_dropout and self.seed is not None:
            cuda_devices = (
                [self.device.index if self.device.index is not None else torch.cuda.current_device()]
                if self.device.type == "cuda"
                else []
            )
            rng = torch.random.fork_rng(devices=cuda_devices)
        with torch.inference_mode(), rng:
            if mc_dropout and not self.seeded_dropout and self.seed is not None:
                torch.manual_seed(self.seed)
            image = self._preprocess(array, volume)
            maps, info = self._run_windows(image, samples, mc=bool(mc_dropout))
            if not bool(image.finite):
                raise ConformalSegError(
                    "image contains NaN or infinite voxels", path=volume.path, fix="fix or re-export the image"
                )
            channels, any_variance = restore(maps, image, self._spatial, mc=bool(mc_dropout))
        probability = channels[0]
        variance = entropy = None
        if mc_dropout:
            variance, entropy = channels[1], channels[2]
            if mc_dropout > 1 and not any_variance:
                warnings.warn(
                    f"all {mc_dropout} MC dropout passes gave identical probabilities: dropout has no "
                    "effect in this model (a traced TorchScript model keeps dropout frozen in eval mode; "
                    "export with torch.jit.script or use a state_dict card)",
                    MCDropoutInactiveWarning,
                    stacklevel=2,
                )
        info.update(
            mc_passes=mc_dropout,
            tta_flips=n_flips,
            seeded_dropout=self.seeded_dropout and bool(mc_dropout),
            seed=self.seed if mc_dropout else None,
        )
        return Prediction(
            probability=probability,
            geometry=volume.geometry,
            variance=variance,
            entropy=entropy,
            mc_passes=mc_dropout,
            tta_flips=n_flips,
            seconds=time.perf_counter() - start,
            device=str(self.device),
            info=info,
        )

    def predict_quantiles(self, volume: Volume) -> QuantilePrediction:
        """The quantile maps of a quantile regression card (see the module docstring) on exactly the
        grid of ``volume``. Raises :class:`InferenceCancelled` when cancelled."""
        levels = self.card.output.quantiles
        if levels is None:
            raise self._card_error(
                f"{self.card.describe()} is a lesion probability model, not a quantile regression "
                "model (its output has no 'quantiles')",
                "use InferenceEngine.predict",
            )
        array = checked_array(volume)
        start = time.perf_counter()
        self._check_cancel()
        with torch.inference_mode():
            image = self._preprocess(array, volume)
            maps, info = self._run_windows(image, [((), None)], mc=False)
            if not bool(image.finite):
                raise ConformalSegError(
                    "image contains NaN or infinite voxels", path=volume.path, fix="fix or re-export the image"
                )
            channels, _ = restore(maps, image, self._spatial, mc=False, quantile=True)
        stacked = np.stack(channels)
        crossing = int(np.count_nonzero(np.any(np.diff(stacked, axis=0) < 0, axis=0)))
        if crossing:
            stacked.sort(axis=0)  # monotone rearrangement: non-crossing quantiles
        info.update(quantiles=list(levels), crossing_voxels=crossing)
        return QuantilePrediction(
            levels=tuple(levels),
            maps=stacked,
            geometry=volume.geometry,
            seconds=time.perf_counter() - start,
            device=str(self.device),
            info=info,
        )

    # ------------------------------------------------------------------ steps

    def _preprocess(self, array: np.ndarray, volume: Volume) -> Preprocessed:
        """The network input of ``array`` (the volume's voxels); on the CPU after a CUDA out-of-memory error."""
        if array.dtype not in TORCH_DTYPES:
            array = array.astype(np.float32)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        affine = torch.as_tensor(network_affine(volume.geometry), dtype=torch.float64)
        device = torch.device("cpu") if self._host_stitching else self.device
        try:
            return preprocess_on(array, affine, device, self._spatial, self._intensity)
        except torch.cuda.OutOfMemoryError:
            pass
        free_cuda()
        self._host_stitching = True
        return preprocess_on(array, affine, torch.device("cpu"), self._spatial, self._intensity)

    def _run_windows(self, image: Preprocessed, samples: list, *, mc: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sliding-window pass (:func:`.sliding_window.run_windows`); what worked is kept for the next cases."""
        maps, info, used = run_windows(self, image, samples, mc=mc)
        if used.sw_batch_size != self.sw_batch_size:
            self.sw_batch_size = used.sw_batch_size  # remember what fits for the next cases
        if used.samples_per_forward < len(samples):
            chunk = used.samples_per_forward
            self.mc_chunk = chunk if self.mc_chunk is None else min(self.mc_chunk, chunk)
        self._host_stitching = used.host_stitching
        return maps, info

    def _sliding_window(self, tensor: torch.Tensor, batch: int, predictor: WindowPredictor, host: bool) -> torch.Tensor:
        return stitch(tensor, batch, predictor, self.card.inference, self.device, host)


def predict_volume(card: ModelCard | str | PathLike[str], volume: Volume, **kwargs: Any) -> Prediction:
    """One-off convenience: build an engine (engine keyword arguments) and predict one volume
    (``mc_dropout``/``tta_flips`` go to :meth:`InferenceEngine.predict`)."""
    predict_args = {k: kwargs.pop(k) for k in ("mc_dropout", "tta_flips") if k in kwargs}
    return InferenceEngine(card, **kwargs).predict(volume, **predict_args)
