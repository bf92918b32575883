"""A DICOM SEG as a label map input (``--masks``, ``--labels``, ``apply --mask``): ``CASE.dcm``.

* Read with pydicom (the frames, unpacked from 1 bit per voxel) and the SEG's own multi-frame geometry:
  the shared (or per-frame) plane orientation and pixel spacing, and each frame's plane position.
  No referenced series is needed.
* **Label values are segment numbers**: the voxels of segment ``k`` get value ``k`` (our writer,
  :mod:`ConformalSegLib.io.dicom_seg`, numbers the segments 1..K in the order of its masks); BINARY and
  LABELMAP SEGs are read, a FRACTIONAL one is refused (probabilities are not labels), and so are
  overlapping segments (a label map holds one value per voxel: read those with
  :func:`ConformalSegLib.io.dicom_seg.read_dicom_seg`).
* **Segments by name** (``--seg-segments NAME=VALUE,...``, :func:`parse_segment_map`): when SEGs number
  their segments differently from file to file (or from the label values asked for), ``segments`` maps
  each NAME to a label value. NAME matches a segment's ``SegmentLabel`` or the ``CodeMeaning`` of its
  segmented property type, case-insensitively; it must match exactly one segment of every SEG read (else
  the error lists the segments found: number, label, code). Segments not named become background (0).
* **Geometry**: with ``reference`` (the grid of the image or probability map the labels belong to), each
  frame is placed on the reference slice at its position; orientation, pixel spacing, rows and columns and
  the in-plane origin must match, and every frame must lie on a slice of the reference (the error says how
  it differs). That also reads SEGs that omit empty frames (highdicom's and dcmqi's default): missing
  slices are background. Without ``reference`` the grid is the SEG's own stack, from its first to its last
  frame, the slice step from ``SpacingBetweenSlices`` or the smallest gap between frames; a SEG that
  references more slices than that stack holds (empty frames left out) is then refused, since its extent
  is unknown.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry

#: Segmentation Storage and Label Map Segmentation Storage (the SOP class of LABELMAP SEGs).
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
SEG_EXTENSION = ".dcm"
FIX = "give a DICOM SEG (BINARY or LABELMAP) of non-overlapping segments on the image's grid"


def is_dicom_seg_path(path: str | PathLike[str]) -> bool:
    """True for a file name ending in ``.dcm`` (the label readers then read it as a DICOM SEG)."""
    return Path(path).name.lower().endswith(SEG_EXTENSION)


def _frame_item(ds: Any, index: int, name: str) -> Any:
    """The first item of functional group ``name`` of frame ``index``: per-frame, else shared (or None)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and name in per_frame[index]:
        return per_frame[index][name].value[0]
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared is not None and name in shared[0]:
        return shared[0][name].value[0]
    return None


def _frames(ds: Any, path: Path) -> np.ndarray:
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises several types for missing or undecodable pixel data
        raise ConformalSegError(f"cannot decode the SEG's frames ({exc})", path=path, fix=FIX) from exc
    return pixels.reshape(int(getattr(ds, "NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))


def _frame_geometry(ds: Any, n_frames: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(orientation 6-vector, pixel spacing (row, column), positions (n_frames, 3)) of the SEG's frames."""
    try:
        orientations = np.array(
            [
                [float(v) for v in _frame_item(ds, i, "PlaneOrientationSequence").ImageOrientationPatient]
                for i in range(n_frames)
            ]
        )
        spacings = np.array(
            [[float(v) for v in _frame_item(ds, i, "PixelMeasuresSequence").PixelSpacing] for i in range(n_frames)]
        )
        positions = np.array(
            [
                [float(v) for v in _frame_item(ds, i, "PlanePositionSequence").ImagePositionPatient]
                for i in range(n_frames)
            ]
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConformalSegError(
            f"the SEG lacks plane orientation, pixel spacing or plane positions ({exc})", path=path, fix=FIX
        ) from exc
    if np.ptp(orientations, axis=0).max() > 1e-4 or np.ptp(spacings, axis=0).max() > 1e-4:
        raise ConformalSegError("the SEG's frames differ in orientation or pixel spacing", path=path, fix=FIX)
    return orientations[0], spacings[0], positions


def _own_grid(ds: Any, orientation: np.ndarray, spacing: np.ndarray, positions: np.ndarray, path: Path) -> Geometry:
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    along = positions @ normal
    distinct = np.unique(np.round(along, 4))
    step = float(_frame_item(ds, 0, "PixelMeasuresSequence").get("SpacingBetweenSlices", 0) or 0)
    if step <= 0:
        gaps = np.diff(distinct)
        step = float(gaps.min()) if len(gaps) else float(getattr(ds, "SliceThickness", 1.0) or 1.0)
    first = positions[int(np.argmin(along))]
    n_slices = int(round((distinct[-1] - distinct[0]) / step)) + 1
    return Geometry(
        shape=(n_slices, int(ds.Rows), int(ds.Columns)),
        spacing=(float(spacing[1]), float(spacing[0]), step),
        origin=tuple(float(v) for v in first),
        direction=tuple(np.column_stack([row_cos, col_cos, normal]).reshape(-1)),
    )


def _slice_indices(
    grid: Geometry, orientation: np.ndarray, spacing: np.ndarray, positions: np.ndarray, path: Path
) -> np.ndarray:
    """The slice of ``grid`` each frame lies on (checked: same plane grid, on a slice, inside)."""
    direction = np.asarray(grid.direction).reshape(3, 3)
    problems = []
    if not np.allclose(direction[:, 0], orientation[:3], atol=1e-4) or not np.allclose(
        direction[:, 1], orientation[3:], atol=1e-4
    ):
        problems.append("orientation")
    if not np.allclose((grid.spacing[1], grid.spacing[0]), spacing, rtol=1e-4):
        problems.append(f"pixel spacing {tuple(spacing)} != {(grid.spacing[1], grid.spacing[0])}")
    offsets = (positions - np.asarray(grid.origin)) @ direction  # in mm along x, y, z of the grid
    tol = 1e-3 + 1e-4 * max(grid.spacing)
    if np.abs(offsets[:, :2]).max(initial=0.0) > tol:
        problems.append("in-plane origin")
    k = offsets[:, 2] / grid.spacing[2]
    if np.abs(k - np.round(k)).max(initial=0.0) * grid.spacing[2] > tol:
        problems.append("frames between the slices")
    k = np.round(k).astype(np.int64)
    if len(k) and (k.min() < 0 or k.max() >= grid.shape[0]):
        problems.append(f"frames outside the {grid.shape[0]} slices")
    if problems:
        raise ConformalSegError(
            f"the SEG is not on the grid of the image it labels ({', '.join(problems)})",
            path=path,
            fix="give the SEG made on this image's series (same frame of reference and slices)",
        )
    return k


def _referenced_slices(ds: Any) -> int:
    """How many source images the SEG references (one per slice of a single-frame series)."""
    return sum(
        len(getattr(item, "ReferencedInstanceSequence", [])) for item in getattr(ds, "ReferencedSeriesSequence", [])
    )


SEGMENTS_FIX = "name each segment as its SegmentLabel or property code meaning reads (the list above)"


def parse_segment_map(text: str) -> dict[str, int]:
    """``"Tumor=1,Liver=2"`` -> ``{"tumor": 1, "liver": 2}`` (names case-folded; values integers in 1..65535).
    Raises :class:`ConformalSegError` for a malformed list, a repeated name or a bad value."""
    mapping: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = item.rpartition("=")
        name = name.strip()
        if not sep or not name or not value.strip().isdigit() or not 1 <= int(value) <= 65535:
            raise ConformalSegError(
                f"--seg-segments entry {item!r} is not NAME=VALUE with a label value in 1..65535",
                fix="write e.g. --seg-segments 'Tumor=1,Liver=2'",
            )
        if name.casefold() in mapping:
            raise ConformalSegError(f"--seg-segments names {name!r} twice", fix="name each segment once")
        mapping[name.casefold()] = int(value)
    return mapping


def _segment_table(ds: Any) -> list[tuple[int, str, str]]:
    """``(number, SegmentLabel, property type CodeMeaning)`` of every segment of the SEG."""
    table = []
    for item in getattr(ds, "SegmentSequence", []):
        codes = getattr(item, "SegmentedPropertyTypeCodeSequence", None) or []
        meaning = str(getattr(codes[0], "CodeMeaning", "")) if len(codes) else ""
        table.append((int(item.SegmentNumber), str(getattr(item, "SegmentLabel", "")), meaning))
    return table


def segment_values(ds: Any, segments: dict[str, int], path: Path) -> np.ndarray:
    """Lookup table segment number -> label value for ``segments`` (module docstring); 0 for the others."""
    table = _segment_table(ds)
    listing = "; ".join(f"{number}: {label!r} ({meaning or 'no code'})" for number, label, meaning in table)
    lut = np.zeros(max((number for number, _, _ in table), default=0) + 1, dtype=np.int64)
    for name, value in segments.items():
        hits = [number for number, label, meaning in table if name in (label.casefold(), meaning.casefold())]
        if len(hits) != 1:
            problem = "matches no segment" if not hits else f"matches {len(hits)} segments ({hits})"
            raise ConformalSegError(
                f"--seg-segments name {name!r} {problem}; the SEG's segments are {listing or 'none'}",
                path=path,
                fix=SEGMENTS_FIX,
            )
        lut[hits[0]] = value
    return lut


def load_dicom_seg_labels(
    path: str | PathLike[str], reference: Geometry | None = None, segments: dict[str, int] | None = None
) -> tuple[np.ndarray, Geometry]:
    """A DICOM SEG as an integer label map (numpy ``(z, y, x)``, value = segment number, or the value
    ``segments`` gives its name) and its grid (``reference`` when given); see the module docstring."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for a file that is not DICOM
        raise ConformalSegError(f"cannot read the DICOM file ({exc})", path=path, fix=FIX) from exc
    if str(getattr(ds, "SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise ConformalSegError(
            "the .dcm file is not a DICOM SEG (Segmentation Storage)", path=path, fix=FIX + "; a series is a folder"
        )
    kind = str(getattr(ds, "SegmentationType", ""))
    if kind not in ("BINARY", "LABELMAP"):
        raise ConformalSegError(f"the SEG is {kind or 'of unknown type'}, not a label map", path=path, fix=FIX)
    frames = _frames(ds, path)
    orientation, spacing, positions = _frame_geometry(ds, len(frames), path)
    grid = reference if reference is not None else _own_grid(ds, orientation, spacing, positions, path)
    if reference is None and _referenced_slices(ds) > grid.shape[0]:
        raise ConformalSegError(
            f"the SEG has frames on {grid.shape[0]} of the {_referenced_slices(ds)} slices of its series (empty "
            "frames left out), and no image grid was given to place it on",
            path=path,
            fix="give the image (or --reference-dicom series) it labels, or the label map as NIfTI",
        )
    if (grid.shape[1], grid.shape[2]) != frames.shape[1:]:
        raise ConformalSegError(
            f"the SEG's frames are {frames.shape[1]}x{frames.shape[2]} pixels, the image's slices "
            f"{grid.shape[1]}x{grid.shape[2]}",
            path=path,
            fix="give the SEG made on this image's series",
        )
    slices = _slice_indices(grid, orientation, spacing, positions, path)
    lut = segment_values(ds, segments, path) if segments is not None else None
    numbers = [int(s.SegmentNumber) for s in getattr(ds, "SegmentSequence", [])]
    labels = np.zeros(grid.shape, dtype=np.uint16 if max(numbers, default=0) > 255 else np.uint8)
    if kind == "LABELMAP":
        for frame, k in zip(frames, slices):
            np.copyto(labels[k], frame.astype(labels.dtype), where=frame > 0)
        return _renumbered(labels, lut), grid
    for index, (frame, k) in enumerate(zip(frames, slices)):
        number = int(_frame_item(ds, index, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        voxels = frame > 0
        if np.any(labels[k][voxels] != 0):
            raise ConformalSegError(
                f"the SEG's segments overlap (segment {number} and segment {int(labels[k][voxels].max())}): a label "
                "map holds one value per voxel",
                path=path,
                fix="give a SEG of non-overlapping segments (one structure per segment, as exported from a label map)",
            )
        labels[k][voxels] = number
    return _renumbered(labels, lut), grid


def _renumbered(labels: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """Segment numbers -> the values of ``lut`` (numbers beyond it: 0); ``labels`` itself without one."""
    if lut is None:
        return labels
    lut = np.concatenate([lut, np.zeros(max(0, int(labels.max(initial=0)) + 1 - lut.size), dtype=lut.dtype)])
    return lut.astype(np.uint16 if lut.max(initial=0) > 255 else np.uint8)[labels]
