"""DICOM SEG output: the calibrated masks as one DICOM Segmentation of the referenced CT series.

* Written with highdicom (``highdicom.seg.Segmentation``), type **BINARY**, one segment per mask,
  segments stacked (not a label map): inner set ⊂ lesion mask ⊂ outer set overlap by design, which a
  label map (and pydicom-seg) cannot store. By default every frame is written, empty ones too, so that a
  reader gets back exactly the masks from the SEG alone (frame ``k`` is the ``k``-th slice of the series
  along its normal); ``omit_empty_frames`` (``apply --dicom-seg-omit-empty``) leaves the empty ones out.
* Speed (``benchmarks/bench_dicom_seg.py``): the masks go to highdicom segment-major in memory
  (:func:`stack_segments`) and the referenced series' headers are read once per command.
* Geometry: the masks' grid must be the referenced series' grid (shape, spacing, origin and direction
  compared with :meth:`~ConformalSegLib.common.geometry.Geometry.mismatch`, the series' geometry computed
  from its headers by :func:`~ConformalSegLib.io.dicom_series.series_headers`); otherwise a
  :class:`~ConformalSegLib.common.errors.ConformalSegError` says how they differ.
* Coded concepts (SNOMED CT / DCM): the lesion masks and the inner set are "Morphologically Abnormal
  Structure / Neoplasm" (SCT 49755003 / 108369006), as in :data:`ConformalSegLib.io.segmentation.SEGMENT_TERMINOLOGY`;
  the outer set, a region around the lesion rather than tissue known to be neoplasm, is "Spatial and
  Relational Concept / Outer limits of fuzzy margin" (SCT 309825002 / DCM 113663). A structure of a
  mask-only calibration (``"liver inner set"``) is "Anatomical Structure / <the SNOMED code of its name>"
  (SCT 91723000; "Organ" when the name has no code in pydicom's dictionary).
* The guarantee travels with the file: the series description (64 characters at most, DICOM's LO)
  names the method, epsilon, alpha and n; the content description adds the start of the profile's
  SHA-256; each segment's Algorithm Parameters (free text) hold the full guarantee sentence, method,
  epsilon, alpha, n and the full SHA-256 of the profile file.
* Atomic (:mod:`ConformalSegLib.io.atomic`): the file appears complete or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from .atomic import atomic_output, check_can_write
from .dicom_series import SeriesHeaders, series_headers
from .segmentation import INNER_SET, OUTER_SET

#: DICOM's LO value representation: at most 64 characters.
LO_MAX = 64


@dataclass(frozen=True)
class GuaranteeRecord:
    """What the SEG states about the masks: the calibration behind them and the profile file's SHA-256."""

    method: str
    epsilon: float | None
    alpha: float | None
    n: int
    profile_sha256: str
    sentence: str

    def short(self) -> str:
        """``cls eps=0.1 alpha=0.1 n=120`` (what fits in a series description)."""
        parts = [self.method]
        if self.epsilon is not None:
            parts.append(f"eps={self.epsilon:g}")
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha:g}")
        parts.append(f"n={self.n}")
        return " ".join(parts)

    def parameters(self) -> dict[str, str]:
        return {
            "guarantee": self.sentence.replace(",", ";"),  # highdicom joins the parameters with commas
            "method": self.method,
            "epsilon": "none" if self.epsilon is None else repr(self.epsilon),
            "alpha": "none" if self.alpha is None else repr(self.alpha),
            "n": str(self.n),
            "profile_sha256": self.profile_sha256,
        }


def series_description(record: GuaranteeRecord) -> str:
    return f"ConformalSeg {record.short()}"[:LO_MAX]


def content_description(record: GuaranteeRecord) -> str:
    return f"{record.short()} profile sha256 {record.profile_sha256}"[:LO_MAX]


def _structure_code(name: str) -> Any:
    from pydicom.sr.codedict import codes

    keyword = "".join(word.capitalize() for word in name.replace("_", " ").split())
    try:
        return getattr(codes.SCT, keyword)
    except AttributeError:
        return codes.SCT.Organ


def segment_concepts(name: str) -> tuple[Any, Any]:
    """(category, type) codes of a segment name (see the module docstring)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    lowered = name.lower()
    if lowered.endswith(OUTER_SET.lower()):  # "Outer set", or a structure's "liver outer set"
        return codes.SCT.SpatialAndRelationalConcept, Code("113663", "DCM", "Outer limits of fuzzy margin")
    suffix = " " + INNER_SET.lower()
    if lowered.endswith(suffix) and len(name) > len(suffix):  # a structure of a mask-only calibration
        return codes.SCT.AnatomicalStructure, _structure_code(name[: -len(suffix)])
    return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm


def check_reference_geometry(geometry: Geometry, reference: Geometry, folder: Path) -> None:
    mismatch = reference.mismatch(geometry)
    if mismatch:
        raise ConformalSegError(
            f"the masks are not on the grid of the referenced DICOM series ({mismatch})",
            path=folder,
            fix="give --reference-dicom the series the probability map was computed on (same grid), "
            "or resample the map onto that series first",
        )


def stack_segments(masks: Mapping[str, np.ndarray]) -> np.ndarray:
    """The masks as highdicom's ``(z, y, x, segments)`` bool array, laid out segment by segment in memory.

    The view's last axis is the slowest in memory, so highdicom's overlap check (a sum over the segments)
    adds whole contiguous volumes and each segment's frames are contiguous; the values are those of
    ``np.stack(..., axis=-1)`` (whose 1-byte stride along the segments made that sum ~10x slower).
    """
    return np.moveaxis(np.stack([np.asarray(mask, dtype=bool) for mask in masks.values()], axis=0), 0, -1)


def write_dicom_seg(
    masks: Mapping[str, np.ndarray],
    geometry: Geometry,
    reference_folder: str | PathLike[str],
    path: str | PathLike[str],
    record: GuaranteeRecord,
    *,
    series_uid: str | None = None,
    force: bool = False,
    reference: SeriesHeaders | None = None,
    omit_empty_frames: bool = False,
) -> Path:
    """Write ``masks`` (bool, numpy ``(z, y, x)`` on ``geometry``) as a DICOM SEG of the series in
    ``reference_folder`` (``series_uid`` when it holds several); see the module docstring.

    ``reference``: that series' headers when the caller has read them already (they are read once, not
    twice). ``omit_empty_frames``: leave out the frames where a segment is empty (smaller and faster; a
    reader then places the frames by position, as highdicom, Slicer and
    :func:`ConformalSegLib.io.dicom_seg_input.load_dicom_seg_labels` with a reference grid do).
    """
    path = check_can_write(path, force=force)
    if reference is None:
        reference = series_headers(reference_folder, series_uid)
    check_reference_geometry(geometry, reference.geometry, reference.folder)
    if not masks:
        raise ValueError("no masks to write")
    seg = build_segmentation(reference, stack_segments(masks), list(masks), record, omit_empty_frames)
    with atomic_output(path, force=force) as tmp:
        seg.save_as(tmp)
    return path


def build_segmentation(
    reference: SeriesHeaders, stacked: np.ndarray, names: list[str], record: GuaranteeRecord, omit_empty_frames: bool
) -> Any:
    """The ``highdicom.seg.Segmentation`` of ``stacked`` (``(z, y, x, segments)``) named ``names``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="ConformalSeg",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        source="ConformalSeg",
        parameters=record.parameters(),
    )
    descriptions = []
    for number, name in enumerate(names, start=1):
        category, kind = segment_concepts(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:LO_MAX],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=name[:LO_MAX],
            )
        )
    try:
        return hd.seg.Segmentation(
            source_images=reference.datasets,
            pixel_array=stacked,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=max(int(getattr(reference.datasets[0], "SeriesNumber", 0) or 0), 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="ConformalSeg",
            manufacturer_model_name="ConformalSegLib",
            software_versions=__version__,
            device_serial_number="none",
            content_description=content_description(record),
            content_label="CONFORMAL",
            series_description=series_description(record),
            omit_empty_frames=omit_empty_frames,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConformalSegError(
            f"cannot make a DICOM SEG of this series ({exc})",
            path=reference.folder,
            fix="give --reference-dicom a complete CT/MR/PET series with patient and study attributes",
        ) from exc


def read_dicom_seg(
    path: str | PathLike[str], reference_folder: str | PathLike[str], series_uid: str | None = None
) -> dict[str, np.ndarray]:
    """Read a DICOM SEG back as ``{segment label: bool mask (z, y, x)}`` on the referenced series' grid."""
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # pydicom/highdicom raise many types for a file that is not a SEG
        raise ConformalSegError(f"cannot read the DICOM SEG ({exc})", path=path, fix="give a DICOM SEG file") from exc
    reference = series_headers(reference_folder, series_uid)
    uids = [d.SOPInstanceUID for d in reference.datasets]
    numbers = list(seg.segment_numbers)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    labels = [seg.get_segment_description(n).SegmentLabel for n in numbers]
    return {label: np.ascontiguousarray(pixels[..., i] > 0) for i, label in enumerate(labels)}
