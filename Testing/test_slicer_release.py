"""Release checks of the Slicer module that run without Slicer.

* The version message: ``ConformalSeg.py`` parses with Python 3.9 grammar, imports nothing of
  ConformalSeg before its version check, and on Python 3.9 (Slicer 5.8) defines a module and a panel
  that show one message naming the Slicer it needs (loaded here with stand-in ``slicer`` modules).
* The profile drives inference: ``conformalseg infer --profile`` uses the recorded MC passes, flips and
  seed and refuses a model with another pipeline fingerprint (the library check of ``apply --image``);
  the panel shows the guarantee only when the map's run matches every loaded profile's record.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "ConformalSeg" / "ConformalSeg.py"


# ----------------------------------------------------------------------------- version message


def _statements_before_version_check(tree: ast.Module) -> list[ast.stmt]:
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.If) and "UNSUPPORTED" in ast.unparse(node.test):
            return tree.body[:i]
    raise AssertionError("ConformalSeg.py has no `if not UNSUPPORTED:` version check")


def test_module_file_parses_with_python39_grammar_and_imports_nothing_of_ours_before_the_check():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    imported = []
    for node in _statements_before_version_check(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
    ours = [name for name in imported if name.startswith("ConformalSeg")]
    assert not ours, f"imported before the version check: {ours}"
    # every file that could be imported before the check is stdlib or Slicer's: nothing more to parse
    assert {name.split(".")[0] for name in imported} <= {"os", "sys", "pathlib", "typing", "slicer"}


def _stand_in_slicer(monkeypatch) -> None:
    """Minimal ``slicer`` modules: enough to execute ConformalSeg.py's top level."""

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    slicer = types.ModuleType("slicer")
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    for name in ("Choice", "Decimals", "SingleStep", "WithinRange"):
        setattr(wrapper, name, lambda *args: None)
    wrapper.parameterNodeWrapper = lambda cls: cls
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    for module in (slicer, i18n, wrapper, scripted):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_on_python39_the_module_loads_and_shows_one_message(monkeypatch):
    _stand_in_slicer(monkeypatch)
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    spec = importlib.util.spec_from_file_location("ConformalSeg_py39", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "5.10" in module.UNSUPPORTED and "3.9" in module.UNSUPPORTED and "3.12" in module.UNSUPPORTED
    assert hasattr(module, "ConformalSegWidget") and not hasattr(module, "ConformalSegLogic")
    assert not hasattr(module, "Logic")  # the helpers were not imported
    parent = types.SimpleNamespace()
    module.ConformalSeg(parent)
    assert parent.helpText == module.UNSUPPORTED and parent.title == "ConformalSeg"


@pytest.mark.parametrize(
    ("version", "supported"), [((3, 9, 10), False), ((3, 11, 9), False), ((3, 12, 10), True), ((3, 13, 0), True)]
)
def test_version_message_only_below_python312(monkeypatch, version, supported):
    _stand_in_slicer(monkeypatch)
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))  # load the light branch only
    spec = importlib.util.spec_from_file_location("ConformalSeg_py39b", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.unsupportedMessage(version) == "") is supported


# ----------------------------------------------------------------------------- the profile drives inference

sys.path.insert(0, str(ROOT / "ConformalSeg"))
from ConformalSegSlicer import commands, fixtures, inference_check  # noqa: E402

RECORD = {"pipeline_sha256": "a" * 64, "mc_passes": 2, "tta_flips": 1, "seed": 5}


def test_profile_to_drive_and_guarantee_blocker():
    other = {**RECORD, "pipeline_sha256": "b" * 64}
    assert inference_check.profile_to_drive([("p.json", None), ("q.json", RECORD)]) == "q.json"
    assert inference_check.profile_to_drive([("p.json", None)]) is None
    with pytest.raises(ValueError, match="different inference pipelines"):
        inference_check.profile_to_drive([("p.json", RECORD), ("q.json", other)])
    run = inference_check.from_node_value(inference_check.node_value(RECORD))
    assert inference_check.guarantee_blocker([("p.json", RECORD)], run) == (None, None)
    for changed in (other, {**RECORD, "mc_passes": 0}, {**RECORD, "seed": 6}, {**RECORD, "tta_flips": 8}):
        blocker, _ = inference_check.guarantee_blocker([("p.json", RECORD)], changed)
        assert blocker and blocker.startswith("No guarantee") and "p.json" in blocker
    blocker, note = inference_check.guarantee_blocker([("p.json", None)], run)
    assert blocker is None and "precomputed" in note
    assert inference_check.guarantee_blocker([("p.json", RECORD)], None) == (None, None)  # a loaded map
    assert commands.infer_command("py", model="m", images="i", out_dir="o", profile="p.json")[-5:-3] == [
        "--profile",
        "p.json",
    ]


def test_infer_with_profile_uses_its_pipeline_and_refuses_another_model(tmp_path):
    reason = fixtures.tiny_model_unavailable_reason()
    if reason:
        pytest.skip(f"tiny model: {reason}")
    from ConformalSegLib.cli import main
    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.inference import resolve_model
    from ConformalSegLib.io.volumes import save_volume
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    right = fixtures.make_tiny_model(tmp_path / "right", seed=0)
    wrong = fixtures.make_tiny_model(tmp_path / "wrong", seed=1)
    record = {**RECORD, "pipeline_sha256": resolve_model(right).pipeline_sha256()}
    cases = list(make_cases(6, 3, shape=(16, 24, 24)))
    profile = calibrate(cases[:5], CalibrationRequest("cls", epsilon=0.1, alpha=0.2, provenance={"inference": record}))
    profile_path, _ = profile.save(tmp_path / "cls.json")
    image = tmp_path / "images" / f"{commands.INPUT_CASE_ID}.nrrd"
    save_volume(cases[5].image, cases[5].geometry, image)

    def infer(model, out, *extra):
        return main(
            ["infer", "--model", str(model), "--images", str(image), "--out", str(out), "--device", "cpu", *extra]
        )

    assert infer(wrong, tmp_path / "w", "--profile", str(profile_path)) == 2  # the library's fingerprint check
    assert not (tmp_path / "w" / "probs").exists()
    assert infer(right, tmp_path / "r", "--profile", str(profile_path), "--mc-dropout", "3") == 2  # conflicts
    assert infer(right, tmp_path / "r", "--profile", str(profile_path)) == 0
    run = inference_check.read_run_record(tmp_path / "r")
    assert run == inference_check.fingerprint(record)  # MC passes 2 and seed 5 came from the profile
    assert (tmp_path / "r" / "uncertainty" / f"{commands.INPUT_CASE_ID}_variance.nii.gz").is_file()
    assert inference_check.guarantee_blocker([(str(profile_path), record)], run) == (None, None)
    assert infer(right, tmp_path / "plain") == 0  # the panel's own settings (no MC): no guarantee shown
    blocker, _ = inference_check.guarantee_blocker(
        [(str(profile_path), record)], inference_check.read_run_record(tmp_path / "plain")
    )
    assert blocker is not None


def test_profile_with_a_subset_of_flips_drives_inference(tmp_path, capsys):
    """A profile calibrated on 4-flip TTA maps: ``infer --profile`` runs 4 flips, ``--tta 4`` agrees, ``--tta``
    (all 8) conflicts; the panel names the pipeline with its flip count."""
    from ConformalSegLib.cli import main
    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.inference import resolve_model
    from ConformalSegLib.io.volumes import save_volume
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    model = fixtures.make_tiny_model(tmp_path / "model", seed=0)
    record = {"pipeline_sha256": resolve_model(model).pipeline_sha256(), "mc_passes": 0, "tta_flips": 4, "seed": 0}
    cases = list(make_cases(6, 3, shape=(16, 24, 24)))
    profile = calibrate(cases[:5], CalibrationRequest("cls", epsilon=0.1, alpha=0.2, provenance={"inference": record}))
    profile_path, _ = profile.save(tmp_path / "cls.json")
    image = tmp_path / "images" / f"{commands.INPUT_CASE_ID}.nrrd"
    save_volume(cases[5].image, cases[5].geometry, image)
    base = ["infer", "--model", str(model), "--images", str(image), "--device", "cpu", "--profile", str(profile_path)]
    assert main([*base, "--out", str(tmp_path / "all"), "--tta"]) == 2
    assert "flips 4" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "r"), "--tta", "4"]) == 0
    run = inference_check.read_run_record(tmp_path / "r")
    assert run == inference_check.fingerprint(record) and run["tta_flips"] == 4
    assert "4 flips" in inference_check.describe(record)
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "bad"), "--tta", "9"])
    assert "--tta takes a number of flips from 2 to 8" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the panel's add-case command


def test_grown_profile_path_and_add_case_command_run_end_to_end(tmp_path):
    import subprocess

    import numpy as np

    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.conformal.profile import load_profile
    from ConformalSegLib.io.volumes import save_volume
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    cases = list(make_cases(7, 5, shape=(16, 20, 20)))
    request = CalibrationRequest("cls", epsilon=0.1, alpha=0.2)
    path, _ = calibrate(cases[:6], request).save(tmp_path / "cls.json")
    assert commands.grown_profile_path(path) == tmp_path / "cls_added1.json"
    assert commands.grown_profile_path(tmp_path / "cls_added1.json") == tmp_path / "cls_added2.json"
    assert commands.case_id_from_name("CT chest 1/2") == "CT_chest_1_2"
    case = cases[6]
    save_volume(case.probability.astype(np.float32), case.geometry, tmp_path / "p.nrrd")
    save_volume(case.lesion.astype(np.uint8), case.geometry, tmp_path / "l.nrrd")
    out = commands.grown_profile_path(path)
    argv = commands.add_case_command(
        sys.executable, profile=path, prob=tmp_path / "p.nrrd", label=tmp_path / "l.nrrd", out=out, case_id="rev1"
    )
    env = commands.child_environment(library_dir=ROOT)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown = load_profile(out)
    assert grown.summaries.case_ids[-1] == "rev1"
    assert grown.calibration == calibrate(cases[:6] + [case], request).calibration
    assert commands.grown_profile_path(path) == tmp_path / "cls_added2.json"  # the next free name


# ----------------------------------------------------------------------------- score maps off the GUI thread


def test_score_maps_come_from_a_child_process_and_equal_the_library(tmp_path):
    import subprocess

    import numpy as np

    from ConformalSegSlicer import score_maps
    from ConformalSegSlicer.slider import SliderState

    fixture = fixtures.make_slider_fixture(tmp_path / "fx", n_calibration=9, shape=(16, 24, 24))
    case = fixture.case
    paths = fixture.profile_paths
    state = SliderState.from_files(paths, case.probability, case.geometry, inline_scores=False)
    assert state.missing_scores() == ["distance:0.5"]
    settings = fixtures.SLIDER_CHECKS[0]
    result = state.update(settings)
    assert "Inner set" not in result.segments and "Outer set" not in result.segments
    assert any("background" in line for line in result.pending) and "background" in result.text
    assert "Lesion (FNR-controlled)" in result.segments  # the other segments are not held up

    names = state.missing_scores()
    score_maps.write_inputs(tmp_path / "work", state.probability, state.geometry)
    argv = score_maps.command(sys.executable, tmp_path / "work", names)
    done = subprocess.run(argv, env=commands.child_environment(library_dir=ROOT), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name, scores in score_maps.read_outputs(tmp_path / "work", names).items():
        state.set_scores(name, scores)
    assert state.missing_scores() == []
    result = state.update(settings)
    assert not result.pending
    expected = state.library_masks(settings)
    for name, mask in expected.items():
        assert np.array_equal(result.segments[name].mask, mask), name
    inline = SliderState.from_files(paths, case.probability, case.geometry)
    assert np.array_equal(inline.scores("distance:0.5"), state.scores("distance:0.5"))


# ----------------------------------------------------------------------------- dependencies (D6)


def test_requirement_groups_and_constraints(tmp_path):
    from ConformalSegSlicer import environment

    path = ROOT / "ConformalSeg" / "Resources" / "requirements.txt"
    names = lambda reqs: {environment.canonical(environment.requirement_name(r)) for r in reqs}  # noqa: E731
    base = names(environment.read_requirements(path, ()))
    assert base == {"slicerio", "tqdm", "nibabel"}
    assert names(environment.read_requirements(path, ("inference",))) == base | {"monai"}
    assert names(environment.read_requirements(path, ("evaluation",))) == base | {"matplotlib"}
    assert "cvxpy" in names(environment.read_requirements(path))  # every group when asked for all
    versions = {"numpy": "1.26.4", "torch": "2.4.1+cu121", "SimpleITK": None, "scipy": "1.13.1", "vtk": None}
    text = environment.constraints(versions.get)
    assert text.splitlines() == ["numpy==1.26.4", "scipy==1.13.1", "torch==2.4.1+cu121"]


def test_scene_interval_length_has_no_inf():
    import numpy as np

    from ConformalSegSlicer import display

    length = np.array([[[0.5, np.inf, 2.0]]], dtype=np.float32)
    scene = display.scene_interval_length(length)
    assert np.isfinite(scene).all() and scene[0, 0, 1] == 4.0 and scene[0, 0, 0] == 0.5
    assert np.isinf(length[0, 0, 1])  # the library's array is not changed
    assert display.scene_interval_length(np.full((1, 1, 2), np.inf)).tolist() == [[[1.0, 1.0]]]
    finite = np.ones((1, 1, 2))
    assert display.scene_interval_length(finite) is finite
    assert np.isfinite(display.overlay_display("interval", 0.0, 2.0).upper_threshold)


# ----------------------------------------------------------------------------- cancel does not block (D13)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cancel_returns_at_once_even_when_the_child_ignores_sigterm():
    import time

    from ConformalSegSlicer.process import ProcessRunner

    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    )
    runner = ProcessRunner([sys.executable, "-c", code], grace=1.5).start()
    deadline = time.monotonic() + 30
    while "up" not in runner.output and time.monotonic() < deadline:
        runner.wait(timeout=0.1)
    started = time.monotonic()
    runner.cancel()
    assert time.monotonic() - started < 0.5  # the GUI thread is not held for the grace period
    assert runner.wait(timeout=20) is not None and runner.cancelled


# ----------------------------------------------------------------------------- lesion-level and slider-safe


def test_lesion_level_and_slider_safe_in_the_slider(tmp_path):
    import numpy as np

    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.conformal.cls import apply_threshold
    from ConformalSegLib.io.segmentation import LESION_FNR, LESION_LEVEL
    from ConformalSegLib.phantoms.simulated_maps import make_cases
    from ConformalSegSlicer import segments
    from ConformalSegSlicer.slider import FIXED_PREFIX, SliderSettings, SliderState, grid_epsilon, relevant_sliders

    cases = list(make_cases(41, 21, shape=(16, 24, 24)))
    cls = calibrate(cases[:40], CalibrationRequest("cls", epsilon=0.1, alpha=0.2))
    lesion = calibrate(cases[:40], CalibrationRequest("lesion", epsilon=0.2, alpha=0.2, voxel_epsilon=0.3))
    test = cases[40]
    state = SliderState([cls, lesion], test.probability, test.geometry)
    assert relevant_sliders([lesion]) == {"epsilon", "alpha"}
    assert LESION_LEVEL in segments.SEGMENT_ORDER
    fixed = state.update(SliderSettings(epsilon=0.2, alpha=0.2))
    expected = lesion.recalibrate(epsilon=0.2, alpha=0.2).masks(test.probability, test.geometry)[LESION_LEVEL]
    assert np.array_equal(fixed.segments[LESION_LEVEL].mask, expected)
    assert all(g.startswith(FIXED_PREFIX) for g in fixed.guarantees)
    safe = state.update(SliderSettings(epsilon=0.205, alpha=0.2, slider_safe=True))  # between two grid stops
    for profile, name in ((cls, LESION_FNR), (lesion, LESION_LEVEL)):
        band = profile.slider_band(alpha=0.2)
        assert grid_epsilon(0.205, band.grid) == 0.2
        assert np.array_equal(safe.segments[name].mask, apply_threshold(test.probability, band.threshold(0.2)))
    assert all(g.startswith("Slider-safe") and "Now at epsilon = 20%" in g for g in safe.guarantees)
    for name, mask in state.library_masks(SliderSettings(epsilon=0.205, alpha=0.2, slider_safe=True)).items():
        assert np.array_equal(safe.segments[name].mask, mask)
    # the band is at least as conservative as the fixed threshold at the same epsilon
    assert safe.segments[LESION_FNR].voxels >= state.update(SliderSettings(0.2, 0.2)).segments[LESION_FNR].voxels


def test_terminology_context_contains_the_code():
    """SCT 108369006 "Neoplasm" is in Slicer's DICOM master list, not in the General Anatomy list (D17)."""
    from ConformalSegLib.io.segmentation import LESION_FNR
    from ConformalSegSlicer import segments

    text = segments.terminology_string(LESION_FNR)
    assert text.startswith("Segmentation category and type - DICOM master list~")
    assert "SCT^108369006^Neoplasm" in text


def test_grid_check_of_the_probability_map_against_the_ct():
    from ConformalSegLib.common.geometry import Geometry
    from ConformalSegSlicer import spatial

    ct = Geometry(shape=(10, 20, 20), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    assert spatial.grid_check(ct, ct) == (None, None)
    finer = Geometry(shape=(20, 40, 40), spacing=(0.5, 0.5, 1.0), origin=(-0.25, -0.25, -0.5))
    warning, error = spatial.grid_check(ct, finer)
    assert error is None and "not on the input volume's grid" in warning
    far = Geometry(shape=(10, 20, 20), spacing=(1.0, 1.0, 2.0), origin=(500.0, 0.0, 0.0))
    warning, error = spatial.grid_check(ct, far)
    assert warning is None and "does not overlap" in error
    low, high = spatial.world_bounds(ct)
    assert high[2] - low[2] == 20.0  # 10 slices of 2 mm


# ----------------------------------------------------------------------------- sample data (D7)


def test_sample_data_is_built_once_and_drives_every_panel_section(tmp_path):
    import time

    from ConformalSegLib.conformal.profile import load_profile
    from ConformalSegLib.io.volumes import load_image, load_probability_map
    from ConformalSegSlicer import sample_data
    from ConformalSegSlicer.slider import SliderSettings, SliderState

    t0 = time.perf_counter()
    from ConformalSegLib.common.shipped_models import LESION_MODEL, shipped_model

    paths = sample_data.make_sample(tmp_path / "sample", model=shipped_model(LESION_MODEL))
    built = time.perf_counter() - t0
    assert paths.model is not None and (paths.model / "model_card.json").is_file()
    stamp = paths.cls_profile.stat().st_mtime_ns
    assert sample_data.make_sample(tmp_path / "sample").cls_profile == paths.cls_profile
    assert paths.cls_profile.stat().st_mtime_ns == stamp  # reused, not rebuilt
    image, probability = load_image(paths.image), load_probability_map(paths.probability)
    assert image.geometry.mismatch(probability.geometry) is None
    import numpy as np

    from ConformalSegLib.io.dicom_series import load_image_input

    series = load_image_input(paths.dicom)  # the Reference DICOM series the panel is given
    assert series.geometry.mismatch(image.geometry) is None and np.array_equal(series.array, np.rint(image.array))
    profiles = [load_profile(paths.cls_profile), load_profile(paths.sets_profile)]
    assert [p.method for p in profiles] == ["cls", "sets"] and profiles[0].summaries.n == sample_data.N_CALIBRATION
    state = SliderState(profiles, probability.array, probability.geometry)
    result = state.update(SliderSettings(epsilon=0.1, alpha=0.1, alpha_inner=0.1, alpha_outer=0.1, slider_safe=True))
    assert not result.has_warning and {"Lesion (FNR-controlled)", "Inner set", "Outer set"} <= set(result.segments)
    assert built < 60


def test_every_combo_choice_has_a_readable_label():
    import re

    from ConformalSegSlicer import display

    source = MODULE_FILE.read_text(encoding="utf-8")
    methods = re.search(r"calibrationMethod: Annotated\[str, Choice\((\[[^\]]*\])\)\]", source).group(1)
    assert set(commands.METHOD_LABELS) == set(ast.literal_eval(methods))
    scores = re.search(r"calibrationScore: Annotated\[str, Choice\((\[[^\]]*\])\)\]", source).group(1)
    assert list(commands.SCORE_LABELS) == ast.literal_eval(scores)
    assert set(display.OVERLAY_LABELS) == set(display.OVERLAYS)
    labels = {**commands.METHOD_LABELS, **commands.SCORE_LABELS, **display.OVERLAY_LABELS}
    assert all(label != key for key, label in labels.items())


def test_run_device_read_from_the_childs_report(tmp_path):
    import json

    (tmp_path / "inference.json").write_text(json.dumps({"device": "cuda:0", **RECORD}))
    assert inference_check.read_run_device(tmp_path) == "cuda:0"
    assert inference_check.read_run_record(tmp_path) == inference_check.fingerprint(RECORD)
    assert inference_check.read_run_device(tmp_path / "missing") is None


def test_extension_index_metadata_points_at_files_of_this_repository():
    """D7: the EXTENSION_* values are in the Extensions Index format (contributors "Name (Affiliation)", a
    comma-separated list); the icon and screenshot URLs name files that exist here (the icon a 128x128
    PNG); the screenshot is declared an offscreen panel render until a real Slicer screenshot replaces it."""
    import re
    import struct

    code = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    values = dict(re.findall(r'set\((\w+) "([^"]*)"\)', code))
    raw = values["CONFORMALSEG_RAW"]
    assert raw.startswith("https://raw.githubusercontent.com/") and raw.endswith("/main")
    assert values["EXTENSION_HOMEPAGE"].startswith("${CONFORMALSEG_REPOSITORY}")
    assert values["CONFORMALSEG_REPOSITORY"].startswith("https://github.com/")
    person = r"[^(),]+ \([^()]+\)"
    assert re.fullmatch(rf"{person}(, {person})*", values["EXTENSION_CONTRIBUTORS"])
    files = {}
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = values[key].replace("${CONFORMALSEG_RAW}", raw)
        assert url.startswith(raw + "/"), key
        files[key] = ROOT / url[len(raw) + 1 :]
        assert files[key].is_file(), (key, files[key])
    for path in files.values():
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", files["EXTENSION_ICONURL"].read_bytes()[16:24])
    assert (width, height) == (128, 128)  # the Extensions Index's icon size
    note = (files["EXTENSION_SCREENSHOTURLS"].parent / "README.md").read_text(encoding="utf-8")
    assert "offscreen render" in note and "not a Slicer screenshot" in note
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "rendered offscreen" in readme.split("## The 3D Slicer module", 1)[1].split("\n\n", 3)[2]


def test_self_test_skips_are_unittest_skips_and_its_class_is_collected_once():
    """ctest ``py_ConformalSeg`` runs ``slicer.testing.runUnitTest``: unittest's loader takes every TestCase
    class in ConformalSeg.py's namespace and runs each ``test_*`` method on its own. So the base class must
    not be imported by name (it would run again, with the bare Logic), and a missing dependency must raise
    ``unittest.SkipTest`` (reported as a skip there; :meth:`runTest`, used by Reload & Test and
    ``slicer.selfTests``, catches it and lists it in its summary line)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "SelfTest" not in imported and "self_test" in imported
    source = (ROOT / "ConformalSeg" / "ConformalSegSlicer" / "self_test.py").read_text(encoding="utf-8")
    methods = {
        n.name: ast.get_source_segment(source, n) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)
    }
    assert "self.skipTest(reason)" in methods["_skip"]
    assert "except unittest.SkipTest" in methods["runTest"] and "skipped" in methods["runTest"]
    tests = [name for name in methods if name.startswith("test_")]
    assert all(name in methods["runTest"] for name in tests)  # runTest runs every test method
