"""The ``conformalseg`` command line: train, infer, calibrate, apply, evaluate, monitor, synth and demo.

Every command calls the same library functions as the Slicer module. Errors caused by the input
exit with status 2 and one message naming the file and the fix; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..common.errors import ConformalSegError
from . import (
    apply_cmd,
    calibrate_cmd,
    demo_cmd,
    evaluate_cmd,
    infer_cmd,
    monitor_cmd,
    profile_cmd,
    synth_cmd,
    train_cmd,
)
from .common import close_progress_bars, install_warning_format

COMMANDS = (train_cmd, infer_cmd, calibrate_cmd, apply_cmd, evaluate_cmd, monitor_cmd, profile_cmd, synth_cmd, demo_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conformalseg",
        description="Statistical guarantees for 3D lesion segmentation: CLS (high-probability FNR control), "
        "expected-FNR control (conformal risk control) and conformal confidence sets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_warning_format()
    try:
        return int(args.func(args) or 0)
    except ConformalSegError as exc:
        close_progress_bars()
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
