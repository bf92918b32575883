"""Real-data experiment: CLS on a calibrated margin around the network's mask (OpenKBP PTV70).

Why: with the shipped recipe the OpenKBP network ranks the PTV's outer layers with the background in a
quarter of the scans, so CLS on the probability map needs a cutoff in the background's own range and its
mask covers 40 % of the scan at eps = alpha = 0.1 (``eval_openkbp.py``, ``benchmarks/RESULTS.md``). A
score that ranks voxels by their distance to the network's 0.5 mask does not care how low the missed
voxels' probabilities are.

What: the same calibration/test pool, cached probability maps and protocol as ``eval_openkbp.py``
(``evaluate_dataset``, ``--splits`` random 50/50 splits, seed ``--seed``), with each scan's score
replaced by ``g(T)``: ``T`` the signed distance in mm to the boundary of the mask ``p >= 0.5``
(``distance:0.5``, :mod:`ConformalSegLib.conformal.score_transforms`: positive inside), and
``g(T) = 1 / (1 + exp(-T / 10 mm))`` a fixed increasing map into (0, 1) so that the unchanged CLS,
expected-FNR and fixed-threshold code runs on it. ``g`` changes nothing but units: the mask
``g(T) >= c`` is ``T >= d`` with ``d = 10 mm * ln(c / (1 - c))``, i.e. the network's 0.5 mask grown
by ``-d`` mm (``d < 0``) or shrunk by ``d`` mm. The fixed 0.5 cutoff is the network's own mask
(``T >= 0``).

Guarantee: CLS's, unchanged. ``T`` is computed from the network's output alone, the same way for every
scan, so the calibration and test scores stay exchangeable and ``P(FNR_test <= eps) >= 1 - alpha``
holds for the grown mask exactly as for a probability cutoff (the proof in ``conformal/cls.py`` uses
nothing about the score but the ``>=`` convention).

The product feature is ``conformalseg calibrate --score margin`` (and ``evaluate --score margin``,
:mod:`ConformalSegLib.conformal.threshold_scores`); this script computes the same score. Run after
``eval_openkbp.py`` (it reuses that script's model and cached pool maps; it trains them if absent)::

    .venv/bin/python benchmarks/eval_openkbp_margin.py
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import _common as C
import numpy as np

from ConformalSegLib.conformal.score_transforms import MARGIN_SCALE_MM, margin_mm
from ConformalSegLib.conformal.threshold_scores import threshold_scores

SCALE_MM = MARGIN_SCALE_MM


def _extra(parser) -> None:  # noqa: ANN001
    import eval_openkbp

    eval_openkbp._extra(parser)


@dataclass(frozen=True)
class MarginCase:
    """One scan for ``evaluate_dataset``: the margin score ``g(T)`` in place of the probability."""

    case_id: str
    probability: np.ndarray
    lesion: np.ndarray
    geometry: Any


def margin_score(probability: np.ndarray, geometry: Any) -> np.ndarray:
    """``g(T)`` of the module docstring: the library's ``margin:0.5`` score (``calibrate --score margin``)."""
    return threshold_scores(probability, geometry, "margin:0.5")


def margin_cases(dataset) -> list[MarginCase]:  # noqa: ANN001
    out = []
    for i, case in enumerate(dataset):
        geometry = case.probability.geometry
        score = margin_score(np.asarray(case.probability.array), geometry)
        out.append(MarginCase(case.case_id, score, np.asarray(case.lesion.array, dtype=bool), geometry))
        if (i + 1) % 40 == 0:
            C.log(f"  margin scores {i + 1}")
    return out


def _pm(values: np.ndarray, digits: int = 3) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    import eval_openkbp

    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    print("### Real data: CLS on a calibrated margin, OpenKBP PTV70 (eval_openkbp_margin.py)\n")
    if eval_openkbp.skipped(args):
        return 0
    from ConformalSegLib.evaluation.protocol import evaluate_dataset

    *_, dataset, _ = eval_openkbp.pool_dataset(args)
    t0 = time.perf_counter()
    cases = margin_cases(dataset)
    score_s = time.perf_counter() - t0
    epsilons = (0.05, 0.1, 0.2)
    result = evaluate_dataset(
        cases,
        epsilons=epsilons,
        alphas=(0.1,),
        main_epsilon=0.1,
        main_alpha=0.1,
        splits=args.splits,
        cal_fraction=0.5,
        seed=args.seed,
        transforms=("identity",),  # confidence sets on g(T) are the distance transform's; not reported here
        hd95=False,
    )
    print(
        f"- {len(cases)} pool scans of `eval_openkbp.py`; {args.splits} random 50/50 splits (seed {args.seed}); "
        f"score g(T), T = signed distance to the 0.5 mask (mm), scale {SCALE_MM:g} mm; scores {score_s:.0f} s, "
        f"evaluation {time.perf_counter() - t0 - score_s:.0f} s.\n"
    )
    rows = []
    for e, eps in enumerate(epsilons):
        cls = {k: result.cls[k][:, e, 0] for k in ("cutoff", "ecr", "fnr", "pc", "dice")}
        grown = np.array([-margin_mm(float(c)) for c in cls["cutoff"]])
        rows.append(
            [f"CLS on the margin, ε = {eps:g}", _pm(cls["ecr"]), _pm(cls["fnr"]), _pm(cls["pc"], 4), _pm(cls["dice"])]
            + [f"{np.median(grown):.1f} ({np.min(grown):.1f} to {np.max(grown):.1f})"]
        )
    base = {"ecr": result.baseline["ecr"][:, 1]} | {k: result.baseline[k] for k in ("fnr", "pc", "dice")}
    rows.append(
        ["fixed 0.5 mask, ε = 0.1", _pm(base["ecr"]), _pm(base["fnr"]), _pm(base["pc"], 4), _pm(base["dice"]), "0"]
    )
    header = ["method (α = 0.1)", "ECR = P(FNR ≤ ε)", "test FNR", "PC", "Dice", "mask grown by, mm: median (range)"]
    print(C.md_table(header, rows))
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
