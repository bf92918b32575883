"""The main job: the whole workflow on the embedded default data, written to one folder.

Steps (each calls the same library functions as the CLI commands):

1. write a synthetic dataset (:mod:`ConformalSegLib.synthetic_dataset`) to ``OUT/data``;
2. evaluate CLS, expected-FNR control and confidence sets over repeated random calibration/test
   splits (:mod:`ConformalSegLib.evaluation`) -> ``OUT/evaluation`` (results.json, report, plots);
3. calibrate profiles on the first half of the cases -> ``OUT/profiles``;
4. apply them to a held-out case -> ``OUT/example`` (Slicer-loadable ``.nrrd`` volumes and one
   ``.seg.nrrd``, and a slice-overlay PNG);
5. write ``OUT/report.md`` linking everything, with the guarantee sentences.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Callable

import numpy as np

from .calibration import CalibrationRequest, calibrate
from .cls import apply_threshold
from .errors import ConformalSegError
from .evaluation import EvaluationResult, TqdmProgress, evaluate_dataset
from .figures import slice_overlay_png
from .io.atomic import atomic_write_text
from .io.dataset import CalibrationDataset
from .io.segmentation import INNER_SET, LESION_FNR, LESION_THRESHOLD, OUTER_SET, SEGMENT_COLORS, write_seg_nrrd
from .io.volumes import load_image, save_volume
from .profile import LESION_CRC
from .reporting import write_report
from .synthetic_dataset import LESION_LABEL, write_synthetic_dataset

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the defaults finish in about a minute on 2 CPU cores."""

    cases: int = 60
    seed: int = 0
    splits: int = 100
    cal_fraction: float = 0.5
    epsilon: float = 0.1
    alpha: float = 0.1
    epsilons: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    alphas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3)
    outer_transform: str = "distance"


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise ConformalSegError("output folder exists and is not empty", path=out,
                                fix="pass --force to replace the demo's files, or --out another folder")


def run_demo(out_dir: str | PathLike[str], settings: DemoSettings = DemoSettings(), *, force: bool = False,
             progress: Callable[[str], Progress] | None = None, log: Callable[[str], None] = print) -> Path:
    """Run the demo into ``out_dir``; returns the path of ``report.md``."""
    out = Path(out_dir)
    _prepare(out, force)
    bar = progress or (lambda _label: None)

    log(f"[1/4] writing {settings.cases} synthetic cases to {out / 'data'}")
    write_synthetic_dataset(out / "data", settings.cases, seed=settings.seed, force=force, progress=bar("synthetic data"))
    dataset = CalibrationDataset.from_root(out / "data", [LESION_LABEL])

    log(f"[2/4] evaluating over {settings.splits} random calibration/test splits")
    with TqdmProgress() as eval_progress:
        result = evaluate_dataset(dataset, epsilons=settings.epsilons, alphas=settings.alphas,
                                  main_epsilon=settings.epsilon, main_alpha=settings.alpha, splits=settings.splits,
                                  cal_fraction=settings.cal_fraction, seed=settings.seed,
                                  transforms=("identity", settings.outer_transform),
                                  progress=eval_progress if progress else None)
    evaluation_files = write_report(result, out / "evaluation", force=force)

    log("[3/4] calibrating profiles on the first half of the cases")
    n_cal = int(round(settings.cases * settings.cal_fraction))
    cal_ids, test_ids = dataset.case_ids[:n_cal], dataset.case_ids[n_cal:]
    requests = {
        "cls": CalibrationRequest("cls", epsilon=settings.epsilon, alpha=settings.alpha),
        "crc": CalibrationRequest("crc", epsilon=settings.epsilon),
        "sets": CalibrationRequest("sets", alpha=settings.alpha, joint="split", inner_transform="identity",
                                   outer_transform=settings.outer_transform),
    }
    profiles = {}
    for name, request in requests.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = calibrate((dataset.load(cid) for cid in cal_ids), request)
        profile.save(out / "profiles" / f"{name}.json", force=force)
        profiles[name] = profile

    log("[4/4] applying the profiles to a held-out case")
    example = _example(dataset, test_ids, profiles, out / "example", force)

    report = out / "report.md"
    atomic_write_text(report, _report_text(settings, result, profiles, example), force=force)
    return report


def _example(dataset: CalibrationDataset, test_ids: list[str], profiles: dict, folder: Path, force: bool) -> dict:
    """Apply every profile to the held-out case with the largest lesion; write volumes, seg.nrrd, PNG."""
    sizes = {cid: int(np.count_nonzero(dataset.load(cid).lesion.array)) for cid in test_ids[:8]}
    case_id = max(sizes, key=sizes.get)
    case = dataset.load(case_id)
    prob, truth, geometry = case.probability.array, case.lesion.array, case.probability.geometry
    image_array = load_image(dataset.probs_dir.parent / "images" / f"{case_id}.nii.gz").array
    masks = {
        LESION_THRESHOLD: apply_threshold(prob, 0.5),
        **profiles["cls"].masks(prob, geometry),
        **profiles["crc"].masks(prob, geometry),
        **profiles["sets"].masks(prob, geometry),
        "Lesion (ground truth)": truth,
    }
    save_volume(image_array, geometry, folder / "image.nrrd", force=force)
    save_volume(prob, geometry, folder / "probability.nrrd", force=force)
    write_seg_nrrd(masks, geometry, folder / "segmentation.seg.nrrd", force=force)
    colors = {**SEGMENT_COLORS, LESION_CRC: (1.0, 0.55, 0.0)}
    slice_overlay_png(image_array, geometry, truth, {
        "fixed 0.5 threshold": {LESION_THRESHOLD: masks[LESION_THRESHOLD]},
        "FNR-controlled (CLS)": {LESION_FNR: masks[LESION_FNR]},
        "expected-FNR (CRC)": {LESION_CRC: masks[LESION_CRC]},
        "confidence sets": {INNER_SET: masks[INNER_SET], OUTER_SET: masks[OUTER_SET]},
    }, folder / "slice_overlay.png", title=f"{case_id} (held out)", force=force, colors=colors)
    fnr = {name: float(np.count_nonzero(truth & ~m)) / max(1, np.count_nonzero(truth)) for name, m in masks.items()}
    voxels = {name: int(np.count_nonzero(m)) for name, m in masks.items()}
    return {"case_id": case_id, "fnr": fnr, "voxels": voxels,
            "inner_inside": bool(not (masks[INNER_SET] & ~truth).any()),
            "outer_contains": bool(not (truth & ~masks[OUTER_SET]).any())}


def _row(result: EvaluationResult, method: str, epsilon: float, alpha: float | None = None) -> dict:
    for row in result.summary_rows():
        if row["method"] == method and row["epsilon"] == epsilon and row["alpha"] == alpha:
            return row
    raise KeyError((method, epsilon, alpha))


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _report_text(settings: DemoSettings, result: EvaluationResult, profiles: dict, example: dict) -> str:
    eps, alpha = settings.epsilon, settings.alpha
    base, cls, crc = _row(result, "baseline", eps), _row(result, "cls", eps, alpha), _row(result, "crc", eps)
    lines = [
        "# ConformalSeg demo",
        "",
        f"Embedded default data: {settings.cases} synthetic CT-like cases whose probability maps imitate an "
        "imperfect, per-case miscalibrated lesion network (`ConformalSegLib/synthetic.py`). Until the shipped "
        "network lands, these maps stand in for a model's output; every step below is the same code the CLI runs.",
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
        "",
        "Confidence sets (inner: identity transform; outer: signed distance in mm), joint by the alpha split:",
        "",
        "| transform | inner coverage | outer coverage | joint coverage | inner mL | outer mL |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.summary_rows():
        if row["method"] == "sets" and row["mode"] == "joint-split" and row["alpha"] == alpha:
            m = row["metrics"]
            lines.append(f"| {row['transform']} | {_pm(m['inner_coverage'])} | {_pm(m['outer_coverage'])} | "
                         f"{_pm(m['joint_coverage'])} | {_pm(m['inner_ml'], 2)} | {_pm(m['outer_ml'], 2)} |")
    lines += [
        "",
        "Full tables and plots: [evaluation/report.md](evaluation/report.md), "
        "![ECR vs alpha](evaluation/ecr_vs_alpha.png) ![FNR before/after](evaluation/fnr_before_after.png) "
        "![PC vs alpha](evaluation/pc_vs_alpha.png) ![coverage vs alpha](evaluation/coverage_vs_alpha.png)",
        "",
        f"## One held-out case: {example['case_id']}",
        "",
        "![slice overlay](example/slice_overlay.png)",
        "",
        "| segment | voxels | FNR on this case |",
        "|---|---|---|",
        *[f"| {name} | {example['voxels'][name]} | {example['fnr'][name]:.3f} |" for name in example["voxels"]
          if name != "Lesion (ground truth)"],
        "",
        f"Inner set inside the lesion: {'yes' if example['inner_inside'] else 'no'}; outer set contains the lesion: "
        f"{'yes' if example['outer_contains'] else 'no'}.",
        "",
        "## Open it in 3D Slicer",
        "",
        "Drag `example/image.nrrd`, `example/probability.nrrd` and `example/segmentation.seg.nrrd` into Slicer: the "
        "segmentation holds the ground truth, the 0.5-threshold mask, the FNR-controlled masks and the inner/outer sets "
        "as named, coloured segments on the image's grid.",
        "",
    ]
    return "\n".join(lines)
