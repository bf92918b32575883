"""Shared CLI plumbing: argument helpers, progress display and user-facing error/warning output."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ..common.errors import CalibrationSetTooSmallWarning


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def add_lesion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lesion-label",
        type=int,
        nargs="+",
        default=[1],
        metavar="V",
        help="label value(s) that mark the lesion in the label maps (default: 1; e.g. 2 for KiTS tumour)",
    )
    parser.add_argument(
        "--channel",
        type=int,
        default=None,
        help="channel of multi-channel probability maps (nnU-Net .npz: the lesion class index)",
    )


def add_empty_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--empty",
        choices=("exclude", "include"),
        default=None,
        help="cases without lesion voxels: exclude (default for cls/crc: guarantee conditional on a "
        "lesion being present) or include (default for sets)",
    )


def progress_bar(description: str) -> Callable[[int, int, str], None]:
    """A ``progress(done, total, label)`` callback drawing a tqdm bar on stderr (plain lines when not a tty)."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int, label: str = "") -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(
                total=total, desc=description, unit="case", file=sys.stderr, dynamic_ncols=True, mininterval=0.5
            )
        bar.set_postfix_str(str(label)[:30], refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state.pop("bar")

    return update


def close_progress_bars() -> None:
    """Close any open tqdm bar so that an error message starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings for users: one line, no source location."""
    prefix = "warning" if issubclass(category, CalibrationSetTooSmallWarning) else category.__name__
    print(f"{prefix}: {message}", file=sys.stderr)


def install_warning_format() -> None:
    warnings.showwarning = show_warning
    warnings.simplefilter("always", CalibrationSetTooSmallWarning)
