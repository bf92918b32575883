"""Held-out evaluation of a lesion network: during training (checkpoint selection) and at the end.

* :func:`validation_dice` (:func:`validation_scores` of :func:`validation_maps`) -- after an epoch, the
  network (eval mode, no dropout) runs MONAI's ``sliding_window_inference`` with the card's window on the
  held-out cases *already preprocessed* by the card's pipeline; the score is the mean per-case lesion Dice
  of ``p >= 0.5`` on the network grid over the cases that have a lesion. By default it selects the
  checkpoint, so it is a validation score, not a test result. Beside it, ``val_cls_pc`` tracks what the
  per-scan guarantee would cost (not used for selection by default): the CLS cutoff at
  ``eps = alpha = 0.1`` (:data:`CLS_EPSILON`, :data:`CLS_ALPHA`) computed from the held-out scans' own exact
  critical cutoffs (:func:`~ConformalSegLib.conformal.cls.critical_cutoff`,
  :func:`~ConformalSegLib.conformal.cls.conformal_lower_cutoff`), and the mean share of every held-out
  scan's voxels in its mask ``p >= cutoff``. It is pooled (no calibration/test split: the cutoff and the
  share come from the same scans), on the network grid, so it is a trend to follow across epochs, not
  the demo's prediction compactness. It is a quantile that a few hard scans set: on 48 held-out phantoms
  its 95 % bootstrap interval is 0.031-0.091 for the shipped model, as wide as its whole range over that
  model's run (0.035-0.083; ``benchmarks/eval_validation_noise.py``, ``benchmarks/RESULTS.md``), so
  selecting by it (``select_by="cls-pc"``) needs many more held-out cases than selecting by Dice.
* :func:`evaluate_heldout` -- the final report, with the real
  :class:`~ConformalSegLib.inference.engine.InferenceEngine` on each case's own grid: per-case Dice,
  pooled Dice, and lesion-wise detection (:mod:`ConformalSegLib.evaluation.lesion_metrics`: sensitivity by
  lesion size, false-positive components and mL per scan).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..evaluation.lesion_metrics import DetectionTally, lesion_detection
from .data import PreparedCase, TrainingCase
from .networks import main_output
from .optimization import CancelToken

THRESHOLD = 0.5
CLS_EPSILON = 0.1  #: tolerance of the tracked CLS cost (``val_cls_pc``)
CLS_ALPHA = 0.1  #: risk level of the tracked CLS cost


def validation_maps(
    network: torch.nn.Module, cases: Sequence[PreparedCase], card: Any, device: torch.device
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(p, truth)`` of every prepared held-out case on the network grid: the lesion probability of
    ``network`` (eval mode, no dropout; MONAI's sliding window with the card's window) and the boolean
    lesion mask. The network's training mode is restored afterwards."""
    from monai.inferers import sliding_window_inference

    was_training = network.training
    network.eval()
    window = card.inference
    maps = []
    try:
        with torch.no_grad():
            for case in cases:
                logits = sliding_window_inference(
                    case.image[None].to(device),
                    list(window.patch_size),
                    window.sw_batch_size,
                    lambda x: main_output(network(x)),
                    overlap=window.overlap,
                    mode="gaussian",
                )
                assert isinstance(logits, torch.Tensor)  # one output tensor, not a tuple or dict
                p = torch.softmax(logits.float(), dim=1)[0, 1].cpu().numpy()
                maps.append((p, case.lesion[0].numpy() > 0.5))
    finally:
        network.train(was_training)
    return maps


def validation_scores(maps: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """``val_dice``, ``val_cases_with_lesion`` and ``val_cls_pc`` of :func:`validation_maps`' output (see
    the module docstring; ``None`` without a held-out lesion)."""
    from ..conformal.cls import conformal_lower_cutoff, critical_cutoff
    from ..evaluation.metrics import dice_from_masks

    scores, cutoffs = [], []
    for p, truth in maps:
        if truth.any():
            scores.append(dice_from_masks(p >= THRESHOLD, truth))
            cutoffs.append(critical_cutoff(p, truth, CLS_EPSILON))
    pc = None
    if cutoffs:  # mask p >= cutoff; a cutoff of -inf (too few scans for alpha) masks every voxel
        cutoff = conformal_lower_cutoff(np.asarray(cutoffs), CLS_ALPHA)
        pc = float(np.mean([np.count_nonzero(p >= cutoff) / p.size for p, _ in maps]))
    return {
        "val_dice": float(np.mean(scores)) if scores else None,
        "val_cases_with_lesion": len(scores),
        "val_cls_pc": pc,
    }


def validation_dice(
    network: torch.nn.Module, cases: Sequence[PreparedCase], card: Any, device: torch.device
) -> dict[str, Any]:
    """Mean per-case lesion Dice (``p >= 0.5``) of ``network`` on prepared held-out cases, and the pooled
    CLS cost ``val_cls_pc`` (:func:`validation_scores` of :func:`validation_maps`)."""
    return validation_scores(validation_maps(network, cases, card, device))


def evaluate_heldout(
    card: Any,
    cases: Sequence[TrainingCase],
    lesion_labels: Sequence[int],
    device: torch.device,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Held-out Dice and lesion-wise detection with the real inference engine (``p >= 0.5``, no MC dropout)."""
    from ..evaluation.metrics import dice_from_masks
    from ..inference.engine import InferenceEngine

    if not cases:
        return {"cases": [], "mean_dice": None, "pooled_dice": None, "threshold": THRESHOLD, "mc_dropout": 0}
    engine = InferenceEngine(card, device=device, cancel=cancel)
    rows: list[dict[str, Any]] = []
    tally = DetectionTally()
    tp = predicted = truth_total = 0
    for case in cases:
        image, labels = case.volumes()
        prediction = engine.predict(image)
        mask = prediction.probability >= THRESHOLD
        truth = np.isin(np.asarray(labels.array), np.asarray(list(lesion_labels)))
        detection = lesion_detection(mask, truth, image.geometry.spacing_zyx)
        tally.add(detection)
        tp += int(np.count_nonzero(mask & truth))
        predicted += int(np.count_nonzero(mask))
        truth_total += int(np.count_nonzero(truth))
        rows.append(
            {
                "case_id": case.case_id,
                "dice": dice_from_masks(mask, truth),
                "lesion_voxels": int(np.count_nonzero(truth)),
                "predicted_voxels": int(np.count_nonzero(mask)),
                "lesions": detection.n_lesions,
                "lesions_detected": detection.n_lesions - detection.n_missed,
                "false_positive_components": detection.false_positive_components,
                "seconds": round(float(prediction.seconds), 4),
            }
        )
    with_lesion = [r["dice"] for r in rows if r["lesion_voxels"] > 0]
    return {
        "cases": rows,
        "threshold": THRESHOLD,
        "mc_dropout": 0,
        "mean_dice": float(np.mean(with_lesion)) if with_lesion else None,
        "median_dice": float(np.median(with_lesion)) if with_lesion else None,
        "cases_with_lesion": len(with_lesion),
        "pooled_dice": float(2 * tp / (predicted + truth_total)) if predicted + truth_total else None,
        "detection": tally.as_dict(),
        "mean_seconds_per_case": float(np.mean([r["seconds"] for r in rows])),
    }
