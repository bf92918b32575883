"""Blob loss: Dice + cross entropy plus a soft Dice of every lesion on its own.

Why
---
The batch soft Dice of :class:`~ConformalSegLib.training.losses.DiceCELoss` sums over every voxel of every
crop, so a 4 mm lesion of 30 voxels weighs about a hundredth of a 20 mm one of 3,000: missing it entirely
costs almost nothing. Conformal lesion segmentation pays for exactly those misses. A scan whose only
lesion the network ranks at the background's level forces the CLS threshold down to that level for every
scan (``benchmarks/RESULTS.md``, "Can any network meet issue 11's PC goal?"). Kofler et al., *blob loss:
instance imbalance aware loss functions for semantic segmentation* (IPMI 2023, arXiv:2205.08209), add
to the usual loss one term per connected component of the target, each normalised on its own, so every
lesion weighs the same whatever its size.

Definition (our reading, for a two-class softmax network)
---------------------------------------------------------
``logits`` ``(B, 2, ...)``, ``target`` ``(B, 1, ...)`` in {0, 1}, ``p`` the softmax probability of the
lesion channel (1). In crop ``b`` let ``C_1, ..., C_K`` be the connected components of the target
(``scipy.ndimage.label``, 26-connectivity: voxels touching at a face, edge or corner are one lesion), and
``O`` the crop's background (target 0). The paper masks the other lesions out of each lesion's term, so
lesion ``k``'s soft Dice is taken over ``O`` and ``C_k`` only::

    dice_k = 1 - (2 * sum_{C_k} p + s) / (sum_{O} p + sum_{C_k} p + |C_k| + s),   s = 1e-5

False positives anywhere in the crop's background count against every lesion, but a lesion's own
voxels never count against another. The blob term of a crop is the mean of ``dice_k`` over its ``K``
lesions; the blob term of the batch is the mean over the crops that hold at least one lesion voxel, and
0 when none does (the paper's convention: a crop without lesions has no instance term). The loss is::

    L = DiceCE(logits, target) + blob(logits, target)

with MONAI's ``DiceCELoss`` exactly as in ``--loss dice-ce``. The paper's instance term is a compound
criterion (Dice + cross entropy over the masked crop). We keep only its Dice: masking a few lesion voxels
out of a crop changes the mean cross entropy of the masked crop by almost nothing, so the per-lesion
cross entropy would add about one more copy of the global term per lesion rather than any balance
between lesions. Weights 1 and 1: the paper's best settings weigh the main term 1-2 times the blob term.
We take the upper end of the blob term because the target is detection of small lesions.

Limits (tested): a crop with one lesion and ``p = 1`` on it and 0 elsewhere gives ``dice_k = 0``; with
``p = 0`` everywhere, ``dice_k = 1 - s / (|C_k| + s)``, just under 1. Two equal lesions, one found and one
missed, give a blob term of about 1/2 whatever their sizes; the batch Dice of the same crop weighs them
by volume.

Deep supervision: MONAI's ``DeepSupervisionLoss`` hands each coarser head a nearest-neighbour downsampled
target, whose components are labelled afresh. A lesion that vanishes at a coarse scale has no term there.

Cost: one ``scipy.ndimage.label`` per crop on the CPU (under a millisecond for a 48 x 48 x 32 crop) and
three ``scatter_add`` sums; no loop over lesions.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..conformal.lesion_level import STRUCTURE_26
from .losses import SMOOTH, DiceCELoss, _check

#: 26-connectivity in 3-D (any face, edge or corner neighbour; the lesion-level guarantee's lesions,
#: ``conformal.lesion_level.STRUCTURE_26``); for 2-D inputs the 8-neighbourhood
_FULL_CONNECTIVITY = {2: np.ones((3, 3), dtype=bool), 3: STRUCTURE_26}


def lesion_components(target: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Connected components of each crop's lesion mask.

    ``target`` ``(B, 1, ...)`` with values 0/1 (2-D or 3-D spatial). Returns ``(labels, counts)``:
    ``labels`` ``(B, N)`` int64 on ``target``'s device, the flattened voxels of crop ``b`` numbered
    ``0`` (background) and ``1..counts[b]`` (its lesions, 26-connected in 3-D).
    """
    spatial = target.dim() - 2
    if spatial not in _FULL_CONNECTIVITY:
        raise ValueError(f"blob loss needs 2-D or 3-D crops, got target shape {tuple(target.shape)}")
    masks = (target.detach()[:, 0] > 0.5).cpu().numpy()
    labels = np.zeros(masks.shape, dtype=np.int64)
    counts: list[int] = []
    for b, mask in enumerate(masks):
        if mask.any():
            components, k = ndimage.label(mask, structure=_FULL_CONNECTIVITY[spatial])
            labels[b] = components
            counts.append(int(k))
        else:
            counts.append(0)
    flat = torch.from_numpy(labels.reshape(len(counts), -1)).to(target.device)
    return flat, counts


def blob_dice(probability: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """The blob term (see the module docstring): mean over crops with a lesion of the mean per-lesion
    masked soft Dice loss; 0 (a zero tensor that keeps the graph) when no crop has a lesion voxel.

    ``probability`` ``(B, 1, ...)`` is the lesion probability, ``target`` ``(B, 1, ...)`` in {0, 1}.
    """
    if probability.shape != target.shape or probability.shape[1] != 1:
        raise ValueError(
            f"probability and target must both be (batch, 1, ...), got {tuple(probability.shape)} "
            f"and {tuple(target.shape)}"
        )
    labels, counts = lesion_components(target)
    p = probability.reshape(probability.shape[0], -1)
    per_crop = []
    for b, k in enumerate(counts):
        if k == 0:
            continue
        index = labels[b]
        # sums[j] = sum of p over component j (j = 0: the crop's background)
        sums = torch.zeros(k + 1, dtype=p.dtype, device=p.device).scatter_add(0, index, p[b])
        sizes = torch.bincount(index, minlength=k + 1).to(p.dtype)
        inside = sums[1:]
        dice = 1.0 - (2.0 * inside + smooth) / (sums[0] + inside + sizes[1:] + smooth)
        per_crop.append(dice.mean())
    if not per_crop:
        return probability.sum() * 0.0
    return torch.stack(per_crop).mean()


class BlobDiceCELoss(nn.Module):
    """``DiceCE + blob`` (see the module docstring); ``forward(logits (B, 2, ...), target (B, 1, ...))``."""

    name = "blob-dice-ce"
    needs_uncertainty = False

    def __init__(self, lesion_channel: int = 1, smooth: float = SMOOTH):
        super().__init__()
        self.main = DiceCELoss(lesion_channel, smooth)
        self.lesion_channel = self.main.lesion_channel
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _check(logits, target, self.lesion_channel)
        p = torch.softmax(logits, dim=1)[:, self.lesion_channel : self.lesion_channel + 1]
        return self.main(logits, target) + blob_dice(p, target, self.smooth)
