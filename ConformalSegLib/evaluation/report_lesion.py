"""The lesion-level sections of the evaluation report: lesion-level control against its target, lesion-wise
detection of every method by lesion size, and what the slider-safe bands cost (Markdown and one figure).

Every number is the mean ± standard deviation over splits of a per-split mean over test scans, as in
:mod:`.report`; the population of these sections is the scans with at least one lesion.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..conformal.guarantee_sentences import percent
from ..conformal.threshold_scores import DEFAULT_SCORE
from .figures import agg_figure
from .lesion_metrics import SIZE_CLASSES
from .markdown import cutoff_text, fmt, pm, table, trivial_text, verdict
from .results import EvaluationResult, binomial_tolerance, coverage_status, mean_std

METHOD_LABELS = {
    "baseline": "baseline (prob >= 0.5)",
    "cls": "CLS (voxel FNR)",
    "crc": "CRC (expected FNR)",
    "lesion": "lesion-level",
}


def method_label(method: str, score: str) -> str:
    """The report's name of a method; the baseline thresholds the score when there is one."""
    if method == "baseline" and score != DEFAULT_SCORE:
        return "baseline (score >= 0.5)"
    return METHOD_LABELS.get(method, method)


def lesion_sections(result: EvaluationResult, z: float = 2.0) -> list[str]:
    """All lesion-level sections (empty when the result has no lesion-level part)."""
    if not result.lesion:
        return []
    return _lesion_ecr_section(result, z) + _lesionwise_section(result) + _bands_section(result, z)


def _lesion_ecr_section(result: EvaluationResult, z: float) -> list[str]:
    cfg = result.config
    S, n_l = cfg.splits, float(np.mean(result.lesion["n_test"]))
    joint = "" if cfg.voxel_epsilon is None else f" and voxel FNR <= {cfg.voxel_epsilon} (joint)"
    out = [
        "## Lesion-level control: lesion ECR vs alpha",
        "",
        f"Guarantee: P(missed lesions <= floor(epsilon L){joint}) >= 1 - alpha on scans with a lesion; a lesion "
        f"is found when at least {percent(cfg.detect_fraction)} of its voxels are in the mask. Lesion ECR = "
        f"fraction of test scans keeping it. Tolerance = {z:g}·sqrt(alpha(1-alpha)/n_test), n_test = {n_l:.1f}.",
        "",
    ]
    for e, eps in enumerate(cfg.epsilons):
        rows = []
        for a, alpha in enumerate(cfg.alphas):
            ecr = result.lesion["lesion_ecr"][:, e, a]
            trivial = int(result.lesion["trivial"][:, e, a].sum())
            status = coverage_status(float(mean_std(ecr)[0]), alpha, n_l, z)
            rows.append(
                [
                    f"{alpha}",
                    fmt(1 - alpha),
                    pm(ecr),
                    fmt(binomial_tolerance(alpha, n_l, z)),
                    verdict(status, trivial, S),
                    pm(result.lesion["missed_rate"][:, e, a]),
                    cutoff_text(result.lesion["cutoff"][:, e, a]),
                    pm(result.lesion["pc"][:, e, a], 4),
                    pm(result.lesion["dice"][:, e, a]),
                    trivial_text(trivial, S),
                ]
            )
        out += [f"### epsilon = {eps}", ""]
        header = ["alpha", "Target", "Lesion ECR", "Tolerance", "Verdict", "Missed-lesion rate", "Cutoff", "PC",
                  "Dice", "Trivial splits"]  # fmt: skip
        out += table(header, rows)
    return out


def _lesionwise_section(result: EvaluationResult) -> list[str]:
    cfg = result.config
    rows = []
    for row in result.lesionwise_rows():
        sens = [_stat(row["sensitivity"][name]) for name, _, _ in SIZE_CLASSES]
        rows.append(
            [
                method_label(row["method"], cfg.score),
                *sens,
                _stat(row["missed_rate"]),
                _stat(row["lesion_ecr"]),
                _stat(row["fp_components"], 2),
                _stat(row["fp_ml"], 3),
            ]
        )
    counts = result.lesionwise.get("lesions_per_class", {})
    per_split = ", ".join(
        f"{name}: {float(np.mean(counts[name])):.1f}" for name, _, _ in SIZE_CLASSES if name in counts
    )
    out = [
        "## Lesion-wise detection (main setting)",
        "",
        f"At epsilon = {cfg.main_epsilon} (alpha = {cfg.main_alpha} for CLS and lesion-level): sensitivity = found "
        "lesions / lesions of the test scans, by equivalent radius (pooled per split; lesions per split "
        f"{per_split}); missed-lesion rate = mean of missed / L per scan; lesion ECR = fraction of scans with "
        "missed <= floor(epsilon L); false positives = predicted components touching no lesion, per scan.",
        "",
    ]
    header = ["Method", *(f"Sensitivity {name}" for name, _, _ in SIZE_CLASSES), "Missed-lesion rate", "Lesion ECR",
              "FP components / scan", "FP mL / scan"]  # fmt: skip
    return out + table(header, rows)


def _bands_section(result: EvaluationResult, z: float) -> list[str]:
    cfg = result.config
    out = [
        "## Slider-safe bands: every epsilon at once",
        "",
        f"A slider-safe band holds for every epsilon of the grid {list(cfg.epsilons)} at once (one event), so "
        "epsilon may be chosen after looking. 'Simultaneous' = fraction of test scans that keep the promise at "
        "every epsilon with the band; 'post hoc' = the same with the per-epsilon thresholds (what choosing "
        "epsilon after looking gives). PC: band / per-epsilon method at each epsilon (the cost of simultaneity).",
        "",
    ]
    for method, band in result.bands.items():
        fixed = result.cls if method == "cls" else result.lesion
        n_t = float(np.mean(fixed["n_test"]))
        rows = []
        for a, alpha in enumerate(cfg.alphas):
            sim = band["simultaneous_ecr"][:, a]
            trivial = int(band["trivial"][:, :, a].all(axis=1).sum())
            status = coverage_status(float(mean_std(sim)[0]), alpha, n_t, z)
            pcs = " / ".join(
                f"{_mean(band['pc'][:, e, a])} vs {_mean(fixed['pc'][:, e, a])}" for e in range(len(cfg.epsilons))
            )
            rows.append([f"{alpha}", pm(sim), verdict(status, trivial, cfg.splits), pm(band["posthoc_ecr"][:, a]),
                         pcs, trivial_text(trivial, cfg.splits)])  # fmt: skip
        label = "CLS (voxel FNR)" if method == "cls" else "lesion-level"
        out += [f"### {label}", ""]
        out += table(["alpha", "Simultaneous ECR", "Verdict", "Post-hoc ECR (per-epsilon)",
                       "PC band vs per-epsilon, by epsilon", "Trivial splits"], rows)  # fmt: skip
    return out


def _mean(values: np.ndarray) -> str:
    return fmt(float(mean_std(values)[0]), 4)


def _stat(value: dict[str, float], digits: int = 3) -> str:
    mean, std = value["mean"], value["std"]
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def plot_sensitivity_by_size(result: EvaluationResult) -> Any:
    """Bar chart: lesion-wise sensitivity by size class for every method at the main setting."""
    fig = agg_figure(7.0, 3.6)
    ax = fig.add_subplot(111)
    rows = result.lesionwise_rows()
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(SIZE_CLASSES))
    for k, row in enumerate(rows):
        means = [row["sensitivity"][name]["mean"] for name, _, _ in SIZE_CLASSES]
        stds = [row["sensitivity"][name]["std"] for name, _, _ in SIZE_CLASSES]
        ax.bar(x + (k - (len(rows) - 1) / 2) * width, np.nan_to_num(means), width, yerr=np.nan_to_num(stds),
               label=method_label(row["method"], result.config.score), capsize=2)  # fmt: skip
    ax.set_xticks(x, [f"radius {name}" for name, _, _ in SIZE_CLASSES])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("lesion-wise sensitivity")
    ax.set_title(f"Lesions found at epsilon = {result.config.main_epsilon}, alpha = {result.config.main_alpha}")
    ax.legend(fontsize=8, loc="lower right")
    return fig
