"""Shared helpers of the benchmark scripts: timing, machine description, Markdown output and the
synthetic 512 x 512 x 300 probability volume.

Conventions of every benchmark script in this folder:

* **stdout is Markdown** (a ``###`` section with tables), so ``run_all.py`` can paste it as is;
  progress messages go to **stderr**.
* ``--quick`` shrinks every size so that the script runs in a few seconds (CI smoke test).
* Times are medians over repetitions of ``time.perf_counter`` intervals, with the garbage collector
  run before each repetition.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # scripts are run as ``python benchmarks/x.py`` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

#: Full-size volume, numpy ``(z, y, x)`` order: 300 slices of 512 x 512.
FULL_SHAPE = (300, 512, 512)
#: ``--quick`` volume (about 2 M voxels).
QUICK_SHAPE = (40, 160, 160)


# --------------------------------------------------------------------------------------------------
# command line / output


def parse_args(
    description: str, argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repetitions (a few seconds; for CI smoke tests)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def log(*parts: object) -> None:
    """Progress message (stderr, so that stdout stays pure Markdown)."""
    print(*parts, file=sys.stderr, flush=True)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    """A duration with a sensible unit."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(x: float) -> str:
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


# --------------------------------------------------------------------------------------------------
# timing


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float], object]:
    """Median wall time of ``fn()`` over ``repeats`` runs (after ``warmup`` untimed runs).

    Returns ``(median_seconds, all_seconds, last_result)``.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def time_per_call(fn: Callable[[int], object], *, repeats: int = 7, min_time: float = 0.2) -> float:
    """timeit-style: median over ``repeats`` of (loop time / calls), the loop count auto-ranged so that
    one loop lasts at least ``min_time`` seconds. ``fn(i)`` receives the call index (to vary inputs)."""
    fn(0)
    number = 1
    while True:
        t0 = time.perf_counter()
        for i in range(number):
            fn(i)
        if time.perf_counter() - t0 >= min_time or number >= 1 << 20:
            break
        number *= 4
    per_call = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for i in range(number):
                fn(i)
            per_call.append((time.perf_counter() - t0) / number)
        finally:
            gc.enable()
    return statistics.median(per_call)


# --------------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    family = model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and cpu in ("unknown", "x86_64", ""):
                cpu = value
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and model is None:
                model = value
    except OSError:
        pass
    if family is not None:
        cpu += f" (family {family}, model {model})"
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def machine_line() -> str:
    m = machine_info()
    return f"{m['date']}; CPU {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; Python {m['python']}, NumPy {m['numpy']}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB), from ``/proc/self/status`` (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# synthetic volume


def _smooth_field(rng: np.random.Generator, coarse: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth noise of unit-ish amplitude on ``shape``: coarse white noise, blurred, cubic-upsampled."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(coarse), 1.0, mode="wrap")
    field /= field.std() or 1.0
    zoom = [s / c for s, c in zip(shape, coarse)]
    out = ndimage.zoom(field, zoom, order=1, grid_mode=True, mode="grid-wrap").astype(np.float32)
    return out[: shape[0], : shape[1], : shape[2]]


def make_volume(
    shape: tuple[int, int, int], seed: int = 0, lesion_fraction: float = 0.02, slab: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """A float32 probability volume and its bool ground-truth lesion, generated memory-aware.

    * **Lesion**: an irregular blob, the union of a main ellipsoid and two overlapping lobes whose
      normalised radius is perturbed by smooth noise, sized to cover about ``lesion_fraction`` of the
      voxels. It is computed only inside its bounding box (a few float32 temporaries of the box size).
    * **Probabilities inside / around the lesion**: ``sigmoid(logit)`` with a logit that rises from
      the boundary towards the core, a per-region bias (an under-segmented part) and smooth + white
      noise, so lesion probabilities spread over (0, 1) (median ~0.98, 5 % quantile ~0.18), a few
      saturated at exactly 1.0 like a real network's float32 sigmoid.
    * **Background**: low probabilities (mostly < 0.01, heavy-tailed), filled ``slab`` slices at a
      time so that temporaries stay small, plus a false-positive blob.

    Peak memory is the two outputs (5 bytes/voxel) plus O(slab and box) temporaries.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    probability = np.empty(shape, dtype=np.float32)
    lesion = np.zeros(shape, dtype=bool)

    # background, slab by slab: p = 0.05 * u**6 (median ~ 8e-4, a thin tail up to 0.05)
    for z0 in range(0, nz, slab):
        block = probability[z0 : z0 + slab]
        rng.random(block.shape, dtype=np.float32, out=block)
        np.power(block, 6, out=block)
        block *= np.float32(0.05)

    # lesion geometry: semi-axes (voxels) so that the main ellipsoid holds ~lesion_fraction of voxels
    target = lesion_fraction * nz * ny * nx
    aspect = np.array([0.75, 1.0, 0.95])  # z is flatter
    scale = (target / (4 / 3 * math.pi * aspect.prod())) ** (1 / 3) * 0.92  # lobes add volume
    semi = aspect * scale
    center = np.array([nz * 0.5, ny * 0.45, nx * 0.55])
    lobes = [
        (center, semi),
        (center + semi * np.array([0.2, 0.75, -0.3]), semi * np.array([0.55, 0.5, 0.6])),
        (center + semi * np.array([-0.3, -0.4, 0.8]), semi * np.array([0.5, 0.6, 0.45])),
    ]
    margin = 1.45  # perturbation and the probability halo reach beyond the ellipsoids
    lo = np.min([np.floor(c - s * margin) for c, s in lobes], axis=0).astype(int).clip(0)
    hi = np.max([np.ceil(c + s * margin) for c, s in lobes], axis=0).astype(int)
    hi = np.minimum(hi, np.array(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    bshape = tuple(int(b - a) for a, b in zip(lo, hi))

    zz, yy, xx = (np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi))
    dist = np.full(bshape, np.inf, dtype=np.float32)  # normalised distance: < 1 inside
    for c, s in lobes:
        d = (
            ((zz[:, None, None] - np.float32(c[0])) / np.float32(s[0])) ** 2
            + ((yy[None, :, None] - np.float32(c[1])) / np.float32(s[1])) ** 2
            + ((xx[None, None, :] - np.float32(c[2])) / np.float32(s[2])) ** 2
        )
        np.sqrt(d, out=d)
        np.minimum(dist, d, out=dist)
        del d
    coarse = tuple(max(4, b // 12) for b in bshape)
    dist += np.float32(0.18) * _smooth_field(rng, coarse, bshape)  # irregular surface
    inside = dist < 1.0
    lesion[box] = inside

    # logit: positive in the core, about 0 at the boundary, falling off outside; the network
    # under-segments one side (bias field) and is noisy
    logit = np.float32(14.0) * (np.float32(1.0) - dist)
    logit += np.float32(2.5) * _smooth_field(rng, tuple(max(4, b // 20) for b in bshape), bshape)
    logit -= np.float32(3.0) * np.clip(
        _smooth_field(rng, tuple(max(4, b // 30) for b in bshape), bshape), 0, None
    )  # partly missed regions
    logit += rng.standard_normal(bshape, dtype=np.float32)
    np.negative(logit, out=logit)
    np.exp(logit, out=logit)
    logit += np.float32(1.0)
    np.reciprocal(logit, out=logit)  # sigmoid, float32 (saturates at exactly 1.0)
    region = probability[box]
    np.maximum(region, logit, out=region)
    del logit, dist

    # one false-positive blob elsewhere
    fc = np.array([nz * 0.3, ny * 0.8, nx * 0.2]).astype(int)
    r = max(2, int(scale * 0.25))
    fbox = tuple(slice(max(0, c - r), c + r) for c in fc)
    sub = probability[fbox]
    sub_noise = rng.random(sub.shape, dtype=np.float32)
    np.maximum(sub, np.float32(0.3) + np.float32(0.6) * sub_noise, out=sub)
    lesion_frac = lesion.mean()
    if not 0 < lesion_frac < 0.2:
        raise RuntimeError(f"unexpected lesion fraction {lesion_frac}")
    return probability, lesion


def volume_description(probability: np.ndarray, lesion: np.ndarray) -> str:
    values = probability[lesion]
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return (
        f"{'x'.join(str(s) for s in probability.shape[::-1])} (x*y*z) float32 volume "
        f"({probability.nbytes / 1e6:.0f} MB), lesion {values.size:,} voxels "
        f"({values.size / probability.size:.2%}); lesion probabilities: 5/25/50/75/95 % quantiles "
        f"{', '.join(f'{v:.3f}' for v in q)}, {np.count_nonzero(values == 1.0):,} exactly 1.0"
    )
