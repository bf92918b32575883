"""Real-data evaluation: a small 3D U-Net for PTV70 on OpenKBP head-and-neck CTs, calibrated with CLS,
expected-FNR control and confidence sets; test ECR, FNR, PC and set coverage over repeated splits.

Data: ``../shared/data/openkbp`` (226 CTs, 128^3, ``ptv.nii.gz`` label 3 = PTV70: gross disease plus
margin, present in every case). Skipped cleanly (exit status 0, a note on stdout) when it is absent.

Protocol (seeded, so reruns give the same numbers):

1. cases sorted by id and permuted with ``--seed``; the first ``--train`` are for training (of which
   ``--heldout`` are held out for the Dice reported in the card), the rest form the
   calibration/test pool, never seen in training;
2. the network (``ConformalSegLib.training``: the shipped lesion model's recipe, DynUNet with deep supervision,
   Dice + CE, dropout 0.1, augmentation, AdamW + poly) is trained once and cached in
   ``benchmarks/_cache/openkbp_ptv70/model`` (reused when its training settings match); the pool's
   probability maps are predicted once (``InferenceDataset``, cached per pipeline fingerprint);
3. ``evaluate_dataset`` runs ``--splits`` random 50/50 calibration/test splits of the pool: fixed
   0.5 threshold vs CLS and expected-FNR control over an epsilon/alpha grid, and joint confidence
   sets (identity and signed-distance transforms). Full report in ``benchmarks/_cache/openkbp_ptv70/eval``.

stdout is the Markdown section for ``benchmarks/RESULTS.md``. Usage::

    .venv/bin/python benchmarks/eval_openkbp.py            # first run trains (about 45-90 min on 2 CPU cores)
    .venv/bin/python benchmarks/eval_openkbp.py --quick    # 24 cases, 2 epochs, 10 splits: a smoke test
    .venv/bin/python benchmarks/eval_openkbp.py --resume   # an interrupted training continues from its checkpoint
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import _common as C

DATA = C.REPO_ROOT.parent / "shared" / "data" / "openkbp"
CACHE = C.REPO_ROOT / "benchmarks" / "_cache" / "openkbp_ptv70"
PTV70 = 3


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--train", type=int, default=66, help="cases for training, incl. --heldout (default 66)")
    parser.add_argument("--heldout", type=int, default=6, help="training cases held out for the card's Dice")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--splits", type=int, default=100, help="random calibration/test splits (default 100)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--hd95", action="store_true", help="also HD95 (slow: minutes per 100 splits)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted training from its checkpoint (model.checkpoint.pt in the cache)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="OpenKBP folder (default ../shared/data/openkbp)")


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _cases(root: Path) -> list[tuple[str, Path, Path]]:
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        ct, ptv = folder / "ct.nii.gz", folder / "ptv.nii.gz"
        if ct.is_file() and ptv.is_file():
            cases.append((folder.name, ct, ptv))
    return cases


def _config(args):  # noqa: ANN001
    from ConformalSegLib.training import TrainingConfig

    # 128^3 CTs at about 4-5 mm x 2-3 mm: resampled to 6 mm isotropic the whole head and neck fits one window.
    return TrainingConfig(
        lesion_labels=(PTV70,),
        loss="dice-ce",
        epochs=args.epochs,
        patch_size=(96, 96, 64),
        crop_size=(64, 64, 48),
        spacing_mm=(6.0, 6.0, 6.0),
        orientation="RAS",
        intensity={"kind": "window", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
        network="dynunet",  # the shipped phantom model's recipe (issue 11): DynUNet, deep supervision,
        channels=(8, 16, 32, 64, 128),  # AdamW + poly, MONAI augmentation
        strides=(2, 2, 2, 2),
        deep_supervision=True,
        optimizer="adamw",
        weight_decay=1e-4,
        learning_rate=2e-3,
        lr_schedule="poly",
        augment=True,
        dropout=0.1,
        batch_size=2,
        samples_per_case=2,
        fg_fraction=0.6,
        seed=args.seed,
        device=args.device,
        name="openkbp_ptv70_unet",
    )


def _model(args, train_ids: list[str], cases: dict, quick: bool) -> Path:  # noqa: ANN001
    from ConformalSegLib.training import TrainingCase, train
    from ConformalSegLib.training.checkpoint import default_checkpoint_path

    out = CACHE / ("model_quick" if quick else "model")
    config = _config(args)
    wanted = {"train_ids": train_ids, "epochs": config.epochs, "seed": config.seed, "recipe": "dynunet-ds-aug-poly"}
    stamp = out / "benchmark_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        C.log(f"reusing the cached model {out}")
        return out
    train_cases = [TrainingCase(cid, cases[cid][0], cases[cid][1]) for cid in train_ids[args.heldout :]]
    held = [TrainingCase(cid, cases[cid][0], cases[cid][1]) for cid in train_ids[: args.heldout]]
    checkpoint = default_checkpoint_path(out)
    resume = bool(getattr(args, "resume", False)) and checkpoint.is_file()
    if checkpoint.is_file() and not resume:
        C.log(f"{checkpoint} from an interrupted run is replaced (--resume would continue it)")
    C.log(
        f"training on {len(train_cases)} cases ({config.epochs} epochs), {len(held)} held out"
        + (f", resuming from {checkpoint}" if resume else "")
    )
    t0 = time.perf_counter()
    result = train(
        config,
        train_cases,
        held,
        out,
        force=True,
        data_info={
            "source": "OpenKBP (../shared/data/openkbp)",
            "label": "PTV70 (ptv.nii.gz == 3)",
            "train_ids": train_ids[args.heldout :],
            "heldout_ids": train_ids[: args.heldout],
        },
        command=" ".join(sys.argv),
        resume=resume,
    )
    C.log(f"trained in {time.perf_counter() - t0:.0f} s; held-out Dice {result.heldout.get('mean_dice')}")
    stamp.write_text(json.dumps(wanted))
    return out


def pool_dataset(args):  # noqa: ANN001, ANN201
    """The cases, the split, the trained model (cached), and the calibration/test pool's dataset with its
    probability maps predicted once (cached): ``(listed, train_ids, pool_ids, model, card, engine, dataset,
    inference seconds)``. Shared with ``eval_mondrian_openkbp.py --predictor network``."""
    import numpy as np

    from ConformalSegLib.inference import InferenceEngine, resolve_model
    from ConformalSegLib.inference.model_dataset import InferenceDataset

    listed = _cases(args.data)
    cases = {cid: (ct, ptv) for cid, ct, ptv in listed}
    order = [listed[i][0] for i in np.random.default_rng(args.seed).permutation(len(listed))]
    if args.quick:
        order = order[:24]
    train_ids, pool_ids = order[: args.train], sorted(order[args.train :])
    model = _model(args, train_ids, cases, args.quick)
    card = resolve_model(model)
    t0 = time.perf_counter()
    pool = CACHE / ("pool_quick" if args.quick else "pool")
    for sub in ("images", "labels"):  # the dataset classes read folders: link the pool's files in place
        (pool / sub).mkdir(parents=True, exist_ok=True)
    for cid in pool_ids:
        for sub, src in (("images", cases[cid][0]), ("labels", cases[cid][1])):
            link = pool / sub / f"{cid}.nii.gz"
            if not link.exists():
                link.symlink_to(src.resolve())
    engine = InferenceEngine(card, device=args.device, seed=0)
    cache = pool / f"probs_{card.pipeline_sha256()[:12]}"
    dataset = InferenceDataset(
        engine,
        pool / "images",
        pool / "labels",
        [PTV70],
        cache,
        progress=lambda done, total, cid: (
            C.log(f"  inference {done}/{total} {cid}") if done % 20 == 0 or done == total else None
        ),
    )
    for _ in dataset:
        pass
    dataset.progress = None
    return listed, train_ids, pool_ids, model, card, engine, dataset, time.perf_counter() - t0


def skipped(args) -> bool:  # noqa: ANN001
    """True (after printing why) when the OpenKBP folder is absent; otherwise applies ``--quick``'s sizes.
    Shared with ``eval_openkbp_margin.py``."""
    if not args.data.is_dir():
        print(f"Skipped: {args.data} is absent (the real-data evaluation needs ../shared/data/openkbp).\n")
        return True
    if args.quick:
        args.train, args.heldout, args.epochs, args.splits = 12, 2, 2, 10
    return False


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    print("### Real data: OpenKBP PTV70 (eval_openkbp.py)\n")
    if skipped(args):
        return 0

    from ConformalSegLib.evaluation.protocol import evaluate_dataset
    from ConformalSegLib.evaluation.report import write_report

    listed, train_ids, pool_ids, model, card, engine, dataset, inference_s = pool_dataset(args)
    t0 = time.perf_counter()
    epsilons, alphas = (0.05, 0.1, 0.2, 0.3), (0.05, 0.1, 0.2)
    result = evaluate_dataset(
        dataset,
        epsilons=epsilons,
        alphas=alphas,
        main_epsilon=0.1,
        main_alpha=0.1,
        splits=args.splits,
        cal_fraction=0.5,
        seed=args.seed,
        transforms=("identity", "distance"),
        hd95=args.hd95,
    )
    eval_s = time.perf_counter() - t0
    write_report(result, CACHE / ("eval_quick" if args.quick else "eval"), force=True)

    training = card.training or {}
    held_dice = training.get("heldout_mean_dice")
    print(
        f"- Cases: {len(listed)} found; {len(train_ids) - args.heldout} for training, {args.heldout} held out "
        f"from training (Dice {held_dice if held_dice is None else round(held_dice, 3)}), {len(pool_ids)} in the "
        f"calibration/test pool; {args.splits} random 50/50 splits (seed {args.seed})."
    )
    print(
        f"- Network: MONAI DynUNet {list(_config(args).channels)} with deep supervision, 6 mm isotropic, "
        f"{args.epochs} epochs "
        f"(`{model.relative_to(C.REPO_ROOT)}`); pool inference {inference_s:.0f} s, evaluation {eval_s:.0f} s "
        f"on {engine.device}.\n"
    )
    rows = []
    for row in result.summary_rows():
        m = row["metrics"]
        if row["method"] == "baseline" and row["epsilon"] == 0.1:
            rows.append(
                ["fixed 0.5 threshold, ε = 0.1", "none", _pm(m["ecr"]), _pm(m["fnr"]), _pm(m["pc"], 4), _pm(m["dice"])]
            )
        elif row["method"] in ("cls", "crc") and row["epsilon"] in (0.05, 0.1, 0.2) and row["alpha"] in (None, 0.1):
            label = ("CLS" if row["method"] == "cls" else "expected-FNR") + f", ε = {row['epsilon']:g}"
            target = f"ECR ≥ {1 - row['alpha']:g}" if row["method"] == "cls" else f"mean FNR ≤ {row['epsilon']:g}"
            rows.append([label, target, _pm(m["ecr"]), _pm(m["fnr"]), _pm(m["pc"], 4), _pm(m["dice"])])
    print(C.md_table(["method (α = 0.1)", "target", "ECR = P(FNR ≤ ε)", "test FNR", "PC", "Dice"], rows))
    print()
    set_rows = []
    for row in result.summary_rows():
        if row["method"] == "sets" and row["mode"] == "joint-split" and row["alpha"] == 0.1:
            m = row["metrics"]
            set_rows.append(
                [
                    row["transform"],
                    _pm(m["inner_coverage"]),
                    _pm(m["outer_coverage"]),
                    _pm(m["joint_coverage"]),
                    _pm(m["inner_ml"], 1),
                    _pm(m["outer_ml"], 1),
                ]
            )
    print("Joint confidence sets (α = 0.1, split between inner and outer; target joint coverage ≥ 0.9):\n")
    print(C.md_table(["transform", "inner ⊆ lesion", "outer ⊇ lesion", "both", "inner mL", "outer mL"], set_rows))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
