"""``conformalseg demo``: the main job on the embedded default data (see :mod:`ConformalSegLib.demo.workflow`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..demo.workflow import DemoSettings, run_demo
from .common import add_force, progress_bar


def register(sub: argparse._SubParsersAction) -> None:
    defaults = DemoSettings()
    p = sub.add_parser(
        "demo",
        help="run the whole workflow on the embedded phantoms and shipped model",
        description="Writes CT phantoms, runs the shipped network on them, evaluates CLS / expected-FNR "
        "control / confidence sets over random splits, calibrates profiles and applies "
        "them to a held-out case.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--cases", type=int, default=defaults.cases, help=f"number of cases (default {defaults.cases})")
    p.add_argument("--splits", type=int, default=defaults.splits, help=f"random splits (default {defaults.splits})")
    p.add_argument("--epsilon", type=float, default=defaults.epsilon, help="main FNR tolerance")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="main risk level")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of data and splits (default {defaults.seed})")
    p.add_argument(
        "--model", type=Path, default=defaults.model, help="model card / folder (default: the shipped model)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device, help="inference device")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic probability maps instead of phantoms + network (no torch needed; no sem-CRC part)",
    )
    p.add_argument(
        "--semcrc-cases",
        type=int,
        default=defaults.semcrc_cases,
        help=f"phantoms of the sem-CRC part (default {defaults.semcrc_cases}; 0 skips it)",
    )
    add_force(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = DemoSettings(
        cases=args.cases,
        splits=args.splits,
        epsilon=args.epsilon,
        alpha=args.alpha,
        seed=args.seed,
        source="synthetic" if args.synthetic else "model",
        model=args.model,
        device=args.device,
        semcrc_cases=0 if args.synthetic else args.semcrc_cases,
    )
    report = run_demo(args.out, settings, force=args.force, progress=progress_bar)
    print(
        f"done in {time.perf_counter() - start:.0f} s. Read {report}; figures in {args.out / 'evaluation'} and "
        f"{args.out / 'example' / 'slice_overlay.png'}; open {args.out / 'example'} in 3D Slicer "
        "(image.nrrd, probability.nrrd, segmentation.seg.nrrd)."
    )
    return 0
