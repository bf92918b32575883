"""False-positive components at many cutoffs of one scan (the evaluation's lesion-wise pass 2).

``evaluate`` reports, for every method and split, the false-positive components and mL of the mask
``prob >= c`` at that split's cutoff: per scan, one connected-component labelling per distinct cutoff
(about 60 per scan in the demo). The benchmark times, side by side on the same volume and cutoffs:

* ours: :func:`ConformalSegLib.evaluation.lesion_protocol.false_positives_at`, which labels only the mask
  (:func:`~ConformalSegLib.evaluation.lesion_metrics.false_positives`);
* baseline: the same loop through :func:`~ConformalSegLib.evaluation.lesion_metrics.lesion_detection`,
  which also labels the true lesions at every cutoff (what the evaluation did before);

and checks both give the same counts and volumes. Volume: a synthetic case (an imitated network output,
:func:`ConformalSegLib.phantoms.simulated_maps.make_case`) at the demo phantoms' grid (96 x 96 x 48 voxels
of 1.6 x 1.6 x 3.0 mm; ``--quick``: 48 x 48 x 24), 60 cutoffs at the probability quantiles from 0.5 % to
99.5 % (many masks are large, as CLS masks at small cutoffs are).

Run: ``.venv/bin/python benchmarks/bench_false_positives.py [--quick]``.
"""

from __future__ import annotations

import sys

import _common as C
import numpy as np

from ConformalSegLib.conformal.cls import apply_threshold
from ConformalSegLib.evaluation.lesion_metrics import lesion_detection
from ConformalSegLib.evaluation.lesion_protocol import false_positives_at
from ConformalSegLib.phantoms.simulated_maps import make_case

SPACING_ZYX = (3.0, 1.6, 1.6)


def baseline(probability: np.ndarray, lesion: np.ndarray, cutoffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct cutoff, the full lesion matching (truth and mask labelled)."""
    distinct, inverse = np.unique(cutoffs, return_inverse=True)
    comps, ml = np.empty(distinct.size), np.empty(distinct.size)
    for k, c in enumerate(distinct):
        result = lesion_detection(apply_threshold(probability, float(c)), lesion, SPACING_ZYX)
        comps[k], ml[k] = result.false_positive_components, result.false_positive_ml
    return comps[inverse], ml[inverse]


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    shape = (24, 48, 48) if args.quick else (48, 96, 96)
    C.log(f"synthetic case {shape} ...")
    case = make_case(args.seed, shape=shape, spacing=SPACING_ZYX[::-1])
    probability, lesion = case.probability, case.lesion
    cutoffs = np.quantile(probability, np.linspace(0.005, 0.995, 60)).astype(np.float64)
    ours_comps, ours_ml = false_positives_at(probability, lesion, cutoffs, SPACING_ZYX)
    base_comps, base_ml = baseline(probability, lesion, cutoffs)
    assert np.array_equal(ours_comps, base_comps) and np.allclose(ours_ml, base_ml, rtol=1e-12, atol=0)
    repeats = 3 if args.quick else 5
    t_ours, _, _ = C.time_call(lambda: false_positives_at(probability, lesion, cutoffs, SPACING_ZYX), repeats)
    t_base, _, _ = C.time_call(lambda: baseline(probability, lesion, cutoffs), repeats)
    quick = " --quick" if args.quick else ""
    print(f"### False positives at 60 cutoffs of one scan (bench_false_positives.py{quick})\n")
    print(f"- {C.machine_line()}; {C.volume_description(probability, lesion)}.\n")
    rows = [
        ["ours: `false_positives_at` (labels the mask only)", C.fmt_s(t_ours), "1.00x"],
        ["baseline: `lesion_detection` per cutoff (truth and mask)", C.fmt_s(t_base), C.fmt_ratio(t_base / t_ours)],
    ]
    print(C.md_table(["60 cutoffs, one scan", "median time", "vs ours"], rows))
    print(f"\nSame counts and volumes at every cutoff; false-positive components from {int(ours_comps.min())} "
          f"to {int(ours_comps.max())}.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
