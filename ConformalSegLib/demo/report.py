"""The demo's ``report.md``: what the calibrated profiles guarantee and how they behaved on held-out data."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..evaluation.results import EvaluationResult

if TYPE_CHECKING:
    from .workflow import DemoSettings

__all__ = ["relink", "report_text"]


def _row(result: EvaluationResult, method: str, epsilon: float, alpha: float | None = None) -> dict:
    for row in result.summary_rows():
        if row["method"] == method and row["epsilon"] == epsilon and row["alpha"] == alpha:
            return row
    raise KeyError((method, epsilon, alpha))


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def relink(markdown: str, prefix: str) -> str:
    """Make the relative links and images of a sub-report point into its folder ``prefix``."""
    return re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", markdown)


def _cost_sentence(base: dict, cls: dict, eps: float, alpha: float) -> list[str]:
    """What the guarantee costs, plainly: the CLS mask's size against the fixed threshold's."""
    pc_cls, pc_base = cls["metrics"]["pc"]["mean"], base["metrics"]["pc"]["mean"]
    ratio = pc_cls / pc_base if pc_base > 0 else float("inf")
    return [
        "",
        f"**What the guarantee costs.** The CLS mask (at most {eps:.0%} of the lesion voxels missed in "
        f"{1 - alpha:.0%} of scans) covers {pc_cls:.2%} of the scan on average, {ratio:.1f} times the fixed "
        f"0.5 threshold's {pc_base:.2%}, which keeps that promise in only "
        f"{base['metrics']['ecr']['mean']:.0%} of scans.",
    ]


def _lesion_level_lines(result: EvaluationResult, settings: DemoSettings) -> list[str]:
    """Lesion-level control at its epsilon, and lesion-wise detection by size for every method."""
    if not result.lesion:
        return []
    alpha, leps = settings.alpha, settings.lesion_epsilon
    row = _row(result, "lesion", leps, alpha)
    m = row["metrics"]
    lines = [
        "",
        f"## Lesion-level control (ε = {leps:g} of a scan's lesions, α = {alpha:g})",
        "",
        "Voxel FNR is dominated by large lesions; the lesion-level guarantee counts lesions: a lesion is "
        f"found when at least {result.config.detect_fraction:.0%} of its voxels are in the mask.",
        "",
        f"| lesion ECR (target ≥ {1 - alpha:g}) | missed-lesion rate | voxel FNR | prediction compactness | Dice |",
        "|---|---|---|---|---|",
        f"| {_pm(m['lesion_ecr'])} | {_pm(m['missed_rate'])} | {_pm(m['fnr'])} | {_pm(m['pc'], 4)} | "
        f"{_pm(m['dice'])} |",
        "",
        f"Lesion-wise detection of every method at the main setting ε = {result.config.main_epsilon:g}, "
        f"α = {alpha:g} (for the lesion-level row: at most that share of a scan's lesions missed), by the "
        "lesions' equivalent radius:",
        "",
        "| method | found 3-5 mm | found 5-10 mm | found 10-20 mm | missed-lesion rate | FP components / scan | "
        "FP mL / scan |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"baseline": "fixed 0.5 threshold", "cls": "CLS", "crc": "expected-FNR", "lesion": "lesion-level"}
    for r in result.lesionwise_rows():
        sens = [r["sensitivity"][k] for k in ("3-5 mm", "5-10 mm", "10-20 mm")]
        cells = [_pm(v) if v["mean"] == v["mean"] else "n/a" for v in sens]
        lines.append(
            f"| {labels.get(r['method'], r['method'])} | {' | '.join(cells)} | {_pm(r['missed_rate'])} | "
            f"{_pm(r['fp_components'], 2)} | {_pm(r['fp_ml'], 3)} |"
        )
    return lines


def _slider_lines(result: EvaluationResult, settings: DemoSettings) -> list[str]:
    """What the slider-safe band costs against the fixed-epsilon CLS, and what it protects from."""
    if not result.bands:
        return []
    a = result.config.alphas.index(settings.alpha)
    e = result.config.epsilons.index(settings.epsilon)
    band = result.bands["cls"]
    sim, post = band["simultaneous_ecr"][:, a], band["posthoc_ecr"][:, a]
    pc_band, pc_fixed = band["pc"][:, e, a], result.cls["pc"][:, e, a]
    return [
        "",
        "## Moving the ε slider after looking (slider-safe band)",
        "",
        f"Every ε of {list(result.config.epsilons)} at once (α = {settings.alpha:g}): with the slider-safe band the "
        f"promise holds at every ε for {_mean_pm(sim)} of test scans; with the per-ε thresholds (choosing ε after "
        f"looking) for {_mean_pm(post)}. The price at ε = {settings.epsilon:g}: prediction compactness "
        f"{_mean_pm(pc_band, 4)} instead of {_mean_pm(pc_fixed, 4)}.",
    ]


def _mean_pm(values, digits: int = 3) -> str:  # noqa: ANN001 - numpy array
    from ..evaluation.results import mean_std

    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _compactness_note(cls_row: dict) -> list[str]:
    """Explain large FNR-controlled masks (they come from lesions the network misses entirely)."""
    pc = cls_row["metrics"]["pc"]["mean"]
    if not pc > 0.25:
        return []
    return [
        "",
        f"**Why the FNR-controlled masks are large here (PC {pc:.2f}).** The network misses some lesions "
        "entirely (mostly small ones: every voxel has probability close to 0). For a scan like that, keeping "
        "its miss rate under ε needs a threshold below those near-zero probabilities, and the conformal "
        "quantile must allow for such scans in the stated share of cases, so the calibrated threshold is tiny "
        "and the mask covers much of the scan. This is CLS reporting honestly what the guarantee costs with "
        "this network; a network that finds more lesions gets smaller masks for the same guarantee. The "
        "expected-FNR masks and larger ε or α are cheaper; the ECR and PC plots show the trade-off.",
    ]


def _data_sentence(settings: DemoSettings) -> str:
    if settings.source == "synthetic":
        return (
            f"Data: {settings.cases} synthetic CT-like cases whose probability maps imitate an imperfect, per-case "
            "miscalibrated lesion network (`ConformalSegLib/phantoms/simulated_maps.py`); every step below is the "
            "same code the "
            "CLI runs."
        )
    return (
        f"Data: {settings.cases} synthetic CT phantoms (`ConformalSegLib/phantoms/generator.py`, "
        f"seed {settings.seed}, not "
        f"seen in training) segmented by the shipped 3D U-Net `{settings.model.name}` (see its README.md) through "
        "the same model-card pipeline as `conformalseg infer`; probability maps in `data/probs/`. Every step "
        "below is the same code the CLI runs."
    )


def report_text(settings: DemoSettings, result: EvaluationResult, profiles: dict, example: dict) -> str:
    """``report.md``: the guarantees of the calibrated profiles, the held-out behaviour, the example case."""
    eps, alpha = settings.epsilon, settings.alpha
    base, cls, crc = _row(result, "baseline", eps), _row(result, "cls", eps, alpha), _row(result, "crc", eps)
    lines = [
        "# ConformalSeg demo",
        "",
        _data_sentence(settings),
        "",
        "## What the calibrated profiles guarantee (calibrated on the first half of the cases)",
        "",
        *[f"- **{name}** (`profiles/{name}.json`): {profile.guarantee}" for name, profile in profiles.items()],
        "",
        f"## Held-out behaviour over {settings.splits} random calibration/test splits "
        f"(ε = {eps:g}, α = {alpha:g}, {settings.cal_fraction:.0%} calibration)",
        "",
        "| method | ECR = P(FNR ≤ ε) | mean test FNR | prediction compactness | Dice |",
        "|---|---|---|---|---|",
        f"| fixed 0.5 threshold | {_pm(base['metrics']['ecr'])} | {_pm(base['metrics']['fnr'])} | "
        f"{_pm(base['metrics']['pc'], 4)} | {_pm(base['metrics']['dice'])} |",
        f"| CLS (target ECR ≥ {1 - alpha:g}) | {_pm(cls['metrics']['ecr'])} | {_pm(cls['metrics']['fnr'])} | "
        f"{_pm(cls['metrics']['pc'], 4)} | {_pm(cls['metrics']['dice'])} |",
        f"| expected-FNR control (target mean FNR ≤ {eps:g}) | {_pm(crc['metrics']['ecr'])} | "
        f"{_pm(crc['metrics']['fnr'])} | {_pm(crc['metrics']['pc'], 4)} | {_pm(crc['metrics']['dice'])} |",
        *_cost_sentence(base, cls, eps, alpha),
        *_compactness_note(cls),
        *_lesion_level_lines(result, settings),
        *_slider_lines(result, settings),
        "",
        "Confidence sets (inner: identity transform; outer: signed distance in mm), joint by the alpha split:",
        "",
        "| transform | inner coverage | outer coverage | joint coverage | inner mL | outer mL |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.summary_rows():
        if row["method"] == "sets" and row["mode"] == "joint-split" and row["alpha"] == alpha:
            m = row["metrics"]
            lines.append(
                f"| {row['transform']} | {_pm(m['inner_coverage'])} | {_pm(m['outer_coverage'])} | "
                f"{_pm(m['joint_coverage'])} | {_pm(m['inner_ml'], 2)} | {_pm(m['outer_ml'], 2)} |"
            )
    lines += [
        "",
        "Full tables and plots: [evaluation/report.md](evaluation/report.md), "
        "![ECR vs alpha](evaluation/ecr_vs_alpha.png) ![FNR before/after](evaluation/fnr_before_after.png) "
        "![PC vs alpha](evaluation/pc_vs_alpha.png) ![coverage vs alpha](evaluation/coverage_vs_alpha.png) "
        "![lesion-wise sensitivity](evaluation/lesion_sensitivity_by_size.png)",
        "",
        f"## One held-out case: {example['case_id']}",
        "",
        "![slice overlay](example/slice_overlay.png)",
        "",
        "| segment | voxels | FNR on this case | lesions found |",
        "|---|---|---|---|",
        *[
            f"| {name} | {example['voxels'][name]} | {example['fnr'][name]:.3f} | "
            f"{example['lesions'][name][0]} of {example['lesions'][name][1]} |"
            for name in example["voxels"]
            if name != "Lesion (ground truth)"
        ],
        "",
        f"Inner set inside the lesion: {'yes' if example['inner_inside'] else 'no'}; outer set contains the lesion: "
        f"{'yes' if example['outer_contains'] else 'no'}.",
        "",
        "## Open it in 3D Slicer",
        "",
        "Drag `example/image.nrrd`, `example/probability.nrrd` (and, with the network, "
        "`example/uncertainty_variance.nrrd`: the MC-dropout variance) and `example/segmentation.seg.nrrd` into "
        "Slicer: the segmentation holds the ground truth, the 0.5-threshold mask, the FNR-controlled masks and the "
        "inner/outer sets "
        "as named, coloured segments on the image's grid.",
        "",
    ]
    return "\n".join(lines)
