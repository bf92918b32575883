"""The margin score (``calibrate --score margin``) against the signed distance it is computed from: time and memory.

``margin:0.5`` is ``g(D)``, ``D`` the confidence sets' ``distance:0.5`` signed distance and ``g`` a logistic map
evaluated in float64 slabs of 4 Mi voxels and rounded to float32 (``conformal/score_transforms.py``). This
measures what the map ``g`` adds on top of the distance transform, each in a fresh process
(``_child.measure``; peak RSS includes the imports and the probability volume, 4 bytes per voxel), against a
floor that only loads the map and makes the mask. The margin score is checked to equal ``g`` of the distance map
voxel by voxel, and to keep its order (a sorted distance sample maps to non-decreasing scores).

Volume: the synthetic 512 x 512 x 300 probability map of ``_common.make_volume`` (``--quick``: 40 x 160 x 160),
spacing 0.8 x 0.8 x 2 mm.

Run: ``.venv/bin/python benchmarks/bench_margin_score.py [--quick]``.
"""

from __future__ import annotations

import sys

import _common as C
import numpy as np
from _child import measured_on_saved_map

SPACING_XYZ = (0.8, 0.8, 2.0)


def run(path: str, name: str, out: str) -> float:
    """Child side: load the map, compute the score ``name`` (``""``: only the mask, the floor), save it."""
    from ConformalSegLib.common.geometry import Geometry
    from ConformalSegLib.conformal.score_transforms import parse_transform

    probability = np.load(path)
    geometry = Geometry(shape=probability.shape, spacing=SPACING_XYZ)
    if not name:
        return float(np.mean(probability >= 0.5))
    scores = np.asarray(parse_transform(name)(probability, geometry))
    del probability
    np.save(out, scores)
    return float(scores.mean())


def main(argv: list[str] | None = None) -> None:
    from ConformalSegLib.conformal.score_transforms import margin_score

    args = C.parse_args(__doc__.splitlines()[0], argv)
    shape = C.QUICK_SHAPE if args.quick else C.FULL_SHAPE
    lines = ["### The margin score: what it costs on top of the signed distance\n", f"Machine: {C.machine_line()}\n"]
    probability, _ = C.make_volume(shape, seed=args.seed)
    runs = [("floor", ("",)), ("distance", ("distance:0.5",)), ("margin", ("margin:0.5",))]
    with measured_on_saved_map("bench_margin_score", probability, runs, log=C.log) as (tmp, measured):
        del probability
        d, m = np.load(tmp / "distance.npy"), np.load(tmp / "margin.npy")
        assert np.array_equal(margin_score(d), m), "the margin score is g of the signed distance"
        order = np.argsort(d, axis=None)[:: max(d.size // 1_000_000, 1)]
        assert np.all(np.diff(m.reshape(-1)[order]) >= 0), "the margin score keeps the order of distances"
        del d, m
    floor, distance, margin = measured["floor"], measured["distance"], measured["margin"]
    voxels = int(np.prod(shape))
    lines.append(
        f"Map of {shape} (z, y, x) = {voxels:,} voxels ({voxels * 4 / 2**20:.0f} MiB as float32), mask fraction "
        f"{floor['result']:.4f}, spacing {SPACING_XYZ} mm (x, y, z). Peak RSS per fresh process; the margin score "
        "equals g of the distance map voxel by voxel (checked) and keeps the distances' order.\n"
    )
    rows = []
    for label, m in (("`distance:0.5` (the baseline)", distance), ("`margin:0.5` = g(distance)", margin)):
        above = max(m["peak_mib"] - floor["peak_mib"], 1e-9)
        rows.append([label, C.fmt_s(m["seconds"]), f"{m['peak_mib']:.0f} MiB", f"{above:.0f} MiB"])
    rows.append(["margin / distance", C.fmt_ratio(margin["seconds"] / distance["seconds"]), "", ""])
    lines.append(f"Floor (imports, map loaded, mask made): {floor['peak_mib']:.0f} MiB.\n")
    lines.append(C.md_table(["score", "time", "peak RSS", "above the floor"], rows) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
