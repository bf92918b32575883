"""Real data: CRC / K-CRC / sem-CRC / per-organ sem-CRC intervals of a quantile denoiser on OpenKBP
head-and-neck CTs, organ groups from the OpenKBP organs at risk (Teneggi et al.'s Table 1 and Fig. 3).

Data: ``../shared/data/openkbp`` (226 CTs, 128^3, ``ct.nii.gz`` in HU, ``oars.nii.gz``: 1 Brainstem,
2 SpinalCord, 3 RightParotid, 4 LeftParotid, 5 Esophagus, 6 Larynx, 7 Mandible, each present only
where contoured). Skipped cleanly (exit status 0, a note on stdout) when it is absent.

Protocol (seeded, so reruns give the same numbers):

1. each CT is reduced 2x per axis (mean of 2 x 2 x 2 HU blocks: 64^3 voxels, about 7-11 mm in plane,
   4-6 mm slices, to fit 2 CPU cores), windowed -175..250 HU -> [0, 1] (the clean truth) and given
   Gaussian noise sigma 0.2 in those units after windowing (the noisy input; generator seeded by
   ``(--seed, case position in the sorted list)``), as in the paper's denoising task and
   :mod:`ConformalSegLib.semcrc.phantom_denoising`; organ labels are taken at the block's first voxel;
2. cases sorted by id and permuted with ``--seed``: the first ``--train`` (``--heldout`` of them held
   out for the raw coverage in the card) train a quantile U-Net (pinball loss, q_0.1 and q_0.9,
   :mod:`ConformalSegLib.training.denoise`), cached in ``benchmarks/_cache/openkbp_semcrc/model``
   (reused while its settings match); the rest form the calibration/test pool;
3. groups: the seven organs; every other voxel with clean > 0 (HU > -175) is ``body``; air and
   the outside of the field of view (clean = 0) are excluded;
4. :func:`~ConformalSegLib.semcrc.evaluate_interval_methods` over ``--runs`` random splits of the pool
   (``n_cal`` = half the pool, ``n_opt`` = a quarter of those, epsilon ``--epsilon``). An organ
   present in fewer than 1/epsilon - 1 S_cal scans cannot be controlled separately (lambda = inf).

stdout is the Markdown section for ``benchmarks/RESULTS.md``. Usage::

    .venv/bin/python benchmarks/eval_semcrc_openkbp.py           # 60 training CTs, 30 epochs (~10 min on 2 cores)
    .venv/bin/python benchmarks/eval_semcrc_openkbp.py --quick   # 40 CTs, 15 epochs, 5 runs: under 2 min
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import _common as C

DATA = C.REPO_ROOT.parent / "shared" / "data" / "openkbp"
CACHE = C.REPO_ROOT / "benchmarks" / "_cache" / "openkbp_semcrc"
ORGANS = {
    1: "brainstem",
    2: "spinal cord",
    3: "right parotid",
    4: "left parotid",
    5: "esophagus",
    6: "larynx",
    7: "mandible",
}
BODY_TISSUE = 8  #: label given here to non-organ voxels with clean > 0 (sem-CRC's generic body group)


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--train", type=int, default=60, help="cases for training, incl. --heldout (default 60)")
    parser.add_argument("--heldout", type=int, default=6, help="training cases held out for the raw coverage")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--runs", type=int, default=20, help="random calibration/test splits (default 20)")
    parser.add_argument("--epsilon", type=float, default=0.1, help="risk tolerance (default 0.1)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--data", type=Path, default=DATA, help="OpenKBP folder (default ../shared/data/openkbp)")


def _cases(root: Path) -> list[tuple[str, Path, Path]]:
    return [
        (f.name, f / "ct.nii.gz", f / "oars.nii.gz")
        for f in sorted(p for p in root.iterdir() if p.is_dir())
        if (f / "ct.nii.gz").is_file() and (f / "oars.nii.gz").is_file()
    ]


def _reduce(ct_path: Path, oars_path: Path, noise_seed: tuple[int, int]):
    """``(noisy, clean, organs, geometry)`` on the 2x reduced grid (module docstring, step 1)."""
    import numpy as np

    from ConformalSegLib.common.geometry import Geometry
    from ConformalSegLib.io.volumes import load_image, load_label_map
    from ConformalSegLib.semcrc.phantom_denoising import add_noise, window

    ct, oars = load_image(ct_path), load_label_map(oars_path)
    hu = np.asarray(ct.array, dtype=np.float32)
    z, y, x = (s // 2 * 2 for s in hu.shape)
    hu = hu[:z, :y, :x].reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(1, 3, 5))
    labels = np.asarray(oars.array)[:z:2, :y:2, :x:2].astype(np.uint8)
    g = ct.geometry
    direction = np.asarray(g.direction).reshape(3, 3)
    origin = np.asarray(g.origin) + direction @ (0.5 * np.asarray(g.spacing))  # centre of the first block
    geometry = Geometry(
        shape=hu.shape, spacing=tuple(2 * s for s in g.spacing), origin=tuple(origin), direction=g.direction
    )
    clean = window(hu)
    noisy = add_noise(clean, np.random.default_rng(noise_seed))
    organs = np.where((labels == 0) & (clean > 0), BODY_TISSUE, labels).astype(np.uint8)
    return noisy, clean, organs, geometry


def _config(args, shape_xyz):  # noqa: ANN001
    from ConformalSegLib.training.denoise import DenoisingConfig

    crop = (32, 32, 32) if args.quick else (48, 48, 48)
    return DenoisingConfig(
        epochs=args.epochs,
        patch_size=tuple(int(s) for s in shape_xyz),
        crop_size=crop,
        channels=(16, 32, 64),
        strides=(2, 2),
        batch_size=4,
        samples_per_case=4,
        seed=args.seed,
        device=args.device,
        name="openkbp_denoiser_quantile",
    )


def _model(args, train_pairs, held_pairs, shape_xyz) -> Path:  # noqa: ANN001
    from ConformalSegLib.training.denoise import train_denoiser

    out = CACHE / ("model_quick" if args.quick else "model")
    config = _config(args, shape_xyz)
    wanted = {
        "train_ids": [p.case_id for p in train_pairs],
        "heldout_ids": [p.case_id for p in held_pairs],
        "epochs": config.epochs,
        "seed": config.seed,
        "crop": list(config.crops),
        "reduce": 2,
        "sigma": 0.2,
    }
    stamp = out / "benchmark_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        C.log(f"reusing the cached model {out}")
        return out
    C.log(f"training on {len(train_pairs)} cases ({config.epochs} epochs), {len(held_pairs)} held out")
    t0 = time.perf_counter()
    result = train_denoiser(
        config,
        train_pairs,
        held_pairs,
        out,
        force=True,
        data_info={
            "source": "OpenKBP (../shared/data/openkbp)",
            "reduce": "2x2x2 HU block mean",
            "window_hu": [-175, 250],
            "noise_sigma": 0.2,
            "noise_added": "after windowing, [0, 1] units, not clipped",
        },
        command=" ".join(sys.argv),
    )
    C.log(f"trained in {time.perf_counter() - t0:.0f} s; held-out coverage {result.heldout.get('coverage')}")
    stamp.write_text(json.dumps(wanted))
    return out


def _pool_scans(engine, pairs: Iterable, organ_map) -> tuple[list, list[float], list[float]]:
    """The denoiser's intervals on the pool (as interval scans), and each scan's raw coverage and mean length
    inside the body."""
    import numpy as np

    from ConformalSegLib.semcrc import make_interval_scan, organ_memberships

    scans, raw_cover, raw_len = [], [], []
    for p in pairs:
        q = engine.predict_quantiles(p.noisy)
        labels = np.asarray(p.labels.array)
        membership = organ_memberships(labels, organ_map, labels > 0)
        scans.append(make_interval_scan(q.lower, q.upper, p.clean.array, membership, case_id=p.case_id))
        counted = labels > 0
        truth = np.asarray(p.clean.array)
        raw_cover.append(float(np.mean((q.lower[counted] <= truth[counted]) & (truth[counted] <= q.upper[counted]))))
        raw_len.append(float(np.mean(q.upper[counted] - q.lower[counted])))
    return scans, raw_cover, raw_len


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    print("### Real data: sem-CRC on OpenKBP denoising (eval_semcrc_openkbp.py)\n")
    if not args.data.is_dir():
        print(f"Skipped: {args.data} is absent (the real-data evaluation needs ../shared/data/openkbp).\n")
        return 0
    import warnings

    import numpy as np

    from ConformalSegLib.inference import InferenceEngine, resolve_model
    from ConformalSegLib.io.volumes import Volume
    from ConformalSegLib.semcrc import (
        IntervalData,
        OrganMap,
        UncontrollableRiskWarning,
        evaluate_interval_methods,
        evaluation_markdown,
    )
    from ConformalSegLib.training.denoise import DenoisingPair

    warnings.simplefilter("ignore", UncontrollableRiskWarning)  # reported as inf lengths in the tables
    if args.quick:
        args.train, args.heldout, args.epochs, args.runs = 12, 2, 15, 5
    t_start = time.perf_counter()
    listed = _cases(args.data)
    position = {cid: i for i, (cid, _, _) in enumerate(listed)}
    files = {cid: (ct, oars) for cid, ct, oars in listed}
    order = [listed[i][0] for i in np.random.default_rng(args.seed).permutation(len(listed))]
    if args.quick:
        order = order[:40]
    train_ids, pool_ids = order[: args.train], sorted(order[args.train :])

    def pair(cid: str) -> DenoisingPair:
        noisy, clean, organs, geometry = _reduce(*files[cid], (args.seed, position[cid]))
        return DenoisingPair(
            cid, Volume(noisy, geometry, None), Volume(clean, geometry, None), Volume(organs, geometry, None)
        )

    t0 = time.perf_counter()
    training = [pair(cid) for cid in train_ids]
    shape_xyz = tuple(reversed(training[0].noisy.array.shape))
    model = _model(args, training[args.heldout :], training[: args.heldout], shape_xyz)
    train_s = time.perf_counter() - t0
    card = resolve_model(model)
    engine = InferenceEngine(card, device=args.device)
    organ_map = OrganMap(ORGANS)
    t0 = time.perf_counter()
    scans, raw_cover, raw_len = _pool_scans(engine, (pair(cid) for cid in pool_ids), organ_map)  # streamed
    data = IntervalData(scans, organ_map.groups)
    inference_s = time.perf_counter() - t0
    n_cal = len(pool_ids) // 2
    n_opt = max(1, n_cal // 4)
    t0 = time.perf_counter()
    summary = evaluate_interval_methods(
        data, args.epsilon, runs=args.runs, n_cal=n_cal, seed=args.seed, n_opt=n_opt, k=4, d_min=2
    )
    eval_s = time.perf_counter() - t0
    out = CACHE / ("eval_quick" if args.quick else "eval")
    out.mkdir(parents=True, exist_ok=True)
    from ConformalSegLib.semcrc import write_interval_evaluation

    write_interval_evaluation(summary, out, force=True)

    info = card.training or {}
    present = {name: sum(bool(np.any(s.group == k)) for s in scans) for k, name in enumerate(organ_map.groups)}
    print(
        f"- Cases: {len(listed)} found{' (quick: 40 used)' if args.quick else ''}; "
        f"{len(train_ids) - args.heldout} train the denoiser, {args.heldout} held out from training (raw "
        f"[q_0.1, q_0.9] coverage {info.get('heldout_body_coverage', float('nan')):.3f} inside the body, "
        f"nominal 0.8), {len(pool_ids)} in the calibration/test pool; {args.runs} random splits "
        f"(n_cal = {n_cal}, n_opt = {n_opt}, seed {args.seed})."
    )
    print(
        f"- Input: CT reduced 2x (64^3), windowed -175..250 HU to [0, 1], Gaussian noise σ = 0.2 after "
        f"windowing. Network: MONAI UNet [16, 32, 64], pinball loss, {args.epochs} epochs "
        f"(`{model.relative_to(C.REPO_ROOT)}`)."
    )
    print(
        f"- Pool raw interval: coverage {np.mean(raw_cover):.3f}, mean length {np.mean(raw_len):.4f} (body voxels). "
        f"Organ presence in the pool: " + ", ".join(f"{k} {v}" for k, v in present.items()) + "."
    )
    print(
        f"- Time: data + training {train_s:.0f} s, pool inference {inference_s:.0f} s, "
        f"{args.runs} × 4 calibrations {eval_s:.0f} s, total {time.perf_counter() - t_start:.0f} s on "
        f"{engine.device}. Full report in `{out.relative_to(C.REPO_ROOT)}`.\n"
    )
    print(evaluation_markdown(summary))
    print(
        "An `inf` length marks splits where an organ was in fewer than 1/ε - 1 calibration scans: per-organ "
        "sem-CRC then reports it as uncontrollable (λ = ∞) instead of giving up its guarantee.\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
