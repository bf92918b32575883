"""The Slicer panel's slider path at 512 x 512 x 300, measured without Slicer (``--quick``: 40 x 160 x 160).

What one slider stop costs on the library side, what moved off the GUI thread, and what writing a mask
into Slicer costs before and after the change to ``SetBinaryLabelmapToSegment``:

* **One slider step** (:meth:`ConformalSegSlicer.slider.SliderState.update`): a CLS profile and a
  confidence-set profile with a ``distance:0.5`` outer transform (score map handed in once, as the
  background process does); every step moves epsilon and the two alphas, so all three masks are
  recomputed. Then the copy of each changed mask into a fresh uint8 image buffer, which is what
  ``slicer_adapter.labelmap_image`` does before ``SetBinaryLabelmapToSegment``.
* **Score transforms** (once per probability map, in the background process since D4): ``distance:0.5``
  (two Euclidean distance transforms) and ``gaussian:2``.
* **Array to VTK image** with the ``vtk`` wheel (skipped when it is not installed): the new path (a
  uint8 ``vtkImageData`` filled from numpy: one mask copy; allocated per call, and reused as the panel
  does) against what
  ``updateSegmentBinaryLabelmapFromArray`` does per segment (``CreateLabelVolumeFromVolume`` deep-copies
  the float32 reference image, a ``vtkImageThreshold`` pass zero-fills it, another deep copy, then the
  mask copy; Slicer's scene add/remove of the temporary node is not included).

Run: ``.venv/bin/python benchmarks/bench_slider_path.py [--quick]`` (the ``vtk`` part needs ``pip install vtk``).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import _common as C
import numpy as np

from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
from ConformalSegLib.conformal.score_transforms import parse_transform

sys.path.insert(0, str(C.REPO_ROOT / "ConformalSeg"))
from ConformalSegSlicer.slider import SliderSettings, SliderState  # noqa: E402

SETTINGS = [(e, a) for e in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3) for a in (0.1, 0.15, 0.2)]


def calibration_profiles(n: int, seed: int):
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    cases = list(make_cases(n, seed, shape=(24, 48, 48)))
    cls = calibrate(cases, CalibrationRequest("cls", epsilon=0.1, alpha=0.1))
    sets = calibrate(
        cases, CalibrationRequest("sets", alpha_inner=0.1, alpha_outer=0.1, outer_transform="distance:0.5")
    )
    return [cls, sets]


def slider_steps(state: SliderState, steps: int) -> tuple[list[float], list[float]]:
    """Per step: ``update`` alone, and ``update`` + the copy of every changed mask into a uint8 buffer."""
    update_times, with_copy = [], []
    buffer = np.empty(state.probability.shape, dtype=np.uint8)
    for i in range(steps):
        e, a = SETTINGS[(i + 1) % len(SETTINGS)]
        settings = SliderSettings(epsilon=e, alpha=a, alpha_inner=a, alpha_outer=min(0.5, a + e))
        t0 = time.perf_counter()
        result = state.update(settings)
        t1 = time.perf_counter()
        for name in result.changed:
            buffer[...] = result.segments[name].mask.view(np.uint8)
        t2 = time.perf_counter()
        update_times.append(t1 - t0)
        with_copy.append(t2 - t0)
    return update_times, with_copy


def vtk_paths(probability: np.ndarray, mask: np.ndarray, repeats: int) -> list[list[object]] | None:
    try:
        import vtk
        from vtk.util import numpy_support
    except ImportError:
        return None
    depth, rows, columns = probability.shape

    def new_path():
        image = vtk.vtkImageData()
        image.SetDimensions(columns, rows, depth)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(mask.shape)[...] = mask.view(np.uint8)
        return image

    reused = new_path()

    def reused_path():
        voxels = numpy_support.vtk_to_numpy(reused.GetPointData().GetScalars())
        voxels.reshape(mask.shape)[...] = mask.view(np.uint8)
        reused.GetPointData().GetScalars().Modified()
        return reused

    reference = vtk.vtkImageData()
    reference.SetDimensions(columns, rows, depth)
    reference.GetPointData().SetScalars(numpy_support.numpy_to_vtk(probability.ravel(), deep=True))

    def old_path():
        template = vtk.vtkImageData()
        template.DeepCopy(reference)  # CreateLabelVolumeFromVolume: copy of the float reference
        threshold = (
            vtk.vtkImageThreshold()
        )  # ClearVolumeImageData (deprecated in VTK 9.7, used by Slicer): zero-filled, cast to the label type
        threshold.SetInputData(template)
        threshold.SetInValue(0)
        threshold.SetOutValue(0)
        threshold.SetOutputScalarTypeToUnsignedChar()
        threshold.Update()
        label = vtk.vtkImageData()
        label.DeepCopy(threshold.GetOutput())
        numpy_support.vtk_to_numpy(label.GetPointData().GetScalars()).reshape(mask.shape)[...] = mask.view(np.uint8)
        return label

    new, _, _ = C.time_call(new_path, repeats)
    again, _, _ = C.time_call(reused_path, repeats)
    old, _, _ = C.time_call(old_path, repeats)
    version = vtk.vtkVersion.GetVTKVersion()
    return [
        [f"uint8 vtkImageData allocated and filled from numpy (VTK {version})", C.fmt_s(new), "1.00x"],
        ["the same image reused, refilled (what the panel does)", C.fmt_s(again), C.fmt_ratio(again / new)],
        [
            "deep copy of the float32 reference + threshold + deep copy + fill (before)",
            C.fmt_s(old),
            C.fmt_ratio(old / new),
        ],
    ]


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    shape = C.QUICK_SHAPE if args.quick else C.FULL_SHAPE
    steps, repeats, n = (6, 2, 20) if args.quick else (18, 3, 60)
    C.log(f"[slider-path] volume {shape} ...")
    probability, _ = C.make_volume(shape, seed=args.seed)
    geometry = Geometry(shape=shape, spacing=(0.8, 0.8, 1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profiles = calibration_profiles(n, args.seed)

    C.log("[slider-path] score transforms ...")
    t0 = time.perf_counter()
    distance = parse_transform("distance:0.5")(probability, geometry)
    distance_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    parse_transform("gaussian:2")(probability, geometry)
    gaussian_s = time.perf_counter() - t0

    state = SliderState(profiles, probability, geometry, inline_scores=False)
    state.set_scores("distance:0.5", distance)
    del distance
    C.log("[slider-path] slider steps ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state.update(SliderSettings())  # warm-up: buffers allocated once
        update_times, with_copy = slider_steps(state, steps)
    mask = state.update(SliderSettings()).segments["Lesion (FNR-controlled)"].mask
    C.log("[slider-path] array -> VTK image ...")
    vtk_rows = vtk_paths(probability, mask, repeats)

    voxels = int(np.prod(shape))
    out = [
        "### Slider path of the Slicer panel (library side)\n",
        f"{shape[2]} x {shape[1]} x {shape[0]} float32 probability map ({voxels / 1e6:.1f} M voxels, "
        f"`_common.make_volume`); a CLS and a confidence-set profile (`distance:0.5` outer transform), {n} "
        f"calibration scans; {steps} slider steps, each moving epsilon and the alphas (three masks recomputed).\n",
        C.md_table(
            ["per slider step", "median", "max"],
            [
                [
                    "`SliderState.update` (3 masks + voxel counts)",
                    C.fmt_s(statistics.median(update_times)),
                    C.fmt_s(max(update_times)),
                ],
                [
                    "+ copy of each changed mask into a uint8 image buffer",
                    C.fmt_s(statistics.median(with_copy)),
                    C.fmt_s(max(with_copy)),
                ],
            ],
        ),
        "",
        C.md_table(
            ["once per probability map (background process since D4)", "time"],
            [
                ["`distance:0.5` score map (two EDTs)", C.fmt_s(distance_s)],
                ["`gaussian:2` score map", C.fmt_s(gaussian_s)],
            ],
        ),
        "",
    ]
    if vtk_rows is None:
        out.append("Array to VTK image: skipped (the `vtk` wheel is not installed: `pip install vtk`).\n")
    else:
        out += [C.md_table(["one mask into a VTK image (per changed segment)", "median", "vs new"], vtk_rows), ""]
    print("\n".join(out))
    sys.stdout.flush()
    C.log(f"[slider-path] peak RSS {C.peak_rss_mb():.0f} MiB")
    return {"update_s": statistics.median(update_times), "distance_s": distance_s, "gaussian_s": gaussian_s}


if __name__ == "__main__":
    main()
