"""Load test: peak memory and time of ``calibrate`` and ``apply`` as the number of scans grows.

Every measurement runs in a fresh Python process (``_child.measure``: ``resource.getrusage`` peak RSS,
imports included; the "imports only" row is that floor).

* **Lesion (CLS)**: ``conformalseg calibrate --method cls`` on n = 100 and 400 small cases (48 x 64 x 64
  float32 ``.nii.gz`` maps and labels; ``--quick``: 10 and 40 cases of 16 x 24 x 24), then ``apply`` on one case.
  These stream already; the rows show that memory does not grow with n.
* **Interval methods**: ``calibrate_interval`` (what ``calibrate --method crc-interval|sem-crc-organ`` runs) on
  n = 100 and 400 synthetic interval scans of 8 x 64 x 64 (``--quick``: 10 and 40 of 2 x 16 x 16), old
  (``stream=False``: every scan in memory) against new (streaming, bit-identical lambdas: checked here too),
  and ``apply`` of the profile on one scan; ``evaluate`` (2 runs of crc-interval and sem-crc-organ) with the
  scans in memory (old) or memory-mapped from a spill folder (new, identical results: checked).
* **One 512 x 512 x 300 map** (not with ``--quick``): ``calibrate --method sets --transform distance`` on that
  one case and ``apply`` of its profile, with the previous whole-grid float64 distance transform (old) and the
  current one (new); see ``bench_distance.py`` for the transform alone.

Run: ``.venv/bin/python benchmarks/bench_load.py [--quick]``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import _common as C
import numpy as np
from _child import measure

SMALL, SMALL_QUICK = (48, 64, 64), (16, 24, 24)
IV, IV_QUICK = (8, 64, 64), (2, 16, 16)
ORGANS = "1=liver,2=spleen,3=kidney,4=pancreas"


# ---------------------------------------------------------------------------------------------- child side


def imports_only() -> None:
    import ConformalSegLib.cli  # noqa: F401
    import ConformalSegLib.semcrc.workflow  # noqa: F401


def cli(argv: list[str], old_distance: bool = False) -> int:
    """``conformalseg ARGV`` in this process (stdout swallowed); ``old_distance``: the whole-grid transform."""
    from ConformalSegLib.cli import main

    if old_distance:
        from bench_distance import whole_grid_signed_distance

        from ConformalSegLib.conformal import score_transforms

        score_transforms.signed_distance_mm = whole_grid_signed_distance  # type: ignore[assignment]
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def interval_calibrate(root: str, method: str, stream: bool, out: str) -> list[float]:
    from ConformalSegLib.semcrc.workflow import calibrate_interval

    d = Path(root)
    options = {} if method == "crc" else {"n_opt": 8, "d_opt": 50, "gammas": [0.5]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile = calibrate_interval(
            method,
            d / "lower",
            d / "upper",
            d / "truth",
            d / "organs",
            0.1,
            organs=ORGANS,
            body="nonzero",
            stream=stream,
            **options,
        )
    profile.save(out, force=True)
    return [float(v) for v in profile.calibration.lam]


def interval_evaluate(root: str, spill: bool) -> dict:
    """``evaluate --lower ...`` over 2 runs: scans in memory (old) or memory-mapped from a spill folder (new)."""
    from ConformalSegLib.semcrc.evaluation import evaluate_interval_methods
    from ConformalSegLib.semcrc.workflow import load_interval_data

    d = Path(root)
    with tempfile.TemporaryDirectory() as spill_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_interval_data(
            d / "lower",
            d / "upper",
            d / "truth",
            d / "organs",
            ORGANS,
            "nonzero",
            spill_to=Path(spill_dir) if spill else None,
        )
        summary = evaluate_interval_methods(
            data,
            0.1,
            runs=2,
            n_cal=data.n // 2,
            methods=("crc", "sem-crc-organ"),
            n_opt=max(2, data.n // 8),
            d_opt=50,
            gammas=(0.5,),
        )
    return {m: summary["methods"][m]["runs"]["lambda"] for m in summary["methods"]}


# ---------------------------------------------------------------------------------------------- data


def write_lesion_cases(root: Path, n: int, shape: tuple[int, int, int], seed: int) -> Path:
    from ConformalSegLib.common.geometry import Geometry
    from ConformalSegLib.io.volumes import save_volume

    geometry = Geometry(shape=shape, spacing=(1.0, 1.0, 2.0))
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    for i in range(n):
        centre = np.asarray(shape, dtype=np.float32) * rng.uniform(0.35, 0.65, 3).astype(np.float32)
        radius = np.asarray(shape, dtype=np.float32) * rng.uniform(0.1, 0.25, 3).astype(np.float32)
        r = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, radius)))
        lesion = r <= 1.0
        noise = rng.normal(0.0, 1.0, shape).astype(np.float32)
        probability = (1.0 / (1.0 + np.exp(4.0 * (r - 1.0) + noise))).astype(np.float32)
        save_volume(probability, geometry, root / "probs" / f"case{i:04d}.nii.gz")
        save_volume(lesion.astype(np.uint8), geometry, root / "labels" / f"case{i:04d}.nii.gz")
    return root


def write_interval_cases(root: Path, n: int, shape: tuple[int, int, int], seed: int) -> Path:
    from ConformalSegLib.semcrc import synthetic_intervals

    syn = synthetic_intervals(n, shape=shape, seed=seed)
    for name in ("lower", "upper", "truth", "organs"):
        (root / name).mkdir(parents=True)
    for i in range(n):
        np.save(root / "lower" / f"s{i:04d}.npy", syn.lower[i])
        np.save(root / "upper" / f"s{i:04d}.npy", syn.upper[i])
        np.save(root / "truth" / f"s{i:04d}.npy", syn.truth[i])
        np.save(root / "organs" / f"s{i:04d}.npy", syn.labels[i].astype(np.int16))
    return root


# ---------------------------------------------------------------------------------------------- parent side


def row(label: str, m: dict) -> list[object]:
    return [label, C.fmt_s(m["seconds"]), f"{m['peak_mib']:.0f} MiB"]


def lesion_rows(tmp: Path, sizes: tuple[int, ...], shape: tuple[int, int, int], seed: int) -> list[list[object]]:
    rows = []
    for n in sizes:
        C.log(f"lesion: writing {n} cases of {shape}")
        data = write_lesion_cases(tmp / f"lesion{n}", n, shape, seed)
        profile = str(tmp / f"cls{n}.json")
        args = ["calibrate", "--method", "cls", "--data", str(data), "--lesion-label", "1"]
        cal = measure("bench_load", "cli", args + ["--epsilon", "0.1", "--alpha", "0.1", "--out", profile])
        rows.append(row(f"calibrate cls, n = {n}", cal))
        prob = str(data / "probs" / "case0000.nii.gz")
        app = measure("bench_load", "cli", ["apply", "--profile", profile, "--prob", prob, "--out", str(tmp / f"a{n}")])
        rows.append(row(f"apply cls (profile of n = {n})", app))
    return rows


def interval_rows(tmp: Path, sizes: tuple[int, ...], shape: tuple[int, int, int], seed: int) -> list[list[object]]:
    rows = []
    for n in sizes:
        C.log(f"intervals: writing {n} scans of {shape}")
        root = write_interval_cases(tmp / f"iv{n}", n, shape, seed)
        for method in ("crc", "sem-crc-organ"):
            old = measure("bench_load", "interval_calibrate", str(root), method, False, str(tmp / "old.json"))
            new = measure("bench_load", "interval_calibrate", str(root), method, True, str(tmp / "new.json"))
            if old["result"] != new["result"]:
                raise AssertionError(f"streaming changed the lambdas: {old['result']} != {new['result']}")
            rows.append(
                [
                    f"calibrate {method}, n = {n}",
                    C.fmt_s(old["seconds"]),
                    C.fmt_s(new["seconds"]),
                    f"{old['peak_mib']:.0f} MiB",
                    f"{new['peak_mib']:.0f} MiB",
                    C.fmt_ratio(old["peak_mib"] / new["peak_mib"]),
                ]
            )
        old = measure("bench_load", "interval_evaluate", str(root), False)
        new = measure("bench_load", "interval_evaluate", str(root), True)
        if old["result"] != new["result"]:
            raise AssertionError("spilled scans changed the evaluation")
        rows.append(
            [
                f"evaluate crc + sem-crc-organ, 2 runs, n = {n}",
                C.fmt_s(old["seconds"]),
                C.fmt_s(new["seconds"]),
                f"{old['peak_mib']:.0f} MiB",
                f"{new['peak_mib']:.0f} MiB",
                C.fmt_ratio(old["peak_mib"] / new["peak_mib"]),
            ]
        )
        scan = [str(root / k / "s0000.npy") for k in ("lower", "upper", "organs")]
        argv = ["apply", "--profile", str(tmp / "new.json"), "--lower", scan[0], "--upper", scan[1]]
        app = measure("bench_load", "cli", argv + ["--organs", scan[2], "--out", str(tmp / f"iva{n}"), "--force"])
        rows.append(
            [
                f"apply sem-crc-organ (profile of n = {n})",
                "",
                C.fmt_s(app["seconds"]),
                "",
                f"{app['peak_mib']:.0f} MiB",
                "",
            ]
        )
    return rows


def large_rows(tmp: Path, seed: int) -> list[list[object]]:
    from ConformalSegLib.common.geometry import Geometry
    from ConformalSegLib.io.volumes import save_volume

    C.log(f"large: writing one {C.FULL_SHAPE} map")
    probability, lesion = C.make_volume(C.FULL_SHAPE, seed=seed)
    geometry = Geometry(shape=C.FULL_SHAPE, spacing=(0.8, 0.8, 2.0))
    data = tmp / "large"
    save_volume(probability, geometry, data / "probs" / "big.nii", compress=False)
    save_volume(lesion.astype(np.uint8), geometry, data / "labels" / "big.nii.gz")
    del probability, lesion
    rows = []
    for old in (True, False):
        label = "old" if old else "new"
        profile = str(tmp / f"sets_{label}.json")
        argv = ["calibrate", "--method", "sets", "--data", str(data), "--lesion-label", "1", "--alpha", "0.5"]
        cal = measure("bench_load", "cli", argv + ["--transform", "distance", "--out", profile], old)
        prob = str(data / "probs" / "big.nii")
        app = measure(
            "bench_load", "cli", ["apply", "--profile", profile, "--prob", prob, "--out", str(tmp / f"r_{label}")], old
        )
        rows.append(
            [
                label,
                C.fmt_s(cal["seconds"]),
                f"{cal['peak_mib']:.0f} MiB",
                C.fmt_s(app["seconds"]),
                f"{app['peak_mib']:.0f} MiB",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = C.parse_args(
        __doc__.splitlines()[0],
        argv,
        lambda p: p.add_argument("--no-large", action="store_true", help="leave out the 512 x 512 x 300 map"),
    )
    sizes = (10, 40) if args.quick else (100, 400)
    lines = ["### Load test: calibrate and apply as n grows\n", f"Machine: {C.machine_line()}\n"]
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp_name:
        tmp = Path(tmp_name)
        floor = measure("bench_load", "imports_only")
        lines.append(f"Peak RSS of the imports alone: {floor['peak_mib']:.0f} MiB.\n")
        shape = SMALL_QUICK if args.quick else SMALL
        lines.append(f"Lesion method (CLS), cases of {shape} float32 `.nii.gz`:\n")
        lines.append(C.md_table(["step", "time", "peak RSS"], lesion_rows(tmp, sizes, shape, args.seed)) + "\n")
        shape = IV_QUICK if args.quick else IV
        lines.append(
            f"Interval methods, synthetic scans of {shape} (`.npy`), old = every scan in memory, new = streaming "
            "calibration / memory-mapped evaluation (identical lambdas, checked):\n"
        )
        header = ["step", "time old", "time new", "peak RSS old", "peak RSS new", "memory old / new"]
        lines.append(C.md_table(header, interval_rows(tmp, sizes, shape, args.seed)) + "\n")
        if not (args.quick or args.no_large):
            lines.append(
                f"One {C.FULL_SHAPE} map (z, y, x), `sets --transform distance`, old = whole-grid float64 distance "
                "transform, new = current:\n"
            )
            header = ["distance transform", "calibrate time", "calibrate peak RSS", "apply time", "apply peak RSS"]
            lines.append(C.md_table(header, large_rows(tmp, args.seed)) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
