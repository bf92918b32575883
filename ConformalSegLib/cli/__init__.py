"""The ``conformalseg`` command line: train, infer, calibrate, apply, evaluate, monitor, synth and demo.

Every command calls the same library functions as the Slicer module. Errors caused by the input
exit with status 2 and one message naming the file and the fix; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
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
from .common import TRUST_ENV, close_progress_bars, install_warning_format

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
    trusted = os.environ.get(TRUST_ENV)
    if getattr(args, "trust_model_code", False):
        os.environ[TRUST_ENV] = "1"  # for this command only (see finally)
    try:
        return int(args.func(args) or 0)
    except ConformalSegError as exc:
        close_progress_bars()
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RecursionError) as exc:  # a failure no specific check caught: one line, exit 2
        close_progress_bars()
        if args.debug:
            raise
        print(f"error: {_system_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if trusted is None:
            os.environ.pop(TRUST_ENV, None)


def _system_error(exc: BaseException) -> str:
    """One line for an operating-system error (permission, disk full, out of memory) naming the file."""
    if isinstance(exc, MemoryError):
        return "out of memory. Fix: use smaller volumes, fewer at once, or a machine with more memory"
    if isinstance(exc, RecursionError):
        return "an input file is nested too deeply to read (a crafted JSON?). Fix: check the files given"
    assert isinstance(exc, OSError)
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}. Fix: check the permissions and free space of that location"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
