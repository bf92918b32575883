"""The paper's Tables I-III (baseline vs cascade, ROI-0 vs ROI-16, Top-1/Top-2/all, component-count
correlations) on phantom lung cases, as JSON and Markdown.

Cases and ground truth
----------------------
:func:`phantom_lung_cases` draws phantoms (:func:`ConformalSegLib.phantoms.generator.make_phantoms`, which puts
about a quarter of its lesions in the lungs) and keeps those with at least one **lung lesion**. The
ground truth is the lung lesions only (:func:`lung_lesion_mask`): the cascade is a lung-tumour
pipeline, so a detected liver lesion is a false positive here, as in the paper's thoracic setting.

Models
------
No trained networks ship with the project, so :func:`evaluate_cascade` takes predictor factories.
The stand-ins of :func:`simulated_coarse_predictor` (a *simulated* coarse network: the blurred
true lesion mask of every organ plus false-positive blobs and smooth noise, seeded per case) and
:func:`hu_refiner` (an image-only ROI model: a smoothed soft-tissue-vs-air sigmoid) make the study
runnable anywhere; with real model cards pass ``lambda case: engine`` instead. The numbers measure
the *pipeline* under these stand-ins, not the paper's networks.

Metrics: Dice and HD95 (mm) of ``probability >= threshold`` against the truth, from
:mod:`ConformalSegLib.evaluation.metrics` (HD95 by MONAI; NaN/inf excluded from means and counted).
Correlations: Pearson and Spearman (``scipy.stats``) with two-sided p-values; NaN when a variable is
constant or fewer than 3 cases are finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats

from ..common.jsonable import jsonable
from ..evaluation.metrics import dice_from_masks, finite_mean, hd95
from ..io.volumes import Volume
from .components import label_components
from .config import CascadeConfig
from .pipeline import StageOutput, compute_lung_mask, run_cascade

__all__ = [
    "LungCase",
    "case_metrics",
    "correlation",
    "evaluate_cascade",
    "hu_refiner",
    "lung_lesion_mask",
    "paper_configs",
    "phantom_lung_cases",
    "report_markdown",
    "simulated_coarse_predictor",
    "write_report",
]


@dataclass
class LungCase:
    """A phantom with lung lesions: image (HU), full label map, lung-lesion truth (bool)."""

    case_id: str
    image: Volume
    labels: np.ndarray
    truth: np.ndarray
    seed: int


def lung_lesion_mask(labels: np.ndarray, lesion: int = 6, lung: int = 2) -> np.ndarray:
    """Lesion voxels of the lesion components (26-connected) whose one-voxel outer shell is mostly lung:
    at least half of the shell voxels that are not lesion carry the ``lung`` label."""
    labels = np.asarray(labels)
    comps, n = label_components(labels == lesion, 26)
    out = np.zeros(labels.shape, dtype=bool)
    for i, box in enumerate(ndimage.find_objects(comps), start=1):
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        mine = comps[grown] == i
        shell = ndimage.binary_dilation(mine) & ~mine & (labels[grown] != lesion)
        if shell.any() and np.count_nonzero(labels[grown][shell] == lung) >= 0.5 * np.count_nonzero(shell):
            out[grown] |= mine
    return out


def phantom_lung_cases(n: int, seed: int = 0, **phantom_kw: Any) -> list[LungCase]:
    """The phantoms among the first ``n`` of :func:`~ConformalSegLib.phantoms.generator.make_phantoms` that have a
    lung lesion (so typically about half of ``n``)."""
    from ..phantoms.generator import make_phantoms

    cases = []
    for i, phantom in enumerate(make_phantoms(n, seed=seed, **phantom_kw)):
        truth = lung_lesion_mask(phantom.labels)
        if truth.any():
            cases.append(
                LungCase(
                    phantom.case_id,
                    Volume(phantom.image, phantom.geometry, None),
                    phantom.labels,
                    truth,
                    seed=int(seed) * 100_003 + i,
                )
            )
    return cases


def simulated_coarse_predictor(
    case: LungCase, *, blur_mm: float = 1.5, false_positives: tuple[int, int] = (0, 6), noise: float = 0.08
) -> Callable[[Volume, int], StageOutput]:
    """A stand-in coarse network for ``case`` (deterministic from ``case.seed``): the blurred mask of
    *all* lesions (liver, kidney, spleen ones too), plus a uniform number in ``false_positives``
    (inclusive) of ellipsoidal Gaussian blobs (semi-axes 2-6 mm, height 0.6-0.95) centred on random
    body voxels, plus smooth noise of standard deviation ``noise`` inside the body, clipped to
    [0, 1]. It ignores the image it is given (it is a simulation of a network's output)."""
    rng = np.random.default_rng(case.seed)
    sp = np.asarray(case.image.geometry.spacing_zyx)
    labels = case.labels
    p = ndimage.gaussian_filter((labels == 6).astype(np.float32), blur_mm / sp)
    p = np.clip(p * 2.0, 0.0, 1.0)  # a lesion's core stays near 1, its rim near 0.5
    body = np.argwhere(labels > 0)
    for _ in range(int(rng.integers(false_positives[0], false_positives[1] + 1))):
        centre = body[rng.integers(len(body))]
        radius = rng.uniform(2.0, 6.0, 3)
        reach = np.ceil(2.0 * radius / sp).astype(int)
        box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(centre, reach, labels.shape))
        grids = np.meshgrid(
            *[(np.arange(b.start, b.stop) - c) * d / a for b, c, d, a in zip(box, centre, sp, radius)], indexing="ij"
        )
        blob = rng.uniform(0.6, 0.95) * np.exp(-sum(g * g for g in grids))
        p[box] = np.maximum(p[box], blob.astype(np.float32))
    field_ = ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 2.0)
    field_ *= np.float32(noise / max(float(field_.std()), 1e-6))
    probability = np.clip(p + field_ * (labels > 0), 0.0, 1.0).astype(np.float32)

    def predict(volume: Volume, mc_passes: int) -> StageOutput:
        if volume.geometry.shape != labels.shape:
            raise ValueError("the simulated coarse model only predicts its own full case")
        return StageOutput(probability, None)

    return predict


def hu_refiner(
    *, centre_hu: float = -350.0, width_hu: float = 60.0, smooth_mm: float = 1.0
) -> Callable[[Volume, int], StageOutput]:
    """An image-only ROI "model" for lung nodules: ``p = sigmoid((smoothed HU - centre_hu) / width_hu)``
    (soft tissue against lung air), then only the 6-connected soft-tissue region (``p >= 0.5``)
    nearest to the crop's centre keeps its probability; elsewhere ``p`` is scaled by 0.1, so chest
    wall and vessels in a wide ROI are mostly suppressed unless they touch the nodule. Variance (for
    ``mc_passes``): ``p (1 - p) / 4``, a deterministic stand-in for MC dropout."""

    def predict(volume: Volume, mc_passes: int) -> StageOutput:
        sp = np.asarray(volume.geometry.spacing_zyx)
        smooth = ndimage.gaussian_filter(np.asarray(volume.array, dtype=np.float32), smooth_mm / sp, mode="nearest")
        p = (1.0 / (1.0 + np.exp(-(smooth - centre_hu) / width_hu))).astype(np.float32)
        regions, n = label_components(p >= 0.5, 6)
        if n > 1:
            centre = (np.array(p.shape) - 1) / 2.0
            distance = ndimage.distance_transform_edt(regions == 0, sampling=sp, return_indices=True)[1]
            nearest = regions[tuple(distance[:, int(round(centre[0])), int(round(centre[1])), int(round(centre[2]))])]
            p = np.where(regions == nearest, p, np.float32(0.1) * p).astype(np.float32)
        return StageOutput(p, (0.25 * p * (1 - p)).astype(np.float32) if mc_passes else None)

    return predict


def case_metrics(
    probability: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Dice and HD95 (mm) of ``probability >= threshold`` against ``truth``."""
    mask = np.asarray(probability) >= np.float32(threshold)
    return {"dice": dice_from_masks(mask, truth), "hd95": hd95(mask, truth, spacing_zyx)}


def correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation with two-sided p-values over the pairs where both are finite."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xs, ys = xa[ok], ya[ok]
    out = {
        "n": int(ok.sum()),
        "pearson_r": math.nan,
        "pearson_p": math.nan,
        "spearman_rho": math.nan,
        "spearman_p": math.nan,
    }
    if xs.size >= 3 and np.ptp(xs) > 0 and np.ptp(ys) > 0:
        r = stats.pearsonr(xs, ys)
        s = stats.spearmanr(xs, ys)
        out.update(pearson_r=float(r[0]), pearson_p=float(r[1]), spearman_rho=float(s[0]), spearman_p=float(s[1]))
    return out


def paper_configs(base: CascadeConfig | None = None) -> dict[str, CascadeConfig]:
    """The settings of the paper's Tables I and II, derived from ``base`` (default: the default config)."""
    base = base or CascadeConfig()
    return {
        "top1_roi0": base.replace(top_k=1, roi_margin_voxels=0, roi_margin_mm=None),
        "top1_roi16": base.replace(top_k=1, roi_margin_voxels=16, roi_margin_mm=None),
        "top2_roi0": base.replace(top_k=2, roi_margin_voxels=0, roi_margin_mm=None),
        "all_roi0": base.replace(top_k=None, roi_margin_voxels=0, roi_margin_mm=None),
    }


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    dice_mean, _ = finite_mean([r["dice"] for r in rows])
    hd_mean, hd_excluded = finite_mean([r["hd95"] for r in rows])
    return {"n": len(rows), "dice": dice_mean, "hd95_mm": hd_mean, "hd95_excluded": hd_excluded}


def evaluate_cascade(
    cases: Sequence[LungCase],
    *,
    stage1: Callable[[LungCase], Any],
    stage2: Any,
    configs: dict[str, CascadeConfig] | None = None,
    threshold: float = 0.5,
    lung_from_labels: bool = False,
) -> dict[str, Any]:
    """Baseline (stage 1 alone) and every cascade setting on every case; returns the report dict.

    ``stage1(case)`` gives the case's coarse predictor (an engine or callable); ``stage2`` the ROI model.
    ``lung_from_labels``: use the phantom's lung label (2) instead of the classical HU algorithm.
    Table III groups cases by the number of coarse components (``stage1 >= stage1_threshold``,
    after merging) and correlates it, and the number the cascade removed, with Dice and HD95.
    """
    configs = configs or paper_configs()
    if lung_from_labels:
        configs = {name: c.replace(lung_source="labels", lung_labels=(2,)) for name, c in configs.items()}
    per_case: list[dict[str, Any]] = []
    for case in cases:
        sp = case.image.geometry.spacing_zyx
        predictor = stage1(case)
        row: dict[str, Any] = {"case_id": case.case_id, "truth_voxels": int(case.truth.sum())}
        lung = None
        for name, config in configs.items():
            if lung is None:  # the same for every setting (configs differ only after the lung mask)
                lung = compute_lung_mask(case.image, config, case.labels)
            result = run_cascade(case.image, config, predictor, stage2, lung_mask=lung)
            if "baseline" not in row:
                row["baseline"] = case_metrics(result.coarse_probability, case.truth, sp, threshold)
                row["n_coarse_components"] = len(result.components)
            row[name] = {**case_metrics(result.probability, case.truth, sp, threshold), "n_kept": len(result.kept)}
        per_case.append(row)
    names = ["baseline", *configs]
    summary = {name: _summary([r[name] for r in per_case]) for name in names}
    primary = next(iter(configs))
    counts = np.array([r["n_coarse_components"] for r in per_case], dtype=float)
    removed = counts - np.array([r[primary]["n_kept"] for r in per_case], dtype=float)
    dice = np.array([r[primary]["dice"] for r in per_case])
    hd = np.array([r[primary]["hd95"] for r in per_case])
    dice_gain = dice - np.array([r["baseline"]["dice"] for r in per_case])
    hd_gain = np.array([r["baseline"]["hd95"] for r in per_case]) - hd
    groups = {}
    for label, sel in (("1 component", counts == 1), ("2 components", counts == 2), ("3+ components", counts >= 3)):
        groups[label] = _summary([r[primary] for r, s in zip(per_case, sel) if s]) if sel.any() else {"n": 0}
    table3 = {
        "setting": primary,
        "groups": groups,
        "components_vs_dice": correlation(counts, dice),
        "components_vs_hd95": correlation(counts, hd),
        "removed_vs_dice_gain": correlation(removed, dice_gain),
        "removed_vs_hd95_reduction": correlation(removed, hd_gain),
    }
    return {
        "format": "conformalseg-cascade-evaluation",
        "threshold": threshold,
        "n_cases": len(per_case),
        "lung_mask": "phantom labels" if lung_from_labels else "classical HU algorithm",
        "configs": {name: {"fingerprint": c.fingerprint(), **c.parameters()} for name, c in configs.items()},
        "summary": summary,
        "table3": table3,
        "cases": per_case,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else ("p < 0.0001" if value < 1e-4 else f"p = {value:.4f}")


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (Tables I-III of the paper)."""
    s = report["summary"]

    def line(name: str, label: str) -> str:
        row = s[name]
        extra = f" ({row['hd95_excluded']} excluded)" if row.get("hd95_excluded") else ""
        return f"| {label} | {_fmt(row['dice'])} | {_fmt(row['hd95_mm'], 2)}{extra} |"

    names = list(report["configs"])
    out = [
        f"# Cascade evaluation ({report['n_cases']} phantom lung cases, lung mask: {report['lung_mask']}, "
        f"threshold {report['threshold']})",
        "",
        "## Table I: baseline vs cascade (Top-1)",
        "",
        "| System | Dice | HD95 (mm) |",
        "|---|---|---|",
        line("baseline", "Stage 1 alone (full volume)"),
    ]
    out += [line(n, f"Cascade {n}") for n in names if n.startswith("top1")]
    out += ["", "## Table II: components used (ROI-0)", "", "| Components | Dice | HD95 (mm) |", "|---|---|---|"]
    out += [line(n, n) for n in names if n.endswith("roi0")]
    t3 = report["table3"]
    out += [
        "",
        f"## Table III: component count ({t3['setting']})",
        "",
        "| Group / metric | Dice | HD95 (mm) |",
        "|---|---|---|",
    ]
    for label, g in t3["groups"].items():
        out.append(f"| {label} (n={g['n']}) | {_fmt(g.get('dice'))} | {_fmt(g.get('hd95_mm'), 2)} |")
    for key, label in (
        ("components_vs_dice", "coarse components vs Dice / HD95"),
        ("removed_vs_dice_gain", "components removed vs Dice gain / HD95 reduction"),
    ):
        other = t3["components_vs_hd95" if key == "components_vs_dice" else "removed_vs_hd95_reduction"]
        c = t3[key]
        out.append(
            f"| Pearson, {label} | {_fmt(c['pearson_r'], 2)} ({_p(c['pearson_p'])}) | "
            f"{_fmt(other['pearson_r'], 2)} ({_p(other['pearson_p'])}) |"
        )
        out.append(
            f"| Spearman, {label} | {_fmt(c['spearman_rho'], 2)} ({_p(c['spearman_p'])}) | "
            f"{_fmt(other['spearman_rho'], 2)} ({_p(other['spearman_p'])}) |"
        )
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], out_dir: str | PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """Write ``cascade_evaluation.json`` (non-finite numbers as strings "nan"/"inf") and
    ``cascade_evaluation.md`` into ``out_dir`` (atomically); return both paths."""
    from ..io.atomic import atomic_write_text

    out = Path(out_dir)
    text = json.dumps(jsonable(report, non_finite="string"), indent=2) + "\n"
    json_path = atomic_write_text(out / "cascade_evaluation.json", text, force=force)
    md_path = atomic_write_text(out / "cascade_evaluation.md", report_markdown(report), force=force)
    return json_path, md_path
