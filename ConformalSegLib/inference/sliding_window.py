"""The sliding-window pass: windows, the per-window predictor and the CUDA out-of-memory fallback.

:func:`monai.inferers.sliding_window_inference` with the card's patch size,
overlap and blending (Gaussian), on the chosen device, under ``torch.inference_mode`` and, on
CUDA with ``amp``, ``torch.autocast(float16)``. The predictor applies the activation per window, so
windows are blended in **probability** space: the probability map is the Gaussian-weighted average
over overlapping windows of each window's probability (mean over the stochastic samples with MC
dropout / flips). Only the lesion channel is stitched (plus variance and entropy with MC dropout),
which keeps the stitching buffer small for many-class networks.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .card_format import InferenceSettings
from .outputs import free_cuda
from .preprocessing import Preprocessed

if TYPE_CHECKING:
    from .engine import InferenceEngine

__all__ = ["WindowPredictor", "WindowSettings", "count_windows", "run_windows", "stitch"]


@dataclass(frozen=True)
class WindowSettings:
    """What one window pass ran with (after any out-of-memory retries)."""

    sw_batch_size: int
    samples_per_forward: int
    host_stitching: bool


def count_windows(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI uses for one image (same rule as ``sliding_window_inference``:
    the image is padded to at least the patch size; interval ``int(patch * (1 - overlap))``)."""
    from monai.data.utils import dense_patch_slices

    size = [max(int(i), int(p)) for i, p in zip(image_size, patch_size)]
    interval = [p if p == i else max(int(p * (1 - overlap)), 1) for i, p in zip(size, patch_size)]
    return len(dense_patch_slices(size, list(patch_size), interval))


def run_windows(
    engine: InferenceEngine, image: Preprocessed, variants: list, *, mc: bool
) -> tuple[torch.Tensor, dict[str, Any], WindowSettings]:
    """Sliding-window pass with the OOM fallback ladder (module docstring): ``(maps (K, d0, d1, d2), info,
    the settings that worked)``; the engine keeps those settings for its next cases."""
    n_variants = len(variants)
    batch = engine.sw_batch_size
    chunk = min(n_variants, engine.mc_chunk or n_variants)
    host = engine._host_stitching
    attempts: list[dict[str, Any]] = []
    total = count_windows(image.tensor.shape[1:], engine.card.inference.patch_size, engine.card.inference.overlap)
    while True:
        stage = "host" if host else "device"
        attempts.append(
            {
                "sw_batch_size": batch,
                "samples_per_forward": chunk,
                "stage": stage,
                "stitching": "cpu" if host else str(engine.device),
            }
        )
        predictor = WindowPredictor(engine, variants, chunk, mc=mc, stage=stage, total=total, retry=len(attempts) > 1)
        try:
            maps = engine._sliding_window(image.tensor, batch, predictor, host)
            break
        except torch.cuda.OutOfMemoryError as exc:
            attempts[-1]["error"] = "out of memory" + ("" if predictor.oom_in_forward else " (stitching)")
            in_forward = predictor.oom_in_forward
            message = str(exc).splitlines()[0][:200] if str(exc) else "CUDA out of memory"
        del predictor
        free_cuda()
        if not in_forward and not host:
            host = True  # the stitching buffer did not fit: smaller batches would not help
        elif chunk > 1:  # first: fewer MC passes/flips per forward call (the same dropout masks)
            chunk = max(1, chunk // 2)
        elif batch > 1:
            batch = max(1, batch // 2)
        elif not host:
            host = True
        else:
            raise engine._card_error(
                f"CUDA out of memory even with one sample per forward call, sw_batch_size=1 and the "
                f"stitching buffer on the CPU ({message})",
                "use a smaller patch_size in the model card, fewer --mc-dropout passes, --device cpu, or a GPU "
                "with more free memory",
            )
    info = {
        "windows": total,
        "sw_batch_size": batch,
        "samples_per_forward": chunk,
        "stitching": "cpu" if host else str(engine.device),
        "attempts": attempts,
        "network_grid_xyz": list(image.tensor.shape[1:]),
    }
    return maps, info, WindowSettings(batch, chunk, host)


def stitch(
    tensor: torch.Tensor,
    batch: int,
    predictor: WindowPredictor,
    settings: InferenceSettings,
    device: torch.device,
    host: bool,
) -> torch.Tensor:
    """MONAI's sliding window over ``tensor`` (one image, channel first) with ``predictor``; the blended
    maps (K, d0, d1, d2), stitched on the CPU when ``host``."""
    from monai.inferers import sliding_window_inference

    inputs = tensor[None]
    stitch_device = torch.device("cpu") if host else device
    if host:
        inputs = inputs.cpu()
    out = sliding_window_inference(
        inputs,
        roi_size=list(settings.patch_size),
        sw_batch_size=batch,
        predictor=predictor,
        overlap=settings.overlap,
        mode=settings.blend,
        sw_device=device,
        device=stitch_device,
        with_coord=True,
    )
    predictor.finish()
    return out[0]


class WindowPredictor:
    """The ``predictor`` given to ``sliding_window_inference``: runs every stochastic sample (MC pass x
    flip) of a window batch, applies the activation, and returns per-window maps:

    * no MC: ``[mean lesion probability]``;
    * MC: ``[mean lesion probability, variance over samples, predictive entropy]``.

    Sums over samples are accumulated in float64 in a fixed sample order, so the result does not
    depend on how samples are split into forward calls (and N identical samples average back to the
    exact single-sample value).
    """

    def __init__(
        self, engine: InferenceEngine, variants: list, chunk: int, *, mc: bool, stage: str, total: int, retry: bool
    ):
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
        total_p: torch.Tensor | None = None
        total_p2: torch.Tensor | None = None
        out_card = engine.card.output
        channel = out_card.lesion_channel or 0  # None only for quantile cards, which return before using it
        for first in range(0, len(self.variants), self.chunk):
            if first:
                engine._check_cancel()
            part = self.variants[first : first + self.chunk]
            rows = len(part) * n_rows
            x = (
                torch.cat([window.flip(f) if f else window for f, _ in part])
                if len(part) > 1
                else (window.flip(part[0][0]) if part[0][0] else window)
            )
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
                    f"the network failed on a batch of shape {tuple(x.shape)}: "
                    f"{str(exc).strip().splitlines()[0][:300]}",
                    "check inference.patch_size (each axis usually must be divisible by the network's total "
                    "downsampling), source args (in_channels) and the network",
                ) from exc
            if isinstance(logits, (list, tuple)):
                logits = logits[0]  # deep supervision: the full-resolution head
            logits = logits.float()
            self._check_output(logits, x)
            if out_card.is_quantile:  # regression: every channel, no activation (one variant only)
                return self._report(logits.contiguous(), n_rows)
            probs = torch.softmax(logits, dim=1) if out_card.activation == "softmax" else torch.sigmoid(logits)
            if single:
                result = probs[:, channel : channel + 1]
                return self._report(result.contiguous(), n_rows)
            for j, (flip, _) in enumerate(part):
                p = probs[j * n_rows : (j + 1) * n_rows]
                if flip:
                    p = p.flip(flip)
                p = p.double()
                lesion = p[:, channel : channel + 1]
                keep = p if (self.mc and out_card.activation == "softmax") else lesion
                total_p = keep.clone() if total_p is None else total_p.add_(keep)
                if self.mc:
                    sq = lesion * lesion
                    total_p2 = sq if total_p2 is None else total_p2.add_(sq)
        n = float(len(self.variants))
        assert total_p is not None  # at least one sample
        mean = total_p / n
        if not self.mc:
            return self._report(mean.float(), n_rows)
        lesion_mean = mean[:, channel : channel + 1]
        assert total_p2 is not None  # summed with the MC samples
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
            raise engine._card_error(
                f"the network output has shape {tuple(logits.shape)} for an input of shape "
                f"{tuple(x.shape)}; expected (batch, classes, same spatial size)",
                "use a segmentation network whose output has the input's spatial size",
            )
        if out_card.is_quantile:
            if channels != len(out_card.quantiles or ()):
                raise engine._card_error(
                    f"output.quantiles lists {len(out_card.quantiles or ())} level(s) but the network "
                    f"has {channels} output channel(s)",
                    "give one quantile level per output channel",
                )
            self.checked = True
            return
        if out_card.activation == "softmax" and channels < 2:
            raise engine._card_error(
                "output.activation is softmax but the network has a single output channel "
                "(softmax over one channel is always 1)",
                'use "activation": "sigmoid" with lesion_channel 0',
            )
        if (out_card.lesion_channel or 0) >= channels:
            raise engine._card_error(
                f"output.lesion_channel is {out_card.lesion_channel} but the network has {channels} output channel(s)",
                f"set lesion_channel between 0 and {channels - 1}",
            )
        self.checked = True

    def _report(self, result: torch.Tensor, n_rows: int) -> torch.Tensor:
        self.done += n_rows
        if self.engine.progress is not None:
            self.engine.progress(min(self.done, self.total), self.total, self.label)
        return result

    def finish(self) -> None:
        if self.engine.progress is not None and self.done < self.total:
            self.engine.progress(self.total, self.total, self.label)
