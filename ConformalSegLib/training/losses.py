"""Training losses for a two-class (background / lesion) softmax network.

Conventions
-----------
``logits`` are the raw network outputs ``(batch, 2, d0, d1, d2)``; ``target`` is the lesion mask
``(batch, 1, d0, d1, d2)`` with values 0/1 (any float or integer dtype). The softmax probability of
channel ``lesion_channel`` (default 1) is the lesion probability ``p``; the cross entropy is the
two-class softmax cross entropy (natural log). Both losses are computed over the whole batch at once
(MONAI's ``batch=True``): the Dice sums run over every voxel of every patch, so patches without
lesion voxels do not give an undefined or saturated per-patch Dice.

* :class:`DiceCELoss` -- the baseline: ``soft Dice of the lesion channel + mean voxel cross entropy``
  (fixed weights 1 and 1), computed by ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True,
  include_background=False, batch=True)`` (for two channels this is exactly the formula above; tested
  against a hand computation).
* Deep supervision (:func:`supervised_loss`): with a network that returns several heads (DynUNet in
  training mode) the loss is ``monai.losses.DeepSupervisionLoss``'s weighted sum over the heads,
  weights ``1, 1/2, 1/4, ...`` (MONAI's ``"exp"`` mode), the main head first.
* :class:`~ConformalSegLib.training.blob_loss.BlobDiceCELoss` (``blob-dice-ce``, its own module) -- the
  baseline plus a soft Dice of every lesion on its own (Kofler et al.'s blob loss), so that small lesions
  weigh as much as large ones.
* :class:`UncertaintyAwareLoss` -- the adaptive loss of Isler et al., *Uncertainty-Guided
  Coarse-to-Fine Tumor Segmentation with Anatomy-Aware Post-Processing*, Sec. III-D:
  ``L = a(x) * L_Dice + (1 - a(x)) * L_CE`` with ``a(x) = exp(-U(x))``, ``U(x)`` the variance of
  the prediction over Monte Carlo dropout passes.

Our reading of the adaptive loss
--------------------------------
The paper says the loss "dynamically scales pixel-wise contributions based on estimated
uncertainty", i.e. ``a(x)`` is a *per-voxel* weight. The cross entropy is a mean of per-voxel terms,
so voxel ``x``'s term is weighted by ``1 - a(x)``: ``CE_a = mean_x (1 - a(x)) * ce(x)`` (the mean is
over all voxels, so the weights are not renormalised). Soft Dice is not a sum of per-voxel terms; we
let ``a(x)`` weight each voxel's contribution to its sums::

    Dice_a = 1 - (2 * sum_x a(x) p(x) g(x) + s) / (sum_x a(x) (p(x) + g(x)) + s),   s = 1e-5

so ``L = Dice_a + CE_a``. Limits: ``U = 0`` everywhere gives ``a = 1``: the plain soft Dice and no
cross entropy; ``U -> inf`` gives ``a -> 0``: ``Dice_a -> 1 - s/s = 0`` and the plain mean cross
entropy. Confident voxels are thus driven by the overlap (Dice) term, ambiguous voxels increasingly
by the voxel-wise, better calibrated cross entropy.

``U(x)`` is the population variance over ``N`` stochastic passes of the lesion probability
(:func:`mc_dropout_variance`), computed with the network being trained, under ``no_grad`` and
detached: it is a weight, not something the network can lower by changing its output. The paper
does not rescale ``U``; neither do we. Since a probability's variance is at most 1/4,
``a(x)`` lies in ``[exp(-1/4), 1] = [0.78, 1]``: the cross entropy weight is at most 0.22, so the
adaptive loss is mostly Dice, with extra cross entropy exactly where dropout disagrees.

Quantile regression (denoising)
-------------------------------
:class:`PinballLoss` trains a regression network whose output channel ``c`` estimates the
``quantiles[c]``-level conditional quantile of the target (Koenker's check loss; Teneggi et al. use
levels 0.1 and 0.9). For a residual ``r = y - q`` the loss of level ``tau`` is
``rho_tau(r) = max(tau * r, (tau - 1) * r)``: under-estimates cost ``tau`` per unit, over-estimates
``1 - tau``. Its minimiser over a constant ``q`` is an empirical ``tau``-quantile of the sample (tested).
The loss is the mean over voxels, batch and quantile channels, in the target's units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .networks import main_output

if TYPE_CHECKING:
    from .blob_loss import BlobDiceCELoss

SMOOTH = 1e-5  #: numerator and denominator smoothing of the soft Dice (MONAI's default)
LOSS_NAMES = ("dice-ce", "uncertainty-aware", "blob-dice-ce")
DEFAULT_QUANTILES = (0.1, 0.9)  #: the paper's levels: alpha = 0.1, the 10th and 90th percentiles


def _check(logits: torch.Tensor, target: torch.Tensor, lesion_channel: int) -> torch.Tensor:
    if logits.dim() < 3 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (batch, classes >= 2, ...), got {tuple(logits.shape)}")
    if not 0 <= lesion_channel < logits.shape[1]:
        raise ValueError(f"lesion_channel {lesion_channel} is not a channel of logits {tuple(logits.shape)}")
    if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:] or target.shape[1] != 1:
        raise ValueError(
            f"target must be (batch, 1, ...) matching logits {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    return target.to(logits.dtype)


def weighted_soft_dice(
    probability: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, smooth: float = SMOOTH
) -> torch.Tensor:
    """``1 - (2 sum w p g + s) / (sum w (p + g) + s)`` over all elements (``w = 1`` when None)."""
    if weight is None:
        intersection = (probability * target).sum()
        denominator = probability.sum() + target.sum()
    else:
        intersection = (weight * probability * target).sum()
        denominator = (weight * (probability + target)).sum()
    return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


def voxel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, lesion_channel: int = 1) -> torch.Tensor:
    """Per-voxel softmax cross entropy ``(batch, 1, ...)`` of a binary lesion target.

    For two channels the target class of a voxel is ``lesion_channel`` where ``target`` is 1 and
    the other channel where it is 0.
    """
    if logits.shape[1] != 2:
        raise ValueError(f"the lesion losses need exactly 2 output channels, got {logits.shape[1]}")
    log_p = F.log_softmax(logits, dim=1)
    lesion = log_p[:, lesion_channel : lesion_channel + 1]
    other = log_p[:, 1 - lesion_channel : 2 - lesion_channel]
    return -(target * lesion + (1.0 - target) * other)


class DiceCELoss(nn.Module):
    """Soft Dice of the lesion channel plus the mean voxel cross entropy, by MONAI's ``DiceCELoss``
    (see the module docstring); ``forward(logits (B, 2, ...), target (B, 1, ...))``."""

    name = "dice-ce"
    needs_uncertainty = False

    def __init__(self, lesion_channel: int = 1, smooth: float = SMOOTH):
        super().__init__()
        from monai.losses import DiceCELoss as MonaiDiceCELoss

        if int(lesion_channel) != 1:
            raise ValueError("the Dice + cross entropy loss takes the lesion as channel 1 of two")
        self.lesion_channel = 1
        self.smooth = float(smooth)
        self.monai = MonaiDiceCELoss(
            to_onehot_y=True,
            softmax=True,
            include_background=False,
            batch=True,
            smooth_nr=self.smooth,
            smooth_dr=self.smooth,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _check(logits, target, self.lesion_channel)
        if logits.shape[1] != 2:
            raise ValueError(f"the lesion losses need exactly 2 output channels, got {logits.shape[1]}")
        return self.monai(logits, target)


class UncertaintyAwareLoss(nn.Module):
    """``Dice_a + CE_a`` with voxel weights ``a = exp(-U)`` (see the module docstring).

    ``forward(logits, target, uncertainty)``: ``uncertainty`` is ``U`` with the target's shape
    (or broadcastable to it), non-negative; it is detached here in any case.
    """

    name = "uncertainty-aware"
    needs_uncertainty = True

    def __init__(self, lesion_channel: int = 1, smooth: float = SMOOTH):
        super().__init__()
        self.lesion_channel = int(lesion_channel)
        self.smooth = float(smooth)

    @staticmethod
    def weight(uncertainty: torch.Tensor) -> torch.Tensor:
        """``a(x) = exp(-U(x))`` (detached)."""
        return torch.exp(-uncertainty.detach().clamp(min=0.0))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
        target = _check(logits, target, self.lesion_channel)
        a = self.weight(uncertainty.to(logits.dtype)).expand_as(target)
        p = torch.softmax(logits, dim=1)[:, self.lesion_channel : self.lesion_channel + 1]
        dice = weighted_soft_dice(p, target, a, self.smooth)
        ce = ((1.0 - a) * voxel_cross_entropy(logits, target, self.lesion_channel)).mean()
        return dice + ce


def mc_dropout_variance(network: nn.Module, inputs: torch.Tensor, passes: int, lesion_channel: int = 1) -> torch.Tensor:
    """``U``: population variance over ``passes`` stochastic forward passes of the softmax lesion
    probability, ``(batch, 1, ...)``, detached.

    Runs under ``torch.no_grad`` with only the dropout modules in train mode (normalisation layers in
    eval mode, so BatchNorm running statistics are not updated by these extra passes); every
    module's mode is restored afterwards. Dropout masks come from the global torch RNG (seeded by
    the trainer). Needs ``passes >= 2`` and at least one dropout layer.
    """
    if passes < 2:
        raise ValueError(f"MC dropout needs at least 2 passes, got {passes}")
    dropouts = [m for m in network.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts or all(float(m.p) <= 0.0 for m in dropouts):
        raise ValueError("the network has no active dropout layer: the MC dropout variance would be 0")
    modes = {m: m.training for m in network.modules()}
    try:
        network.eval()
        for m in dropouts:
            m.train(True)
        with torch.no_grad():
            lesion = slice(lesion_channel, lesion_channel + 1)
            samples = [
                torch.softmax(main_output(network(inputs)).float(), dim=1)[:, lesion].double() for _ in range(passes)
            ]
            total = torch.stack(samples).sum(dim=0)
            total_sq = torch.stack([p * p for p in samples]).sum(dim=0)
            mean = total / passes
            variance = (total_sq / passes - mean * mean).clamp(min=0.0)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return variance.to(inputs.dtype).detach()


def pinball(prediction: torch.Tensor, target: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Elementwise check loss ``rho_tau(target - prediction)`` (broadcasting)."""
    residual = target - prediction
    return torch.maximum(tau * residual, (tau - 1.0) * residual)


class PinballLoss(nn.Module):
    """Mean pinball loss of a quantile regression output (see the module docstring).

    ``forward(prediction, target)``: ``prediction`` ``(batch, Q, ...)`` with channel ``c`` the
    ``quantiles[c]`` estimate, ``target`` ``(batch, 1, ...)`` (the clean image). Returns the mean of
    ``rho_{tau_c}(target - prediction_c)`` over every voxel, batch item and channel.
    """

    name = "pinball"
    needs_uncertainty = False
    taus: torch.Tensor

    def __init__(self, quantiles: Sequence[float] = DEFAULT_QUANTILES):
        super().__init__()
        levels = tuple(float(q) for q in quantiles)
        if not levels or any(not 0.0 < q < 1.0 for q in levels):
            raise ValueError(f"quantile levels must lie in (0, 1), got {list(levels)}")
        self.quantiles = levels
        self.register_buffer("taus", torch.tensor(levels, dtype=torch.float64), persistent=False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        q = len(self.quantiles)
        if prediction.dim() < 3 or prediction.shape[1] != q:
            raise ValueError(f"prediction must be (batch, {q} quantiles, ...), got {tuple(prediction.shape)}")
        if target.shape[0] != prediction.shape[0] or target.shape[1] != 1 or target.shape[2:] != prediction.shape[2:]:
            raise ValueError(
                f"target must be (batch, 1, ...) matching {tuple(prediction.shape)}, got {tuple(target.shape)}"
            )
        taus = self.taus.to(prediction.dtype).view(1, q, *([1] * (prediction.dim() - 2)))
        return pinball(prediction, target.to(prediction.dtype), taus).mean()


def build_loss(name: str, lesion_channel: int = 1) -> DiceCELoss | UncertaintyAwareLoss | BlobDiceCELoss:
    """The loss called ``name`` (one of :data:`LOSS_NAMES`; ``blob-dice-ce``: :mod:`.blob_loss`)."""
    if name == "dice-ce":
        return DiceCELoss(lesion_channel)
    if name == "uncertainty-aware":
        return UncertaintyAwareLoss(lesion_channel)
    if name == "blob-dice-ce":
        from .blob_loss import BlobDiceCELoss

        return BlobDiceCELoss(lesion_channel)
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSS_NAMES)}")


class _WithUncertainty(nn.Module):
    """``loss(logits, target, uncertainty)`` with the uncertainty bound, as a two-argument loss."""

    def __init__(self, loss: nn.Module, uncertainty: torch.Tensor):
        super().__init__()
        self.loss, self.uncertainty = loss, uncertainty

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target, self.uncertainty)


def supervised_loss(
    loss: DiceCELoss | UncertaintyAwareLoss | BlobDiceCELoss,
    heads: Sequence[torch.Tensor],
    target: torch.Tensor,
    uncertainty: torch.Tensor | None = None,
) -> torch.Tensor:
    """``loss`` of the main head, or MONAI's ``DeepSupervisionLoss`` (``"exp"`` weights) over all heads."""
    from monai.losses import DeepSupervisionLoss

    bound: nn.Module = loss
    if loss.needs_uncertainty:
        if uncertainty is None:
            raise ValueError(f"the {loss.name} loss needs the MC dropout uncertainty")
        bound = _WithUncertainty(loss, uncertainty)
    if len(heads) == 1:
        return bound(heads[0], target)
    return DeepSupervisionLoss(bound, weight_mode="exp")(list(heads), target)  # type: ignore[arg-type]
