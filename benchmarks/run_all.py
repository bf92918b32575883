"""Run every benchmark and print one Markdown section (machine, date, each benchmark's tables).

Each benchmark runs in its own Python process (so one's memory does not weigh on the next); their
progress messages go to stderr, the Markdown to stdout.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run_all.py            # full sizes, about 1.5 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # CI smoke test, a few seconds
    .venv/bin/python benchmarks/run_all.py --output benchmarks/RESULTS.md

Exit status: 0 when every benchmark succeeded, 1 otherwise (failed ones are reported in the output).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    "bench_cls_exact_vs_bisection.py",
    "bench_recalibration.py",
    "bench_mondrian.py",
    "bench_threshold_bandwidth.py",
    "bench_slider.py",
    "bench_slider_path.py",
    "bench_inference.py",
    "bench_semcrc.py",
    "bench_lesion_level.py",
    "bench_false_positives.py",
    "bench_risk_control.py",
    "bench_executors.py",
    "bench_archive_merge.py",
    "bench_distance.py",
    "bench_margin_score.py",
    "bench_load.py",
    "bench_evaluate_executors.py",
    "bench_interval_evaluate_executors.py",
    "bench_dicom_seg.py",
    "bench_training_step.py",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke test)")
    parser.add_argument("--output", type=Path, help="also write the Markdown to this file")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args(argv)

    m = C.machine_info()
    parts = [
        f"## Benchmark results{' (--quick: smoke-test sizes, not meaningful numbers)' if args.quick else ''}\n",
        f"- Date: {m['date']}",
        f"- Machine: CPU {m['cpu']}, {m['cores']} cores, {m['ram']} RAM",
        f"- Software: Python {m['python']}, NumPy {m['numpy']}",
        f"- Command: `.venv/bin/python benchmarks/run_all.py{' --quick' if args.quick else ''}`\n",
    ]
    failed = []
    total0 = time.perf_counter()
    for script in args.only or BENCHMARKS:
        cmd = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        C.log(f"== {script}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=C.REPO_ROOT)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            failed.append(script)
            parts.append(f"### {script}: FAILED (exit status {proc.returncode})\n")
            if proc.stdout.strip():
                parts.append("```\n" + proc.stdout.strip() + "\n```\n")
            continue
        parts.append(proc.stdout.rstrip() + "\n")
        parts.append(f"_`{script}` ran in {elapsed:.1f} s._\n")
    parts.append(
        f"Total: {time.perf_counter() - total0:.1f} s"
        + (f"; **failed: {', '.join(failed)}**" if failed else "")
        + ".\n"
    )
    text = "\n".join(parts)
    print(text)
    if args.output is not None:
        args.output.write_text(text)
        C.log(f"written to {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
