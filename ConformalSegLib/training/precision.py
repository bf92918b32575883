"""The arithmetic of the training forward pass: float32, or bfloat16 mixed precision.

``fp32`` (the default): every operation in float32, as every shipped model so far was trained.

``bf16``: the network's forward pass runs under ``torch.autocast(device_type, dtype=torch.bfloat16)``,
so convolutions and transposed convolutions take bfloat16 inputs and weights (with float32
accumulation in oneDNN and cuDNN); the logits of every head are cast back to float32 before the loss,
so the softmax, Dice and cross entropy, the backward pass through them, the weights, the optimiser's
state and the weight average stay float32 (mixed precision as nnU-Net trains on GPUs, with bfloat16's
float32 exponent range instead of float16's, so no loss scaling is needed). Validation and the shipped
model's inference run in float32 whatever the training precision: the model card says nothing about
precision and the engine needs nothing new.

What it buys and costs is measured in ``benchmarks/bench_training_step.py`` (RESULTS.md "Training
step"): the step time and how far the bf16 gradient is from the fp32 gradient of the same batch and
weights. bfloat16 keeps 8 significant bits, so an input in [0, 1] is rounded to within 2^-9 of itself,
about 1 HU in the default -200..300 HU window, against the phantoms' noise of 8-20 HU.

On CUDA bf16 needs a GPU that supports it (Ampere or later; refused otherwise). On the CPU it works
everywhere but is faster than float32 only on processors with bfloat16 or wide vector instructions
(AVX-512, AMX); elsewhere it may be slower, which is why it is not the default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..common.errors import ConformalSegError

#: The training precisions (``TrainingConfig.precision``, ``conformalseg train --precision``).
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, device: torch.device | None = None) -> None:
    """Raise :class:`ConformalSegError` for an unknown precision, or bf16 on a GPU without it."""
    if precision not in PRECISIONS:
        raise ConformalSegError(f"unknown training precision {precision!r}", fix=f"use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConformalSegError(
            f"this GPU ({torch.cuda.get_device_name(device)}) does not support bfloat16",
            fix="train with --precision fp32 (the default), or on an Ampere or later GPU",
        )


@contextlib.contextmanager
def forward_precision(device: torch.device, precision: str) -> Iterator[None]:
    """The context in which the training forward pass runs (see the module docstring); the caller casts
    the outputs to float32 before computing the loss."""
    check_precision(precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield
