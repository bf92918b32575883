"""Signed distance transform (``--transform distance``): peak memory and time, whole-grid float64 vs current.

``whole_grid_signed_distance`` is the previous implementation (two whole-grid ``distance_transform_edt`` calls in
float64, then ``np.where`` and a float32 cast); ``signed_distance_mm`` the current one (inside distances on the
mask's grown bounding box, distances from the int32 feature transform slab by slab). Each measurement runs in a
fresh process (``_child.measure``; peak RSS includes the imports and the probability volume, 4 bytes per voxel);
the results are compared voxel by voxel (at most 1 float32 ulp apart, checked).

Volume: the synthetic 512 x 512 x 300 probability map of ``_common.make_volume`` (``--quick``: 40 x 160 x 160),
mask ``p >= 0.5``, spacing 0.8 x 0.8 x 2 mm.

Run: ``.venv/bin/python benchmarks/bench_distance.py [--quick]``.
"""

from __future__ import annotations

import sys

import _common as C
import numpy as np
from _child import measured_on_saved_map
from scipy import ndimage

SPACING_XYZ = (0.8, 0.8, 2.0)


def whole_grid_signed_distance(mask: np.ndarray, geometry) -> np.ndarray:  # noqa: ANN001
    """The previous ``signed_distance_mm`` (whole grid, float64 work arrays)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        diagonal = float(np.linalg.norm(np.asarray(geometry.shape) * np.asarray(geometry.spacing_zyx)))
        return np.full(mask.shape, diagonal if mask.all() else -diagonal, dtype=np.float32)
    sampling = geometry.spacing_zyx
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return np.where(mask, inside, -outside).astype(np.float32)


def run(path: str, old: bool | None, out: str) -> float:
    """Child side: load the map, compute the transform (``old`` None: none, the floor), save it."""
    from ConformalSegLib.common.geometry import Geometry
    from ConformalSegLib.conformal.score_transforms import signed_distance_mm

    probability = np.load(path, mmap_mode=None)
    geometry = Geometry(shape=probability.shape, spacing=SPACING_XYZ)
    mask = probability >= 0.5
    del probability
    if old is not None:
        signed = (whole_grid_signed_distance if old else signed_distance_mm)(mask, geometry)
        np.save(out, signed)
    return float(mask.mean())


def main(argv: list[str] | None = None) -> None:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    shape = C.QUICK_SHAPE if args.quick else C.FULL_SHAPE
    lines = ["### Signed distance transform: memory and time\n", f"Machine: {C.machine_line()}\n"]
    probability, _ = C.make_volume(shape, seed=args.seed)
    runs = [("floor", (None,)), ("old", (True,)), ("new", (False,))]
    with measured_on_saved_map("bench_distance", probability, runs, log=C.log) as (tmp, measured):
        del probability
        a, b = np.load(tmp / "old.npy"), np.load(tmp / "new.npy")
        np.testing.assert_array_max_ulp(a, b, maxulp=1)
        identical = float(np.mean(a == b))
        del a, b
    floor, old, new = measured["floor"], measured["old"], measured["new"]
    voxels = int(np.prod(shape))
    volume_mib = voxels * 4 / 2**20
    lines.append(
        f"Map of {shape} (z, y, x) = {voxels:,} voxels ({volume_mib:.0f} MiB as float32), mask fraction "
        f"{new['result']:.4f}, spacing {SPACING_XYZ} mm (x, y, z). Peak RSS per fresh process (imports, the map "
        f"while the mask is made, the transform); values bit-identical in {identical:.6%} of the voxels, the rest "
        "1 float32 ulp apart.\n"
    )
    rows = []
    extra = []
    for label, m in (("whole grid, float64 (old)", old), ("cropped inside, int32 features, float32 (new)", new)):
        extra.append(max(m["peak_mib"] - floor["peak_mib"], 1e-9))
        per_voxel = extra[-1] * 2**20 / voxels
        rows.append(
            [label, C.fmt_s(m["seconds"]), f"{m['peak_mib']:.0f} MiB", f"{extra[-1]:.0f} MiB", f"{per_voxel:.1f}"]
        )
    rows.append(["old / new", C.fmt_ratio(old["seconds"] / new["seconds"]), "", C.fmt_ratio(extra[0] / extra[1]), ""])
    header = ["implementation", "time", "peak RSS", "above the floor", "bytes per voxel above the floor"]
    lines.append(f"Floor (imports, map loaded, mask made, no transform): {floor['peak_mib']:.0f} MiB.\n")
    lines.append(C.md_table(header, rows) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
