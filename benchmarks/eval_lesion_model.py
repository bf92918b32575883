"""Held-out test of a lesion model on fresh CT phantoms: per-case Dice, lesion-wise detection by lesion size,
false-positive components per scan, and inference time (the numbers of the shipped model's README).

Phantoms: ``make_phantoms(--phantoms, seed=--seed)`` with the default seed 4000 -- not the training stream
(seed 1000, spawn keys (0, i) and (1, j)), not the demo (2026), not the cascade study (3000). The model
runs through the real :class:`~ConformalSegLib.inference.InferenceEngine` on each phantom's own grid;
masks are ``p >= 0.5``; lesion-wise detection follows :mod:`ConformalSegLib.evaluation.lesion_metrics`
(a lesion is found when at least half of its voxels are in the mask; size classes by equivalent radius).

``--model`` takes one model or several (one row each, side by side: a candidate against the shipped one), and
then each model's per-case Dice against the first's on the same phantoms: the mean difference, its 95 % bootstrap
interval and a Wilcoxon signed-rank p-value (``_lesion_eval.paired_dice_difference``).
``--demo`` adds the demo's question for each (``_lesion_eval.demo_question``: the 60 demo phantoms, 100
calibration/test splits at each of ``--split-seeds`` (default 0 and 2026), eps = alpha = 0.1: the fixed 0.5
threshold's Dice, CLS ECR and PC, expected-FNR control's PC), the numbers a new model must beat to ship.
``--scores`` asks it for each score the cutoffs may apply to (``calibrate --score``: ``identity``, the
probability, by default; e.g. ``identity gaussian:2.0``), one row per model and score, the network run once.
``--demo-seed`` asks it on other phantoms than the demo's (default 2026): a score or setting picked on the demo's
phantoms is checked there on phantoms it was not picked on (e.g. 4000, the held-out test's seed).

stdout: Markdown for ``benchmarks/RESULTS.md`` and the model README; the per-case JSON goes to
``benchmarks/_cache/lesion_model_eval/`` (the demo maps to its ``demo/`` folder, one per pipeline).
``--quick``: 6 test phantoms, 12 demo phantoms, 10 splits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _common as C
import numpy as np
from _lesion_eval import DEMO_SEED, TEST_SEED, demo_phantoms, demo_question, held_out_test, paired_dice_difference

from ConformalSegLib.common.shipped_models import LESION_MODEL, shipped_model
from ConformalSegLib.conformal.threshold_scores import DEFAULT_SCORE, parse_threshold_score

OUT = C.REPO_ROOT / "benchmarks" / "_cache" / "lesion_model_eval"
MODEL = shipped_model(LESION_MODEL)


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--phantoms", type=int, default=100, help="held-out phantoms (default 100; 0: --demo only)")
    parser.add_argument("--model", type=Path, nargs="+", default=[MODEL],
                        help="model folder(s) or card(s) (default: the shipped one)")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--demo", action="store_true", help="also the demo's question (CLS PC, fixed Dice)")
    parser.add_argument("--cases", type=int, default=60, help="--demo: demo phantoms (default 60)")
    parser.add_argument("--splits", type=int, default=100, help="--demo: splits per seed (default 100)")
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 2026], help="--demo: default 0 2026")
    parser.add_argument(
        "--scores",
        nargs="+",
        default=[DEFAULT_SCORE],
        help="--demo: what the cutoffs apply to, one row each (default: identity, the probability)",
    )
    parser.add_argument("--demo-seed", type=int, default=DEMO_SEED, help="--demo: phantom seed (default 2026)")


def _pair(values: list[float], digits: int = 3) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def _paired_table(records: list[dict]) -> str:
    """Each model's per-case Dice against the first model's, on the same phantoms (``paired_dice_difference``)."""
    first, table = records[0], []
    for record in records[1:]:
        d = paired_dice_difference(record["cases"], first["cases"])
        record["paired_dice_vs_first"] = d
        p = "n/a" if d["wilcoxon_p"] is None else f"{d['wilcoxon_p']:.2g}"
        table.append([f"`{record['model']}`", f"{d['mean']:+.3f}", f"{d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f}", p,
                      f"{d['better']} / {d['worse']} of {d['cases']}"])  # fmt: skip
    header = ["model", "mean Dice difference", "95 % bootstrap interval", "Wilcoxon p", "better / worse"]
    title = f"\n#### Paired against `{first['model']}` (per-case Dice on the same phantoms)\n\n"
    return title + C.md_table(header, table) + "\n\n(an interval containing 0: these phantoms cannot tell them apart)"


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    seed = TEST_SEED if args.seed == 0 else args.seed
    n, cases, splits = (min(6, args.phantoms), 12, 10) if args.quick else (args.phantoms, args.cases, args.splits)
    from ConformalSegLib.evaluation.lesion_metrics import SIZE_CLASSES
    from ConformalSegLib.inference import resolve_model

    cards = [resolve_model(m) for m in args.model]
    scores = [parse_threshold_score(s).name for s in args.scores]  # canonical names; a bad one fails here, early
    rows, demo_rows, records, device = [], [], [], "cpu"
    folder = ("quick" if args.quick else "full") + ("" if args.demo_seed == DEMO_SEED else f"_seed{args.demo_seed}")
    data = demo_phantoms(OUT / "demo" / folder, cases, args.demo_seed) if args.demo else None
    if n <= 0 and not args.demo:
        raise SystemExit("--phantoms 0 leaves nothing to measure: add --demo, or give --phantoms a positive count")
    with_lesion = 0
    for card in cards:
        record: dict = {"model": card.name, "path": str(card.path), "seed": seed}
        if n > 0:
            C.log(f"testing {card.name} on {n} phantoms (seed {seed}) ...")
            test = held_out_test(card, n, seed, device=args.device)
            device, dice, summary = test["device"], test["dice"], test["detection"]
            sens, counts, with_lesion = summary["sensitivity_by_size"], summary["lesions_by_size"], len(dice)
            rows.append([f"`{card.name}`", f"{dice.mean():.3f}", f"{np.median(dice):.3f}",
                         f"{int((dice < 0.1).sum())} of {len(dice)}",
                         *[f"{sens[name]:.2f} ({counts[name]})" if sens[name] is not None else "n/a"
                           for name, _, _ in SIZE_CLASSES],
                         f"{summary['false_positive_components_per_scan']:.2f}",
                         f"{test['seconds_median']:.2f}"])  # fmt: skip
            record.update(cases=test["cases"], detection=summary)
        if data is not None:
            C.log(f"the demo's question for {card.name} ({cases} phantoms, {splits} splits x {args.split_seeds})")
            cache = OUT / "demo" / f"probs_{folder}" / card.pipeline_sha256()[:12]
            record["demo"] = []
            for score in scores:
                demo = [demo_question(card, data, cache, splits, s, score) for s in args.split_seeds]
                record["demo"] += demo
                demo_rows.append([f"`{card.name}`", f"`{score}`", _pair([d["fixed_dice"] for d in demo]),
                                  _pair([d["cls_ecr"] for d in demo]), _pair([d["cls_pc"] for d in demo]),
                                  _pair([d["crc_pc"] for d in demo])])  # fmt: skip
        records.append(record)
    print(f"### Lesion model on held-out phantoms (eval_lesion_model.py{' --quick' if args.quick else ''})\n")
    if rows:
        print(f"- {C.machine_line()}; on {device}; {n} phantoms `make_phantoms({n}, seed={seed})`, "
              f"{with_lesion} with a lesion; mask p >= 0.5.\n")  # fmt: skip
        found = [f"found {name}" for name, _, _ in SIZE_CLASSES]
        header = [
            "model",
            "mean Dice",
            "median Dice",
            "Dice < 0.1",
            *found,
            "FP components / scan",
            "inference s / case",
        ]
        print(C.md_table(header, rows))
        print("\n(found = lesions with at least half of their voxels in the mask / lesions of that equivalent "
              "radius; the number of lesions in parentheses)")  # fmt: skip
        if len(rows) > 1:
            print(_paired_table(records))
    else:
        print(f"- {C.machine_line()}; no held-out test (--phantoms 0).")
    if demo_rows:
        seeds = " / ".join(map(str, args.split_seeds))
        which = "demo phantoms (seed 2026)" if args.demo_seed == DEMO_SEED else f"phantoms of seed {args.demo_seed}"
        print(f"\n#### The demo's question: {cases} {which}, {splits} splits at split seeds {seeds}, "
              "eps = alpha = 0.1\n")  # fmt: skip
        print(C.md_table(["model", "score", "fixed Dice", "CLS ECR", "CLS PC", "CRC PC"], demo_rows))
        print("\n(score: what the cutoffs and the fixed 0.5 threshold apply to; `identity` is the probability)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("quick.json" if args.quick else "full.json")).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
