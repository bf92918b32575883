"""Writing an :class:`~ConformalSegLib.evaluation.results.EvaluationResult` to a folder: JSON, Markdown, plots.

Files (all written atomically with :mod:`ConformalSegLib.io.atomic`; existing files are never
overwritten unless ``force=True``, and the check happens for *all* files before any is written):

* ``results.json`` -- plain JSON (``null`` for NaN and infinite values): configuration, the
  summary rows (mean/std over splits), every per-split array and the per-case arrays.
* ``report.md`` -- tables: baseline vs CLS vs CRC, ECR vs alpha with the ``1 - alpha`` target and a
  PASS/CHECK verdict (mean ECR ``>= 1 - alpha - z*sqrt(alpha(1-alpha)/n_test)``, see
  :func:`ConformalSegLib.evaluation.results.binomial_tolerance`), confidence-set coverage and sizes, and
  prediction compactness.
* ``ecr_vs_alpha.png``, ``fnr_before_after.png``, ``pc_vs_alpha.png``, ``coverage_vs_alpha.png``,
  ``lesion_sensitivity_by_size.png`` -- drawn with matplotlib's Agg canvas (no pyplot, no global backend
  change). The lesion-level sections (lesion-level control, lesion-wise detection by lesion size, the
  slider-safe bands) are :mod:`.report_lesion`'s.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.threshold_scores import DEFAULT_SCORE
from ..io.atomic import OVERWRITE_FIX, atomic_output, atomic_write_text
from .figures import agg_figure
from .markdown import cutoff_text, fmt, pm, table, trivial_text, verdict
from .report_lesion import lesion_sections, method_label, plot_sensitivity_by_size
from .results import BASELINE_CUTOFF, EvaluationResult, binomial_tolerance, coverage_status, mean_std

__all__ = ["REPORT_FILES", "render_markdown", "write_report"]

REPORT_FILES = (
    "results.json",
    "report.md",
    "ecr_vs_alpha.png",
    "fnr_before_after.png",
    "pc_vs_alpha.png",
    "coverage_vs_alpha.png",
    "lesion_sensitivity_by_size.png",
)


def render_markdown(result: EvaluationResult, z: float = 2.0) -> str:
    """The Markdown report of ``result`` (see module docstring)."""
    out = _intro(result, z) + _methods_section(result) + _ecr_section(result, z)
    if not result.sets:
        out += ["## Confidence sets: coverage", "", "No confidence sets were evaluated.", ""]
    else:
        out += _sets_coverage_section(result, z) + _sets_size_section(result)
    return "\n".join(out + _pc_section(result) + lesion_sections(result, z))


def _intro(result: EvaluationResult, z: float) -> list[str]:
    cfg = result.config
    n_pop = result.mean_population_test
    population = "cases with a lesion" if cfg.empty == "exclude" else "all cases"
    out = ["# ConformalSeg evaluation report", ""]
    out += [
        f"- Cases: {result.n_cases} ({result.n_empty_lesions} without lesion voxels)",
        f"- Protocol: {cfg.splits} random calibration/test splits (seed {cfg.seed}), {result.n_cal} calibration "
        f"and {result.n_test} test case(s) per split (cal fraction {cfg.cal_fraction})",
        f"- CLS / CRC / baseline population: {population} (empty-lesion policy '{cfg.empty}'); "
        f"on average {n_pop:.1f} test and {np.mean(result.cls['n_cal']):.1f} calibration case(s) per split",
        f"- Main setting: epsilon = {cfg.main_epsilon}, alpha = {cfg.main_alpha}; baseline: "
        + (f"prob >= {BASELINE_CUTOFF}" if cfg.score == DEFAULT_SCORE else f"score >= {BASELINE_CUTOFF}"),
        *(
            []
            if cfg.score == DEFAULT_SCORE
            else [
                f"- Score: every method thresholds the {cfg.score} score of the probability map, not the "
                f"probability (`--score {cfg.score}`); the confidence sets transform that score."
            ]
        ),
        "- Every number is the mean ± standard deviation over splits of a per-split mean over test cases.",
        f"- Verdicts: PASS when the mean coverage is at least 1 - alpha - {z:g}·sqrt(alpha(1-alpha)/n_test) "
        "(binomial tolerance), CHECK otherwise; 'trivial' when the calibration side was too small for alpha "
        "in every split (whole-image masks: coverage holds trivially).",
        "",
    ]
    if result.warnings:
        out += ["**Warnings**", ""] + [f"- {w}" for w in result.warnings] + [""]
    return out


def _methods_section(result: EvaluationResult) -> list[str]:
    """Baseline vs CLS (at the main alpha) vs CRC, one table per epsilon."""
    cfg = result.config
    S, a_main = cfg.splits, cfg.main_alpha_index
    out = [
        "## Baseline vs CLS vs CRC",
        "",
        f"CLS at alpha = {cfg.main_alpha}: P(FNR <= epsilon) >= 1 - alpha; CRC: E[FNR] <= epsilon. "
        "ECR = fraction of test cases with FNR <= epsilon. HD95 (mm) at the main setting only; test cases "
        "with an empty prediction or lesion are left out of its mean (count per split shown).",
        "",
    ]
    for e, eps in enumerate(cfg.epsilons):
        rows = []
        hd_base = hd_cls = "—"
        if e == cfg.main_epsilon_index and cfg.hd95:
            hd_base = f"{pm(result.baseline['hd95'], 2)} (excl. {np.mean(result.baseline['hd95_excluded']):.1f})"
            hd_cls = f"{pm(result.cls['hd95'], 2)} (excl. {np.mean(result.cls['hd95_excluded']):.1f})"
        rows.append(
            [
                method_label("baseline", cfg.score),
                f"{BASELINE_CUTOFF}",
                pm(result.baseline["ecr"][:, e]),
                pm(result.baseline["fnr"]),
                pm(result.baseline["pc"], 4),
                pm(result.baseline["dice"]),
                hd_base,
                "0",
            ]
        )
        rows.append(
            [
                f"CLS (alpha = {cfg.main_alpha})",
                cutoff_text(result.cls["cutoff"][:, e, a_main]),
                pm(result.cls["ecr"][:, e, a_main]),
                pm(result.cls["fnr"][:, e, a_main]),
                pm(result.cls["pc"][:, e, a_main], 4),
                pm(result.cls["dice"][:, e, a_main]),
                hd_cls,
                trivial_text(int(result.cls["trivial"][:, e, a_main].sum()), S),
            ]
        )
        rows.append(
            [
                "CRC (expected FNR)",
                cutoff_text(result.crc["cutoff"][:, e]),
                pm(result.crc["ecr"][:, e]),
                pm(result.crc["fnr"][:, e]),
                pm(result.crc["pc"][:, e], 4),
                pm(result.crc["dice"][:, e]),
                "—",
                trivial_text(int(result.crc["trivial"][:, e].sum()), S),
            ]
        )
        out += [f"### epsilon = {eps}", ""]
        out += table(["Method", "Cutoff", "ECR", "Mean FNR", "PC", "Dice", "HD95 (mm)", "Trivial splits"], rows)
    return out


def _ecr_section(result: EvaluationResult, z: float) -> list[str]:
    """CLS: ECR against the 1 - alpha target for every (epsilon, alpha), with verdicts."""
    cfg = result.config
    S, n_pop = cfg.splits, result.mean_population_test
    out = [
        "## CLS: ECR vs alpha",
        "",
        f"Target: ECR >= 1 - alpha. Tolerance = {z:g}·sqrt(alpha(1-alpha)/n_test) with n_test = {n_pop:.1f}.",
        "",
    ]
    for e, eps in enumerate(cfg.epsilons):
        rows = []
        for a, alpha in enumerate(cfg.alphas):
            ecr = result.cls["ecr"][:, e, a]
            mean = float(mean_std(ecr)[0])
            rows.append(
                [
                    f"{alpha}",
                    fmt(1 - alpha),
                    pm(ecr),
                    fmt(binomial_tolerance(alpha, n_pop, z)),
                    verdict(coverage_status(mean, alpha, n_pop, z), int(result.cls["trivial"][:, e, a].sum()), S),
                    pm(result.cls["fnr"][:, e, a]),
                    trivial_text(int(result.cls["trivial"][:, e, a].sum()), S),
                ]
            )
        out += [f"### epsilon = {eps}", ""]
        out += table(["alpha", "Target 1-alpha", "ECR", "Tolerance", "Verdict", "Mean FNR", "Trivial splits"], rows)
    return out


def _sets_coverage_section(result: EvaluationResult, z: float) -> list[str]:
    """Confidence sets: inner / outer / joint coverage per transform and mode, with verdicts."""
    cfg = result.config
    S = cfg.splits
    out = ["## Confidence sets: coverage", ""]
    out += [
        "Inner coverage: the inner set lies inside the true lesion; outer: the outer set contains it; "
        "joint: both. Marginal sets guarantee inner and outer coverage >= 1 - alpha each; joint-split "
        "sets (alpha/2 each) guarantee joint coverage >= 1 - alpha. All cases (with or without lesion) "
        f"are used; {result.n_test} test case(s) per split. Baseline 0.5 mask for reference: inside the "
        f"lesion {pm(result.baseline['inside'])}, containing it {pm(result.baseline['contains'])}.",
        "",
    ]
    for name, modes in result.sets.items():
        for mode, arrays in modes.items():
            rows = []
            for a, alpha in enumerate(cfg.alphas):
                if mode == "marginal":
                    states = [
                        coverage_status(float(mean_std(arrays[k][:, a])[0]), alpha, result.n_test, z)
                        for k in ("inner_coverage", "outer_coverage")
                    ]
                    status = "n/a" if "n/a" in states else ("PASS" if states == ["PASS", "PASS"] else "CHECK")
                else:
                    status = coverage_status(
                        float(mean_std(arrays["joint_coverage"][:, a])[0]), alpha, result.n_test, z
                    )
                shown = verdict(status, int(arrays["trivial"][:, a].sum()), S)
                rows.append(
                    [
                        f"{alpha}",
                        fmt(1 - alpha),
                        pm(arrays["inner_coverage"][:, a]),
                        pm(arrays["outer_coverage"][:, a]),
                        pm(arrays["joint_coverage"][:, a]),
                        shown,
                        trivial_text(int(arrays["trivial"][:, a].sum()), S),
                    ]
                )
            out += [f"### transform {name}, {mode}", ""]
            out += table(["alpha", "Target 1-alpha", "Inner", "Outer", "Joint", "Verdict", "Trivial splits"], rows)
    return out


def _sets_size_section(result: EvaluationResult) -> list[str]:
    out = ["## Confidence sets: mean sizes", ""]
    for name, modes in result.sets.items():
        for mode, arrays in modes.items():
            rows = [
                [
                    f"{alpha}",
                    pm(arrays["inner_voxels"][:, a], 1),
                    pm(arrays["inner_ml"][:, a], 3),
                    pm(arrays["outer_voxels"][:, a], 1),
                    pm(arrays["outer_ml"][:, a], 3),
                ]
                for a, alpha in enumerate(result.config.alphas)
            ]
            out += [f"### transform {name}, {mode}", ""]
            out += table(["alpha", "Inner (voxels)", "Inner (mL)", "Outer (voxels)", "Outer (mL)"], rows)
    return out


def _pc_section(result: EvaluationResult) -> list[str]:
    cfg = result.config
    out = ["## Prediction compactness (predicted / total voxels)", ""]
    header = ["alpha"] + [f"CLS epsilon={eps}" for eps in cfg.epsilons]
    rows = [
        [f"{alpha}"] + [pm(result.cls["pc"][:, e, a], 4) for e in range(len(cfg.epsilons))]
        for a, alpha in enumerate(cfg.alphas)
    ]
    rows.append(["CRC (no alpha)"] + [pm(result.crc["pc"][:, e], 4) for e in range(len(cfg.epsilons))])
    rows.append([f"baseline {BASELINE_CUTOFF}"] + [pm(result.baseline["pc"], 4)] * len(cfg.epsilons))
    return out + table(header, rows)


# ----------------------------------------------------------------------------- plots


def _alpha_axis(ax, alphas: tuple[float, ...]) -> np.ndarray:
    x = np.asarray(alphas, dtype=np.float64)
    grid = np.linspace(0, max(x.max() * 1.1, 0.05), 50)
    ax.plot(grid, 1 - grid, color="black", lw=1.2, ls="--", label="target 1 - alpha")
    ax.set_xlabel("alpha")
    ax.grid(alpha=0.3)
    return x


def _plot_ecr(result: EvaluationResult):
    cfg = result.config
    fig = agg_figure()
    ax = fig.add_subplot(111)
    x = _alpha_axis(ax, cfg.alphas)
    for e, eps in enumerate(cfg.epsilons):
        mean, std = mean_std(result.cls["ecr"][:, e, :])
        line = ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"CLS epsilon={eps}")
        base = float(mean_std(result.baseline["ecr"][:, e])[0])
        if np.isfinite(base):
            ax.axhline(base, color=line[0].get_color(), ls=":", lw=1, label=f"baseline 0.5, epsilon={eps}")
    ax.set_ylabel("ECR = P(FNR <= epsilon) on test cases")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("Empirical coverage vs alpha (mean ± std over splits)")
    ax.legend(fontsize=7, loc="lower left")
    return fig


def _plot_fnr(result: EvaluationResult):
    cfg = result.config
    test_pop = result.test_mask & result.population[None, :]
    base = np.broadcast_to(result.per_case["baseline_fnr"][None, :], test_pop.shape)[test_pop]
    cls = result.per_case["cls_main_fnr"][test_pop]
    base, cls = base[np.isfinite(base)], cls[np.isfinite(cls)]
    fig = agg_figure()
    ax = fig.add_subplot(111)
    bins = np.linspace(0, 1, 41)
    ax.hist(base, bins=bins, histtype="stepfilled", alpha=0.45, density=True, label="baseline prob >= 0.5")
    ax.hist(
        cls,
        bins=bins,
        histtype="stepfilled",
        alpha=0.45,
        density=True,
        label=f"CLS epsilon={cfg.main_epsilon}, alpha={cfg.main_alpha}",
    )
    ax.axvline(cfg.main_epsilon, color="black", ls="--", lw=1.2, label=f"epsilon = {cfg.main_epsilon}")
    ax.set_xlabel("test FNR (pooled over splits and test cases)")
    ax.set_ylabel("density")
    ax.set_title("False-negative rate before (0.5) and after CLS")
    ax.legend(fontsize=8)
    return fig


def _plot_pc(result: EvaluationResult):
    cfg = result.config
    fig = agg_figure()
    ax = fig.add_subplot(111)
    x = np.asarray(cfg.alphas, dtype=np.float64)
    for e, eps in enumerate(cfg.epsilons):
        mean, std = mean_std(result.cls["pc"][:, e, :])
        line = ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"CLS epsilon={eps}")
        crc = float(mean_std(result.crc["pc"][:, e])[0])
        if np.isfinite(crc):
            ax.axhline(crc, color=line[0].get_color(), ls="--", lw=1, label=f"CRC epsilon={eps}")
    base = float(mean_std(result.baseline["pc"])[0])
    if np.isfinite(base):
        ax.axhline(base, color="black", ls=":", lw=1.2, label="baseline 0.5")
    ax.set_xlabel("alpha")
    ax.set_ylabel("PC = predicted / total voxels")
    ax.set_title("Prediction compactness vs alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _plot_coverage(result: EvaluationResult):
    cfg = result.config
    fig = agg_figure()
    ax = fig.add_subplot(111)
    if not result.sets:
        ax.text(0.5, 0.5, "no confidence sets evaluated", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    x = _alpha_axis(ax, cfg.alphas)
    for name, modes in result.sets.items():
        for mode, arrays in modes.items():
            keys = ("inner_coverage", "outer_coverage") if mode == "marginal" else ("joint_coverage",)
            for key in keys:
                mean, std = mean_std(arrays[key])
                ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"{name} {mode}: {key.split('_')[0]}")
    ax.set_ylabel("coverage on test cases")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("Confidence-set coverage vs alpha (mean ± std over splits)")
    ax.legend(fontsize=7, loc="lower left")
    return fig


# ----------------------------------------------------------------------------- writing


def write_report(
    result: EvaluationResult, out_dir: str | PathLike[str], *, force: bool = False, z: float = 2.0
) -> list[Path]:
    """Write all :data:`REPORT_FILES` into ``out_dir`` (created if needed); return their paths.

    Raises :class:`ConformalSegError` before writing anything when one of the files exists and
    ``force`` is False, or when ``out_dir`` is a file.
    """
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ConformalSegError("output folder is an existing file", path=folder, fix="give a folder path")
    paths = [folder / name for name in REPORT_FILES]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise ConformalSegError(f"output file(s) already exist: {', '.join(existing)}", path=folder, fix=OVERWRITE_FIX)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConformalSegError(
            f"cannot create the output folder ({exc.strerror or exc})",
            path=folder,
            fix="choose a writable output location",
        ) from exc
    written: list[Path] = []
    text = json.dumps(result.to_dict(), indent=1, allow_nan=False)
    written.append(atomic_write_text(paths[0], text + "\n", force=force))
    written.append(atomic_write_text(paths[1], render_markdown(result, z), force=force))
    for path, draw in zip(paths[2:], (_plot_ecr, _plot_fnr, _plot_pc, _plot_coverage, plot_sensitivity_by_size)):
        fig = draw(result)
        with atomic_output(path, force=force) as tmp:
            fig.savefig(tmp, format="png")
        written.append(path)
    return written
