"""The module's self-tests in Slicer: segments equal the library's masks, cancel kills the process tree,
the sem-CRC overlay equals the library's, a tiny model runs end to end.

``ConformalSeg.py`` subclasses :class:`SelfTest` as ``ConformalSegTest`` (the name Slicer and ctest look
up). The same computations are tested without Slicer by ``Testing/test_slicer_logic.py``.
"""

import logging
import os
import tempfile
import unittest

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from ConformalSegLib.common.geometry import Geometry

from . import display, fixtures, intervals, segments
from . import slicer_adapter as adapter
from .logic import Logic
from .process import ProcessRunner, pid_alive


class SelfTest(ScriptedLoadableModuleTest):
    """Self-tests: run from the Reload & Test button, ``slicer.selfTests["ConformalSeg"]()``, or ctest."""

    #: The logic under test; ``ConformalSeg.py`` sets the module's own.
    logicClass = Logic

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.skipped = []  # (test, reason): reported as skips in the summary, not as passes
        tests = (
            self.test_SegmentsMatchLibraryForTwoSliderSettings,
            self.test_CancelKillsProcessTree,
            self.test_IntervalOverlayMatchesLibrary,
            self.test_TinyModelEndToEnd,
            self.test_SampleDataFillsThePanel,
            self.test_SegExportEqualsTheSliders,
            self.test_AddCaseGrowsTheProfile,
            self.test_MaskProfileApply,
            self.test_TrustConfirmation,
        )
        for test in tests:
            self.setUp()
            try:
                test()
            except unittest.SkipTest as exc:  # one skipped test does not end the others
                self.skipped.append((test.__name__, str(exc)))
        summary = f"ConformalSeg self-test: {len(tests) - len(self.skipped)} passed, {len(self.skipped)} skipped"
        details = "; ".join(f"{name} SKIPPED ({reason})" for name, reason in self.skipped)
        print(summary + (f": {details}" if details else ""))
        self.delayDisplay(summary)

    def _skip(self, name: str, reason: str) -> None:
        """Skip the running test: ``unittest.SkipTest``, which unittest's runner (ctest ``py_ConformalSeg``
        runs each ``test_*`` method on its own) reports as a skip, and :meth:`runTest` lists in its summary."""
        logging.warning("ConformalSeg %s SKIPPED: %s", name, reason)
        self.delayDisplay(f"Skipped {name}: {reason}")
        self.skipTest(reason)

    def _addCase(self, case):
        image = adapter.add_volume(case.image, case.geometry, "ConformalSegTest CT")
        probability = adapter.add_volume(case.probability, case.geometry, "ConformalSegTest probability")
        return image, probability

    def _assertSegmentsMatch(self, logic, state, settings, segmentation, reference):
        segmentation, result = logic.updateSegmentation(state, settings, segmentation, reference)
        expected = state.library_masks(settings)
        ids = segmentation.GetSegmentation().GetSegmentIDs()
        self.assertEqual(sorted(segments.segment_id(n) for n in expected), sorted(ids))
        for name, mask in expected.items():
            actual = adapter.segment_mask(segmentation, name, reference)
            self.assertEqual(int(np.count_nonzero(actual)), int(np.count_nonzero(mask)), name)
            self.assertTrue(np.array_equal(actual, mask), name)
        return segmentation, result

    def test_SegmentsMatchLibraryForTwoSliderSettings(self):
        self.delayDisplay("Synthetic scan, probability map and profiles")
        with tempfile.TemporaryDirectory() as folder:
            fixture = fixtures.make_slider_fixture(folder)
            image, probability = self._addCase(fixture.case)
            self.assertIsNone(fixture.case.geometry.mismatch(adapter.volume_geometry(probability)))
            logic = self.logicClass()
            state = logic.loadSliderState(probability, fixture.profile_paths)
            segmentation = None
            for settings in fixtures.SLIDER_CHECKS:
                segmentation, result = self._assertSegmentsMatch(logic, state, settings, segmentation, image)
            self.assertIn("too few", result.text)  # alpha = 0.04 needs 24 scans, the profile has 19
            self.assertTrue(result.has_warning)
        self.delayDisplay("Segments equal the library's masks")

    def test_CancelKillsProcessTree(self):
        code = (
            "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(300)']); print('CHILD', child.pid, flush=True); time.sleep(300)"
        )
        runner = ProcessRunner([adapter.python_slicer(), "-c", code]).start()
        deadline = 60
        while not any(line.startswith("CHILD") for line in runner.output) and deadline > 0:
            runner.wait(timeout=0.5)
            deadline -= 0.5
        child = int(next(line for line in runner.output if line.startswith("CHILD")).split()[1])
        runner.cancel()
        self.assertIsNotNone(runner.wait(timeout=30))
        self.assertTrue(runner.cancelled)
        self.assertFalse(pid_alive(child, timeout=10))
        self.delayDisplay("Cancel stopped the process and its child")

    def test_TinyModelEndToEnd(self):
        reason = fixtures.tiny_model_unavailable_reason()
        if reason:
            self._skip("test_TinyModelEndToEnd", reason)
            return
        with tempfile.TemporaryDirectory() as folder:
            fixture = fixtures.make_slider_fixture(folder, methods=("cls",))
            model = fixtures.make_tiny_model(os.path.join(folder, "model"))
            image, _probability = self._addCase(fixture.case)
            logic = self.logicClass()
            probability, uncertainty = logic.runInference(image, model, device="cpu", mcDropout=2, timeout=600)
            self.assertIsNotNone(uncertainty)
            self.assertIsNone(adapter.volume_geometry(image).mismatch(adapter.volume_geometry(probability)))
            # D3: the result is saved with the scene (no storage node into the deleted temporary folder)
            self.assertIsNone(probability.GetStorageNode())
            self.assertTrue(probability.GetModifiedSinceRead())
            values = adapter.volume_array(probability, copy=False)
            self.assertTrue(0.0 <= float(values.min()) and float(values.max()) <= 1.0)
            state = logic.loadSliderState(probability, fixture.profile_paths)
            self._assertSegmentsMatch(logic, state, fixtures.SLIDER_CHECKS[0], None, image)
        self.delayDisplay("Tiny model ran end to end on the CPU")

    def test_SampleDataFillsThePanel(self):
        logic = self.logicClass()
        image, probability = logic.loadSampleData()
        p = logic.getParameterNode()
        self.assertEqual(p.probabilityVolume.GetID(), probability.GetID())
        state = logic.loadSliderState(probability, [p.profilePath, p.secondProfilePath])
        settings = state.initial_settings()
        segmentation, result = self._assertSegmentsMatch(logic, state, settings, None, image)
        self.assertFalse(result.has_warning)
        self.delayDisplay("The sample data fills the panel and its segments equal the library's")

    def test_SegExportEqualsTheSliders(self):
        """*Export DICOM SEG* on the sample (its scan's DICOM series as the reference): the SEG written by the
        ``apply`` child holds, segment for segment, the masks the sliders show."""
        try:
            import highdicom  # noqa: F401  # the child runs in this same Python environment
        except ImportError:
            self._skip("test_SegExportEqualsTheSliders", "highdicom is not installed (pip install highdicom)")
        from ConformalSegLib.io.dicom_seg import read_dicom_seg

        logic = self.logicClass()
        image, probability = logic.loadSampleData()
        p = logic.getParameterNode()
        state = logic.loadSliderState(probability, [p.profilePath])
        settings = state.initial_settings()
        with tempfile.TemporaryDirectory() as folder:
            target = os.path.join(folder, "export.dcm")
            logic.runSegExport(
                p.profilePath, probability, settings, target, timeout=300, referenceVolume=image,
                dicomReferenceFolder=str(p.dicomReferencePath),
            )  # fmt: skip
            segments = read_dicom_seg(target, str(p.dicomReferencePath))
        shown = state.update(settings).segments
        self.assertEqual(len(segments), len(shown))
        for (name, mask), update in zip(segments.items(), shown.values()):
            self.assertTrue(np.array_equal(mask, update.mask), name)
        self.delayDisplay("Export DICOM SEG writes the masks the sliders show")

    def test_AddCaseGrowsTheProfile(self):
        from ConformalSegLib.conformal.profile import load_profile

        with tempfile.TemporaryDirectory() as folder:
            fixture = fixtures.make_slider_fixture(folder, methods=("cls",))
            image, probability = self._addCase(fixture.case)
            reviewed = adapter.ensure_segmentation(None, probability, name="ConformalSegTest reviewed")
            adapter.add_named_segments(reviewed, {"lesion": fixture.case.lesion}, probability)
            logic = self.logicClass()
            finished = {}
            pump = logic.startAddCase(
                probability,
                reviewed,
                fixture.profile_paths[0],
                "reviewed1",
                onFinished=lambda code, cancelled, path: finished.update(code=code, path=path),
            )
            pump.timer.stop()
            self.assertIsNotNone(pump.runner.wait(120))
            self.assertEqual(finished.get("code"), 0, "\n".join(pump.runner.output[-20:]))
            grown = load_profile(finished["path"])
            old = load_profile(fixture.profile_paths[0])
            self.assertEqual(grown.summaries.n, old.summaries.n + 1)
            self.assertEqual(grown.summaries.case_ids[-1], "reviewed1")
        self.delayDisplay("Add this case to calibration wrote a grown profile beside the old one")

    def test_MaskProfileApply(self):
        """A mask-only margin profile (``calibrate --masks``) applied to a label map in a child: the loaded
        segments equal the library's sets, the guarantee sentence comes back, the slider refuses it."""
        from ConformalSegLib.common.errors import ConformalSegError

        with tempfile.TemporaryDirectory() as folder:
            fixture = fixtures.make_mask_fixture(folder)
            labels = adapter.add_volume(fixture.labels, fixture.geometry, "ConformalSegTest predicted labels")
            logic = self.logicClass()
            self.assertEqual(logic.profileInput(fixture.profile_path), "mask")
            with self.assertRaises(ConformalSegError):
                logic.loadSliderState(labels, [fixture.profile_path])
            segmentation, volumes, result = logic.runProfileApply(
                fixture.profile_path, timeout=300, maskVolume=labels, referenceVolume=labels
            )
        self.assertEqual(volumes, {})
        self.assertTrue(result.guarantees[0].startswith("With probability at least 80%"))
        names = adapter.segment_names(segmentation)
        self.assertEqual(sorted(names.values()), sorted(fixture.expected))
        for segmentId, name in names.items():
            actual = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, labels) > 0
            self.assertTrue(np.array_equal(actual, fixture.expected[name]), name)
        self.assertIsNone(segmentation.GetStorageNode())
        self.delayDisplay("A mask-only margin profile applied to a label map gives the library's sets")

    def test_TrustConfirmation(self):
        """A TorchScript model asks once per session (read in a child: no torch in Slicer's process); No
        runs nothing; in testing mode the default dialog answers No (Slicer's would answer Yes)."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:  # the child reads the card with ConformalSegLib.inference
            self._skip("test_TrustConfirmation", "torch is not installed (install the PyTorch extension)")
            return
        logic = self.logicClass()
        asked = []
        with tempfile.TemporaryDirectory() as folder:
            model = fixtures.make_code_model_card(folder)
            self.assertIsNone(logic.confirmModelTrust(model, ask=lambda title, text: asked.append(text) or False))
            if slicer.app.testingEnabled():
                self.assertIsNone(logic.confirmModelTrust(model))
            self.assertTrue(logic.confirmModelTrust(model, ask=lambda title, text: asked.append(text) or True))
            self.assertTrue(logic.confirmModelTrust(model, ask=lambda title, text: self.fail("asked again")))
        self.assertEqual(len(asked), 2)
        self.assertIn(os.path.dirname(str(model)), asked[0])
        self.assertIn("TorchScript", asked[0])
        self.delayDisplay("A model that runs code asks once, names its folder, and No runs nothing")

    def test_IntervalOverlayMatchesLibrary(self):
        reason = fixtures.interval_fixture_unavailable_reason()
        if reason:
            self._skip("test_IntervalOverlayMatchesLibrary", reason)
            return
        self.delayDisplay("Synthetic quantile volumes, organ segments and a per-organ sem-CRC profile")
        with tempfile.TemporaryDirectory() as folder:
            fixture = fixtures.make_interval_fixture(folder)
            geometry = Geometry(shape=fixture.lower.shape, spacing=(0.8, 0.7, 2.5), origin=(-10.0, 4.0, 30.0))
            lower = adapter.add_volume(fixture.lower, geometry, "ConformalSegTest lower quantile")
            upper = adapter.add_volume(fixture.upper, geometry, "ConformalSegTest upper quantile")
            truth = adapter.add_volume(fixture.truth, geometry, "ConformalSegTest truth")
            organs = adapter.ensure_segmentation(None, lower, name="ConformalSegTest organs")
            adapter.add_named_segments(organs, fixture.segments, lower)
            logic = self.logicClass()
            applied = logic.applyIntervalProfile(fixture.profile_path, lower, upper, organs, truth)
            expected = fixture.expected(with_truth=True)
            volumes = len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
            again = logic.applyIntervalProfile(fixture.profile_path, lower, upper, organs, None, applied.lengthNode)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")), volumes)  # outputs reused
        self.assertEqual(again.lengthNode.GetID(), applied.lengthNode.GetID())
        self.assertEqual(again.outcome.rows[0][-1], "")  # no ground truth: no risk
        overlay = adapter.volume_array(applied.lengthNode)
        self.assertTrue(np.array_equal(overlay, display.scene_interval_length(expected.length)))
        self.assertTrue(np.array_equal(adapter.volume_array(applied.lowerNode), expected.lower))
        self.assertTrue(np.array_equal(adapter.volume_array(applied.upperNode), expected.upper))
        self.assertIsNone(geometry.mismatch(adapter.volume_geometry(applied.lengthNode)))
        outcome = applied.outcome
        self.assertEqual(outcome.match.unmatched_organs, ["kidney", "pancreas"])
        self.assertEqual(sorted(outcome.match.organs), ["liver", "spleen"])
        self.assertIn("kidney, pancreas", outcome.text)
        self.assertEqual(outcome.rows, intervals.table_rows(expected.table, with_risk=True))
        logic.showOverlay(applied.lengthNode, "interval", 0.0, 0.5, lower)
        self.assertEqual(applied.lengthNode.GetDisplayNode().GetColorNodeID(), display.INTERVAL_COLOR_NODE_ID)
        if slicer.app.layoutManager() is not None:  # no slice views with --no-main-window
            composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
            self.assertIn(applied.lengthNode.GetID(), [n.GetForegroundVolumeID() for n in composites])
        self.delayDisplay("The interval-length overlay equals the library's length map")
