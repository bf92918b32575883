"""The main job: the whole workflow on the embedded default data and model, written to one folder.

Steps (each calls the same library functions as the CLI commands):

1. write the embedded dataset to ``OUT/data``: synthetic CT phantoms (:mod:`ConformalSegLib.phantoms.generator`,
   nnU-Net layout, lesion label 6) drawn with a seed the shipped model was *not* trained on;
2. run the shipped network (``common.shipped_models.LESION_MODEL`` in ``Resources/models``) on every phantom through
   :class:`~ConformalSegLib.inference.model_dataset.InferenceDataset` -> ``OUT/data/probs``;
3. evaluate CLS, expected-FNR control, lesion-level control, the slider-safe bands and confidence sets
   over repeated random calibration/test splits, with lesion-wise detection by lesion size
   (:mod:`ConformalSegLib.evaluation.protocol`) -> ``OUT/evaluation`` (results.json, report, plots);
4. calibrate profiles on the first half of the cases -> ``OUT/profiles``;
5. apply them to a held-out case -> ``OUT/example`` (Slicer-loadable ``.nrrd`` volumes including the
   MC-dropout variance, one ``.seg.nrrd``, and a slice-overlay PNG);
6. write ``OUT/report.md`` linking everything, with the guarantee sentences.

``DemoSettings(source="synthetic")`` replaces steps 1-2 by synthetic probability maps
(:mod:`ConformalSegLib.phantoms.simulated_dataset`), which needs neither torch nor MONAI.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from ..common.errors import ConformalSegError
from ..common.shipped_models import LESION_MODEL, shipped_model
from ..conformal.calibration import CalibrationRequest, calibrate
from ..conformal.cls import apply_threshold
from ..conformal.profile import LESION_CRC
from ..evaluation.figures import slice_overlay_png
from ..evaluation.lesion_metrics import lesion_detection
from ..evaluation.progress import TqdmProgress
from ..evaluation.protocol import evaluate_dataset
from ..evaluation.report import write_report
from ..io.atomic import atomic_write_text
from ..io.dataset import CalibrationDataset
from ..io.segmentation import (
    INNER_SET,
    LESION_FNR,
    LESION_LEVEL,
    LESION_THRESHOLD,
    OUTER_SET,
    SEGMENT_COLORS,
    write_seg_nrrd,
)
from ..io.volumes import load_image, save_volume
from ..phantoms.dataset import write_phantom_dataset
from ..phantoms.labels import LESION as PHANTOM_LESION
from ..phantoms.simulated_dataset import LESION_LABEL, write_synthetic_dataset
from .report import relink, report_text

#: The network shipped with the project (see its README.md for how it was trained).
DEFAULT_MODEL = shipped_model(LESION_MODEL)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the defaults finish in about two minutes on 2 CPU cores."""

    cases: int = 60
    seed: int = 2026  # phantoms of the demo: must differ from the seed the model was trained on
    source: str = "model"  # "model": phantoms + the shipped network; "synthetic": synthetic probability maps
    model: Path = DEFAULT_MODEL
    device: str = "auto"
    example_mc_passes: int = 8  # MC-dropout passes for the held-out example's uncertainty map
    hd95: bool = False  # HD95 over every split dominates the run time (minutes); `conformalseg evaluate` has it
    semcrc_cases: int = 30  # phantoms of the sem-CRC part (shipped quantile denoiser); 0 skips it
    splits: int = 100
    cal_fraction: float = 0.5
    epsilon: float = 0.1
    alpha: float = 0.1
    lesion_epsilon: float = 0.25  # lesion-level: at most a quarter of a scan's lesions missed (one in four)
    epsilons: tuple[float, ...] = (0.05, 0.1, 0.2, 0.25, 0.3)
    alphas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3)
    outer_transform: str = "distance"


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise ConformalSegError(
            "output folder exists and is not empty",
            path=out,
            fix="pass --force to replace the demo's files, or --out another folder",
        )


def run_demo(
    out_dir: str | PathLike[str],
    settings: DemoSettings = DemoSettings(),
    *,
    force: bool = False,
    progress: Callable[[str], Progress] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the demo into ``out_dir``; returns the path of ``report.md``."""
    out = Path(out_dir)
    _prepare(out, force)
    bar: Callable[[str], Progress | None] = progress or (lambda _label: None)

    dataset = _dataset(out, settings, force, bar, log)
    log(f"[3/7] evaluating over {settings.splits} random calibration/test splits")
    with TqdmProgress() as eval_progress:
        result = evaluate_dataset(
            dataset,
            epsilons=settings.epsilons,
            alphas=settings.alphas,
            main_epsilon=settings.epsilon,
            main_alpha=settings.alpha,
            splits=settings.splits,
            cal_fraction=settings.cal_fraction,
            seed=settings.seed,
            transforms=("identity", settings.outer_transform),
            hd95=settings.hd95,
            progress=eval_progress if progress else None,
        )
    write_report(result, out / "evaluation", force=force)

    log("[4/7] calibrating profiles on the first half of the cases")
    n_cal = int(round(settings.cases * settings.cal_fraction))
    cal_ids, test_ids = dataset.case_ids[:n_cal], dataset.case_ids[n_cal:]
    requests = {
        "cls": CalibrationRequest("cls", epsilon=settings.epsilon, alpha=settings.alpha),
        "crc": CalibrationRequest("crc", epsilon=settings.epsilon),
        "lesion": CalibrationRequest("lesion", epsilon=settings.lesion_epsilon, alpha=settings.alpha),
        "sets": CalibrationRequest(
            "sets",
            alpha=settings.alpha,
            joint="split",
            inner_transform="identity",
            outer_transform=settings.outer_transform,
        ),
    }
    profiles = {}
    for name, request in requests.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = calibrate((dataset.load(cid) for cid in cal_ids), request)
        if hasattr(dataset, "provenance"):  # the network's pipeline, as `calibrate --model` records it
            profile.provenance["inference"] = dataset.provenance()
        profile.save(out / "profiles" / f"{name}.json", force=force)
        profiles[name] = profile

    log("[5/7] applying the profiles to a held-out case")
    example = _example(dataset, test_ids, profiles, out / "example", force, settings)

    semcrc_section = ""
    if settings.semcrc_cases > 0:
        from .semcrc_intervals import run_semcrc_demo

        log(f"[6/7] sem-CRC: organ-dependent intervals of the shipped denoiser on {settings.semcrc_cases} phantoms")
        semcrc_section = run_semcrc_demo(out / "semcrc", settings.semcrc_cases, device=settings.device, force=force)
    else:
        log("[6/7] (sem-CRC part skipped)")
    log("[7/7] writing the report")
    report = out / "report.md"
    text = report_text(settings, result, profiles, example)
    if semcrc_section:
        text += "\n" + relink(semcrc_section, "semcrc/")
    atomic_write_text(report, text, force=force)
    return report


def _dataset(
    out: Path, settings: DemoSettings, force: bool, bar: Callable[[str], Progress | None], log: Callable[[str], None]
) -> CalibrationDataset:
    """Steps 1-2: the embedded data on disk, as a dataset whose cases carry probability maps."""
    if settings.source == "synthetic":
        log(f"[1/7] writing {settings.cases} synthetic probability maps to {out / 'data'}")
        write_synthetic_dataset(
            out / "data", settings.cases, seed=settings.seed, force=force, progress=bar("synthetic data")
        )
        log("[2/7] (no network: the synthetic maps imitate one)")
        return CalibrationDataset.from_root(out / "data", [LESION_LABEL])
    if settings.source != "model":
        raise ConformalSegError(f"unknown demo source {settings.source!r}", fix="use 'model' or 'synthetic'")
    from ..inference import InferenceEngine, resolve_model
    from ..inference.model_dataset import InferenceDataset
    from ..inference.model_lineage import training_lineage

    card = resolve_model(settings.model)
    lineage = training_lineage(card)  # a fine-tuned model also learnt from its starting model's phantoms
    if int(settings.seed) in lineage.phantom_seeds:
        raise ConformalSegError(
            f"the demo's phantom seed {settings.seed} is a seed the model was trained on (its training "
            f"phantom seeds: {', '.join(map(str, lineage.phantom_seeds))}): the evaluation would run on "
            "training data",
            path=card.path,
            fix="choose another --seed",
        )
    log(f"[1/7] writing {settings.cases} CT phantoms (seed {settings.seed}) to {out / 'data'}")
    write_phantom_dataset(out / "data", settings.cases, seed=settings.seed, force=force, progress=bar("phantoms"))
    if force and (out / "data" / "probs").exists():
        import shutil

        shutil.rmtree(out / "data" / "probs")  # a cache of an earlier run: --force means start afresh
    engine = InferenceEngine(card, device=settings.device, seed=0)
    log(f"[2/7] running the network {card.name!r} on {engine.device} for every phantom")
    dataset = InferenceDataset(
        engine,
        out / "data" / "imagesTr",
        out / "data" / "labelsTr",
        [PHANTOM_LESION],
        out / "data" / "probs",
        progress=bar("inference"),
    )
    for _ in dataset:  # predict every case once (later passes read the cached maps)
        pass
    dataset.progress = None
    return dataset


def _image_path(dataset: CalibrationDataset, case_id: str) -> Path:
    if hasattr(dataset, "engine"):
        return dataset.paths(case_id)[0]
    return dataset.probs_dir.parent / "images" / f"{case_id}.nii.gz"


def _example(
    dataset: CalibrationDataset, test_ids: list[str], profiles: dict, folder: Path, force: bool, settings: DemoSettings
) -> dict:
    """Apply every profile to the held-out case with the largest lesion; write volumes, seg.nrrd, PNG."""
    sizes = {cid: int(np.count_nonzero(dataset.load(cid).lesion.array)) for cid in test_ids[:8]}
    case_id = max(sizes, key=lambda cid: sizes[cid])
    case = dataset.load(case_id)
    prob, truth, geometry = case.probability.array, case.lesion.array, case.probability.geometry
    image = load_image(_image_path(dataset, case_id))
    image_array = image.array
    if hasattr(dataset, "engine") and settings.example_mc_passes > 0:
        mc = dataset.engine.predict(image, mc_dropout=settings.example_mc_passes)
        save_volume(mc.variance, geometry, folder / "uncertainty_variance.nrrd", force=force)
    masks = {
        LESION_THRESHOLD: apply_threshold(prob, 0.5),
        **profiles["cls"].masks(prob, geometry),
        **profiles["crc"].masks(prob, geometry),
        **profiles["lesion"].masks(prob, geometry),
        **profiles["sets"].masks(prob, geometry),
        "Lesion (ground truth)": truth,
    }
    save_volume(image_array, geometry, folder / "image.nrrd", force=force)
    save_volume(prob, geometry, folder / "probability.nrrd", force=force)
    write_seg_nrrd(masks, geometry, folder / "segmentation.seg.nrrd", force=force)
    colors = {**SEGMENT_COLORS, LESION_CRC: (1.0, 0.55, 0.0)}
    slice_overlay_png(
        image_array,
        geometry,
        truth,
        {
            "fixed 0.5 threshold": {LESION_THRESHOLD: masks[LESION_THRESHOLD]},
            "FNR-controlled (CLS)": {LESION_FNR: masks[LESION_FNR]},
            "expected-FNR (CRC)": {LESION_CRC: masks[LESION_CRC]},
            "lesion-level": {LESION_LEVEL: masks[LESION_LEVEL]},
            "confidence sets": {INNER_SET: masks[INNER_SET], OUTER_SET: masks[OUTER_SET]},
        },
        folder / "slice_overlay.png",
        title=f"{case_id} (held out)",
        force=force,
        colors=colors,
    )
    fnr = {
        name: float(np.count_nonzero(truth & ~m)) / max(1, int(np.count_nonzero(truth))) for name, m in masks.items()
    }
    voxels = {name: int(np.count_nonzero(m)) for name, m in masks.items()}
    detection = {
        name: lesion_detection(m, truth, geometry.spacing_zyx)
        for name, m in masks.items()
        if name != "Lesion (ground truth)"
    }
    return {
        "lesions": {name: (d.n_lesions - d.n_missed, d.n_lesions) for name, d in detection.items()},
        "case_id": case_id,
        "fnr": fnr,
        "voxels": voxels,
        "inner_inside": bool(not (masks[INNER_SET] & ~truth).any()),
        "outer_contains": bool(not (truth & ~masks[OUTER_SET]).any()),
    }
