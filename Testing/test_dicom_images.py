"""DICOM series folders as the images of ``infer`` and ``calibrate --model --images``: the same maps, the
same geometry and the same calibration as the NIfTI export of the same series, and one clear refusal per
bad folder (empty, several series without ``--series-uid``, an unknown UID).

The "model" is the elementwise logit probe of ``test_model_data.py``: its probability map is its input, so
a probability series stored with a rescale slope of 1/1000 goes through the whole pipeline visibly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_support import GEOM, SHAPE, write_ct_series
from test_io_support import write_sitk

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("pydicom")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

from ConformalSegLib.cli import main  # noqa: E402
from ConformalSegLib.conformal.profile import load_profile  # noqa: E402
from ConformalSegLib.inference.datasets import find_images  # noqa: E402
from ConformalSegLib.io.dicom_series import image_input_sha256, load_image_input  # noqa: E402
from ConformalSegLib.io.volumes import load_image, load_probability_map  # noqa: E402

N_CASES = 10


class LogitProbe(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(1e-6, 1.0 - 1e-6)
        return torch.log(x) - torch.log1p(-x)


@pytest.fixture(autouse=True)
def _trusted_model_code(monkeypatch):
    monkeypatch.setenv("CONFORMALSEG_TRUST_MODEL_CODE", "1")


def probabilities(seed: int) -> np.ndarray:
    """A blob at a random place, quantised to 1/1000 (what a slope of 0.001 can store)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    centre = rng.uniform(-0.3, 0.3, 3)
    blob = np.exp(-3.0 * ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2))
    return np.round(np.clip(blob + rng.random(SHAPE) * 0.05, 0, 1) * 1000) / 1000


def nifti_export(series_folder, path):
    """What a user's converter does: read the series with SimpleITK and write it as NIfTI."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_folder)))
    sitk.WriteImage(reader.Execute(), str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_images")
    probe = root / "probe"
    probe.mkdir()
    torch.jit.script(LogitProbe()).save(str(probe / "probe.ts"))
    card = {
        "format": "conformalseg-model-card",
        "format_version": 1,
        "name": "probe",
        "source": {"torchscript": "probe.ts"},
        "preprocessing": {"orientation": "RAS", "spacing_mm": None, "intensity": {"kind": "none"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 4},
        "output": {"activation": "sigmoid", "lesion_channel": 0},
    }
    (probe / "model_card.json").write_text(json.dumps(card))
    rng = np.random.default_rng(11)
    (root / "nifti").mkdir()
    for k in range(N_CASES):
        cid = f"case{k:02d}"
        prob = probabilities(k)
        write_ct_series(root / "dicom" / cid, prob, rescale=(0.001, 0.0))
        nifti_export(root / "dicom" / cid, root / "nifti" / f"{cid}.nii.gz")
        lesion = (prob > 0.55) | ((prob > 0.3) & (rng.random(SHAPE) < 0.3))
        write_sitk(lesion.astype(np.uint8), root / "labels" / f"{cid}.nii.gz", GEOM)
    return {"root": root, "model": probe}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_series_folder_reads_like_its_nifti_export(setup):
    root = setup["root"]
    series, nifti = load_image_input(root / "dicom" / "case03"), load_image(root / "nifti" / "case03.nii.gz")
    assert series.geometry.mismatch(GEOM) is None and nifti.geometry.mismatch(GEOM) is None
    assert np.array_equal(series.array, nifti.array)
    assert np.allclose(series.array, probabilities(3), atol=1e-6)  # the slope was applied, slices sorted
    cases = find_images(root / "dicom", dicom=True)  # a folder of case folders
    assert [c.case_id for c in cases] == [f"case{k:02d}" for k in range(N_CASES)]
    one = find_images(root / "dicom" / "case03", dicom=True)  # one series folder: one case named after it
    assert [(c.case_id, c.path) for c in one] == [("case03", root / "dicom" / "case03")]
    assert (
        one[0].sha256()
        == image_input_sha256(root / "dicom" / "case03")
        != image_input_sha256(root / "dicom" / "case04")
    )


def test_infer_on_a_series_equals_infer_on_its_nifti_export(setup, tmp_path, capsys):
    root, model = setup["root"], setup["model"]
    base = ["infer", "--model", model, "--device", "cpu"]
    code, _, err = run([*base, "--images", root / "dicom" / "case05", "--out", tmp_path / "dicom"], capsys)
    assert code == 0, err
    code, _, err = run([*base, "--images", root / "nifti" / "case05.nii.gz", "--out", tmp_path / "nifti"], capsys)
    assert code == 0, err
    from_dicom = load_probability_map(tmp_path / "dicom" / "probs" / "case05.nii.gz")
    from_nifti = load_probability_map(tmp_path / "nifti" / "probs" / "case05.nii.gz")
    assert from_dicom.geometry.mismatch(GEOM) is None  # the series' geometry is carried to the output
    assert np.array_equal(from_dicom.array, from_nifti.array)
    assert np.allclose(from_dicom.array, probabilities(5), atol=1e-4)  # the probe returns its input
    report = json.loads((tmp_path / "dicom" / "inference.json").read_text())
    assert report["cases"][0]["image"] == str((root / "dicom" / "case05").resolve())


def test_calibrate_on_series_equals_calibrate_on_nifti(setup, tmp_path, capsys):
    root, model = setup["root"], setup["model"]
    common = ["calibrate", "--method", "cls", "--epsilon", "0.2", "--alpha", "0.2", "--lesion-label", "1"]
    common += ["--model", model, "--device", "cpu", "--labels", root / "labels"]
    for kind in ("dicom", "nifti"):
        code, _, err = run([*common, "--images", root / kind, "--out", tmp_path / f"{kind}.json"], capsys)
        assert code == 0, err
    dicom, nifti = load_profile(tmp_path / "dicom.json"), load_profile(tmp_path / "nifti.json")
    assert dicom.calibration.n == nifti.calibration.n == N_CASES
    assert dicom.calibration.probability_threshold == nifti.calibration.probability_threshold
    assert np.array_equal(dicom.summaries.values, nifti.summaries.values)
    assert np.array_equal(dicom.summaries.offsets, nifti.summaries.offsets)


def test_calibrate_on_series_with_seg_labels(setup, tmp_path, capsys):
    """The PACS case: CT series folders and ground truth as DICOM SEGs (placed on each series' grid)."""
    from ConformalSegLib.io.dicom_seg import GuaranteeRecord, write_dicom_seg
    from ConformalSegLib.io.volumes import load_label_map

    root, model = setup["root"], setup["model"]
    record = GuaranteeRecord("truth", None, None, 0, "0" * 64, "ground truth")
    (tmp_path / "labels").mkdir()
    for k in range(N_CASES):
        cid = f"case{k:02d}"
        lesion = load_label_map(root / "labels" / f"{cid}.nii.gz").array == 1
        write_dicom_seg({"lesion": lesion}, GEOM, root / "dicom" / cid, tmp_path / "labels" / f"{cid}.dcm", record)
    common = ["calibrate", "--method", "cls", "--epsilon", "0.2", "--alpha", "0.2", "--lesion-label", "1"]
    common += ["--model", model, "--device", "cpu", "--images", root / "dicom"]
    code, _, err = run([*common, "--labels", tmp_path / "labels", "--out", tmp_path / "seg.json"], capsys)
    assert code == 0, err
    code, _, err = run([*common, "--labels", root / "labels", "--out", tmp_path / "nifti.json"], capsys)
    assert code == 0, err
    seg, nifti = load_profile(tmp_path / "seg.json"), load_profile(tmp_path / "nifti.json")
    assert seg.calibration.probability_threshold == nifti.calibration.probability_threshold
    assert np.array_equal(seg.summaries.values, nifti.summaries.values)


def test_dicom_image_refusals(setup, tmp_path, capfd):  # capfd: ITK writes to the C stderr
    root, model = setup["root"], setup["model"]
    base = ["infer", "--model", model, "--device", "cpu"]
    (tmp_path / "empty").mkdir()
    code, _, err = run([*base, "--images", tmp_path / "empty", "--out", tmp_path / "o1"], capfd)
    assert code == 2 and "no images found" in err and "DICOM series" in err
    assert "No Series were found" not in err  # ITK's own warning is not shown next to ours
    two = tmp_path / "two"
    write_ct_series(two, probabilities(1), series_uid="1.2.3.1", rescale=(0.001, 0.0))
    write_ct_series(two, probabilities(2), series_uid="1.2.3.2", series_number=2, rescale=(0.001, 0.0))
    code, _, err = run([*base, "--images", two, "--out", tmp_path / "o2"], capfd)
    assert code == 2 and "2 series: 1.2.3.1, 1.2.3.2" in err and "--series-uid" in err
    code, _, err = run([*base, "--images", two, "--series-uid", "9.9", "--out", tmp_path / "o3"], capfd)
    assert code == 2 and "series 9.9 is not in the folder" in err
    code, _, err = run([*base, "--images", two, "--series-uid", "1.2.3.2", "--out", tmp_path / "o4"], capfd)
    assert code == 0, err
    assert np.allclose(
        load_probability_map(tmp_path / "o4" / "probs" / "two.nii.gz").array, probabilities(2), atol=1e-4
    )
    nested = tmp_path / "cases"
    write_ct_series(nested / "a", probabilities(3), rescale=(0.001, 0.0))
    write_ct_series(nested / "b", probabilities(4), series_uid="1.2.3.4", rescale=(0.001, 0.0))
    write_ct_series(nested / "b", probabilities(5), series_uid="1.2.3.5", series_number=2, rescale=(0.001, 0.0))
    code, _, err = run([*base, "--images", nested, "--out", tmp_path / "o5"], capfd)
    assert code == 2 and "holds 2 series" in err and "one image series per case folder" in err
    code, _, err = run([*base, "--images", root / "dicom", "--series-uid", "1.2", "--out", tmp_path / "o6"], capfd)
    assert code == 2 and "one series folder" in err
    code, _, err = run([*base, "--images", root / "nifti", "--series-uid", "1.2", "--out", tmp_path / "o7"], capfd)
    assert code == 2 and "--series-uid applies to a DICOM series folder" in err
    assert not any((tmp_path / f"o{k}").exists() for k in (1, 2, 3, 5, 6, 7))


def test_calibrate_and_evaluate_on_probability_series_equal_their_nifti(setup, tmp_path, capsys):
    """``--probs`` holding one DICOM probability series per case folder (slope 1/1000) gives the same
    profile and evaluation, bit for bit, as the NIfTI export of the same series."""
    root = setup["root"]
    common = ["calibrate", "--method", "cls", "--epsilon", "0.2", "--alpha", "0.2", "--lesion-label", "1"]
    for kind in ("dicom", "nifti"):
        argv = [*common, "--probs", root / kind, "--labels", root / "labels", "--out", tmp_path / f"{kind}.json"]
        code, _, err = run(argv, capsys)
        assert code == 0, err
    dicom, nifti = load_profile(tmp_path / "dicom.json"), load_profile(tmp_path / "nifti.json")
    assert dicom.calibration.n == nifti.calibration.n == N_CASES
    assert dicom.calibration.probability_threshold == nifti.calibration.probability_threshold
    assert np.array_equal(dicom.summaries.values, nifti.summaries.values)
    assert np.array_equal(dicom.summaries.offsets, nifti.summaries.offsets)
    evaluate = ["evaluate", "--labels", root / "labels", "--lesion-label", "1", "--splits", "5", "--epsilon", "0.2"]
    for kind in ("dicom", "nifti"):
        code, _, err = run([*evaluate, "--probs", root / kind, "--out", tmp_path / f"eval_{kind}"], capsys)
        assert code == 0, err
    results = [json.loads((tmp_path / f"eval_{kind}" / "results.json").read_text()) for kind in ("dicom", "nifti")]
    assert results[0]["dataset"]["n_cases"] == N_CASES
    for key in ("dataset", "summary", "per_split", "per_case"):  # mL figures: NIfTI stores spacing as float32
        assert _close(results[0][key], results[1][key]), key


def _close(a, b) -> bool:
    """Equal, floats up to 1e-7 relative (the NIfTI export's float32 spacing against DICOM's decimal strings)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= 1e-7 * max(abs(a), abs(b))
    return a == b


def test_probability_series_refusals(setup, tmp_path, capfd):
    root = setup["root"]
    base = ["calibrate", "--method", "cls", "--epsilon", "0.2", "--alpha", "0.2", "--lesion-label", "1"]
    base += ["--labels", root / "labels"]
    hu = tmp_path / "hu"  # a CT series (HU through the usual -1024 intercept) given as probabilities
    for k in range(N_CASES):
        write_ct_series(hu / f"case{k:02d}", (probabilities(k) * 1000).astype(np.int16))
    code, _, err = run([*base, "--probs", hu, "--out", tmp_path / "o1.json"], capfd)
    assert code == 2 and "holds integers" in err and "case00" in err and "fractional RescaleSlope" in err
    percent = tmp_path / "percent"  # a fractional slope, but values in percent: out of [0, 1]
    for k in range(N_CASES):
        write_ct_series(percent / f"case{k:02d}", probabilities(k) * 100, rescale=(0.1, 0.0))
    code, _, err = run([*base, "--probs", percent, "--out", tmp_path / "o3.json"], capfd)
    assert code == 2 and "probability values range from" in err and "case00" in err
    two = tmp_path / "two"  # one case folder with two series
    write_ct_series(two / "case00", probabilities(0), series_uid="1.2.3.1", rescale=(0.001, 0.0))
    write_ct_series(two / "case00", probabilities(1), series_uid="1.2.3.2", series_number=2, rescale=(0.001, 0.0))
    code, _, err = run([*base, "--probs", two, "--out", tmp_path / "o2.json"], capfd)
    assert code == 2 and "holds 2 DICOM series" in err and "one probability series per case folder" in err
    assert not any((tmp_path / f"o{k}.json").exists() for k in (1, 2, 3))
