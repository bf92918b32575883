"""Writing the DICOM SEG of ``apply --dicom-seg``: where the time goes, and the writer before and after.

Three nested lesion masks (inner set ⊂ lesion ⊂ outer set, a ball of radius 0.2 / 0.3 / 0.45 of the
half-width, i.e. on about a third of the slices) on a 512 x 512 x 300 CT series written by the test helper
(``Testing/dicom_support.py``; ``--quick``: 40 x 96 x 96), as ``apply`` writes them:

* **before** (the writer of commit 08fab43): the reference series' headers read twice (once for the grid
  check, once by the writer), the masks stacked ``np.stack(..., axis=-1).astype(uint8)``, every frame
  written;
* **after**: headers read once, the masks handed to highdicom segment-major
  (:func:`ConformalSegLib.io.dicom_seg.stack_segments`), every frame written: the file's pixel data are
  **identical** to before (checked byte for byte);
* **after, omitting empty frames** (``--dicom-seg-omit-empty``): fewer frames; the masks read back on the
  series' grid are identical (checked with :func:`ConformalSegLib.io.dicom_seg.read_dicom_seg`).

Steps timed separately: reading the headers (pydicom, 300 files, GDCM sorting), stacking, highdicom's
``Segmentation()`` (checks incl. the overlap sum, per-frame functional groups, bit packing) and
``save_as`` (pydicom writing the per-frame sequences). The writers run interleaved, and each one's **best**
repetition is reported (on a shared machine the fastest run is the least disturbed one; the median is
given too).

Run: ``.venv/bin/python benchmarks/bench_dicom_seg.py [--quick] [--seed S]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as C
import numpy as np

sys.path.insert(0, str(C.REPO_ROOT / "Testing"))
from dicom_support import write_ct_series  # noqa: E402

from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.io.dicom_seg import (  # noqa: E402
    GuaranteeRecord,
    build_segmentation,
    check_reference_geometry,
    read_dicom_seg,
    stack_segments,
)
from ConformalSegLib.io.dicom_series import series_headers  # noqa: E402

RECORD = GuaranteeRecord("sets", None, 0.1, 120, "0" * 64, "With probability at least 90%, ...")
STEPS = ("headers", "stack", "Segmentation()", "save_as")


def lesion_masks(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij", sparse=True)
    r = np.sqrt(x**2 + y**2 + z**2)
    return {"Inner set": r < 0.2, "Lesion (FNR-controlled)": r < 0.3, "Outer set": r < 0.45}


def timed(steps: dict[str, float], name: str, fn: Callable[[], object]) -> object:
    t0 = time.perf_counter()
    result = fn()
    steps[name] = steps.get(name, 0.0) + time.perf_counter() - t0
    return result


def write(kind: str, masks: dict[str, np.ndarray], geometry: Geometry, folder: Path, out: Path) -> dict[str, float]:
    """One write as ``apply`` does it; returns the seconds per step."""
    steps: dict[str, float] = {}
    reference = timed(steps, "headers", lambda: series_headers(folder))
    check_reference_geometry(geometry, reference.geometry, folder)
    if kind == "before":
        reference = timed(steps, "headers", lambda: series_headers(folder))  # the writer read them again
        stacked = timed(steps, "stack", lambda: np.stack(list(masks.values()), axis=-1).astype(np.uint8))
    else:
        stacked = timed(steps, "stack", lambda: stack_segments(masks))
    omit = kind == "after, omit empty frames"
    seg = timed(steps, "Segmentation()", lambda: build_segmentation(reference, stacked, list(masks), RECORD, omit))
    timed(steps, "save_as", lambda: seg.save_as(out))
    steps["frames"] = float(seg.NumberOfFrames)
    return steps


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    shape = (40, 96, 96) if args.quick else C.FULL_SHAPE
    repeats = 1 if args.quick else 5
    geometry = Geometry(shape, (0.8, 0.8, 2.5), (-200.0, -200.0, 50.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    masks = lesion_masks(shape)
    kinds = ("before", "after", "after, omit empty frames")
    with tempfile.TemporaryDirectory(prefix="bench-dicom-seg-") as tmp:
        root = Path(tmp)
        C.log(f"writing a {shape[2]}x{shape[1]}x{shape[0]} CT series ...")
        write_ct_series(root / "ct", np.zeros(shape, np.int16), geometry)
        write("after", masks, geometry, root / "ct", root / "warm.dcm")  # imports, highdicom's tables
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
        for r in range(repeats):
            for kind in kinds:
                C.log(f"repetition {r + 1}/{repeats}: {kind}")
                runs[kind].append(write(kind, masks, geometry, root / "ct", root / f"{kind}.dcm"))
        import pydicom

        before, after = (pydicom.dcmread(root / f"{kind}.dcm") for kind in kinds[:2])
        if before.PixelData != after.PixelData or before.NumberOfFrames != after.NumberOfFrames:
            raise SystemExit("the pixel data of the SEG changed")
        back = read_dicom_seg(root / f"{kinds[2]}.dcm", root / "ct")
        if list(back) != list(masks) or not all(np.array_equal(back[n], masks[n]) for n in masks):
            raise SystemExit("the SEG without empty frames does not read back as the masks")
        sizes = {kind: (root / f"{kind}.dcm").stat().st_size / 2**20 for kind in kinds}

    def total(run: dict[str, float]) -> float:
        return sum(run.get(step, 0.0) for step in STEPS)

    best = {kind: min(runs[kind], key=total) for kind in kinds}  # each step as in the writer's best run
    medians = {kind: statistics.median(total(run) for run in runs[kind]) for kind in kinds}
    rows = [
        [
            kind,
            *(C.fmt_s(best[kind].get(step, 0.0)) for step in STEPS),
            C.fmt_s(total(best[kind])),
            C.fmt_ratio(total(best["before"]) / total(best[kind])),
            C.fmt_s(medians[kind]),
            C.fmt_ratio(medians["before"] / medians[kind]),
            int(best[kind]["frames"]),
            f"{sizes[kind]:.1f} MiB",
        ]
        for kind in kinds
    ]
    print(f"### DICOM SEG writing (bench_dicom_seg.py{' --quick' if args.quick else ''})\n")
    print(f"- {C.machine_line()}")
    print(
        f"- {shape[2]}x{shape[1]}x{shape[0]} series, 3 nested masks (BINARY, overlapping), highdicom; best of "
        f"{repeats} interleaved runs (and their median); 'after' has byte-identical pixel data, 'omit empty "
        "frames' reads back to the same masks\n"
    )
    header = ["writer", *STEPS, "total (best)", "vs before", "median total", "vs before", "frames", "file"]
    print(C.md_table(header, rows))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
