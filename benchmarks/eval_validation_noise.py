"""Can a training run's held-out phantoms tell two checkpoints apart? The validation Dice and the tracked CLS
cost ``val_cls_pc`` of one or several lesion models on the held-out phantoms of a phantom stream, measured
exactly as training measures them after every epoch (:func:`ConformalSegLib.training.validation.validation_maps`
and :func:`~ConformalSegLib.training.validation.validation_scores`, on the network grid), with 95 % bootstrap
intervals over the scans, and for every model after the first the paired bootstrap interval of its difference
from the first (the same resampled scans for both).

Why: ``conformalseg train --select-by`` chooses the epoch whose weights are written by one of these numbers.
``val_cls_pc`` is a conformal quantile of the held-out scans' critical cutoffs (with 39 scans that have a
lesion and alpha = 0.1, the 4th smallest), so a few hard scans set it; this measures how much it moves when
the scans drawn change, against the differences between epochs it is asked to rank.

Bootstrap: ``--boot`` replicates, each ``n`` scans drawn with replacement from the ``n`` held-out phantoms
(``numpy.random.default_rng(--seed)``); in a replicate the Dice is the mean over the drawn scans with a lesion
and the CLS cost is recomputed from the drawn scans alone (the cutoff from their critical cutoffs, the mean
share of their voxels at or above it: ``p >= cutoff``, the convention of :mod:`ConformalSegLib.conformal.cls`).
Each map's values are sorted once, so a replicate counts voxels by binary search (exact, no grid).

Phantoms: ``PhantomStream(--stream-seed).heldout_cases(--heldout)``, the held-out set of ``conformalseg train
--phantom-stream --phantom-seed S --heldout N`` (the first 48 of a larger set are the 48 of a run with
``--heldout 48``). stdout: Markdown for ``benchmarks/RESULTS.md``. ``--quick``: 6 phantoms, 200 replicates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

from ConformalSegLib.common.shipped_models import LESION_MODEL, shipped_model


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--model", type=Path, nargs="+", default=[shipped_model(LESION_MODEL)],
                        help="model folder(s) or card(s) (default: the shipped one)")  # fmt: skip
    parser.add_argument("--stream-seed", type=int, default=1010, help="phantom stream (default 1010, v11's)")
    parser.add_argument("--heldout", type=int, default=48, help="held-out phantoms (default 48, as in training)")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    parser.add_argument("--device", default="cpu")


class ScanTable:
    """What a replicate needs of one model's held-out maps: per scan whether it has a lesion, its Dice at
    0.5, its exact critical cutoff at eps = 0.1, and its sorted probabilities (to count ``p >= c``)."""

    def __init__(self, maps: list[tuple[np.ndarray, np.ndarray]]) -> None:
        from ConformalSegLib.conformal.cls import critical_cutoff
        from ConformalSegLib.evaluation.metrics import dice_from_masks
        from ConformalSegLib.training.validation import CLS_EPSILON, THRESHOLD

        self.lesion = np.array([bool(t.any()) for _, t in maps])
        self.dice = np.array([dice_from_masks(p >= THRESHOLD, t) if t.any() else np.nan for p, t in maps])
        self.cutoff = np.array([critical_cutoff(p, t, CLS_EPSILON) if t.any() else np.nan for p, t in maps])
        self.sorted = [np.sort(p, axis=None) for p, _ in maps]

    def share_at_or_above(self, scan: int, cutoff: float) -> float:
        values = self.sorted[scan]
        return (values.size - int(np.searchsorted(values, cutoff, side="left"))) / values.size

    def scores(self, scans: np.ndarray) -> tuple[float, float]:
        """(validation Dice, CLS cost) of the scans ``scans`` (indices, repeats allowed)."""
        from ConformalSegLib.conformal.cls import conformal_lower_cutoff
        from ConformalSegLib.training.validation import CLS_ALPHA

        with_lesion = scans[self.lesion[scans]]
        if with_lesion.size == 0:
            return float("nan"), float("nan")
        cutoff = conformal_lower_cutoff(self.cutoff[with_lesion], CLS_ALPHA)
        pc = float(np.mean([self.share_at_or_above(int(i), cutoff) for i in scans]))
        return float(np.mean(self.dice[with_lesion])), pc


def model_maps(model: Path, cases: list[Any], device: str) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The held-out maps of one model, as training computes them."""
    from ConformalSegLib.inference import resolve_model
    from ConformalSegLib.inference.engine import resolve_device
    from ConformalSegLib.training import prepare_cases
    from ConformalSegLib.training.validation import validation_maps

    card = resolve_model(model)
    labels = card.training.get("lesion_labels") or [6]
    prepared = prepare_cases(card, cases, labels, card.inference.patch_size, what="held-out")
    torch_device = resolve_device(device)
    network = card.load_network().to(torch_device)
    return card.name, validation_maps(network, prepared, card, torch_device)


def _interval(values: np.ndarray) -> str:
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return f"{lo:.3f} .. {hi:.3f}"


def _row(name: str, dice: str, dice_replicates: np.ndarray, pc: str, pc_replicates: np.ndarray) -> list[str]:
    """A table row: the model, then each number with its 95 % bootstrap interval."""
    return [f"`{name}`", dice, _interval(dice_replicates), pc, _interval(pc_replicates)]


def main(argv: list[str] | None = None) -> int:
    from ConformalSegLib.training import PhantomStream
    from ConformalSegLib.training.validation import validation_scores

    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    n, boot = (6, 200) if args.quick else (args.heldout, args.boot)
    C.log(f"generating {n} held-out phantoms of stream {args.stream_seed} ...")
    cases = PhantomStream(args.stream_seed).heldout_cases(n)
    names, tables, pooled = [], [], []
    for model in args.model:
        name, maps = model_maps(model, cases, args.device)
        C.log(f"{name}: {len(maps)} maps")
        names.append(name)
        pooled.append(validation_scores(maps))
        tables.append(ScanTable(maps))
    rng = np.random.default_rng(args.seed)
    replicates = np.array(
        [[table.scores(scans) for table in tables] for scans in (rng.integers(0, n, n) for _ in range(boot))]
    )  # (boot, models, 2)

    print("### Can the held-out phantoms tell checkpoints apart? (eval_validation_noise.py)\n")
    print(
        f"- {C.machine_line()}; {n} held-out phantoms of stream {args.stream_seed} "
        f"(`PhantomStream({args.stream_seed}).heldout_cases({n})`), {int(tables[0].lesion.sum())} with a lesion; "
        f"{boot} bootstrap replicates of the scans (seed {args.seed}); eps = alpha = 0.1.\n"
    )
    rows = [
        _row(name, f"{p['val_dice']:.3f}", replicates[:, i, 0], f"{p['val_cls_pc']:.4f}", replicates[:, i, 1])
        for i, (name, p) in enumerate(zip(names, pooled))
    ]
    print(C.md_table(["model", "validation Dice", "95 % interval", "val_cls_pc", "95 % interval"], rows))
    if len(names) > 1:
        diff = replicates[:, 1:, :] - replicates[:, :1, :]
        rows = [
            _row(
                name,
                f"{pooled[i + 1]['val_dice'] - pooled[0]['val_dice']:+.3f}",
                diff[:, i, 0],
                f"{pooled[i + 1]['val_cls_pc'] - pooled[0]['val_cls_pc']:+.4f}",
                diff[:, i, 1],
            )
            + [f"{np.mean(diff[:, i, 1] < 0):.2f}"]
            for i, name in enumerate(names[1:])
        ]
        print(f"\n#### Paired against `{names[0]}` (the same resampled scans)\n")
        header = ["model", "Dice difference", "95 % interval", "val_cls_pc difference", "95 % interval",
                  "replicates with a smaller val_cls_pc"]  # fmt: skip
        print(C.md_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
