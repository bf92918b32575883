"""One threshold pass (``ConformalSegLib.conformal.cls.apply_threshold``) vs this machine's memory bandwidth.

On the 512 x 512 x 300 float32 probability volume of ``_common.make_volume`` (``--quick``: a small
one), times

* ``np.copyto(dst, a)`` into a preallocated float32 array: the memory-bandwidth reference
  (reads 4 and writes 4 bytes per voxel),
* ``a.max()``: a read-only reference (4 bytes per voxel),
* ``np.greater_equal(a, c, out=preallocated_bool)``: the bare comparison, no allocation
  (reads 4, writes 1 byte per voxel),
* ``a >= c``: the same with a freshly allocated result (what ``apply_threshold`` does),
* ``apply_threshold(a, c)``: the library call (rounds the cutoff up to float32, allocates the mask),
* ``apply_threshold(a, c, out=buf)``: the library call writing into a reused mask (the slider path),

and prints the effective GB/s of each (bytes read + written / time, 1 GB = 1e9 bytes) and the
ratio of the threshold pass to the copy. A threshold pass cannot beat ``5 V bytes / copy GB/s``;
the "% of copy-bound" column is that lower bound divided by the measured time.

Run: ``.venv/bin/python benchmarks/bench_threshold_bandwidth.py [--quick]``.
"""

from __future__ import annotations

import sys

import _common as C
import numpy as np

from ConformalSegLib.conformal.cls import apply_threshold, round_up_to_dtype


def main(argv: list[str] | None = None) -> dict:
    args = C.parse_args(
        __doc__.splitlines()[0],
        argv,
        lambda p: p.add_argument("--cutoff", type=float, default=0.5, help="probability cutoff (default 0.5)"),
    )
    shape = C.QUICK_SHAPE if args.quick else C.FULL_SHAPE
    repeats = 5 if args.quick else 15

    C.log(f"[bw] generating {shape} volume ...")
    prob, lesion = C.make_volume(shape, seed=args.seed)
    del lesion
    v = prob.size
    cutoff = args.cutoff
    c32 = round_up_to_dtype(cutoff, prob.dtype)
    dst = np.empty_like(prob)
    out = np.empty(prob.shape, dtype=bool)
    dst.fill(0)
    out.fill(False)  # touch the pages once so the preallocated runs pay no page faults

    cases = [
        ("`np.copyto(dst, a)` (float32, preallocated)", lambda: np.copyto(dst, prob), 8),
        ("`a.max()` (read only)", lambda: prob.max(), 4),
        ("`np.greater_equal(a, c, out=bool_buf)`", lambda: np.greater_equal(prob, c32, out=out), 5),
        ("`a >= c` (new bool array)", lambda: prob >= c32, 5),
        ("`apply_threshold(a, c)`", lambda: apply_threshold(prob, cutoff), 5),
        ("`apply_threshold(a, c, out=bool_buf)`", lambda: apply_threshold(prob, cutoff, out=out), 5),
    ]
    timings = {}
    for name, fn, bytes_per_voxel in cases:
        C.log(f"[bw] {name} ...")
        t, _, _ = C.time_call(fn, repeats, warmup=2)
        timings[name] = (t, bytes_per_voxel)
    assert np.array_equal(apply_threshold(prob, cutoff), np.greater_equal(prob, c32, out=out))

    t_copy = timings[cases[0][0]][0]
    copy_gbs = 8 * v / t_copy / 1e9
    rows = []
    for name, (t, bpv) in timings.items():
        gbs = bpv * v / t / 1e9
        bound = bpv * v / (copy_gbs * 1e9)
        rows.append([name, C.fmt_s(t), f"{bpv} B", f"{gbs:.1f}", C.fmt_ratio(t / t_copy), f"{bound / t:.0%}"])
    t_apply = timings[cases[4][0]][0]
    t_bare = timings[cases[2][0]][0]
    t_fresh = timings[cases[3][0]][0]
    lines = [
        "### Threshold pass vs memory bandwidth\n",
        f"{'x'.join(str(s) for s in shape[::-1])} (x*y*z) float32 volume ({prob.nbytes / 1e6:.0f} MB, "
        f"{v:,} voxels), cutoff {cutoff}; median of {repeats} runs. GB/s counts bytes read + written "
        f"per voxel (1 GB = 1e9 B).\n",
        C.md_table(["operation", "median time", "bytes / voxel", "GB/s", "time / copy", "% of copy-bound"], rows),
        "",
        f"`apply_threshold` moves data at {5 * v / t_apply / 1e9:.1f} GB/s vs {copy_gbs:.1f} GB/s for the copy "
        f"(bandwidth ratio {5 * v / t_apply / 1e9 / copy_gbs:.2f}); it takes {t_apply / t_copy:.2f}x the time of "
        f"the copy and {t_apply / t_bare:.2f}x the time of the bare preallocated comparison; the difference "
        f"with `a >= c` ({C.fmt_s(t_fresh - t_bare)}) is the cost of a freshly allocated "
        f"{v / 1e6:.0f} MB bool result (page faults on first touch).\n",
    ]
    if args.quick:
        lines.append("(`--quick`: the volume fits in cache, so these are not memory-bandwidth numbers.)\n")
    print("\n".join(lines))
    sys.stdout.flush()
    C.log(f"[bw] peak RSS {C.peak_rss_mb():.0f} MiB")
    return {
        "copy_gbs": copy_gbs,
        "apply_gbs": 5 * v / t_apply / 1e9,
        "time_ratio_apply_copy": t_apply / t_copy,
        "time_ratio_apply_bare": t_apply / t_bare,
    }


if __name__ == "__main__":
    main()
