"""The cascade study (Isler et al., Tables I-III) on phantom lung cases: baseline vs cascade, ROI-0 vs
ROI-16, Top-1/Top-2/all, and component-count correlations (Pearson, Spearman, p-values).

Models: by default the project's shipped 3D U-Net (``Resources/models/phantom_lesion_unet``) is both
the coarse stage-1 network (full volume) and the stage-2 ROI model (on crops); ``--stand-ins`` uses
the simulated coarse network and the HU refiner of :mod:`ConformalSegLib.cascade.evaluation` instead.
Phantoms are drawn with ``--seed`` (default 3000: not the shipped model's training seed). The lung
mask is the classical HU algorithm (``--lung-labels``: the phantom's lung label).

stdout: Markdown for ``benchmarks/RESULTS.md``; the full report (JSON + Markdown) goes to
``benchmarks/_cache/cascade_eval``. ``--quick``: 12 phantoms (a smoke test).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import _common as C

OUT = C.REPO_ROOT / "benchmarks" / "_cache" / "cascade_eval"


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--phantoms", type=int, default=80, help="phantoms drawn (about 40%% have a lung lesion)")
    parser.add_argument("--model", type=Path, default=C.REPO_ROOT / "Resources" / "models" / "phantom_lesion_unet")
    parser.add_argument("--stand-ins", action="store_true", help="simulated coarse network + HU refiner")
    parser.add_argument("--lung-labels", action="store_true", help="lung mask from the phantom's labels")
    parser.add_argument("--device", default="auto")


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    if args.seed == 0:
        args.seed = 3000
    from ConformalSegLib.cascade.evaluation import (
        evaluate_cascade,
        hu_refiner,
        phantom_lung_cases,
        report_markdown,
        simulated_coarse_predictor,
        write_report,
    )

    n = 12 if args.quick else args.phantoms
    t0 = time.perf_counter()
    cases = phantom_lung_cases(n, seed=args.seed)
    if args.stand_ins:
        stage1, stage2, models = (
            simulated_coarse_predictor,
            hu_refiner(),
            "stand-ins (simulated coarse network, HU refiner)",
        )
    else:
        from ConformalSegLib.inference import InferenceEngine, resolve_model

        engine = InferenceEngine(resolve_model(args.model), device=args.device, seed=0)
        stage1, stage2 = (lambda case: engine), engine
        models = f"the shipped U-Net `{engine.card.name}` for both stages, on {engine.device}"
    C.log(f"cascade study on {len(cases)} lung cases of {n} phantoms ...")
    report = evaluate_cascade(cases, stage1=stage1, stage2=stage2, lung_from_labels=args.lung_labels)
    seconds = time.perf_counter() - t0
    write_report(report, OUT / ("quick" if args.quick else "full"), force=True)
    body = report_markdown(report).split("\n", 1)[1]  # drop the report's own title
    print(f"### Cascade study (eval_cascade.py{' --quick' if args.quick else ''})\n")
    print(
        f"- {report['n_cases']} phantom lung cases of {n} phantoms (seed {args.seed}); models: {models}; lung mask: "
        f"{report['lung_mask']}; {seconds:.0f} s.\n"
    )
    print(body.replace("\n## ", "\n#### "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
