"""The library's DICOM CT series writer (``io.dicom_ct_write``, ``synth --dicom``): read back exactly (values and
an oblique geometry) by the library's reader and by pydicom, refused inputs, no partial series, and the whole
DICOM SEG path on a synthesized series (``synth --dicom`` -> ``calibrate`` -> ``apply --dicom-seg``)."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_support import GEOM, SHAPE

from ConformalSegLib.cli import main
from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.io.dicom_ct_write import write_ct_series
from ConformalSegLib.io.dicom_series import load_image_input, series_headers

pydicom = pytest.importorskip("pydicom")


def test_series_reads_back_exactly_on_an_oblique_grid(tmp_path):
    import locale

    hu = np.random.default_rng(0).integers(-1024, 3000, size=SHAPE).astype(np.float32)
    before = locale.setlocale(locale.LC_ALL)
    files = write_ct_series(hu, GEOM, tmp_path / "ct", patient_id="P7", series_description="test series")
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's writer sets "C"; the rest of the process keeps its own
    assert [f.name for f in files] == [f"slice{k:04d}.dcm" for k in range(SHAPE[0])]
    volume = load_image_input(tmp_path / "ct")
    assert volume.geometry.mismatch(GEOM) is None and np.array_equal(volume.array, hu)
    assert series_headers(tmp_path / "ct").geometry.mismatch(GEOM) is None  # the SEG writer's view of it
    headers = [pydicom.dcmread(f) for f in files]
    assert {h.SOPClassUID for h in headers} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage
    assert len({h.SOPInstanceUID for h in headers}) == len(files)
    for key in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(h, key) for h in headers}) == 1, key
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, len(files) + 1))
    assert (headers[0].Modality, headers[0].PatientID, headers[0].SeriesDescription) == ("CT", "P7", "test series")


def test_refusals_leave_nothing(tmp_path):
    hu = np.zeros(SHAPE, np.float32)
    with pytest.raises(ConformalSegError, match="int16 range"):
        write_ct_series(hu + 40000, GEOM, tmp_path / "big")
    nan = hu.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ConformalSegError, match="int16 range"):
        write_ct_series(nan, GEOM, tmp_path / "nan")
    with pytest.raises(ConformalSegError, match="shape"):
        write_ct_series(hu[1:], GEOM, tmp_path / "shape")
    write_ct_series(hu, GEOM, tmp_path / "ct")
    with pytest.raises(ConformalSegError):
        write_ct_series(hu, GEOM, tmp_path / "ct")  # an existing series is not overwritten without force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no partial or staging folder left


def test_dicom_seg_on_a_synthesized_series(tmp_path, capsys):
    """``synth --dicom`` gives every case a series; ``apply --dicom-seg`` refers to it and the SEG's segment
    equals the applied NIfTI mask."""
    pytest.importorskip("highdicom")
    from ConformalSegLib.io.dicom_seg import read_dicom_seg
    from ConformalSegLib.io.volumes import load_label_map

    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--cases", "12", "--seed", "3", "--dicom"]) == 0
    assert "with DICOM series in dicom/" in capsys.readouterr().out
    assert len(list((data / "dicom").iterdir())) == 12
    argv = ["calibrate", "--method", "cls", "--data", str(data), "--lesion-label", "2", "--epsilon", "0.2"]
    assert main([*argv, "--alpha", "0.2", "--out", str(tmp_path / "p.json")]) == 0
    case = sorted((data / "probs").iterdir())[0].name.removesuffix(".nii.gz")
    out = tmp_path / "out"
    argv = ["apply", "--profile", str(tmp_path / "p.json"), "--prob", str(data / "probs" / f"{case}.nii.gz")]
    assert main([*argv, "--dicom-seg", "--reference-dicom", str(data / "dicom" / case), "--out", str(out)]) == 0
    capsys.readouterr()
    segments = read_dicom_seg(out / "segmentation.dcm", data / "dicom" / case)
    masks = sorted(p for p in out.glob("*.nii.gz"))
    assert len(segments) == len(masks) == 1
    assert np.array_equal(next(iter(segments.values())), load_label_map(masks[0]).array.astype(bool))
