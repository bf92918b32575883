"""Sample data: a synthetic scan with its probability map and matching CLS and confidence-set profiles.

Registered in Slicer's Sample Data module (category *ConformalSeg*, sample *ConformalSegPhantom*) so that
a new user can try the panel in one click: the first click builds the files with the library
(:func:`make_sample`: seconds, no download, no network, nothing but the library and what Slicer ships: numpy,
scipy, SimpleITK, pydicom) into Slicer's cache folder, later clicks reuse them. The scan and its map come from
:func:`ConformalSegLib.phantoms.simulated_maps.make_cases` (an image, a lesion and a calibrated-looking
probability map); the profiles are calibrated on 60 more scans of the same generator, so the new scan is
exchangeable with them and the guarantees shown are the real ones for this toy population. The
shipped network (``logic.SHIPPED_MODEL``, the folder named by ``shipped_models.LESION_MODEL``) is offered as the model
when it is there. The scan is also written as a DICOM CT series (:func:`ConformalSegLib.io.dicom_ct_write.
write_ct_series`), set as the panel's *Reference DICOM series*, so that *Export DICOM SEG* can be tried on the
sample too (or the series loaded through Slicer's DICOM module).
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

#: Bump when the sample changes (a cached sample of another version is rebuilt).
SAMPLE_VERSION = 2
SAMPLE_NAME = "ConformalSegPhantom"
CATEGORY = "ConformalSeg"
N_CALIBRATION = 60
SHAPE = (32, 72, 72)
SEED = 2026


@dataclass(frozen=True)
class SamplePaths:
    image: Path
    probability: Path
    cls_profile: Path
    sets_profile: Path
    model: Path | None
    dicom: Path  # the scan as a DICOM CT series (a folder)


def _paths(folder: Path, model: Path | None) -> SamplePaths:
    return SamplePaths(
        folder / "phantom_ct.nrrd",
        folder / "phantom_probability.nrrd",
        folder / "cls.json",
        folder / "sets.json",
        model if model is not None and (model / "model_card.json").is_file() else None,
        folder / "phantom_ct_dicom",
    )


def make_sample(folder: str | PathLike[str], model: str | PathLike[str] | None = None) -> SamplePaths:
    """Build the sample into ``folder`` (reused when already built by this version); returns its paths."""
    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.io.dicom_ct_write import write_ct_series
    from ConformalSegLib.io.volumes import save_volume
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    folder = Path(folder)
    paths = _paths(folder, Path(model) if model is not None else None)
    manifest = folder / "sample.json"
    files = (paths.image, paths.probability, paths.cls_profile, paths.sets_profile)
    if manifest.is_file() and all(p.is_file() for p in files) and paths.dicom.is_dir():
        if json.loads(manifest.read_text(encoding="utf-8")).get("version") == SAMPLE_VERSION:
            return paths
    folder.mkdir(parents=True, exist_ok=True)
    cases = list(make_cases(N_CALIBRATION + 1, SEED, shape=SHAPE))
    calibration, scan = cases[:-1], cases[-1]
    requests = {
        paths.cls_profile: CalibrationRequest("cls", epsilon=0.1, alpha=0.1),
        paths.sets_profile: CalibrationRequest(
            "sets", alpha_inner=0.1, alpha_outer=0.1, outer_transform="distance:0.5"
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, request in requests.items():
            calibrate(calibration, request).save(path, force=True)
    save_volume(scan.image, scan.geometry, paths.image, force=True)
    save_volume(scan.probability, scan.geometry, paths.probability, force=True)
    shutil.rmtree(paths.dicom, ignore_errors=True)  # one series in the folder, never an older version's slices too
    write_ct_series(scan.image, scan.geometry, paths.dicom, series_description="ConformalSeg sample CT")
    manifest.write_text(json.dumps({"version": SAMPLE_VERSION, "case": scan.case_id}) + "\n", encoding="utf-8")
    return paths
