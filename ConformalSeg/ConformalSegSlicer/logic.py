"""The module's logic: everything the panel does, usable from scripts without the GUI.

``ConformalSeg.py`` subclasses :class:`Logic` as ``ConformalSegLogic`` (the name Slicer looks up) to
give it the module's parameter node. Segments are computed in process (:mod:`ConformalSegSlicer.slider`);
the model, calibration and evaluation run out of process (``conformalseg`` in PythonSlicer, through
:class:`ConformalSegSlicer.process.ProcessRunner`); MRML nodes are read and written by
:mod:`ConformalSegSlicer.slicer_adapter`.
"""

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.shipped_models import LESION_MODEL

from . import (
    commands,
    display,
    environment,
    evaluation_plots,
    inference_check,
    intervals,
    sample_data,
    score_maps,
    trust,
)
from . import slicer_adapter as adapter
from .process import ProcessRunner
from .profile_apply_logic import ProfileApplyLogic
from .slider import SliderSettings, SliderState

#: The module's folder (``ConformalSeg.py``, ``Resources/``), one above this package.
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The shipped lesion network: in the installed extension's module resources, else the source checkout's.
SHIPPED_MODEL = next(
    (
        Path(folder)
        for folder in (
            os.path.join(MODULE_DIR, "Resources", "models", LESION_MODEL),
            os.path.join(os.path.dirname(MODULE_DIR), "Resources", "models", LESION_MODEL),
        )
        if os.path.isfile(os.path.join(folder, "model_card.json"))
    ),
    None,
)


def registerSampleData() -> None:
    """Add the ConformalSeg sample to Slicer's Sample Data module (built on first click, no download)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=sample_data.CATEGORY,
        sampleName=sample_data.SAMPLE_NAME,
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "ConformalSeg.png"),
        customDownloader=lambda source: Logic().loadSampleData(),
    )


class Logic(ProfileApplyLogic, ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from scripts without the GUI.

    ``runnerFactory`` makes the out-of-process runner (default
    :class:`ConformalSegSlicer.process.ProcessRunner`): it is called as
    ``runnerFactory(argv, env=..., on_output=..., on_progress=..., on_finished=..., stages=...)``.
    """

    def __init__(self, runnerFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runnerFactory or ProcessRunner

    # ------------------------------------------------------------------ segments (in process)

    def loadSliderState(self, probabilityVolume, profilePaths, inlineScores: bool = True) -> SliderState:
        """Profiles + the probability map of a volume node (copied) on its own grid. With
        ``inlineScores=False`` (the panel) score maps (confidence-set transforms, threshold profiles' ``--score``)
        are left to :meth:`startScoreMaps`."""
        return SliderState.from_files(
            profilePaths,
            adapter.volume_array(probabilityVolume),
            adapter.volume_geometry(probabilityVolume),
            inline_scores=inlineScores,
        )

    def startScoreMaps(self, state: SliderState, onFinished=None):
        """Compute the state's missing score maps in PythonSlicer (never on the GUI thread;
        :mod:`ConformalSegSlicer.score_maps`) and hand them to ``state`` when done; returns the pump, or
        None when nothing is missing. ``onFinished(ok)`` runs after the maps are in the state."""
        names = state.missing_scores()
        if not names:
            return None
        work = adapter.temporary_folder()
        score_maps.write_inputs(work, state.probability, state.geometry)

        def finished(code, cancelled):
            try:
                ok = code == 0 and not cancelled
                if ok:
                    for name, scores in score_maps.read_outputs(work, names).items():
                        state.set_scores(name, scores)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if onFinished:
                onFinished(ok)

        return self._start(score_maps.command(adapter.python_slicer(), work, names), (), None, None, finished)

    def updateSegmentation(
        self,
        state: SliderState,
        settings: SliderSettings,
        segmentationNode,
        referenceVolume,
        maskVolume=None,
        writeAll: bool = True,
    ):
        """Recalibrate for ``settings`` and write the changed segments (all with ``writeAll``) into
        ``segmentationNode`` (created when None, with ``referenceVolume``'s geometry); the masks are on
        the grid of ``maskVolume`` (the probability map; default ``referenceVolume``). Returns
        ``(segmentationNode, SliderResult)``."""
        if referenceVolume is None:
            raise ValueError("a reference volume is needed for the segmentation geometry")
        result = state.update(settings)
        segmentationNode = adapter.ensure_segmentation(segmentationNode, referenceVolume)
        names = list(result.segments) if writeAll else result.changed
        adapter.update_segments(
            segmentationNode, {n: result.segments[n].mask for n in names}, maskVolume or referenceVolume
        )
        adapter.remove_segments(segmentationNode, keep=result.segments)
        return segmentationNode, result

    def process(
        self,
        probabilityVolume,
        profilePaths,
        settings: SliderSettings | None = None,
        segmentationNode=None,
        referenceVolume=None,
    ):
        """One call: profiles + probability volume -> segmentation node (and the SliderResult)."""
        state = self.loadSliderState(probabilityVolume, profilePaths)
        return self.updateSegmentation(
            state,
            settings or state.initial_settings(),
            segmentationNode,
            referenceVolume or probabilityVolume,
            probabilityVolume,
        )

    def showSegments(self, segmentationNode, visible, show3D: bool) -> None:
        adapter.set_segment_visibility(segmentationNode, visible)
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None and bool(displayNode.GetVisibility3D()) != bool(show3D):
            adapter.show_segmentation_3d(segmentationNode, show3D)

    def showOverlay(self, volumeNode, kind: str, hideBelow: float, opacity: float, backgroundVolume=None) -> None:
        """``volumeNode`` as the slice views' foreground ("probability", "uncertainty" or "interval"
        display: see :mod:`ConformalSegSlicer.display`)."""
        low, high = (0.0, 1.0) if kind == "probability" else adapter.data_range(volumeNode)
        adapter.show_overlay(volumeNode, display.overlay_display(kind, low, high, hideBelow), opacity, backgroundVolume)

    # ------------------------------------------------------------------ organ-dependent intervals (sem-CRC)

    def applyIntervalProfile(
        self, profilePath, lowerNode, upperNode, segmentationNode=None, truthNode=None, lengthNode=None
    ) -> intervals.AppliedIntervals:
        """Apply an interval profile (``conformalseg calibrate --method sem-crc...``) to one scan's lower
        and upper quantile volumes with the library's ``apply_interval``. ``segmentationNode``: the
        scan's organs, segments matched to the profile's organ names by name (case-insensitive; see
        :mod:`ConformalSegSlicer.intervals`); ``truthNode`` (optional) adds the per-organ risk. Writes
        the conformalised bounds and the interval length into scene volumes (reused by later calls;
        the length into ``lengthNode`` when given) on the lower volume's grid; returns them with the
        outcome (table rows, status text)."""
        if lowerNode is None or upperNode is None:
            raise ValueError(_("choose the lower and the upper quantile volumes"))
        given = [n.GetID() for n in (lowerNode, upperNode, truthNode) if n is not None]
        if lengthNode is not None and lengthNode.GetID() in given:
            raise ValueError(_("the interval-length output must not be one of the input volumes"))
        intervals.check_grids(
            adapter.volume_geometry(lowerNode),
            {
                "upper quantile volume": adapter.volume_geometry(upperNode),
                "ground truth": adapter.volume_geometry(truthNode) if truthNode is not None else None,
            },
        )
        profile = intervals.load_profile(profilePath)
        match = masks = None
        if segmentationNode is not None:
            match = intervals.match_segments(adapter.segment_names(segmentationNode), intervals.profile_organs(profile))
            masks = adapter.segment_arrays(segmentationNode, match.segment_ids, lowerNode)
        outcome = intervals.apply_profile(
            profile,
            adapter.volume_array(lowerNode, copy=False),
            adapter.volume_array(upperNode, copy=False),
            match,
            masks,
            adapter.volume_array(truthNode, copy=False) if truthNode is not None else None,
        )
        base, result = lowerNode.GetName(), outcome.application
        lower = adapter.output_volume("intervalLower", f"{base} conformal lower", result.lower, lowerNode)
        upper = adapter.output_volume("intervalUpper", f"{base} conformal upper", result.upper, lowerNode)
        sceneLength = display.scene_interval_length(result.length)  # no inf in the scene
        length = (
            adapter.write_volume(lengthNode, sceneLength, lowerNode)
            if lengthNode is not None
            else adapter.output_volume("intervalLength", f"{base} interval length", sceneLength, lowerNode)
        )
        return intervals.AppliedIntervals(outcome, lower, upper, length)

    # ------------------------------------------------------------------ out of process

    def _start(self, argv, stages, onOutput, onProgress, onFinished):
        runner = self.runnerFactory(
            argv,
            env=adapter.environment_for_child(),
            on_output=onOutput,
            on_progress=onProgress,
            on_finished=onFinished,
            stages=stages,
        )
        logging.info("ConformalSeg: running %s", " ".join(str(a) for a in argv))
        return adapter.ProcessPump(runner).start()

    def _startFor(self, result, argv, stages, onOutput, onProgress, onFinished):
        """``_start`` whose ``onFinished(returncode, cancelled, result)`` is also told ``result`` (the output
        path the caller reads afterwards); ``onFinished`` may be None."""

        def finished(code, cancelled):
            if onFinished is not None:
                onFinished(code, cancelled, result)

        return self._start(argv, stages, onOutput, onProgress, finished)

    def inferenceProfile(self, profilePaths):
        """The loaded profile whose recorded pipeline a model run must use (None: no profile recorded one)."""
        from ConformalSegLib.conformal.profile import load_profile

        records = [(str(path), load_profile(path).provenance.get("inference")) for path in profilePaths]
        try:
            return inference_check.profile_to_drive(records)
        except ValueError as exc:
            raise ConformalSegError(str(exc), fix="load profiles calibrated with one model pipeline") from None

    def confirmModelTrust(self, modelPath, ask=None):
        """Whether ``modelPath`` may run: False (plain weights, no trust needed), True (a TorchScript or
        MONAI bundle model the user confirmed now or earlier in this session: pass ``trustModelCode``),
        None (the user said no). ``ask(title, message) -> bool`` defaults to a Yes/No dialog."""
        if ask is None:

            def ask(title, message):
                # confirmYesNoDisplay answers Yes by itself in testing mode: never trust code unasked
                if slicer.app.testingEnabled():
                    logging.warning("ConformalSeg: testing mode, model code not trusted without a person: %s", message)
                    return False
                return slicer.util.confirmYesNoDisplay(message, windowTitle=title)

        # read in a child: the card modules import torch, which stays out of Slicer's process
        request = trust.request_in_child(modelPath, adapter.python_slicer(), os.environ)
        return trust.decide(request, trust.SESSION, ask)

    def startInference(
        self,
        inputVolume,
        modelPath,
        device="auto",
        mcDropout=0,
        onOutput=None,
        onProgress=None,
        onFinished=None,
        profilePath=None,
        trustModelCode=False,
    ):
        """Export ``inputVolume`` and run ``conformalseg infer`` on it in PythonSlicer; returns the
        pump. With ``profilePath`` the child uses the profile's recorded pipeline (MC passes, flips, seed;
        ``mcDropout`` is ignored) and refuses a model with another fingerprint. ``trustModelCode`` lets a
        TorchScript or MONAI bundle model run (ask first: :meth:`confirmModelTrust`).
        ``onFinished(returncode, cancelled, outDir)``."""
        if inputVolume is None:
            raise ValueError("choose the input volume the model runs on")
        work = adapter.temporary_folder()
        image = os.path.join(work, "images", commands.INPUT_CASE_ID + ".nrrd")
        os.makedirs(os.path.dirname(image))
        adapter.export_volume(inputVolume, image)
        outDir = os.path.join(work, "out")
        argv = commands.infer_command(
            adapter.python_slicer(),
            model=modelPath,
            images=image,
            out_dir=outDir,
            mc_dropout=mcDropout,
            device=device,
            profile=profilePath,
            trust_model_code=bool(trustModelCode),
        )
        return self._startFor(outDir, argv, commands.progress_stages("infer"), onOutput, onProgress, onFinished)

    def loadInferenceResults(self, outDir, referenceVolume=None):
        """Probability (and MC-dropout variance) volumes written by ``conformalseg infer``: each marked
        modified (its file is in a temporary folder deleted next, so Save must write it), under the
        reference volume's parent transform and subject-hierarchy folder, the probability volume tagged
        with the run's pipeline fingerprint (:mod:`ConformalSegSlicer.inference_check`)."""
        found = commands.find_inference_outputs(outDir)
        if found.probability is None:
            raise ConformalSegError("the model wrote no probability map", path=outDir, fix="see the log for its error")
        base = referenceVolume.GetName() if referenceVolume is not None else "ConformalSeg"
        probability = adapter.load_result_volume(
            found.probability, "probability", f"{base} lesion probability", referenceVolume
        )
        uncertainty = (
            adapter.load_result_volume(found.variance, "variance", f"{base} MC-dropout variance", referenceVolume)
            if found.variance
            else None
        )
        record = inference_check.read_run_record(outDir)
        probability.SetAttribute(inference_check.NODE_ATTRIBUTE, inference_check.node_value(record))
        return probability, uncertainty

    def runInference(self, inputVolume, modelPath, device="cpu", mcDropout=0, timeout=None, trustModelCode=False):
        """Blocking inference (scripts, tests): returns ``(probabilityVolume, uncertaintyVolume)``.
        A script runs a TorchScript or MONAI bundle model only with ``trustModelCode=True`` (no dialog)."""
        finished = {}
        pump = self.startInference(
            inputVolume,
            modelPath,
            device,
            mcDropout,
            onFinished=lambda code, cancelled, out: finished.update(code=code, out=out),
            trustModelCode=trustModelCode,
        )
        pump.timer.stop()
        if pump.runner.wait(timeout) is None:
            pump.cancel()
            pump.runner.wait(30)
            raise RuntimeError("the model did not finish in time")
        if finished.get("code") != 0:
            raise RuntimeError("the model failed:\n" + "\n".join(pump.runner.output[-20:]))
        try:
            return self.loadInferenceResults(finished["out"], inputVolume)
        finally:
            adapter.remove_work_folder(finished["out"])

    def startCalibration(
        self,
        dataDir,
        method,
        lesionLabel,
        outDir,
        settings: SliderSettings,
        onOutput=None,
        onProgress=None,
        onFinished=None,
        score: str = "identity",
    ):
        """``conformalseg calibrate`` in the background (``score``: cls / crc, ``calibrate --score``);
        ``onFinished(returncode, cancelled, profilePath)``."""
        os.makedirs(outDir, exist_ok=True)
        profile = os.path.join(str(outDir), f"{method}.json")
        s = settings.snapped()
        argv = commands.calibrate_command(
            adapter.python_slicer(),
            data_dir=dataDir,
            method=method,
            out_profile=profile,
            lesion_labels=lesionLabel,
            epsilon=s.epsilon,
            alpha=s.alpha,
            alpha_inner=s.alpha_inner,
            alpha_outer=s.alpha_outer,
            force=True,
            score=score,
        )
        return self._startFor(profile, argv, commands.progress_stages("calibrate"), onOutput, onProgress, onFinished)

    def startEvaluation(
        self,
        dataDir,
        lesionLabel,
        splits,
        outDir,
        settings: SliderSettings,
        onOutput=None,
        onProgress=None,
        onFinished=None,
    ):
        """``conformalseg evaluate`` in the background; ``onFinished(returncode, cancelled, resultsJson)``."""
        out = os.path.join(str(outDir), "evaluation")
        s = settings.snapped()
        argv = commands.evaluate_command(
            adapter.python_slicer(),
            data_dir=dataDir,
            out_dir=out,
            lesion_labels=lesionLabel,
            splits=splits,
            epsilon=s.epsilon,
            alpha=s.alpha,
        )
        return self._startFor(
            os.path.join(out, "results.json"),
            argv,
            commands.progress_stages("evaluate"),
            onOutput,
            onProgress,
            onFinished,
        )

    def startAddCase(
        self, probabilityVolume, reviewedSegmentation, profilePath, caseId, onOutput=None, onFinished=None
    ):
        """``conformalseg profile add-case`` in the background: the probability map and the reviewed lesion
        (the union of ``reviewedSegmentation``'s segments on the map's grid) are written to a temporary
        folder and appended to ``profilePath``'s calibration set as a new profile beside it (the old one is
        never modified). ``onFinished(returncode, cancelled, newProfilePath)``."""
        from ConformalSegLib.io.volumes import save_volume

        if probabilityVolume is None or reviewedSegmentation is None:
            raise ValueError(_("choose the probability map and the reviewed lesion segmentation"))
        ids = list(adapter.segment_names(reviewedSegmentation))
        if not ids:
            raise ValueError(_("the reviewed segmentation has no segment"))
        masks = adapter.segment_arrays(reviewedSegmentation, ids, probabilityVolume)
        lesion = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
        for mask in masks.values():
            lesion[mask > 0] = 1
        geometry = adapter.volume_geometry(probabilityVolume)
        work = adapter.temporary_folder()
        prob, label = os.path.join(work, "probability.nrrd"), os.path.join(work, "label.nrrd")
        save_volume(adapter.volume_array(probabilityVolume, copy=False), geometry, prob)
        save_volume(lesion, geometry, label)
        out = commands.grown_profile_path(profilePath)
        argv = commands.add_case_command(
            adapter.python_slicer(), profile=profilePath, prob=prob, label=label, out=out, case_id=caseId
        )

        def finished(code, cancelled):
            shutil.rmtree(work, ignore_errors=True)
            if onFinished:
                onFinished(code, cancelled, str(out))

        return self._start(argv, (), onOutput, None, finished)

    def loadSampleData(self):
        """The sample (:mod:`ConformalSegSlicer.sample_data`, built into Slicer's cache folder on first use):
        the scan and its probability map loaded, and the parameter node set to them, to the CLS and
        confidence-set profiles, to the scan's DICOM series (the DICOM SEG reference) and to the shipped model
        when present. Returns the two volume nodes."""
        folder = os.path.join(slicer.app.cachePath, "ConformalSeg-sample")
        paths = sample_data.make_sample(folder, model=SHIPPED_MODEL)
        image = adapter.load_volume(str(paths.image), "ConformalSeg phantom CT")
        probability = adapter.load_volume(str(paths.probability), "ConformalSeg phantom lesion probability")
        slicer.util.setSliceViewerLayers(background=image, fit=True)
        p = self.getParameterNode()
        if hasattr(p, "profilePath"):  # the module's parameter node (ConformalSeg.py)
            p.inputVolume, p.probabilityVolume = image, probability
            p.profilePath, p.secondProfilePath = paths.cls_profile, paths.sets_profile
            p.dicomReferencePath = paths.dicom  # Export DICOM SEG works on the sample too
            if paths.model is not None:
                p.modelPath = paths.model
        return image, probability

    def updateEvaluationPlots(self, results, epsilon: float, alpha: float):
        """ECR-vs-alpha and PC-vs-alpha charts for the evaluated epsilon nearest ``epsilon``."""
        return adapter.update_evaluation_plots(evaluation_plots.alpha_curves(results, epsilon), alpha)

    # ------------------------------------------------------------------ dependencies

    def deviceChoice(self, requested: str) -> environment.DeviceChoice:
        """The device inference will use (imports torch: seconds the first time)."""
        return adapter.device_choice(requested)

    def describeDevice(self, requested: str, probe: bool = False) -> str:
        """The device message; PyTorch is queried only when already imported or ``probe``."""
        if not probe and "torch" not in sys.modules:
            return environment.describe_unprobed(requested)
        try:
            return self.deviceChoice(requested).message
        except Exception as exc:  # a broken PyTorch install must not break the panel
            return _("Cannot query PyTorch: {error}").format(error=exc)

    def requirements(self, features=()) -> list:
        """``Resources/requirements.txt``: the packages every command needs plus the ``features`` groups
        (``inference``, ``evaluation``; ``sem-crc-calibration`` is never installed by the panel)."""
        return environment.read_requirements(os.path.join(MODULE_DIR, "Resources", "requirements.txt"), features)

    def ensurePythonRequirements(self, features=()) -> bool:
        """Install the missing requirements after a confirmation (never Slicer's numpy, SimpleITK...)."""
        return adapter.ensure_requirements(self.requirements(features), requester="ConformalSeg")

    def ensureInferenceDependencies(self) -> bool:
        """PyTorch (through the PyTorch extension) and MONAI; False when the user declined."""
        if not adapter.ensure_torch():
            return False
        return self.ensurePythonRequirements(features=("inference",))
