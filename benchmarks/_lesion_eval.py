"""The two measurements every lesion model in RESULTS.md gets, shared by ``eval_lesion_model.py`` and
``eval_inference_window.py``.

* :func:`held_out_test`: ``make_phantoms(n, seed)`` (default seed 4000: not a training stream, not the demo, not
  the cascade study) through the real :class:`~ConformalSegLib.inference.InferenceEngine` on each phantom's own
  grid, mask ``p >= 0.5``: per-case Dice, lesion-wise detection by size (a lesion is found when at least half of
  its voxels are in the mask), false-positive components per scan, inference seconds per case.
* :func:`demo_question`: the demo's phantoms (``write_phantom_dataset(..., seed=2026)``, :func:`demo_phantoms`),
  the model's maps, and ``splits`` random calibration/test splits (half for calibration) at eps = alpha = 0.1:
  CLS ECR and prediction compactness, expected-FNR control's PC and the fixed 0.5 threshold's Dice, the
  protocol of the demo's report. ``score`` is what the cutoffs apply to (``calibrate --score``; default the
  probability). The same question on phantoms of another seed (:func:`demo_phantoms`'s ``seed``) is how a
  choice made on the demo's phantoms, such as a score, is checked on phantoms it was not chosen on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

#: The demo's phantom seed and the held-out test's (see the module docstring).
DEMO_SEED, TEST_SEED = 2026, 4000


def held_out_test(card: Any, n: int, seed: int = TEST_SEED, device: str = "cpu") -> dict[str, Any]:
    """Per-case rows and the summary of ``card`` on ``make_phantoms(n, seed)`` (see the module docstring)."""
    from ConformalSegLib.evaluation.lesion_metrics import DetectionTally, lesion_detection
    from ConformalSegLib.evaluation.metrics import dice_from_masks
    from ConformalSegLib.inference import InferenceEngine
    from ConformalSegLib.io.volumes import Volume
    from ConformalSegLib.phantoms.generator import make_phantoms

    engine = InferenceEngine(card, device=device, seed=0)
    tally, rows, seconds = DetectionTally(), [], []
    for phantom in make_phantoms(n, seed=seed):
        t0 = time.perf_counter()
        prediction = engine.predict(Volume(phantom.image, phantom.geometry, None))
        seconds.append(time.perf_counter() - t0)
        mask, truth = prediction.probability >= 0.5, phantom.lesion_mask
        detection = lesion_detection(mask, truth, phantom.geometry.spacing_zyx)
        tally.add(detection)
        rows.append({"case_id": phantom.case_id, "lesion_voxels": int(truth.sum()), "dice": dice_from_masks(mask, truth)
                     if truth.any() else None, "lesions": detection.n_lesions, "found": detection.n_lesions
                     - detection.n_missed, "fp_components": detection.false_positive_components})  # fmt: skip
    dice = np.array([r["dice"] for r in rows if r["dice"] is not None])
    summary = tally.as_dict()
    return {
        "device": str(engine.device),
        "cases": rows,
        "detection": summary,
        "dice": dice,
        "dice_mean": float(dice.mean()),
        "dice_median": float(np.median(dice)),
        "found": summary["sensitivity_by_size"],
        "fp_per_scan": summary["false_positive_components_per_scan"],
        "seconds_median": float(np.median(seconds)),
    }


def demo_phantoms(folder: Path, cases: int, seed: int = DEMO_SEED) -> Path:
    """The demo's ``cases`` phantoms (seed 2026, or ``seed``) in ``folder`` (written once, then reused)."""
    from ConformalSegLib.phantoms.dataset import write_phantom_dataset

    if not (folder / "imagesTr").is_dir():
        write_phantom_dataset(folder, cases, seed=seed)
    return folder


def demo_question(
    card: Any, data: Path, cache: Path, splits: int, split_seed: int = 0, score: str = "identity"
) -> dict[str, Any]:
    """Inference on the demo phantoms in ``data`` (maps cached in ``cache``: a second call with another
    ``score`` reuses them), then CLS / CRC / the fixed threshold on ``score`` over ``splits`` splits drawn
    with ``split_seed``."""
    from ConformalSegLib.evaluation.protocol import evaluate_dataset
    from ConformalSegLib.inference import InferenceEngine
    from ConformalSegLib.inference.model_dataset import InferenceDataset
    from ConformalSegLib.phantoms.labels import LESION

    t0 = time.perf_counter()
    dataset = InferenceDataset(InferenceEngine(card, device="cpu", seed=0), data / "imagesTr", data / "labelsTr",
                               [LESION], cache)  # fmt: skip
    for _ in dataset:
        pass
    seconds = time.perf_counter() - t0
    result = evaluate_dataset(dataset, epsilons=(0.1,), alphas=(0.1,), splits=splits, seed=split_seed, hd95=False,
                              transforms=("identity",), lesionwise=False, score=score)  # fmt: skip
    rows = {(r["method"], r["alpha"]): r["metrics"] for r in result.summary_rows() if r.get("epsilon") == 0.1}
    cls, crc, fixed = rows[("cls", 0.1)], rows[("crc", None)], rows[("baseline", None)]
    return {
        "score": score,
        "seconds": seconds,
        "cls_ecr": cls["ecr"]["mean"],
        "cls_pc": cls["pc"]["mean"],
        "cls_pc_std": cls["pc"]["std"],
        "crc_pc": crc["pc"]["mean"],
        "fixed_dice": fixed["dice"]["mean"],
    }


def paired_dice_difference(cases: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-case Dice of one model minus a reference model's on the same held-out phantoms (rows of
    :func:`held_out_test`, matched by ``case_id``; lesion-free phantoms have no Dice and are left out).

    Returns the mean difference with a 95 % bootstrap interval over cases (``scipy.stats.bootstrap``, BCa,
    9,999 resamples, seed 0), the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``; zero
    differences dropped; ``None`` when every difference is zero) and how many cases each model wins. Two
    models measured on one set of phantoms differ by that set's luck as well as by skill: an interval that
    contains 0 says the phantoms cannot tell them apart.
    """
    from scipy import stats

    ref = {r["case_id"]: r["dice"] for r in reference}
    if set(ref) != {r["case_id"] for r in cases}:
        raise ValueError("paired comparison needs the same held-out phantoms for both models")
    d = np.array([r["dice"] - ref[r["case_id"]] for r in cases if r["dice"] is not None])
    if d.size < 2:
        raise ValueError(f"paired comparison needs at least 2 phantoms with a lesion, got {d.size}")
    if np.all(d == d[0]):  # a constant sample: no spread to resample (scipy's BCa would fail)
        low = high = float(d[0])
    else:
        ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=9999, random_state=0).confidence_interval
        low, high = float(ci.low), float(ci.high)
    p = None if np.all(d == 0) else float(stats.wilcoxon(d).pvalue)
    return {"cases": int(d.size), "mean": float(d.mean()), "ci95": (low, high), "wilcoxon_p": p,
            "better": int((d > 0).sum()), "worse": int((d < 0).sum())}  # fmt: skip
