"""Write synthetic cases (:mod:`ConformalSegLib.phantoms.simulated_maps`) as a dataset folder on disk.

Layout (the layout ``calibrate --data`` and ``evaluate --data`` read): ``DIR/probs/CASE.nii.gz``
(float32 probability maps), ``DIR/labels/CASE.nii.gz`` (uint8: 0 background, 1 organ, 2 lesion) and
``DIR/images/CASE.nii.gz`` (float32 CT-like intensities, for viewing in Slicer). Lesion label: 2. With
``dicom=True`` each image is also a DICOM CT series ``DIR/dicom/CASE/`` (:mod:`ConformalSegLib.io.dicom_ct_write`:
the reference series of ``apply --dicom-seg`` and of the Slicer panel's DICOM SEG export).
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np

from ..io.dicom_ct_write import write_ct_series
from ..io.volumes import save_volume
from .simulated_maps import SyntheticCase, make_cases

ORGAN_LABEL = 1
LESION_LABEL = 2


def label_map(case: SyntheticCase) -> np.ndarray:
    """uint8 label map of a synthetic case: 0 background, 1 organ, 2 lesion."""
    labels = np.zeros(case.lesion.shape, dtype=np.uint8)
    labels[case.organ] = ORGAN_LABEL
    labels[case.lesion] = LESION_LABEL
    return labels


def write_synthetic_dataset(
    out_dir: str | PathLike[str],
    n_cases: int,
    *,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    dicom: bool = False,
    **case_options,
) -> Path:
    """Generate ``n_cases`` cases and write them under ``out_dir`` (see module docstring)."""
    out = Path(out_dir)
    for done, case in enumerate(make_cases(n_cases, seed=seed, **case_options), start=1):
        save_volume(case.probability, case.geometry, out / "probs" / f"{case.case_id}.nii.gz", force=force)
        save_volume(label_map(case), case.geometry, out / "labels" / f"{case.case_id}.nii.gz", force=force)
        save_volume(case.image, case.geometry, out / "images" / f"{case.case_id}.nii.gz", force=force)
        if dicom:
            write_ct_series(case.image, case.geometry, out / "dicom" / case.case_id, force=force)
        if progress is not None:
            progress(done, n_cases, case.case_id)
    return out
