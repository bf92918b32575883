"""Data input/output: probability maps, label maps, calibration datasets, Slicer segmentations, DICOM series
(``dicom_series``), DICOM SEG out (``dicom_seg``) and in as a label map (``dicom_seg_input``) and nnU-Net fold
ensembles (``nnunet_folds``).

Arrays are in numpy ``(z, y, x)`` order; geometry spacing/origin/direction in ITK ``(x, y, z)`` order
(see :mod:`ConformalSegLib.common.geometry`). Every failure caused by the user's files raises
:class:`~ConformalSegLib.common.errors.ConformalSegError` naming the file and the fix. All writers are
atomic and refuse to overwrite existing files unless ``force=True``; :mod:`.guards` checks paths,
memory and ``.npy``/``.npz`` headers before anything is read.
"""

from __future__ import annotations

from .atomic import atomic_output, atomic_write_bytes, atomic_write_text
from .dataset import CalibrationDataset, Case, case_id, discover_pairs
from .segmentation import (
    INNER_SET,
    LESION_FNR,
    LESION_THRESHOLD,
    OUTER_SET,
    SEGMENT_COLORS,
    SEGMENT_TERMINOLOGY,
    read_seg_nrrd,
    slug,
    write_masks_nifti,
    write_seg_nrrd,
)
from .volumes import (
    Volume,
    check_same_geometry,
    geometry_from_sitk,
    label_values,
    load_image,
    load_label_map,
    load_label_mask,
    load_probability_map,
    mask_from_labels,
    save_volume,
    sitk_image,
)

__all__ = [
    "INNER_SET",
    "LESION_FNR",
    "LESION_THRESHOLD",
    "OUTER_SET",
    "SEGMENT_COLORS",
    "SEGMENT_TERMINOLOGY",
    "CalibrationDataset",
    "Case",
    "Volume",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "case_id",
    "check_same_geometry",
    "discover_pairs",
    "geometry_from_sitk",
    "label_values",
    "load_image",
    "load_label_map",
    "load_label_mask",
    "load_probability_map",
    "mask_from_labels",
    "read_seg_nrrd",
    "save_volume",
    "sitk_image",
    "slug",
    "write_masks_nifti",
    "write_seg_nrrd",
]
