"""The two segmentation networks ``conformalseg train`` builds, as MONAI classes with card-ready arguments.

* ``unet``: ``monai.networks.nets.UNet`` (residual units, isotropic strides per level). The first
  shipped model used it; it stays for small fast models and for old cards.
* ``dynunet``: ``monai.networks.nets.DynUNet``, the nnU-Net architecture (two 3x3x3 convolutions with
  instance norm and leaky ReLU per level, strided-convolution downsampling, transposed-convolution
  upsampling) with **per-axis strides** (e.g. ``2x2x1`` first, so an anisotropic 1.6 x 1.6 x 3.0 mm
  grid is downsampled in plane before the slice axis) and optional **deep supervision**: in training
  mode it returns the full-resolution output and ``deep_supr_num`` lower-resolution heads (upsampled
  by MONAI to the output size), in eval mode only the main output, so inference and the model card
  need nothing special.

Both take ``dropout`` (after every convolution for DynUNet, inside the residual units for UNet), which
the inference engine's MC dropout switches on at test time.

Strides are given per level as ``(s0, s1, s2)`` in network axis order ``[d0, d1, d2]`` = ``[x, y, z]``
(an integer means the same stride on every axis); a patch must be divisible on each axis by the
product of that axis' strides (:func:`downsampling`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

NETWORKS = ("unet", "dynunet")
Stride = int | tuple[int, int, int]


def stride_triplet(stride: Stride) -> tuple[int, int, int]:
    """``2 -> (2, 2, 2)``; a triplet is returned as ints."""
    if isinstance(stride, (tuple, list)):
        if len(stride) != 3:
            raise ValueError(f"a stride is one integer or three, got {stride!r}")
        return tuple(int(s) for s in stride)  # type: ignore[return-value]
    return (int(stride),) * 3


def parse_stride(text: str) -> Stride:
    """``"2" -> 2``, ``"2x2x1" -> (2, 2, 1)`` (the CLI's ``--strides`` tokens)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0])
    if len(parts) == 3:
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise ValueError(f"a stride is N or AxBxC, got {text!r}")


def format_stride(stride: Stride) -> str:
    """Inverse of :func:`parse_stride`."""
    return str(stride) if isinstance(stride, int) else "x".join(str(int(s)) for s in stride)


def downsampling(strides: Sequence[Stride]) -> tuple[int, int, int]:
    """Total downsampling factor per axis: the product of the strides."""
    triplets = [stride_triplet(s) for s in strides]
    return tuple(math.prod(t[axis] for t in triplets) for axis in range(3))  # type: ignore[return-value]


def network_args(
    kind: str,
    channels: Sequence[int],
    strides: Sequence[Stride],
    *,
    dropout: float,
    num_res_units: int = 1,
    deep_supervision: bool = False,
    out_channels: int = 2,
) -> dict[str, Any]:
    """Keyword arguments of the MONAI class of ``kind`` (as written into the model card)."""
    if kind == "unet":
        if any(isinstance(s, (tuple, list)) and len(set(s)) > 1 for s in strides):
            raise ValueError("the unet network takes isotropic strides only; use --network dynunet for AxBxC strides")
        return {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": out_channels,
            "channels": [int(c) for c in channels],
            "strides": [stride_triplet(s)[0] for s in strides],
            "num_res_units": int(num_res_units),
            "dropout": float(dropout),
        }
    if kind == "dynunet":
        per_level = [[1, 1, 1]] + [list(stride_triplet(s)) for s in strides]
        return {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": out_channels,
            "kernel_size": [[3, 3, 3]] * len(per_level),
            "strides": per_level,
            "upsample_kernel_size": per_level[1:],
            "filters": [int(c) for c in channels],
            "dropout": float(dropout),
            "norm_name": ["INSTANCE", {"affine": True}],
            "act_name": ["leakyrelu", {"inplace": True, "negative_slope": 0.01}],
            "deep_supervision": bool(deep_supervision),
            "deep_supr_num": max(1, min(2, len(strides) - 1)),
            "res_block": False,
        }
    raise ValueError(f"unknown network {kind!r}; use one of {', '.join(NETWORKS)}")


def card_network_name(kind: str) -> str:
    """The ``monai.networks.nets`` class name of ``kind`` (the card's ``source.state_dict.network``)."""
    return {"unet": "UNet", "dynunet": "DynUNet"}[kind]


def build_network(kind: str, args: dict[str, Any]) -> torch.nn.Module:
    """The network of ``kind`` built with ``args`` (from :func:`network_args`)."""
    from monai.networks import nets

    return getattr(nets, card_network_name(kind))(**args)


def main_output(output: torch.Tensor) -> torch.Tensor:
    """The full-resolution logits of a network output: DynUNet with deep supervision returns
    ``(B, 1 + heads, C, ...)`` in training mode; anything else is returned as it is."""
    return output[:, 0] if output.dim() == 6 else output


def outputs_list(output: torch.Tensor) -> list[torch.Tensor]:
    """Every head's logits, main first (one element without deep supervision)."""
    return list(torch.unbind(output, dim=1)) if output.dim() == 6 else [output]
