"""Shared helpers for the DICOM tests (no tests here): a small synthetic CT series written with pydicom
directly, independently of the code under test (one single-frame CT Image Storage file per slice)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running pytest from any folder
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.geometry import Geometry  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def oblique_direction(degrees: float = 25.0) -> tuple[float, ...]:
    """A proper rotation (det +1, as every DICOM slice stack has): about z, then about x."""
    t, u = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(u), -np.sin(u)], [0.0, np.sin(u), np.cos(u)]])
    return tuple((rx @ rz).reshape(-1))


SHAPE = (6, 9, 11)  # (z, y, x): rows 9, columns 11, 6 slices
GEOM = Geometry(shape=SHAPE, spacing=(0.8, 0.65, 2.5), origin=(-40.0, 12.5, 100.0), direction=oblique_direction())


def ct_values(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """Hounsfield units (int16, numpy order) of a small random 'CT'."""
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    geometry: Geometry = GEOM,
    *,
    series_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    frame_of_reference: str = "1.2.826.0.1.3680043.8.498.2",
    series_number: int = 1,
    rescale: tuple[float, float] = (1.0, -1024.0),
) -> list[Path]:
    """Write the values ``hu`` (numpy ``(z, y, x)``, stored as int16 through ``rescale`` = (slope, intercept))
    as single-frame CT files in ``folder``; file names are shuffled relative to slice order so that readers
    must sort by position."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    direction = np.asarray(geometry.direction).reshape(3, 3)
    slope, intercept = rescale
    stored = np.round((hu.astype(np.float64) - intercept) / slope).astype(np.int16)
    order = np.random.default_rng(7).permutation(hu.shape[0])
    paths = []
    for k in range(hu.shape[0]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^CT", "PH001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20260101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", "A1"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, series_number, "CT"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.Manufacturer, ds.InstanceNumber = "test", k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        position = np.asarray(geometry.origin) + direction[:, 2] * geometry.spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in list(direction[:, 0]) + list(direction[:, 1])]
        ds.PixelSpacing = [f"{geometry.spacing[1]:.6f}", f"{geometry.spacing[0]:.6f}"]  # row, column spacing
        ds.SliceThickness = f"{geometry.spacing[2]:.6f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        ds.KVP = "120"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"S{series_number}IM{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
