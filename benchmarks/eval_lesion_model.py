"""Held-out test of a lesion model on fresh CT phantoms: per-case Dice, lesion-wise detection by lesion size,
false-positive components per scan, and inference time (the numbers of the shipped model's README).

Phantoms: ``make_phantoms(--phantoms, seed=--seed)`` with the default seed 4000 -- not the training stream
(seed 1000, spawn keys (0, i) and (1, j)), not the demo (2026), not the cascade study (3000). The model
runs through the real :class:`~ConformalSegLib.inference.InferenceEngine` on each phantom's own grid;
masks are ``p >= 0.5``; lesion-wise detection follows :mod:`ConformalSegLib.evaluation.lesion_metrics`
(a lesion is found when at least half of its voxels are in the mask; size classes by equivalent radius).

stdout: Markdown for ``benchmarks/RESULTS.md`` and the model README; the per-case JSON goes to
``benchmarks/_cache/lesion_model_eval/``. ``--quick``: 6 phantoms.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import _common as C
import numpy as np

from ConformalSegLib.common.shipped_models import LESION_MODEL, shipped_model

OUT = C.REPO_ROOT / "benchmarks" / "_cache" / "lesion_model_eval"
MODEL = shipped_model(LESION_MODEL)


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--phantoms", type=int, default=100, help="held-out phantoms (default 100)")
    parser.add_argument("--model", type=Path, default=MODEL, help="model folder or card (default: the shipped one)")
    parser.add_argument("--device", default="auto")


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    seed = 4000 if args.seed == 0 else args.seed
    n = 6 if args.quick else args.phantoms
    from ConformalSegLib.evaluation.lesion_metrics import SIZE_CLASSES, DetectionTally, lesion_detection
    from ConformalSegLib.evaluation.metrics import dice_from_masks
    from ConformalSegLib.inference import InferenceEngine, resolve_model
    from ConformalSegLib.io.volumes import Volume
    from ConformalSegLib.phantoms.generator import make_phantoms

    engine = InferenceEngine(resolve_model(args.model), device=args.device, seed=0)
    tally, rows, seconds = DetectionTally(), [], []
    C.log(f"testing {engine.card.name} on {n} phantoms (seed {seed}) ...")
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
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("quick.json" if args.quick else "full.json")).write_text(
        json.dumps({"model": engine.card.name, "seed": seed, "cases": rows, "detection": summary}, indent=1) + "\n"
    )
    print(f"### Lesion model on held-out phantoms (eval_lesion_model.py{' --quick' if args.quick else ''})\n")
    print(f"- {C.machine_line()}; model `{engine.card.name}` on {engine.device}; {n} phantoms "
          f"`make_phantoms({n}, seed={seed})`, {len(dice)} with a lesion; mask p >= 0.5.\n")  # fmt: skip
    header = ["mean Dice", "median Dice", "Dice < 0.1", *[f"found {name}" for name, _, _ in SIZE_CLASSES],
              "FP components / scan", "inference s / case"]  # fmt: skip
    sens = summary["sensitivity_by_size"]
    counts = summary["lesions_by_size"]
    row = [f"{dice.mean():.3f}", f"{np.median(dice):.3f}", f"{int((dice < 0.1).sum())} of {len(dice)}",
           *[f"{sens[name]:.2f} ({counts[name]})" if sens[name] is not None else "n/a" for name, _, _ in SIZE_CLASSES],
           f"{summary['false_positive_components_per_scan']:.2f}", f"{np.median(seconds):.2f}"]  # fmt: skip
    print(C.md_table(header, [row]))
    print("\n(found = lesions with at least half of their voxels in the mask / lesions of that equivalent radius; "
          "the number of lesions in parentheses)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
