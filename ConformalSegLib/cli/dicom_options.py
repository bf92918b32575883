"""DICOM options of ``conformalseg apply``: series folders as input, a DICOM SEG as output (and
``--series-uid``, shared with ``infer`` and ``calibrate/evaluate --images``).

``--image`` and ``--prob`` accept a folder holding a DICOM series (:mod:`ConformalSegLib.io.dicom_series`;
``--series-uid`` picks one of several); ``--dicom-seg --reference-dicom DIR`` also writes
``OUT/segmentation.dcm``, a DICOM SEG of that series carrying the guarantee
(:mod:`ConformalSegLib.io.dicom_seg`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..io.atomic import check_can_write
from ..io.checksums import sha256_file
from ..io.dicom_seg import GuaranteeRecord, check_reference_geometry, write_dicom_seg
from ..io.dicom_series import SeriesHeaders, series_headers

SEG_NAME = "segmentation.dcm"


def add_series_uid_option(p: Any, inputs: str = "--images") -> None:
    """``--series-uid`` (shared by ``apply``, ``infer``, ``calibrate/evaluate --images``)."""
    p.add_argument(
        "--series-uid",
        default=None,
        help=f"Series Instance UID to read when the {inputs} folder holds several DICOM series",
    )


def add_dicom_options(p: argparse.ArgumentParser) -> None:
    add_series_uid_option(p, "--image/--prob/--reference-dicom")
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="also write OUT/segmentation.dcm: a DICOM SEG (overlapping segments) of the --reference-dicom series, "
        "whose descriptions state the guarantee (method, epsilon, alpha, n, profile SHA-256)",
    )
    p.add_argument(
        "--dicom-seg-omit-empty",
        action="store_true",
        help="with --dicom-seg: leave out the empty frames (smaller, faster to write; viewers place frames by "
        "position, and so does --labels/--mask when reading it back on the image's grid)",
    )
    p.add_argument(
        "--reference-dicom",
        type=Path,
        default=None,
        help="with --dicom-seg: the DICOM series folder the map was computed on (default: --image or --prob when "
        "it is a DICOM folder)",
    )


def dicom_seg_path(args: argparse.Namespace) -> Path | None:
    """``OUT/segmentation.dcm`` when ``--dicom-seg`` is given (checked writable), else None."""
    if not args.dicom_seg:
        if args.reference_dicom is not None or args.dicom_seg_omit_empty:
            raise ConformalSegError(
                "--reference-dicom and --dicom-seg-omit-empty need --dicom-seg", fix="add --dicom-seg or leave them out"
            )
        return None
    reference = reference_folder(args)
    if reference is None:
        raise ConformalSegError(
            "--dicom-seg needs the DICOM series the map was computed on",
            fix="pass --reference-dicom DIR (the CT series folder)",
        )
    if not reference.is_dir():
        raise ConformalSegError("--reference-dicom is not a folder", path=reference, fix="give the series folder")
    path = args.out / SEG_NAME
    if not args.force:
        check_can_write(path)
    return path


def reference_folder(args: argparse.Namespace) -> Path | None:
    if args.reference_dicom is not None:
        return Path(args.reference_dicom)
    for source in (getattr(args, "image", None), getattr(args, "prob", None)):
        if source is not None and Path(source).is_dir():
            return Path(source)
    return None


def reference_headers(args: argparse.Namespace) -> SeriesHeaders:
    """The reference series' headers, read once per command (kept on ``args``; a large series takes ~1 s)."""
    cached = getattr(args, "_reference_headers", None)
    if cached is None:
        folder = reference_folder(args)
        assert folder is not None  # dicom_seg_path checked it
        cached = args._reference_headers = series_headers(folder, args.series_uid)
    return cached


def check_dicom_reference(args: argparse.Namespace, geometry: Geometry) -> None:
    """Refuse a map whose grid is not the reference series' grid (before any output is written)."""
    reference = reference_headers(args)
    check_reference_geometry(geometry, reference.geometry, reference.folder)


def write_seg_output(
    args: argparse.Namespace, path: Path, masks: dict[str, np.ndarray], geometry: Geometry, doc: dict[str, Any]
) -> Path:
    """Write the DICOM SEG of ``masks`` with the guarantee of the apply summary ``doc``."""
    folder = reference_folder(args)
    assert folder is not None  # dicom_seg_path checked it
    record = GuaranteeRecord(
        method=str(doc["method"]),
        epsilon=doc.get("epsilon"),
        alpha=doc.get("alpha"),
        n=int(doc["n"]),
        profile_sha256=sha256_file(args.profile),
        sentence=str(doc["guarantee"]),
    )
    return write_dicom_seg(
        masks,
        geometry,
        folder,
        path,
        record,
        series_uid=args.series_uid,
        force=args.force,
        reference=reference_headers(args),
        omit_empty_frames=args.dicom_seg_omit_empty,
    )
