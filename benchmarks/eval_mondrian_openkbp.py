"""Real data: group-conditional (Mondrian) CLS on OpenKBP PTV70, with groups by features of the data.

Data: ``../shared/data/openkbp`` (226 head-and-neck CTs, 128^3, ``ptv.nii.gz`` label 3 = PTV70, present
in every case). Skipped cleanly (exit status 0, a note on stdout) when it is absent. Two groupings of the
real scans, both available in the data:

* **PTV70 volume** (the lesion size, from the label): bins ``[0, 200)``, ``[200, 400)`` and ``[400, inf)`` mL
  (``--group-by lesion-size:200,400``), calibrated per true size and, for apply time, per *predicted* size
  (voxels with probability >= 0.5; the guarantee is then conditional on the predicted-size bin);
* **slice thickness** (from the CT header, i.e. the acquisition protocol, known for a new scan): thin
  (< 2.5 mm), 2.5 mm, thick (> 2.5 mm) -- a ``case_id,group`` table as for ``--groups FILE``. The thin
  group is small (22 scans): about 11 per calibration half, close to the 9 CLS needs at alpha = 0.1, so
  some splits report it too small (whole image) instead of borrowing the marginal threshold.

Probability maps (``--predictor``):

* ``simulated`` (default, minutes on a CPU, no training): a network imitated on the *real* PTV70 shapes
  and spacings, as in :mod:`ConformalSegLib.phantoms.simulated_maps`: logit ``s (shift - d)`` plus smooth
  noise, ``d`` the signed distance to the PTV70 surface in mm (positive outside), ``s`` in [0.4, 1.5] /mm
  and ``shift`` ~ N(-1.5, 1.5) mm per case (networks under-segment). A boundary error of a few mm costs a
  small target a larger share of its voxels, so small PTVs are the hard group, as with real networks;
* ``network``: the network of ``eval_openkbp.py`` (DynUNet, the shipped recipe) on its calibration/test
  pool (trained and its maps predicted once, then cached in ``benchmarks/_cache/openkbp_ptv70``; the first
  run trains, 45-90 minutes on 2 CPU cores). Its summaries' cache names the network's pipeline fingerprint.

Protocol: ``--splits`` (default 200) seeded random 50/50 calibration/test splits; per split, the marginal
CLS threshold and each group's Mondrian threshold at eps = alpha = 0.1 on the calibration half; on the test
half the per-group ECR = P(FNR <= eps) of both. Summaries are cached per predictor in
``benchmarks/_cache/openkbp_mondrian``. stdout is the Markdown section for ``benchmarks/RESULTS.md``::

    .venv/bin/python benchmarks/eval_mondrian_openkbp.py [--quick] [--predictor simulated|network]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import _common as C
import numpy as np

DATA = C.REPO_ROOT.parent / "shared" / "data" / "openkbp"
CACHE = C.REPO_ROOT / "benchmarks" / "_cache" / "openkbp_mondrian"
PTV70 = 3
EPS = ALPHA = 0.1
SIZE_EDGES = (200.0, 400.0)


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--predictor", choices=("simulated", "network"), default="simulated")
    parser.add_argument("--splits", type=int, default=200, help="random calibration/test splits (default 200)")
    parser.add_argument("--data", type=Path, default=DATA, help="OpenKBP folder (default ../shared/data/openkbp)")
    parser.add_argument("--device", default="auto", help="network predictor: auto, cpu or cuda")
    parser.add_argument("--train", type=int, default=66, help="network predictor: as eval_openkbp.py")
    parser.add_argument("--heldout", type=int, default=6, help="network predictor: as eval_openkbp.py")
    parser.add_argument("--epochs", type=int, default=40, help="network predictor: as eval_openkbp.py")


def thickness_group(z_mm: float) -> str:
    return "thin (< 2.5 mm)" if z_mm < 2.45 else ("2.5 mm" if z_mm < 2.55 else "thick (> 2.5 mm)")


def simulated_probability(label: np.ndarray, spacing_zyx: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """The imitated network output on one real PTV70 mask (module docstring), computed in the mask's bounding
    box grown by 25 mm (beyond it the distance is clipped at 20 mm and the probability is below 1e-6)."""
    from scipy import ndimage, special

    scale, shift = rng.uniform(0.4, 1.5), rng.normal(-1.5, 1.5)
    prob = np.full(label.shape, special.expit(scale * (shift - 20.0)), np.float32)
    where = np.argwhere(label)
    margin = np.ceil(25.0 / np.asarray(spacing_zyx)).astype(int)
    lo, hi = np.maximum(where.min(0) - margin, 0), np.minimum(where.max(0) + margin + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = label[box]
    inside = ndimage.distance_transform_edt(sub, sampling=spacing_zyx)
    outside = ndimage.distance_transform_edt(~sub, sampling=spacing_zyx)
    d = np.minimum(outside - inside, 20.0)  # signed distance, mm, positive outside
    noise = ndimage.gaussian_filter(rng.standard_normal(sub.shape), 2.0)
    noise /= noise.std() or 1.0
    prob[box] = special.expit(scale * (shift - d) + noise)
    return prob


def _summaries_simulated(args) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray, list[str]]:  # noqa: ANN001
    from ConformalSegLib.conformal.mondrian import scan_volumes_ml
    from ConformalSegLib.conformal.summaries import lesion_values
    from ConformalSegLib.io.volumes import load_label_map

    folders = sorted(p for p in args.data.iterdir() if (p / "ptv.nii.gz").is_file())
    if args.quick:
        folders = folders[:40]
    ids, values, true_ml, pred_ml, groups = [], [], [], [], []
    for i, folder in enumerate(folders):
        label = load_label_map(folder / "ptv.nii.gz")
        lesion = label.array == PTV70
        rng = np.random.default_rng([args.seed, i])
        prob = simulated_probability(lesion, label.geometry.spacing_zyx, rng)
        ids.append(folder.name)
        values.append(lesion_values(prob, lesion))
        t, p = scan_volumes_ml(prob, lesion, label.geometry)
        true_ml.append(t)
        pred_ml.append(p)
        groups.append(thickness_group(label.geometry.spacing[2]))
        if (i + 1) % 50 == 0:
            C.log(f"  {i + 1}/{len(folders)} cases")
    return ids, values, np.array(true_ml), np.array(pred_ml), groups


def _summaries_network(args) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray, list[str]]:  # noqa: ANN001
    import eval_openkbp

    from ConformalSegLib.conformal.mondrian import scan_volumes_ml
    from ConformalSegLib.conformal.summaries import lesion_values

    if args.quick:
        args.train, args.heldout, args.epochs = 12, 2, 2
    *_, dataset, _ = eval_openkbp.pool_dataset(args)
    ids, values, true_ml, pred_ml, groups = [], [], [], [], []
    for case in dataset:
        prob, lesion, geometry = case.probability.array, case.lesion.array, case.probability.geometry
        ids.append(case.case_id)
        values.append(lesion_values(prob, lesion))
        t, p = scan_volumes_ml(prob, lesion, geometry)
        true_ml.append(t)
        pred_ml.append(p)
        groups.append(thickness_group(geometry.spacing[2]))
    return ids, values, np.array(true_ml), np.array(pred_ml), groups


def _summaries_path(args) -> Path | None:  # noqa: ANN001
    """The cache file of the summaries. For the network predictor it names the network's pipeline fingerprint,
    so a retrained network (``eval_openkbp.py`` with other settings) never reuses another's summaries; None
    while that network has not been trained."""
    name = f"{args.predictor}{'_quick' if args.quick else ''}_seed{args.seed}"
    if args.predictor == "network":
        import eval_openkbp

        from ConformalSegLib.inference import resolve_model

        model = eval_openkbp.CACHE / ("model_quick" if args.quick else "model")
        if not (model / "model_card.json").is_file():
            return None
        name += f"_{resolve_model(model).pipeline_sha256()[:12]}"
    return CACHE / f"{name}.npz"


def load_summaries(args):  # noqa: ANN001, ANN201
    """Per case: id, descending PTV70 probabilities, true and predicted volume (mL), thickness group (cached)."""
    path = _summaries_path(args)
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            offsets = z["offsets"]
            values = [z["values"][a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            return list(z["ids"]), values, z["true_ml"], z["pred_ml"], list(z["groups"])
    make = _summaries_simulated if args.predictor == "simulated" else _summaries_network
    ids, values, true_ml, pred_ml, groups = make(args)
    path = _summaries_path(args)  # the network exists now
    assert path is not None
    CACHE.mkdir(parents=True, exist_ok=True)
    offsets = np.r_[0, np.cumsum([v.size for v in values])]
    np.savez(
        path,
        ids=np.array(ids),
        values=np.concatenate(values),
        offsets=offsets,
        true_ml=true_ml,
        pred_ml=pred_ml,
        groups=np.array(groups),
    )
    return ids, values, true_ml, pred_ml, groups


def evaluate(ids, values, true_ml, pred_ml, groups, splits: int, seed: int) -> dict:  # noqa: ANN001
    """Per split and group: marginal and Mondrian ECR on the test half, n and triviality of the group."""
    from ConformalSegLib.conformal.cls import calibrate_cls, critical_cutoffs
    from ConformalSegLib.conformal.mondrian import calibrate_groups, grouping_by_size, grouping_from_table
    from ConformalSegLib.conformal.profile import CalibrationProfile
    from ConformalSegLib.conformal.summaries import LesionSummaries

    full = LesionSummaries.from_sorted(zip(ids, values))
    c_all = critical_cutoffs(full, EPS)
    rng = np.random.default_rng(seed)
    n = len(ids)
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _ in range(splits):
        perm = rng.permutation(n)
        cal, test = perm[: n // 2], perm[n // 2 :]
        s = full.subset(cal)
        like = calibrate_cls(s, EPS, ALPHA)
        profile = CalibrationProfile(like, s)
        table = grouping_from_table(s.case_ids, {ids[i]: groups[i] for i in cal})
        sizes = grouping_by_size(SIZE_EDGES, true_ml[cal], pred_ml[cal])
        m_table = calibrate_groups(table, like, profile, warn=False)
        m_size = calibrate_groups(sizes, like, profile, warn=False)
        test_true = np.searchsorted(SIZE_EDGES, true_ml[test], side="right")
        test_pred = np.searchsorted(SIZE_EDGES, pred_ml[test], side="right")
        parts = [("slice thickness", g.name, g, np.array([groups[i] == g.name for i in test])) for g in m_table.groups]
        parts += [("PTV70 volume", g.name, g, test_true == j) for j, g in enumerate(m_size.groups)]
        parts += [("predicted volume", g.name, g, test_pred == j) for j, g in enumerate(m_size.predicted_groups)]
        for kind, name, g, members in parts:
            c = c_all[test[members]]
            r = rows.setdefault((kind, name), {"marginal": [], "mondrian": [], "n": [], "trivial": [], "tests": []})
            r["marginal"] += list(c >= like.probability_threshold)
            r["mondrian"] += list(c >= g.calibration.probability_threshold)
            r["n"].append(g.n)
            r["trivial"].append(g.more_needed > 0)
            r["tests"].append(int(members.sum()))
        allc = c_all[test]
        r = rows.setdefault(
            ("all scans", "marginal"), {"marginal": [], "mondrian": [], "n": [], "trivial": [], "tests": []}
        )
        r["marginal"] += list(allc >= like.probability_threshold)
        r["n"].append(like.n)
        r["tests"].append(test.size)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    print(f"### Real data: Mondrian CLS on OpenKBP PTV70, {args.predictor} predictor (eval_mondrian_openkbp.py)\n")
    if not args.data.is_dir():
        print(f"Skipped: {args.data} is absent (the real-data evaluation needs ../shared/data/openkbp).\n")
        return 0
    if args.quick:
        args.splits = 20
    t0 = time.perf_counter()
    ids, values, true_ml, pred_ml, groups = load_summaries(args)
    t_data = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = evaluate(ids, values, np.asarray(true_ml), np.asarray(pred_ml), groups, args.splits, args.seed)
    table = []
    for (kind, name), r in rows.items():

        def share(key: str, fmt: str = ".3f") -> str:
            return format(float(np.mean(r[key])), fmt) if r[key] else "-"

        n_cal, n_test = f"{np.mean(r['n']):.1f}", f"{np.mean(r['tests']):.1f}"
        table.append([kind, name, n_cal, n_test, share("marginal"), share("mondrian"), share("trivial", ".0%")])
    print(
        f"- {len(ids)} cases (PTV70 volume median {np.median(true_ml):.0f} mL, "
        f"10-90 % {np.percentile(true_ml, 10):.0f}-{np.percentile(true_ml, 90):.0f} mL); "
        f"{args.splits} random 50/50 splits (seed {args.seed}); eps = alpha = 0.1; "
        f"data and summaries {t_data:.0f} s (cached in `benchmarks/_cache/openkbp_mondrian`).\n"
    )
    print(
        C.md_table(
            [
                "grouping",
                "group",
                "calibration scans (mean)",
                "test scans (mean)",
                "ECR, marginal threshold",
                "ECR, Mondrian threshold",
                "splits too small (whole image)",
            ],
            table,
        )
    )
    print(
        "\nECR = P(FNR <= 0.1) over the test scans of the group, pooled over splits; target 1 - alpha = 0.9. "
        "'predicted volume' groups use the Mondrian thresholds calibrated per predicted-size bin "
        "(the apply-time rule).\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
