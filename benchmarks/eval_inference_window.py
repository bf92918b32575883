"""Sliding-window size at inference vs the training crop: what the window does to a lesion model's maps
(held-out Dice, lesion-wise detection, false positives) and to the cost of its guarantee (CLS PC).

The shipped ``phantom_lesion_unet`` was trained on 48 x 48 x 32 crops and its card runs it in one
96 x 96 x 48 window that covers a whole phantom. nnU-Net infers with its training patch size; a network
with instance normalisation sees other statistics in a window 4.5 times the crop (mostly air around the
body). This script runs the same weights with other windows (a copy of the card whose ``inference.patch_size``
/ ``overlap`` differ; the weights are those of ``--model``) and measures, for each window:

* the held-out test of ``eval_lesion_model.py``: ``make_phantoms(--phantoms, seed=4000)``, mask ``p >= 0.5``,
  per-case Dice, lesion-wise detection by size, false-positive components per scan;
* the demo's question: the 60 demo phantoms (seed 2026), their maps, and 100 calibration/test splits
  (seed 0, half for calibration) at eps = alpha = 0.1: CLS ECR and prediction compactness (PC), CRC PC,
  the fixed 0.5 threshold's Dice (the numbers of the TTA table in RESULTS.md use the same protocol);
* inference seconds for the 60 demo phantoms (on this machine, with its load at the time).

stdout: the Markdown table for ``benchmarks/RESULTS.md``; the cards and maps go to
``benchmarks/_cache/inference_window/``. ``--quick``: 6 test phantoms, 12 demo phantoms, 10 splits.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import _common as C
from _lesion_eval import demo_phantoms, demo_question, held_out_test

OUT = C.REPO_ROOT / "benchmarks" / "_cache" / "inference_window"
MODEL = C.REPO_ROOT / "Resources" / "models" / "phantom_lesion_unet"
#: (x, y, z) window and overlap; None = the card's own
WINDOWS = ("card", "64x64x48@0.25", "48x48x32@0.25", "48x48x32@0.5")


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--model", type=Path, default=MODEL, help="model folder (default: the shipped one)")
    parser.add_argument("--windows", nargs="+", default=list(WINDOWS), help="XxYxZ@OVERLAP or 'card'")
    parser.add_argument("--phantoms", type=int, default=100, help="held-out test phantoms (default 100)")
    parser.add_argument("--cases", type=int, default=60, help="demo phantoms (default 60)")
    parser.add_argument("--splits", type=int, default=100, help="calibration/test splits (default 100)")


def window_card(model: Path, window: str, folder: Path) -> Path:
    """A model folder whose card is ``model``'s with the sliding window ``window`` (``XxYxZ@OVERLAP``);
    the weights file is copied (a card names its weights inside its own folder)."""
    card = json.loads((model / "model_card.json").read_text())
    if window != "card":
        size, overlap = window.split("@")
        card["inference"]["patch_size"] = [int(v) for v in size.split("x")]
        card["inference"]["overlap"] = float(overlap)
    folder.mkdir(parents=True, exist_ok=True)
    weights = card["source"]["state_dict"]["weights"]
    shutil.copyfile(model / weights, folder / weights)
    (folder / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    n, cases, splits = (6, 12, 10) if args.quick else (args.phantoms, args.cases, args.splits)
    from ConformalSegLib.inference import resolve_model

    root = OUT / ("quick" if args.quick else "full")
    data = demo_phantoms(root / "demo_phantoms", cases)
    rows = []
    for window in args.windows:
        card = resolve_model(window_card(args.model, window, root / "cards" / window.replace("@", "_o")))
        C.log(f"window {window}: {card.inference.patch_size} overlap {card.inference.overlap}")
        test = held_out_test(card, n, 4000)
        demo = demo_question(card, data, root / "probs" / card.pipeline_sha256()[:12], splits)
        found = " / ".join(f"{v:.2f}" if v is not None else "n/a" for v in test["found"].values())
        rows.append([f"{'x'.join(map(str, card.inference.patch_size))}, overlap {card.inference.overlap:g}"
                     + (" (card)" if window == "card" else ""),
                     f"{test['dice_mean']:.3f} / {test['dice_median']:.3f}", found, f"{test['fp_per_scan']:.2f}",
                     f"{demo['fixed_dice']:.3f}", f"{demo['cls_ecr']:.3f}",
                     f"{demo['cls_pc']:.3f} ± {demo['cls_pc_std']:.3f}", f"{demo['crc_pc']:.3f}",
                     f"{demo['seconds']:.0f} s"])  # fmt: skip
    print(f"### Inference window vs training crop (eval_inference_window.py{' --quick' if args.quick else ''})\n")
    print(f"- {C.machine_line()}; model `{args.model.name}`; test: {n} phantoms `make_phantoms({n}, seed=4000)`; "
          f"demo: {cases} phantoms (seed 2026), {splits} splits (seed 0), eps = alpha = 0.1.\n")  # fmt: skip
    header = ["window (x, y, z)", "test Dice mean / median", "found 3-5 / 5-10 / 10-20 mm", "FP comp. / scan",
              "demo: fixed-0.5 Dice", "CLS ECR", "CLS PC", "CRC PC", f"inference, {cases} cases"]  # fmt: skip
    print(C.md_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
