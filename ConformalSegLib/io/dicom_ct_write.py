"""Write a CT volume as a DICOM series: one single-frame file per slice, with SimpleITK's GDCM writer.

What it is for: the DICOM paths of the tool need a DICOM CT to refer to (``apply --dicom-seg`` writes a SEG
whose frames reference the CT's slices; the Slicer panel's *Export DICOM SEG* needs the series of the CT on
screen). The phantoms are NIfTI/NRRD; :func:`write_ct_series` gives them a series (``conformalseg synth
--dicom``, the Slicer sample data), so those paths can be tried without a scanner.

What is written (the pattern of SimpleITK's *DICOM series from array* example, tags set per slice):

* pixel values: the volume rounded to int16 (Hounsfield units, rescale slope 1, intercept 0); values outside
  the int16 range are refused, not clipped;
* geometry: ImagePositionPatient of every slice from the image's own index-to-physical map,
  ImageOrientationPatient from its direction's first two columns, PixelSpacing and the slice positions from
  its spacing, so the series reads back onto exactly ``geometry`` (tested through
  :func:`~.dicom_series.read_series`);
* identity: one new Study, Series and Frame of Reference UID for the series (a new SOP Instance UID per slice),
  Modality CT, the given patient name/id and series description, and the patient, study and equipment
  attributes a DICOM SEG's source images must carry (highdicom reads them; empty where unknown).

The series is written into a staging folder and published whole (:func:`~.atomic.staged_folder`): an error or
Ctrl-C leaves no half-written series behind. The process locale is restored afterwards (GDCM sets it to ``C``).
"""

from __future__ import annotations

import locale
import time
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..common.lazy_import import lazy_module
from .atomic import staged_folder
from .volumes import sitk_image

if TYPE_CHECKING:
    import SimpleITK as sitk
else:
    sitk = lazy_module("SimpleITK", purpose="write DICOM CT series")

#: The DICOM root of the UIDs this writer makes (pydicom's, as ``pydicom.uid.generate_uid`` uses).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def new_uid() -> str:
    """A fresh DICOM UID (pydicom's generator: the prefix above plus a random suffix, at most 64 characters)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=UID_PREFIX))


def write_ct_series(
    image: np.ndarray,
    geometry: Geometry,
    folder: str | PathLike[str],
    *,
    patient_name: str = "Phantom^ConformalSeg",
    patient_id: str = "PHANTOM",
    series_description: str = "ConformalSeg phantom CT",
    force: bool = False,
) -> list[Path]:
    """Write ``image`` (Hounsfield units, numpy ``(z, y, x)`` on ``geometry``) as a DICOM CT series in the new
    folder ``folder`` (module docstring); returns the slice files in slice order."""
    hu = np.rint(np.asarray(image, dtype=np.float64))
    if hu.shape != tuple(geometry.shape):
        raise ConformalSegError(f"the image has shape {hu.shape}, its geometry {geometry.shape}", path=folder)
    if hu.size and (not np.isfinite(hu).all() or hu.min() < -32768 or hu.max() > 32767):
        raise ConformalSegError(
            "the image has values outside the int16 range (or NaN) of a DICOM CT",
            path=folder,
            fix="window or rescale the image first",
        )
    volume = sitk_image(hu.astype(np.int16), geometry)
    direction = volume.GetDirection()
    now_date, now_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    series = {
        "0008|0060": "CT",
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0020": now_date,
        "0008|0021": now_date,
        "0008|0030": now_time,
        "0008|0031": now_time,
        "0008|103e": series_description,
        "0008|0050": "",  # AccessionNumber
        "0008|0070": "ConformalSeg",  # Manufacturer
        "0008|0090": "",  # ReferringPhysicianName
        "0010|0010": patient_name,
        "0010|0020": patient_id,
        "0010|0030": "",  # PatientBirthDate
        "0010|0040": "O",  # PatientSex
        "0018|0050": f"{geometry.spacing[2]:.10g}",  # SliceThickness
        "0020|0010": "1",  # StudyID
        "0020|1040": "",  # PositionReferenceIndicator
        "0020|000d": new_uid(),
        "0020|000e": new_uid(),
        "0020|0052": new_uid(),
        "0020|0011": "1",
        "0020|0037": "\\".join(f"{v:.10g}" for v in (*direction[0::3], *direction[1::3])),
        "0028|1052": "0",
        "0028|1053": "1",
        "0028|1054": "HU",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the UIDs set here (GDCM would make its own)
    target = Path(folder)
    names = [f"slice{k:04d}.dcm" for k in range(volume.GetDepth())]
    with staged_folder(target, force=force) as stage, _locale_kept():
        for k, name in enumerate(names):
            frame = volume[:, :, k]
            for tag, value in series.items():
                frame.SetMetaData(tag, value)
            frame.SetMetaData("0008|0018", new_uid())
            frame.SetMetaData("0020|0013", str(k + 1))
            frame.SetMetaData(
                "0020|0032", "\\".join(f"{v:.10g}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k)))
            )
            writer.SetFileName(str(stage / name))
            writer.Execute(frame)
    return [target / name for name in names]


@contextmanager
def _locale_kept() -> Iterator[None]:
    """Restore the process locale afterwards: GDCM's writer sets ``LC_ALL`` to ``"C"`` and leaves it so, after
    which Python reads text files as ASCII by default (and, inside Slicer, the whole application would change
    locale)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)
