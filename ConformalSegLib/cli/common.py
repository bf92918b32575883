"""Shared CLI plumbing: argument helpers, progress display and user-facing error/warning output."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def add_lesion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lesion-label",
        type=int,
        nargs="+",
        default=None,
        metavar="V",
        help="label value(s) that mark the lesion in the label maps (e.g. 2 for KiTS tumour; default: 1, "
        "accepted only when the label maps hold no other non-zero value)",
    )
    parser.add_argument(
        "--channel",
        type=int,
        default=None,
        help="channel of multi-channel probability maps (nnU-Net .npz: the lesion class index)",
    )
    add_seg_segments_option(parser)


def add_seg_segments_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seg-segments",
        default=None,
        metavar="NAME=V,...",
        help="DICOM SEG label maps: the label value of each named segment (its SegmentLabel or property code "
        "meaning, case-insensitive; e.g. 'Tumor=1,Liver=2'), for SEGs whose segment numbers differ; segments "
        "not named become background (default: segment number = label value)",
    )


def segment_map(args: argparse.Namespace) -> dict[str, int] | None:
    """``--seg-segments`` parsed (:func:`~ConformalSegLib.io.dicom_seg_input.parse_segment_map`), or None."""
    from ..io.dicom_seg_input import parse_segment_map

    text = getattr(args, "seg_segments", None)
    return parse_segment_map(text) if text else None


def add_empty_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--empty",
        choices=("exclude", "include"),
        default=None,
        help="cases without lesion voxels: exclude (default for cls/crc: guarantee conditional on a "
        "lesion being present) or include (default for sets)",
    )


def progress_bar(description: str, unit: str = "case") -> Callable[[int, int, str], None]:
    """A ``progress(done, total, label)`` callback drawing a tqdm bar on stderr; when stderr is not a tty (a log
    file, a pipe) whole lines instead, no carriage returns: the first step, the last, and one every 5 seconds."""
    if not sys.stderr.isatty():
        return _progress_lines(description, unit)
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int, label: str = "") -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(
                total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5
            )
        bar.set_postfix_str(str(label)[:30], refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state.pop("bar")

    return update


def _progress_lines(description: str, unit: str, every: float = 5.0) -> Callable[[int, int, str], None]:
    """:func:`progress_bar` for a non-terminal stderr: ``description: done/total units (label)`` lines."""
    last = [-math.inf]

    def update(done: int, total: int, label: str = "") -> None:
        now = time.monotonic()
        if done <= 1 or done >= total or now - last[0] >= every:
            last[0] = now
            suffix = f" ({str(label)[:60]})" if label else ""
            print(f"{description}: {done}/{total} {unit}s{suffix}", file=sys.stderr, flush=True)

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


def input_files(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Path]:
    """``{--flag: folder}`` of the input files named by ``flags`` (their folders) that were given."""
    found: dict[str, Path] = {}
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None:
            found[f"--{flag.replace('_', '-')}"] = Path(value).parent
    return found


def input_folders(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Path]:
    """``{--flag: folder}`` of the input folders named by ``flags`` that were given (``--data``: its
    ``probs/`` and ``labels/``)."""
    found: dict[str, Path] = {}
    for flag in flags:
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag == "data":
            found.update({"--data": Path(value) / "probs", "--data ": Path(value) / "labels"})
        else:
            found[f"--{flag.replace('_', '-')}"] = Path(value)
    return found


def refuse_output_in_inputs(
    out: Path, inputs: dict[str, Path], *, output_is_folder: bool, nested: bool = False
) -> None:
    """Refuse ``--out`` when its files would land in a folder read as input (the next run on that folder
    would read them as inputs): in the folder itself, or anywhere below it when ``nested``."""
    where = Path(os.path.abspath(out if output_is_folder else out.parent)).resolve()
    for flag, folder in inputs.items():
        folder = Path(os.path.abspath(folder)).resolve()
        if where == folder or (nested and folder in where.parents):
            sibling = folder.parent / f"{folder.name}_results"
            raise ConformalSegError(
                f"--out {out} is inside the input folder {folder} ({flag.strip()}): the next run on that "
                "folder would read the outputs as inputs",
                path=out,
                fix=f"write the outputs beside it, e.g. in {sibling}",
            )


#: :data:`ConformalSegLib.inference.networks.TRUST_ENV`, spelled out so that the CLI starts without torch.
TRUST_ENV = "CONFORMALSEG_TRUST_MODEL_CODE"


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    """``--trust-model-code``: allow model folders whose loading runs code (TorchScript, MONAI bundles)."""
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="allow a TorchScript model or a MONAI bundle: loading them runs code from the model folder "
        "(only for models from a source you trust; state_dict model cards never need it)",
    )
