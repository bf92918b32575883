"""The cascade study (Isler et al., Tables I-III) on phantom lung cases: baseline vs cascade, ROI-0 vs
ROI-16, Top-1/Top-2/all, and component-count correlations (Pearson, Spearman, p-values).

Models: by default the shipped lesion network (``Resources/models/phantom_lesion_unet``) is the coarse
stage-1 model (full volume) and the shipped ROI models refine the crops: ``phantom_roi_unet``
(uncertainty-aware loss) for Tables I-III, and, as the paper's ablation (Table V), ``phantom_roi_unet``
against ``phantom_roi_unet_dicece`` (plain Dice + cross entropy), both trained by ``conformalseg train
--task roi`` on crops around the stage-1 model's components of other phantoms (their READMEs). Without
the ROI models (``--roi-model none``) the stage-1 model refines its own ROIs; ``--stand-ins`` uses the
simulated coarse network and the HU refiner of :mod:`ConformalSegLib.cascade.evaluation` instead.
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
MODELS = C.REPO_ROOT / "Resources" / "models"


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--phantoms", type=int, default=80, help="phantoms drawn (about 40%% have a lung lesion)")
    parser.add_argument("--model", type=Path, default=MODELS / "phantom_lesion_unet", help="stage-1 model")
    parser.add_argument(
        "--roi-model",
        nargs="+",
        default=[str(MODELS / "phantom_roi_unet"), str(MODELS / "phantom_roi_unet_dicece")],
        help="stage-2 ROI model(s): the first gives Tables I-III, all of them Table V; 'none': stage 1 refines",
    )
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
    roi_models: list = []
    if args.stand_ins:
        stage1, stage2, models = (
            simulated_coarse_predictor,
            hu_refiner(),
            "stand-ins (simulated coarse network, HU refiner)",
        )
    else:
        from ConformalSegLib.inference import InferenceEngine, resolve_model

        engine = InferenceEngine(resolve_model(args.model), device=args.device, seed=0)
        stage1 = lambda case: engine  # noqa: E731
        paths = [] if args.roi_model == ["none"] else [Path(p) for p in args.roi_model if Path(p).exists()]
        roi_models = [InferenceEngine(resolve_model(p), device=args.device, seed=0) for p in paths]
        stage2 = roi_models[0] if roi_models else engine
        roi = ", ".join(f"`{m.card.name}`" for m in roi_models) or f"`{engine.card.name}` itself"
        models = f"stage 1 `{engine.card.name}`, ROI model(s) {roi}, on {engine.device}"
    C.log(f"cascade study on {len(cases)} lung cases of {n} phantoms ...")
    report = evaluate_cascade(cases, stage1=stage1, stage2=stage2, lung_from_labels=args.lung_labels)
    ablation = [(roi_models[0].card.name, report)] if roi_models else []
    for m in roi_models[1:]:
        ablation.append(
            (m.card.name, evaluate_cascade(cases, stage1=stage1, stage2=m, lung_from_labels=args.lung_labels))
        )
    seconds = time.perf_counter() - t0
    write_report(report, OUT / ("quick" if args.quick else "full"), force=True)
    body = report_markdown(report).split("\n", 1)[1]  # drop the report's own title
    print(f"### Cascade study (eval_cascade.py{' --quick' if args.quick else ''})\n")
    print(
        f"- {report['n_cases']} phantom lung cases of {n} phantoms (seed {args.seed}); models: {models}; lung mask: "
        f"{report['lung_mask']}; {seconds:.0f} s.\n"
    )
    print(body.replace("\n## ", "\n#### "))
    if len(ablation) > 1:
        print(_table_v(ablation))
    return 0


def _table_v(ablation: list) -> str:  # noqa: ANN001 - [(model name, report)]
    """Table V of the paper: the ROI models side by side, at every Top-K / margin setting."""
    names = [n for n in ablation[0][1]["summary"] if n != "baseline"]
    lines = ["#### Table V: ROI model loss (uncertainty-aware vs Dice + cross entropy)", "",
             "| ROI model | " + " | ".join(f"{n}: Dice / HD95 (mm)" for n in names) + " |",
             "|---|" + "---|" * len(names)]  # fmt: skip
    for name, report in ablation:
        cells = [f"{report['summary'][n]['dice']:.4f} / {report['summary'][n]['hd95_mm']:.2f}" for n in names]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
