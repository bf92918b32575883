"""DICOM image series as input: a folder of single-frame slices read as one 3D volume.

* :func:`load_image_input` and :func:`load_probability_input` accept what the other readers of
  :mod:`ConformalSegLib.io.volumes` accept, plus a **folder** holding a DICOM series. The slices are found
  and sorted along the slice normal by SimpleITK's GDCM series reader (``ImageSeriesReader``), with the
  rescale slope/intercept applied, so a CT comes in Hounsfield units and a probability series stored
  with a slope of e.g. 1/1000 comes in as probabilities (checked like every other probability map).
* A folder with several series needs ``series_uid`` (``--series-uid`` on the command line); the error
  lists the series found.
* The geometry is the series' own (LPS, ITK order, :class:`~ConformalSegLib.common.geometry.Geometry`):
  origin = position of the first slice along the normal, direction columns = the row cosine, the column
  cosine and the slice normal, spacing = (column spacing, row spacing, distance between slices).
  :func:`series_headers` computes the same geometry from the headers alone with pydicom (no pixels),
  for :mod:`ConformalSegLib.io.dicom_seg`, which needs the slice files in the same order as the frames.
* Many cases (``infer --images``, ``calibrate --images``): :func:`find_series_cases` takes a folder that is
  itself one series (one case, named after the folder) or a folder of case folders, one series each
  (case id = the case folder's name); :func:`image_input_sha256` is the content key of either input kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..common.lazy_import import lazy_module
from .checksums import sha256_file, sha256_files
from .volumes import Volume, _check_probabilities, geometry_from_sitk, load_image, load_probability_map

if TYPE_CHECKING:
    import SimpleITK as sitk
else:
    sitk = lazy_module("SimpleITK", purpose="read DICOM series")

SERIES_FIX = "pass --series-uid with one of the series listed"


def list_series(folder: str | PathLike[str]) -> list[str]:
    """The Series Instance UIDs of the DICOM series in ``folder`` (not its sub-folders), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConformalSegError("DICOM folder not found", path=folder, fix="give the folder that holds the series")
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "No Series were found": our caller says it better
    try:
        return sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def series_files(folder: str | PathLike[str], series_uid: str | None = None) -> list[str]:
    """The files of one series of ``folder``, sorted by position along the slice normal."""
    folder = Path(folder)
    uids = list_series(folder)
    if not uids:
        raise ConformalSegError(
            "the folder holds no DICOM image series", path=folder, fix="give a folder of DICOM slices (.dcm files)"
        )
    if series_uid is None:
        if len(uids) > 1:
            raise ConformalSegError(
                f"the folder holds {len(uids)} series: {', '.join(uids)}", path=folder, fix=SERIES_FIX
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise ConformalSegError(
            f"series {series_uid} is not in the folder (series found: {', '.join(uids)})", path=folder, fix=SERIES_FIX
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def read_series(folder: str | PathLike[str], series_uid: str | None = None, *, what: str = "image") -> sitk.Image:
    """One DICOM series of ``folder`` as a 3D SimpleITK image (rescale applied)."""
    files = series_files(folder, series_uid)
    if len(files) < 2:
        raise ConformalSegError(
            f"the DICOM series has {len(files)} slice: a {what} needs a 3D stack",
            path=folder,
            fix="give the folder of the whole series",
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or ["unreadable"])[-1][:200]
        raise ConformalSegError(
            f"cannot read the DICOM series ({reason})", path=folder, fix="re-export the series"
        ) from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConformalSegError(
            f"the DICOM series is not a 3D scalar {what}", path=folder, fix="give a greyscale series (CT, MR, PET)"
        )
    return image


def load_image_input(path: str | PathLike[str], series_uid: str | None = None) -> Volume:
    """An image file (:func:`~ConformalSegLib.io.volumes.load_image`) or a DICOM series folder, as float32."""
    if not Path(path).is_dir():
        _no_series_uid(path, series_uid)
        return load_image(path)
    image = read_series(path, series_uid)
    return Volume(sitk.GetArrayFromImage(image).astype(np.float32, copy=False), geometry_from_sitk(image), str(path))


def load_probability_input(
    path: str | PathLike[str],
    *,
    channel: int | None = None,
    series_uid: str | None = None,
    spacing: Sequence[float] | None = None,
) -> Volume:
    """A probability map file (:func:`~ConformalSegLib.io.volumes.load_probability_map`) or a DICOM series
    folder whose rescaled values are probabilities (checked for range like any probability map). ``spacing``:
    the grid of a bare array file (a series carries its own)."""
    if not Path(path).is_dir():
        _no_series_uid(path, series_uid)
        return load_probability_map(path, channel=channel, spacing=spacing)
    if channel not in (None, 0):
        raise ConformalSegError("a DICOM series has one channel", path=path, fix="leave out --channel")
    image = read_series(path, series_uid, what="probability map")
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):  # integer slope and intercept: no fractions can be stored
        raise ConformalSegError(
            f"the DICOM series holds integers ({array.dtype}, values {array.min()} to {array.max()} after its "
            "rescale slope and intercept): it is an image or a segmentation, not probabilities",
            path=path,
            fix="store probabilities with a fractional RescaleSlope (e.g. 0.001, so that values read in [0, 1]), "
            "or give the probability map as NIfTI/NRRD",
        )
    return Volume(_check_probabilities(array, Path(path)), geometry_from_sitk(image), str(path))


def image_input_sha256(path: str | PathLike[str], series_uid: str | None = None) -> str:
    """SHA-256 of an image input: the file's bytes, or the names and bytes of one series' files."""
    if not Path(path).is_dir():
        return sha256_file(path)
    return sha256_files(series_files(path, series_uid))


def find_series_cases(folder: str | PathLike[str], series_uid: str | None = None) -> dict[str, Path]:
    """``case id -> series folder`` (see the module docstring); ``{}`` when ``folder`` holds no DICOM series.

    ``folder`` holding a series itself is one case (``series_uid`` picks one of several; checked here, before
    any case runs). Otherwise each visible sub-folder holding a series is a case and must hold exactly one
    (``series_uid`` names one series, so it cannot apply to many cases).
    """
    folder = Path(folder)
    if list_series(folder):
        series_files(folder, series_uid)  # an unknown UID, or several series without one, fails now
        return {folder.name: folder}
    cases: dict[str, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        uids = list_series(sub)
        if len(uids) > 1:
            raise ConformalSegError(
                f"the case folder holds {len(uids)} series ({', '.join(uids)}); a folder of case folders needs one "
                "series per case",
                path=sub,
                fix="keep one image series per case folder (move the others, e.g. localizers, elsewhere)",
            )
        if uids:
            cases[sub.name] = sub
    if cases and series_uid is not None:
        raise ConformalSegError(
            f"--series-uid picks a series in one series folder, but this folder holds {len(cases)} case folders",
            path=folder,
            fix="leave out --series-uid (one series per case folder), or give the one series folder",
        )
    return cases


def _no_series_uid(path: str | PathLike[str], series_uid: str | None) -> None:
    if series_uid is not None:
        raise ConformalSegError(
            "--series-uid applies to a DICOM series folder, not to a file", path=path, fix="leave out --series-uid"
        )


@dataclass(frozen=True)
class SeriesHeaders:
    """The headers (pydicom datasets, no pixels) of one series, sorted along the normal, and its geometry."""

    datasets: list[Any]
    geometry: Geometry
    folder: Path


def series_headers(folder: str | PathLike[str], series_uid: str | None = None) -> SeriesHeaders:
    """Read one series' headers with pydicom and compute its geometry (see the module docstring)."""
    import pydicom

    folder = Path(folder)
    files = series_files(folder, series_uid)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    try:
        rows = {(int(d.Rows), int(d.Columns)) for d in datasets}
        orientations = np.array([[float(v) for v in d.ImageOrientationPatient] for d in datasets])
        positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
        spacings = np.array([[float(v) for v in d.PixelSpacing] for d in datasets])
    except (AttributeError, ValueError, TypeError) as exc:
        raise ConformalSegError(
            f"the series lacks image geometry ({exc})", path=folder, fix="give a CT/MR/PET series with positions"
        ) from exc
    if len(rows) != 1 or np.ptp(orientations, axis=0).max() > 1e-4 or np.ptp(spacings, axis=0).max() > 1e-4:
        raise ConformalSegError(
            "the slices of the series differ in size, orientation or pixel spacing",
            path=folder,
            fix="give a series of parallel slices of one size",
        )
    row_cos, col_cos = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_cos, col_cos)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    datasets, positions, along = [datasets[i] for i in order], positions[order], along[order]
    steps = np.diff(along)
    if len(datasets) < 2 or steps.min() <= 0 or np.ptp(steps) > 1e-3 * max(steps.max(), 1.0):
        raise ConformalSegError(
            "the slices of the series are not equally spaced along their normal (missing or repeated slices)",
            path=folder,
            fix="give a complete series with one slice per position",
        )
    offsets = np.diff(positions, axis=0) - np.outer(steps, normal)
    if np.abs(offsets).max() > 1e-2:
        raise ConformalSegError(
            "the series is sheared (gantry tilt): its slices are not stacked along their normal",
            path=folder,
            fix="resample the series onto an orthogonal grid first",
        )
    (n_rows, n_cols) = rows.pop()
    geometry = Geometry(
        shape=(len(datasets), n_rows, n_cols),
        spacing=(spacings[0, 1], spacings[0, 0], float(steps.mean())),
        origin=tuple(positions[0]),
        direction=tuple(np.column_stack([row_cos, col_cos, normal]).reshape(-1)),
    )
    return SeriesHeaders(datasets, geometry, folder)
