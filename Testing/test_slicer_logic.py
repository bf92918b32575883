"""The Slicer module's Slicer-free logic (``ConformalSeg/ConformalSegSlicer``), tested without Slicer.

Covers the out-of-process runner (progress parsing, callbacks, cancellation killing the whole
process tree), the CLI command lines run end to end, the slider path (masks equal the library's for
every setting, only moved thresholds recompute, guarantee and too-small warning), RAS <-> LPS
geometry against SimpleITK and nibabel, segment metadata, overlays, the evaluation plots, the
environment helpers, and the sem-CRC section (segments matched to a profile's organs, the organ label
map, the library's ``apply_interval`` through it, the table and status text).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ConformalSeg"))

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.conformal.profile import LESION_CRC, load_profile  # noqa: E402
from ConformalSegLib.io.segmentation import INNER_SET, LESION_FNR, LESION_THRESHOLD, OUTER_SET  # noqa: E402
from ConformalSegSlicer import commands, display, environment, evaluation_plots, fixtures, intervals, segments, spatial  # noqa: E402
from ConformalSegSlicer.process import (  # noqa: E402
    ProcessRunner,
    Progress,
    StagedProgress,
    kill_process_tree,
    parse_progress,
    pid_alive,
    popen_group_options,
    split_lines,
)
from ConformalSegSlicer.slider import (  # noqa: E402
    SliderSettings,
    SliderState,
    greater_than,
    initial_settings,
    relevant_sliders,
    snap,
    validate_probability,
)

PY = sys.executable


def child_env():
    return commands.child_environment(library_dir=ROOT)


# ----------------------------------------------------------------------------- progress parsing


@pytest.mark.parametrize(
    "line, fraction, label",
    [
        ("PROGRESS 0.25 windows", 0.25, "windows"),
        ("progress: 40% case 3", 0.4, "case 3"),
        ("calibrating:  45%|####5     | 9/20 [00:01<00:02,  6.1case/s, synth_009]", 0.45, "calibrating"),
        (
            "pass 1/2: case statistics:  40%|####      | 4/10 [00:01<00:02,  3.00case/s]",
            0.4,
            "pass 1/2: case statistics",
        ),
        ("inference: 100%|##########| 1/1 [00:03<00:00,  3.2s/case]", 1.0, "inference"),
        ("calibration splits:  33%|###3      | 33/100 [00:00<00:00]", 0.33, "calibration splits"),
        ("weird:  50%|#####     |", 0.5, "weird"),
        ("[model] 3/12 windows", 0.25, "model"),
    ],
)
def test_parse_progress(line, fraction, label):
    progress = parse_progress(line)
    assert progress is not None
    assert progress.fraction == pytest.approx(fraction)
    assert progress.label == label


@pytest.mark.parametrize("line", ["wrote 3 files", "pass 1/2 done", "error: bad file", "epsilon 0.1/alpha 0.2", ""])
def test_lines_that_are_not_progress(line):
    assert parse_progress(line) is None


def test_staged_progress_is_monotone_over_the_evaluate_bars():
    staged = StagedProgress(commands.progress_stages("evaluate"))
    labels = commands.progress_stages("evaluate")
    assert len(labels) == 3
    values = [
        staged.overall(Progress(0.5, labels[0])),
        staged.overall(Progress(0.0, labels[1])),
        staged.overall(Progress(1.0, labels[1])),
        staged.overall(Progress(0.1, "something else")),
        staged.overall(Progress(1.0, labels[2])),
    ]
    assert values == pytest.approx([1 / 6, 1 / 3, 2 / 3, 2 / 3, 1.0])
    assert StagedProgress().overall(Progress(0.3)) == pytest.approx(0.3)


def test_split_lines_handles_carriage_returns():
    assert split_lines("a\rb\r\nc\nd") == (["a", "b", "c"], "d")
    assert split_lines("") == ([], "")


# ----------------------------------------------------------------------------- the runner


def test_runner_delivers_output_progress_and_exit_status(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        print("hello", flush=True)
        for i in range(1, 5):
            sys.stderr.write(f"\\rwork: {25 * i:3d}%|##| {i}/4 [00:00<00:00]"); sys.stderr.flush(); time.sleep(0.02)
        sys.stderr.write("\\n")
        print("caf\\u00e9 done", flush=True)
        sys.exit(3)
    """)
    events = []
    runner = ProcessRunner(
        [PY, "-c", script],
        on_output=lambda line: events.append(("out", line)),
        on_progress=lambda f, label: events.append(("progress", round(f, 2), label)),
        on_finished=lambda code, cancelled: events.append(("finished", code, cancelled)),
    )
    assert not runner.started and not runner.poll()
    runner.start()
    assert runner.wait(timeout=60) == 3
    assert events[0] == ("out", "hello")
    assert [e for e in events if e[0] == "progress"] == [("progress", v, "work") for v in (0.25, 0.5, 0.75, 1.0)]
    assert ("out", "café done") in events
    assert events[-1] == ("finished", 3, False) and events.count(events[-1]) == 1
    assert runner.output == ["hello", "café done"] and runner.finished and not runner.running
    assert not runner.poll()  # finished is reported once
    with pytest.raises(RuntimeError):
        runner.start()


GRANDCHILD = textwrap.dedent("""
    import signal, subprocess, sys, time
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN) if {ignore} else None; time.sleep(300)"
    child = subprocess.Popen([sys.executable, "-c", code])
    print("CHILD", child.pid, flush=True)
    time.sleep(300)
""")


@pytest.mark.parametrize("ignore_sigterm", [False, True])
def test_cancel_kills_the_whole_process_tree(ignore_sigterm):
    if ignore_sigterm and os.name == "nt":
        pytest.skip("SIGTERM semantics are POSIX")
    finished = []
    runner = ProcessRunner(
        [PY, "-c", GRANDCHILD.replace("{ignore}", str(ignore_sigterm))],
        grace=0.5,
        on_finished=lambda code, cancelled: finished.append((code, cancelled)),
    ).start()
    for _ in range(400):
        runner.poll()
        if any(line.startswith("CHILD") for line in runner.output):
            break
        runner.wait(timeout=0.05)
    child = int(next(line for line in runner.output if line.startswith("CHILD")).split()[1])
    assert pid_alive(child)
    runner.cancel()
    assert runner.wait(timeout=30) is not None
    assert finished and finished[0][1] is True and runner.cancelled
    assert not pid_alive(child, timeout=10), "the grandchild survived the cancel"
    runner.cancel()  # no-op once finished


def test_kill_process_tree_on_an_exited_process_is_harmless():
    import subprocess

    proc = subprocess.Popen([PY, "-c", "pass"], **popen_group_options())
    proc.wait()
    assert kill_process_tree(proc, grace=0.1) == 0


def test_popen_is_injectable():
    calls = []

    class FakePopen:
        def __init__(self, argv, **kwargs):
            import io

            calls.append((argv, kwargs))
            self.stdout = io.BytesIO(b"PROGRESS 0.5 half\nline\n")
            self.pid, self.returncode = 12345, None

        def poll(self):
            self.returncode = 0
            return 0

    got = []
    runner = ProcessRunner(
        ["x", "y"], popen=FakePopen, on_progress=lambda f, label: got.append((f, label)), on_output=got.append
    ).start()
    assert runner.wait(timeout=10) == 0
    assert got == [(0.5, "half"), "line"]
    argv, kwargs = calls[0]
    assert argv == ["x", "y"] and kwargs["stderr"] is not None
    assert ("start_new_session" in kwargs) or ("creationflags" in kwargs)


# ----------------------------------------------------------------------------- command lines


def test_child_environment_puts_the_library_first():
    env = commands.child_environment({"PYTHONPATH": os.pathsep.join(["/a", str(ROOT)]), "X": "1"}, library_dir=ROOT)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/a"]
    assert env["X"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert commands.library_root() == ROOT


def test_find_python_slicer(tmp_path):
    assert commands.find_python_slicer(lambda name: "/opt/Slicer/bin/PythonSlicer") == "/opt/Slicer/bin/PythonSlicer"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "PythonSlicer").write_text("")
    assert commands.find_python_slicer(lambda name: None, slicer_home=tmp_path) == str(
        tmp_path / "bin" / "PythonSlicer"
    )
    assert commands.find_python_slicer(lambda name: None, fallback="py") == "py"


def test_command_lines():
    argv = commands.infer_command(
        "PythonSlicer", model="m", images="i.nii.gz", out_dir="o", mc_dropout=4, device="cuda"
    )
    assert argv == [
        "PythonSlicer",
        "-m",
        "ConformalSegLib",
        "infer",
        "--model",
        "m",
        "--images",
        "i.nii.gz",
        "--out",
        "o",
        "--mc-dropout",
        "4",
        "--device",
        "cuda",
        "--force",
    ]
    with pytest.raises(ValueError):
        commands.infer_command("p", model="m", images="i", out_dir="o", device="gpu")
    cls = commands.calibrate_command(
        "p", data_dir="d", method="cls", out_profile="o.json", lesion_labels=2, epsilon=0.1, alpha=0.2
    )
    assert cls[3:] == [
        "calibrate",
        "--data",
        "d",
        "--lesion-label",
        "2",
        "--method",
        "cls",
        "--epsilon",
        "0.1",
        "--alpha",
        "0.2",
        "--out",
        "o.json",
    ]
    sets = commands.calibrate_command(
        "p", data_dir="d", method="sets", out_profile="o.json", alpha_inner=0.05, alpha_outer=0.1, force=True
    )
    assert "--alpha-inner" in sets and "--epsilon" not in sets and sets[-1] == "--force"
    margin = commands.calibrate_command(
        "p", data_dir="d", method="crc", out_profile="o.json", epsilon=0.1, score="margin:0.5"
    )
    assert margin[margin.index("--score") + 1] == "margin:0.5" and margin[-2:] == ["--out", "o.json"]
    sets_margin = commands.calibrate_command(
        "p", data_dir="d", method="sets", out_profile="o.json", alpha_inner=0.1, alpha_outer=0.1, score="margin:0.5"
    )
    assert "--score" not in sets_margin and "--score" not in cls  # sets choose their own transforms
    from ConformalSegLib.conformal.threshold_scores import parse_threshold_score

    for score in commands.SCORE_LABELS:  # every panel choice is a canonical `calibrate --score` name
        assert parse_threshold_score(score).name == score
        argv = commands.calibrate_command("p", data_dir="d", method="cls", out_profile="o", epsilon=0.1, alpha=0.1,
                                          score=score)  # fmt: skip
        assert ("--score" in argv) == (score != "identity")
    with pytest.raises(ValueError, match="score must be one of"):
        commands.calibrate_command("p", data_dir="d", method="cls", out_profile="o", epsilon=0.1, alpha=0.1, score="x")
    ev = commands.evaluate_command("p", data_dir="d", out_dir="o", splits=7, epsilon=0.123, alpha=0.07)
    eps = ev[ev.index("--epsilons") + 1 : ev.index("--alphas")]
    assert "0.123" in eps and ev[ev.index("--main-alpha") + 1] == "0.07" and "--no-hd95" in ev
    with pytest.raises(ValueError):
        commands.evaluate_command("p", data_dir="d", out_dir="o", splits=0)
    with pytest.raises(ValueError):
        commands.calibrate_command(
            "p", data_dir="d", method="cls", out_profile="o", lesion_labels=0, epsilon=0.1, alpha=0.1
        )


def test_find_inference_outputs(tmp_path):
    assert commands.find_inference_outputs(tmp_path) == commands.InferenceOutputs(None, None)
    (tmp_path / "probs").mkdir()
    (tmp_path / "uncertainty").mkdir()
    (tmp_path / "probs" / "scan.nii.gz").write_text("")
    (tmp_path / "uncertainty" / "scan_variance.nii.gz").write_text("")
    found = commands.find_inference_outputs(tmp_path)  # renamed case: the only map is taken
    assert found.probability.name == "scan.nii.gz" and found.variance.name == "scan_variance.nii.gz"
    (tmp_path / "probs" / "input.nii.gz").write_text("")
    found = commands.find_inference_outputs(tmp_path)
    assert found.probability.name == "input.nii.gz" and found.variance is None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

    root = tmp_path_factory.mktemp("slicer_cli") / "data"
    write_synthetic_dataset(root, 14, seed=3, shape=(20, 40, 40))
    return root


def _run(argv, stages=()):
    progress = []
    runner = ProcessRunner(
        argv, env=child_env(), cwd=str(ROOT), stages=stages, on_progress=lambda f, label: progress.append(f)
    )
    runner.start()
    code = runner.wait(timeout=600)
    assert code == 0, "\n".join(runner.output[-30:])
    return runner, progress


def test_calibrate_and_evaluate_run_out_of_process(dataset, tmp_path):
    profile_path = tmp_path / "cls.json"
    argv = commands.calibrate_command(
        PY, data_dir=dataset, method="cls", out_profile=profile_path, lesion_labels=2, epsilon=0.2, alpha=0.25
    )
    runner, progress = _run(argv, commands.progress_stages("calibrate"))
    assert progress and progress[-1] == pytest.approx(1.0) and progress == sorted(progress)
    profile = load_profile(profile_path)
    assert profile.method == "cls" and profile.calibration.epsilon == 0.2
    assert any("With probability at least 75%" in line for line in runner.output)
    argv = commands.calibrate_command(
        PY, data_dir=dataset, method="cls", out_profile=tmp_path / "margin.json", lesion_labels=2, epsilon=0.2,
        alpha=0.25, score="margin:0.5",
    )  # fmt: skip
    runner, _ = _run(argv, commands.progress_stages("calibrate"))
    assert load_profile(tmp_path / "margin.json").score == "margin:0.5"
    assert any("thresholds the margin:0.5 score" in line for line in runner.output)

    out = tmp_path / "evaluation"
    argv = commands.evaluate_command(
        PY, data_dir=dataset, out_dir=out, lesion_labels=2, splits=6, epsilon=0.15, alpha=0.2
    )
    runner, progress = _run(argv, commands.progress_stages("evaluate"))
    assert progress[-1] == pytest.approx(1.0) and progress == sorted(progress)
    results = evaluation_plots.load_results(out)  # a folder means its results.json
    curves = evaluation_plots.alpha_curves(results, 0.16)
    assert curves.epsilon == pytest.approx(0.15) and curves.splits == 6 and curves.n_cases == 14
    assert list(curves.alphas) == sorted(commands.evaluation_grid(commands.EVALUATION_ALPHAS, 0.2))
    assert np.all((curves.ecr >= 0) & (curves.ecr <= 1))
    columns = evaluation_plots.table_columns(curves)
    assert len({len(v) for v in columns.values()}) == 1 and list(columns)[0] == "alpha"
    assert np.allclose(columns["target 1-alpha"], 1 - curves.alphas)
    ecr, pc = curves.at(0.2)
    row = list(curves.alphas).index(0.2)
    assert ecr == pytest.approx(curves.ecr[row]) and pc == pytest.approx(curves.pc[row])
    marker = evaluation_plots.marker_columns(curves, 0.175)
    assert marker["ECR"][0] == pytest.approx(np.interp(0.175, curves.alphas, curves.ecr))


def test_evaluation_results_errors(tmp_path):
    with pytest.raises(ConformalSegError, match="not found"):
        evaluation_plots.load_results(tmp_path / "missing.json")
    bad = tmp_path / "results.json"
    bad.write_text("{")
    with pytest.raises(ConformalSegError, match="valid"):
        evaluation_plots.load_results(bad)
    bad.write_text("{}")
    with pytest.raises(ConformalSegError, match="summary"):
        evaluation_plots.load_results(bad)
    with pytest.raises(ConformalSegError, match="CLS"):
        evaluation_plots.alpha_curves({"summary": [], "config": {}}, 0.1)


# ----------------------------------------------------------------------------- geometry


def test_ras_lps_geometry_matches_simpleitk_and_nibabel(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    from ConformalSegLib.io.volumes import geometry_from_sitk

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    image = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.float32))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-12.0, 30.5, 7.25))
    image.SetDirection(tuple(q.reshape(-1)))
    geometry = geometry_from_sitk(image)
    ijk_to_ras = spatial.ijk_to_ras_from_geometry(geometry)
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        x, y, z = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose((ijk_to_ras @ [*index, 1.0])[:3], [-x, -y, z])
        assert np.allclose(spatial.lps_to_ras((x, y, z)), [-x, -y, z])
    back = spatial.geometry_from_ijk_to_ras(ijk_to_ras, (5, 6, 7))
    assert geometry.mismatch(back) is None and back.shape == (5, 6, 7)
    # NIfTI stores RAS: nibabel's affine is Slicer's IJK-to-RAS
    path = tmp_path / "g.nii.gz"
    sitk.WriteImage(image, str(path))
    assert np.allclose(nib.load(str(path)).affine, ijk_to_ras, atol=1e-4)
    with pytest.raises(ValueError):
        spatial.geometry_from_ijk_to_ras(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError):
        spatial.geometry_from_ijk_to_ras(np.eye(3), (1, 1, 1))


# ----------------------------------------------------------------------------- slider path


@pytest.fixture(scope="module")
def slider_fixture(tmp_path_factory):
    return fixtures.make_slider_fixture(tmp_path_factory.mktemp("slider"))


@pytest.fixture()
def state(slider_fixture):
    return SliderState.from_files(
        slider_fixture.profile_paths, slider_fixture.case.probability, slider_fixture.case.geometry
    )


def _assert_library_equal(state, settings):
    result = state.update(settings)
    expected = state.library_masks(settings)
    assert set(result.segments) == set(expected)
    for name, mask in expected.items():
        assert np.array_equal(result.segments[name].mask, mask), name
        assert result.segments[name].voxels == int(mask.sum())
    return result


def test_slider_masks_equal_the_library_for_many_settings(state):
    rng = np.random.default_rng(1)
    settings = list(fixtures.SLIDER_CHECKS) + [
        SliderSettings(*rng.uniform(0.01, 0.6, 4), include_threshold=bool(rng.integers(2))) for _ in range(25)
    ]
    for s in settings:
        _assert_library_equal(state, s)


def test_only_moved_thresholds_recompute(state):
    first = state.update(SliderSettings(0.1, 0.2, 0.2, 0.2))
    assert set(first.changed) == {LESION_FNR, LESION_CRC, INNER_SET, OUTER_SET}
    again = state.update(SliderSettings(0.1, 0.2, 0.2, 0.2))
    assert again.changed == []
    inner_only = state.update(SliderSettings(0.1, 0.2, 0.05, 0.2))
    assert inner_only.changed in ([INNER_SET], [])
    lesion = state.update(SliderSettings(0.1, 0.5, 0.05, 0.2, include_threshold=True))
    assert LESION_CRC not in lesion.changed and LESION_THRESHOLD in lesion.changed
    assert state.update(SliderSettings(0.1, 0.5, 0.05, 0.2, include_threshold=True)).changed == []


def test_guarantee_text_and_too_small_warning(state, slider_fixture):
    result = _assert_library_equal(state, SliderSettings(0.1, 0.2, 0.2, 0.2))
    assert not result.has_warning
    assert result.guarantees[0].startswith(
        "(epsilon and alpha fixed before viewing this scan) With probability at least 80%, at most 10% of the lesion"
    )
    assert "calibrated on 19 scans" in result.guarantees[0]
    assert len(result.guarantees) == 3 and result.text.count("\n") == 2
    small = _assert_library_equal(state, SliderSettings(0.1, 0.04, 0.2, 0.2))
    assert small.has_warning and "too few for alpha = 0.04" in small.text and "at least 24" in small.text
    assert small.segments[LESION_FNR].voxels == slider_fixture.case.probability.size  # the whole image
    sets = _assert_library_equal(state, SliderSettings(0.1, 0.2, 0.01, 0.2))
    assert sets.has_warning and sets.segments[INNER_SET].voxels == 0


def test_impossible_setting_gives_the_trivial_mask_with_a_warning(state, slider_fixture):
    state.update(SliderSettings(0.1, 0.2, 0.2, 0.2))
    zero = state.update(SliderSettings(0.0, 0.2, 0.2, 0.2))  # expected-FNR control needs epsilon > 0
    assert zero.has_warning and not zero.errors
    assert any("needs epsilon > 0" in g for g in zero.guarantees)
    assert zero.segments[LESION_CRC].voxels == slider_fixture.case.probability.size  # the whole image, as the CLI
    assert zero.segments[LESION_FNR].changed  # CLS at epsilon = 0 is valid


def test_slider_values_are_snapped_to_the_displayed_decimals(state):
    assert snap(0.30000000000000004) == 0.3 and snap(0.1234) == 0.123
    a = state.update(SliderSettings(0.30000000000000004, 0.1, 0.2, 0.2))
    assert a.guarantees[0] == state.update(SliderSettings(0.3, 0.1, 0.2, 0.2)).guarantees[0]
    assert "at most 30%" in a.guarantees[0]


def test_initial_settings_reproduce_the_calibrated_profiles(slider_fixture):
    profiles = [load_profile(p) for p in slider_fixture.profile_paths]
    settings = initial_settings(profiles)
    assert settings == SliderSettings(0.1, 0.2, 0.2, 0.2)
    state = SliderState(profiles, slider_fixture.case.probability, slider_fixture.case.geometry)
    result = state.update(settings)
    for profile in profiles:
        assert any(g.endswith(profile.guarantee) for g in result.guarantees)  # after the fixed-values label
    assert relevant_sliders(profiles) == {"epsilon", "alpha", "alphaInner", "alphaOuter"}
    assert relevant_sliders(profiles[1:2]) == {"epsilon"}
    assert relevant_sliders(profiles[2:]) == {"alphaInner", "alphaOuter"}


def test_joint_max_sets_follow_the_alpha_slider(tmp_path, slider_fixture):
    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    cases = list(make_cases(12, 4, shape=(20, 32, 32)))
    profile = calibrate(cases, CalibrationRequest("sets", alpha=0.2, joint="max"))
    state = SliderState([profile], cases[0].probability, cases[0].geometry)
    assert relevant_sliders([profile]) == {"alpha"} and initial_settings([profile]).alpha == 0.2
    a = _assert_library_equal(state, SliderSettings(alpha=0.2))
    b = _assert_library_equal(state, SliderSettings(alpha=0.3, alpha_inner=0.01))
    assert a.segments[OUTER_SET].voxels >= b.segments[OUTER_SET].voxels


def test_slider_state_rejects_bad_input(slider_fixture):
    case = slider_fixture.case
    profiles = [load_profile(p) for p in slider_fixture.profile_paths]
    with pytest.raises(ConformalSegError, match="no calibration profile"):
        SliderState([], case.probability, case.geometry)
    with pytest.raises(ConformalSegError, match="same segment"):
        SliderState(profiles[:1] * 2, case.probability, case.geometry)
    with pytest.raises(ConformalSegError, match="integer"):
        validate_probability(case.lesion.astype(np.int16))
    with pytest.raises(ConformalSegError, match="outside"):
        validate_probability(case.image)  # the CT, not probabilities
    nan = case.probability.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ConformalSegError, match="NaN"):
        validate_probability(nan)
    with pytest.raises(ConformalSegError, match="3D"):
        validate_probability(case.probability[0])
    with pytest.raises(ValueError, match="shape"):
        SliderState(profiles, case.probability, Geometry((1, 2, 3)))


def test_greater_than_is_exact_at_float32_ties():
    from ConformalSegLib.conformal.confidence_sets import _greater  # the library's own rule, for comparison

    values = np.array([0.1, np.nextafter(np.float32(0.1), 1), 0.5, 1.0, 0.0], dtype=np.float32)
    out = np.empty(values.shape, bool)
    for threshold in [0.1, float(np.float32(0.1)), 0.49999999, 0.5, 1.0, 0.0, -1.0, np.inf, -np.inf]:
        assert np.array_equal(greater_than(values, threshold, out), _greater(values, threshold)), threshold


# ----------------------------------------------------------------------------- segments, overlays


def test_segment_metadata():
    ids = [segments.segment_id(n) for n in segments.SEGMENT_ORDER]
    assert len(set(ids)) == len(ids) and all(i and " " not in i for i in ids)
    assert set(segments.VISIBILITY_PARAMETER) == set(segments.SEGMENT_ORDER)
    for name in segments.SEGMENT_ORDER:
        assert len(segments.segment_color(name)) == 3
    text = segments.terminology_string(LESION_FNR)
    parts = text.split("~")
    assert len(parts) == 7 and parts[1] == "SCT^49755003^Morphologically Altered Structure"
    assert parts[2] == "SCT^108369006^Neoplasm" and parts[3] == "^^"
    assert segments.terminology_string(OUTER_SET) is None  # a region around the lesion, not neoplasm
    assert segments.terminology_string(LESION_CRC) == text
    assert segments.sort_names(["x", OUTER_SET, LESION_FNR]) == [LESION_FNR, OUTER_SET, "x"]


def test_overlay_display():
    p = display.overlay_display("probability", hide_below=0.2)
    assert (p.color_node_id, p.window_min, p.window_max, p.lower_threshold) == (
        "vtkMRMLColorTableNodeFileViridis.txt",
        0.0,
        1.0,
        0.2,
    )
    u = display.overlay_display("uncertainty", 0.0, 0.04, 0.25)
    assert u.color_node_id == "vtkMRMLColorTableNodeFileInferno.txt"
    assert (u.window_min, u.window_max, u.lower_threshold) == (0.0, 0.04, pytest.approx(0.01))
    flat = display.overlay_display("uncertainty", 0.0, 0.0)
    assert flat.window_max > flat.window_min
    with pytest.raises(ValueError):
        display.overlay_display("entropy")


def test_interval_overlay_display():
    d = display.overlay_display("interval", *display.finite_range(np.array([0.2, np.inf, 0.6, 1.0])), hide_below=0.25)
    assert d.color_node_id == display.INTERVAL_COLOR_NODE_ID == "vtkMRMLColorTableNodeFileInferno.txt"
    assert (d.window_min, d.window_max, d.lower_threshold) == (0.2, 1.0, pytest.approx(0.4))
    assert d.upper_threshold == display.FINITE_TOP  # infinite (uncontrolled) lengths are drawn, not hidden
    assert display.finite_range(np.array([1.0, 3.0])) == (1.0, 3.0)
    everything_infinite = display.overlay_display("interval", *display.finite_range(np.full(3, np.inf)))
    assert everything_infinite.window_max > everything_infinite.window_min
    with pytest.raises(ValueError):
        display.overlay_display("uncertainty", *display.finite_range(np.full(3, np.inf)))
    assert display.OVERLAYS == ("none", "probability", "uncertainty", "interval")


# ----------------------------------------------------------------------------- sem-CRC intervals


def hand_profile(body="all", lam=(0.1, 0.2, 0.05), status=("controlled",) * 3, method="sem-crc-organ"):
    """An interval profile over liver (label 1), spleen (labels 2 and 3) and body, without calibrating."""
    from ConformalSegLib.semcrc import IntervalProfile, OrganMap
    from ConformalSegLib.semcrc.procedures import IntervalCalibration

    groups = ("liver", "spleen", "body")
    calibration = IntervalCalibration(
        method=method,
        epsilon=0.1,
        groups=groups,
        lam=np.array(lam, dtype=float),
        anchor=np.zeros(3),
        omega=np.zeros(3),
        status=tuple(status),
        n_cal=np.array([5, 5, 5]),
        n_opt=3,
        organs=groups,
    )
    return IntervalProfile(calibration, OrganMap({1: "liver", 2: "spleen", 3: "spleen"}), body)


def test_match_segments_by_name_case_insensitively():
    names = {"a": "Liver ", "b": "SPLEEN", "c": " spleen", "d": "Body", "e": "Tumour", "f": "left  kidney"}
    match = intervals.match_segments(names, ("liver", "spleen", "left kidney", "pancreas"))
    assert match.organs == {"liver": ["a"], "spleen": ["b", "c"], "left kidney": ["f"]}
    assert match.unmatched_organs == ["pancreas"]
    assert match.unused_segments == ["Tumour"]
    assert match.body_segments == ["d"]
    assert match.segment_ids == ["a", "b", "c", "f", "d"]
    assert intervals.profile_organs(hand_profile()) == ("liver", "spleen")
    assert intervals.organ_label_values(hand_profile()) == {"liver": 1, "spleen": 2}
    assert intervals.body_label_value(hand_profile()) == 4


def _masks(shape=(1, 4, 4)):
    liver = np.zeros(shape, dtype=np.uint8)
    liver[0, 0, :2] = 1
    spleen = np.zeros(shape, dtype=np.uint8)
    spleen[0, 0, 1:3] = 1  # overlaps the liver at (0, 0, 1)
    body = np.zeros(shape, dtype=np.uint8)
    body[0, :2, :] = 1
    return {"s1": liver, "s2": spleen, "s3": body}


def test_label_map_from_segments():
    names = {"s1": "liver", "s2": "Spleen", "s3": "body"}
    profile = hand_profile()
    match = intervals.match_segments(names, intervals.profile_organs(profile))
    labels, overlap = intervals.assemble_label_map(profile, match, _masks(), (1, 4, 4))
    assert overlap == 1
    assert labels.dtype == np.int32
    assert labels[0, 0].tolist() == [1, 1, 2, 4]  # the liver (first in the profile) wins the overlap
    assert (labels[0, 1:] == 4).all()  # body: every voxel in no organ ("all" profile)
    nonzero = hand_profile(body="nonzero")
    labels, _ = intervals.assemble_label_map(nonzero, match, _masks(), (1, 4, 4))
    assert labels[0, 0].tolist() == [1, 1, 2, 4] and (labels[0, 1] == 4).all()
    assert (labels[0, 2:] == 0).all()  # outside the body segment: background, excluded
    no_body = intervals.match_segments({"s1": "liver"}, ("liver", "spleen"))
    labels, _ = intervals.assemble_label_map(nonzero, no_body, _masks(), (1, 4, 4))
    assert (labels[labels != 1] == 4).all()  # no body segment: everything else is body
    with pytest.raises(ConformalSegError, match="shape"):
        intervals.assemble_label_map(profile, match, _masks((1, 4, 5)), (1, 4, 4))
    with pytest.raises(ConformalSegError, match="no mask"):
        intervals.assemble_label_map(profile, match, {}, (1, 4, 4))


def test_apply_profile_uses_the_library_and_reports():
    from ConformalSegLib.semcrc import apply_interval

    rng = np.random.default_rng(0)
    lower = rng.normal(size=(1, 4, 4)).astype(np.float32)
    upper = lower + 0.1
    truth = lower + rng.uniform(-0.2, 0.3, size=lower.shape).astype(np.float32)
    profile = hand_profile(lam=(0.1, np.inf, 0.05), status=("controlled", "uncontrollable", "controlled"))
    names = {"s1": "LIVER", "s2": "spleen", "s3": "body", "s4": "needle"}
    match = intervals.match_segments(names, intervals.profile_organs(profile))
    outcome = intervals.apply_profile(profile, lower, upper, match, _masks(), truth)
    reference = np.full(lower.shape, 4)
    reference[0, 0, :2], reference[0, 0, 2] = 1, 2
    expected = apply_interval(profile, lower, upper, reference, truth=truth)
    for key in ("lower", "upper", "length"):
        assert np.array_equal(getattr(outcome.application, key), getattr(expected, key)), key
    assert np.isinf(outcome.application.length[0, 0, 2])  # the uncontrollable spleen: infinite interval
    assert outcome.rows == intervals.table_rows(expected.table, with_risk=True)
    assert outcome.rows[1][:3] == ("spleen", "inf", "uncontrollable")
    assert outcome.rows[0][0] == "liver" and outcome.rows[0][4] != ""
    assert outcome.overlap_voxels == 1 and outcome.has_warning
    for words in (
        "Organs found in the segmentation: liver, spleen.",
        "needle",
        "Not controlled here (infinite intervals): spleen.",
        "1 voxels lie in segments of two organs",
    ):
        assert words in outcome.text, words
    spleen = np.zeros(lower.shape, dtype=np.uint8)
    spleen[0, 3, 3] = 1
    quiet = intervals.apply_profile(
        hand_profile(),
        lower,
        upper,
        intervals.match_segments({"s1": "liver", "s9": "Spleen"}, ("liver", "spleen")),
        {"s1": _masks()["s1"], "s9": spleen},
    )
    assert not quiet.has_warning and quiet.rows[0][4] == "" and "two organs" not in quiet.text


def test_apply_profile_errors():
    lower = np.zeros((1, 3, 3), dtype=np.float32)
    with pytest.raises(ConformalSegError, match="needs the scan's organ segmentation"):
        intervals.apply_profile(hand_profile(), lower, lower + 1)
    with pytest.raises(ConformalSegError, match="differ in shape"):
        intervals.apply_profile(hand_profile(), lower, np.zeros((1, 3, 4)))
    with pytest.raises(ConformalSegError, match="ground truth"):
        intervals.apply_profile(hand_profile(), lower, lower + 1, truth=np.zeros((2, 3, 3)))
    grid = Geometry(shape=(1, 3, 3))
    intervals.check_grids(grid, {"upper quantile volume": Geometry(shape=(1, 3, 3)), "ground truth": None})
    with pytest.raises(ConformalSegError, match="ground truth is not on the lower quantile volume's grid"):
        intervals.check_grids(grid, {"ground truth": Geometry(shape=(1, 3, 3), spacing=(2.0, 1.0, 1.0))})
    assert intervals.format_number(None) == "n/a" and intervals.format_number(np.inf) == "inf"


def test_interval_fixture_end_to_end(tmp_path):
    """The self-test's data: segments named like a user would, the panel's path equals the library's
    result on the original label map (also through the saved and re-loaded profile)."""
    reason = fixtures.interval_fixture_unavailable_reason()
    if reason:
        pytest.skip(reason)
    fixture = fixtures.make_interval_fixture(tmp_path)
    profile = intervals.load_profile(fixture.profile_path)
    assert profile.calibration.method == "sem-crc-organ" and profile.body == "nonzero"
    ids = {f"Segment_{i}": name for i, name in enumerate(fixture.segments)}
    match = intervals.match_segments(ids, intervals.profile_organs(profile))
    assert sorted(match.organs) == ["liver", "spleen"] and match.unmatched_organs == ["kidney", "pancreas"]
    assert match.unused_segments == ["Needle tip"] and len(match.body_segments) == 1
    masks = {sid: fixture.segments[ids[sid]].astype(np.uint8) for sid in match.segment_ids}
    outcome = intervals.apply_profile(profile, fixture.lower, fixture.upper, match, masks, fixture.truth)
    expected = fixture.expected()
    assert np.array_equal(outcome.application.length, expected.length)
    assert np.array_equal(outcome.application.lower, expected.lower)
    assert np.array_equal(outcome.application.upper, expected.upper)
    assert [row[0] for row in outcome.rows] == ["liver", "spleen", "kidney", "pancreas", "body"]
    assert outcome.rows == intervals.table_rows(expected.table, with_risk=True)
    assert "kidney, pancreas" in outcome.text and outcome.has_warning


# ----------------------------------------------------------------------------- environment


def test_requirements_file_never_installs_slicers_own_packages(tmp_path):
    requirements = environment.read_requirements(ROOT / "ConformalSeg" / "Resources" / "requirements.txt")
    names = {environment.canonical(environment.requirement_name(r)) for r in requirements}
    assert {"slicerio", "tqdm", "nibabel", "monai"} <= names
    assert not names & {environment.canonical(p) for p in environment.PROTECTED_PACKAGES}
    bad = tmp_path / "r.txt"
    bad.write_text("# comment\n-r other.txt\nSimpleITK>=2\n")
    with pytest.raises(ValueError, match="SimpleITK"):
        environment.read_requirements(bad)


def test_missing_requirements():
    versions = {"tqdm": "4.66.1", "monai": "1.2.0"}
    missing = environment.missing_requirements(["tqdm>=4.60", "monai>=1.3", "slicerio>=1.1"], versions.get)
    assert missing == ["monai>=1.3", "slicerio>=1.1"]
    assert environment.missing_requirements(["numpy"]) == []  # installed here


@pytest.mark.parametrize(
    "requested, cuda, expected_device, fallback, words",
    [
        ("auto", True, "cuda", False, "GPU (NVIDIA X)"),
        ("auto", False, "cpu", False, "CPU"),
        ("cuda", False, "cpu", True, "falling back to the CPU"),
        ("cuda", True, "cuda", False, "CUDA 12.4"),
        ("cpu", True, "cpu", False, "CPU"),
    ],
)
def test_device_choice(requested, cuda, expected_device, fallback, words):
    choice = environment.resolve_device(
        requested,
        torch_version="2.5.0",
        cuda_available=cuda,
        cuda_version="12.4" if cuda else None,
        gpu_name="NVIDIA X" if cuda else None,
    )
    assert (choice.device, choice.fallback) == (expected_device, fallback)
    assert words in choice.message


def test_device_messages_without_torch():
    assert "CUDA support" in environment.resolve_device("cuda", torch_version="2.5.0+cpu", cuda_available=False).message
    assert "not installed" in environment.resolve_device("auto", torch_version=None, cuda_available=False).message
    assert "falls back" in environment.describe_unprobed("cuda")
    with pytest.raises(ValueError):
        environment.resolve_device("tpu", torch_version=None, cuda_available=False)


def test_reload_packages_reimports_from_source():
    modules = {"pkg": 1, "pkg.sub": 2, "pkg.sub.leaf": 3, "pkgother": 4, "other": 5}
    imported = []

    def fake_import(name):
        imported.append(name)
        modules[name] = name
        if name == "pkg":  # a package import that pulls in a submodule on its own
            modules["pkg.sub"] = "pkg.sub"

    names = environment.reload_packages(["pkg"], modules, fake_import)
    assert names == ["pkg", "pkg.sub", "pkg.sub.leaf"]
    assert imported == ["pkg", "pkg.sub.leaf"]
    assert modules["pkgother"] == 4 and modules["other"] == 5


def test_reload_packages_real_modules():
    import ConformalSegSlicer.display as before

    names = environment.reload_packages(["ConformalSegSlicer.display"])
    import ConformalSegSlicer.display as after

    assert names == ["ConformalSegSlicer.display"] and after is not before
    assert after.overlay_display("probability").window_max == 1.0


# ----------------------------------------------------------------------------- tiny model end to end


def test_tiny_model_end_to_end_on_cpu(tmp_path, slider_fixture):
    reason = fixtures.tiny_model_unavailable_reason()
    if reason:
        pytest.skip(f"tiny-model end-to-end test: {reason}")
    from ConformalSegLib.io.volumes import load_probability_map, save_volume

    model = fixtures.make_tiny_model(tmp_path / "model")
    case = slider_fixture.case
    image = tmp_path / "images" / f"{commands.INPUT_CASE_ID}.nii.gz"
    save_volume(case.image, case.geometry, image)
    argv = commands.infer_command(PY, model=model, images=image, out_dir=tmp_path / "out", mc_dropout=2, device="cpu")
    runner, progress = _run(argv)
    found = commands.find_inference_outputs(tmp_path / "out")
    assert found.probability is not None and found.variance is not None
    probability = load_probability_map(found.probability)
    assert case.geometry.mismatch(probability.geometry) is None
    state = SliderState.from_files(slider_fixture.profile_paths[:1], probability.array, probability.geometry)
    _assert_library_equal(state, fixtures.SLIDER_CHECKS[0])


def test_tiny_model_card_is_valid(tmp_path):
    if importlib.util.find_spec("ConformalSegLib.inference") is None or importlib.util.find_spec("monai") is None:
        pytest.skip("ConformalSegLib.inference or MONAI missing")
    from ConformalSegLib.inference import resolve_model

    folder = fixtures.make_tiny_model(tmp_path)
    card = resolve_model(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = card.load_network()
    assert sum(p.numel() for p in network.parameters()) < 20000
