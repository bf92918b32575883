import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _addSourceCheckoutToPath() -> None:
    """Run from a source checkout (module path ``<repo>/ConformalSeg``), the library is
    ``<repo>/ConformalSegLib``: put ``<repo>`` on sys.path (Slicer adds only module folders). In an
    installed extension ConformalSegLib sits next to this file and this does nothing."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(repository, "ConformalSegLib", "__init__.py")) and repository not in sys.path:
        sys.path.append(repository)


_addSourceCheckoutToPath()

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402 (after the path set-up)
from ConformalSegSlicer import commands, display, environment, evaluation_plots, intervals, segments  # noqa: E402
from ConformalSegSlicer import slicer_adapter as adapter  # noqa: E402
from ConformalSegSlicer.process import ProcessRunner  # noqa: E402
from ConformalSegSlicer.slider import SliderSettings, SliderState, relevant_sliders  # noqa: E402

#
# ConformalSeg
#


class ConformalSeg(ScriptedLoadableModule):
    """Statistical guarantees for 3D lesion segmentation (README: "The 3D Slicer module")."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ConformalSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorchUtils (PyTorch extension) is used when present
        self.parent.contributors = ["ConformalSeg developers"]
        self.parent.helpText = _("""
Turns a lesion probability map (from your network, run here out of process, or loaded) into
segments with a statistical guarantee, calibrated on scans with ground truth
(a profile made with <code>conformalseg calibrate</code>). All guarantees assume the calibration
scans and the new scan are exchangeable (same population, same network and preprocessing).
<ul>
<li><b>Lesion (FNR-controlled)</b>, CLS: with probability at least 1 - alpha, the mask misses at most
a fraction epsilon of the new scan's lesion voxels.</li>
<li><b>Lesion (expected-FNR-controlled)</b>, conformal risk control: averaged over new scans, the mask
misses at most a fraction epsilon of the lesion voxels.</li>
<li><b>Inner / outer set</b>, conformal confidence sets: with probability at least 1 - alpha-inner the
inner set lies inside the true lesion; with probability at least 1 - alpha-outer the outer set
contains all of it (joint profiles: both at once with probability at least 1 - alpha).</li>
<li><b>Organ-dependent uncertainty (sem-CRC)</b>: an interval profile (<code>conformalseg calibrate
--method sem-crc-organ</code>) widens a model's lower/upper quantile maps by one lambda per organ; the
organs come from a segmentation whose segment names match the profile's organ names. Per-organ
sem-CRC: for each organ, averaged over new scans, at most a fraction epsilon of its voxels lie outside
their interval (the exact guarantee of the profile is shown under the Apply button).</li>
</ul>
Moving the sliders recalibrates from the profile's stored summaries without re-running the model;
the label under them states the current guarantee and warns when the calibration set is too small
for the chosen alpha (the mask is then the whole image). See
<a href="https://github.com/ConformalSeg/ConformalSeg#readme">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Methods: Tan et al., Conformal Lesion Segmentation for 3D Medical Images (CLS); Angelopoulos et al.,
Conformal Risk Control; Davenport, Conformal confidence sets for biomedical image segmentation.
Module layout follows the 3D Slicer scripted module template (Jean-Christophe Fillion-Robin, Kitware
Inc., Andras Lasso, PerkLab, and Steve Pieper, Isomics, Inc.).
""")


#
# ConformalSegParameterNode
#

Level = Annotated[float, WithinRange(0.001, 0.999), Decimals(3), SingleStep(0.01)]
UnitInterval = Annotated[float, WithinRange(0.0, 1.0), Decimals(2), SingleStep(0.01)]


@parameterNodeWrapper
class ConformalSegParameterNode:
    """All state of the panel (saved with the scene)."""

    inputVolume: vtkMRMLScalarVolumeNode
    probabilityVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: Path
    profilePath: Path
    secondProfilePath: Path
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    mcDropoutSamples: Annotated[int, WithinRange(0, 64)] = 0
    epsilon: Annotated[float, WithinRange(0.0, 1.0), Decimals(3), SingleStep(0.01)] = 0.1
    alpha: Level = 0.1
    alphaInner: Level = 0.1
    alphaOuter: Level = 0.1
    showLesion: bool = True
    showInnerSet: bool = True
    showOuterSet: bool = True
    showThresholdSegment: bool = False
    show3D: bool = False
    overlay: Annotated[str, Choice(list(display.OVERLAYS))] = "probability"
    overlayHideBelow: UnitInterval = 0.05
    overlayOpacity: UnitInterval = 0.5
    datasetPath: Path
    calibrationMethod: Annotated[str, Choice(["cls", "crc", "sets"])] = "cls"
    lesionLabel: Annotated[int, WithinRange(1, 255)] = 1
    evaluationSplits: Annotated[int, WithinRange(1, 1000)] = 100
    calibrationOutputPath: Path
    evaluationResultsPath: Path
    intervalProfilePath: Path
    lowerVolume: vtkMRMLScalarVolumeNode
    upperVolume: vtkMRMLScalarVolumeNode
    organSegmentation: vtkMRMLSegmentationNode
    truthVolume: vtkMRMLScalarVolumeNode
    intervalLengthVolume: vtkMRMLScalarVolumeNode


def isSet(path) -> bool:
    """A path parameter that was given (an unset pathlib parameter reads as ``.``)."""
    return path is not None and str(path) not in ("", ".")


def sliderSettings(p) -> SliderSettings:
    return SliderSettings(p.epsilon, p.alpha, p.alphaInner, p.alphaOuter, p.showThresholdSegment)


#
# ConformalSegWidget
#


class ConformalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: thin glue between the .ui, the parameter node and :class:`ConformalSegLogic`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._state = None  # SliderState of the current profiles + probability map
        self._stateKey = None
        self._profilesKey = None
        self._written = None  # (segmentation id, id(state)): where the state's masks were written
        self._results = None  # ((path, mtime), results dict) of conformalseg evaluate
        self._plotsKey = None
        self._overlayKey = None
        self._overlayShown = False
        self._inference = None  # ProcessPump
        self._background = None  # ProcessPump of calibrate / evaluate
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(60)  # coalesce slider drags
        self._refreshTimer.timeout.connect(self.refresh)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ConformalSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ConformalSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.calibrateButton.connect("clicked(bool)", self.onCalibrateButton)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.showPlotsButton.connect("clicked(bool)", self.onShowPlotsButton)
        self.ui.applyIntervalsButton.connect("clicked(bool)", self.onApplyIntervalsButton)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._refreshTimer.stop()
        for pump in (self._inference, self._background):
            if pump is not None:
                pump.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onReload(self) -> None:
        """Developer reload: re-import the helper package and the library too (importlib)."""
        self.cleanup()
        environment.reload_packages(("ConformalSegSlicer", "ConformalSegLib"))
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._state = self._stateKey = self._profilesKey = self._written = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # each widget of the .ui carries a "SlicerParameterName" dynamic property
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            for name in ("modelPathLineEdit", "profilePathLineEdit", "secondProfilePathLineEdit", "datasetPathLineEdit",
                         "calibrationOutputPathLineEdit", "evaluationResultsPathLineEdit",
                         "intervalProfilePathLineEdit"):
                lineEdit = getattr(self.ui, name)
                if lineEdit.currentPath in (".", "./"):
                    lineEdit.currentPath = ""  # an unset path parameter reads "."
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self._refreshTimer.start()

    # ------------------------------------------------------------------ refresh

    def refresh(self) -> None:
        """Bring the segments, overlays, plots and buttons in line with the parameter node."""
        p = self._parameterNode
        if p is None:
            return
        self._updateButtons()
        self._updateSegments()
        self._updateDisplay()
        self._updatePlots()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self._inference is not None and self._inference.running
        canApply = bool(p.inputVolume and isSet(p.modelPath)) or bool(p.probabilityVolume and isSet(p.profilePath))
        self.ui.applyButton.enabled = running or canApply
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = (_("Stop the model (kills the process and all its children)") if running else
                                       _("Run the model on the input volume (out of process), then compute the segments")
                                       if isSet(p.modelPath) else _("Compute the segments from the probability map"))
        busy = self._background is not None and self._background.running
        hasData = isSet(p.datasetPath) and isSet(p.calibrationOutputPath)
        self.ui.calibrateButton.enabled = hasData and (not busy or self._backgroundCommand == "calibrate")
        self.ui.evaluateButton.enabled = hasData and (not busy or self._backgroundCommand == "evaluate")
        self.ui.calibrateButton.text = _("Cancel") if busy and self._backgroundCommand == "calibrate" else _("Calibrate")
        self.ui.evaluateButton.text = _("Cancel") if busy and self._backgroundCommand == "evaluate" else _("Evaluate")
        self.ui.showPlotsButton.enabled = isSet(p.evaluationResultsPath)
        self.ui.applyIntervalsButton.enabled = bool(isSet(p.intervalProfilePath) and p.lowerVolume and p.upperVolume)

    def _profilePaths(self) -> list:
        p = self._parameterNode
        return [path for path in (p.profilePath, p.secondProfilePath) if isSet(path)]

    def _updateSegments(self) -> None:
        p = self._parameterNode
        paths = self._profilePaths()
        if not paths or not p.probabilityVolume:
            self._state = None
            self._setGuarantee(_("Choose a calibration profile and a probability map (or a model to produce one)."))
            return
        try:
            profilesKey = tuple((str(path), os.path.getmtime(path) if os.path.exists(path) else None) for path in paths)
            imageData = p.probabilityVolume.GetImageData()
            stateKey = (profilesKey, p.probabilityVolume.GetID(), imageData.GetMTime() if imageData else None)
            if stateKey != self._stateKey:
                self._state = None
                self._stateKey = stateKey
                self._state = self.logic.loadSliderState(p.probabilityVolume, paths)
                if profilesKey != self._profilesKey:  # a new profile: start from its calibrated parameters
                    self._profilesKey = profilesKey
                    self._applySettings(self._state.initial_settings())
            if self._state is None:
                return
            enabled = relevant_sliders(self._state.profiles)
            for name in ("epsilon", "alpha", "alphaInner", "alphaOuter"):
                getattr(self.ui, name + "SliderWidget").enabled = name in enabled
            reference = p.inputVolume or p.probabilityVolume
            writeAll = self._written != (p.outputSegmentation.GetID() if p.outputSegmentation else None, id(self._state))
            segmentation, result = self.logic.updateSegmentation(self._state, sliderSettings(p), p.outputSegmentation,
                                                                 reference, p.probabilityVolume, writeAll=writeAll)
            self._written = (segmentation.GetID(), id(self._state))
            if p.outputSegmentation is None or p.outputSegmentation.GetID() != segmentation.GetID():
                p.outputSegmentation = segmentation
            self._setGuarantee(result.text, warning=result.has_warning)
            self._fillResultsTable(result)
        except (ConformalSegError, ValueError, OSError) as exc:
            self._state = None
            self._setGuarantee(str(exc), warning=True)
        except Exception as exc:  # keep the panel usable; the traceback goes to the log
            logging.exception("ConformalSeg: updating the segments failed")
            self._state = None
            self._setGuarantee(_("Updating the segments failed: {error}").format(error=exc), warning=True)

    def _applySettings(self, settings: SliderSettings) -> None:
        p = self._parameterNode
        p.epsilon, p.alpha, p.alphaInner, p.alphaOuter = (settings.epsilon, settings.alpha, settings.alpha_inner,
                                                          settings.alpha_outer)

    @staticmethod
    def _setStatus(label, text: str, warning: bool = False) -> None:
        label.text = text
        label.styleSheet = "QLabel { color: #b34700; }" if warning else ""

    def _setGuarantee(self, text: str, warning: bool = False) -> None:
        self._setStatus(self.ui.guaranteeLabel, text, warning)

    def _fillResultsTable(self, result) -> None:
        table = self.ui.resultsTable
        names = segments.sort_names(result.segments)
        table.setRowCount(len(names))
        for row, name in enumerate(names):
            segment = result.segments[name]
            for column, text in enumerate((name, f"{segment.voxels:,}", f"{segment.volume_ml:.2f}", segment.rule)):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()

    def _fillIntervalsTable(self, rows, withRisk: bool) -> None:
        """One row per organ of the profile (``intervals.TABLE_COLUMNS``); the risk column only with a ground truth."""
        table = self.ui.intervalsTable
        table.setRowCount(len(rows))
        for row, texts in enumerate(rows):
            for column, text in enumerate(texts):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.setColumnHidden(len(intervals.TABLE_COLUMNS) - 1, not withRisk)
        table.resizeColumnsToContents()

    def _updateDisplay(self) -> None:
        p = self._parameterNode
        if p.outputSegmentation:
            visible = {name: getattr(p, segments.VISIBILITY_PARAMETER[name]) for name in segments.SEGMENT_ORDER}
            self.logic.showSegments(p.outputSegmentation, visible, p.show3D)
        overlayNode = {"probability": p.probabilityVolume, "uncertainty": p.uncertaintyVolume,
                       "interval": p.intervalLengthVolume}.get(p.overlay)
        imageData = overlayNode.GetImageData() if overlayNode else None
        key = (overlayNode.GetID() if overlayNode else None, imageData.GetMTime() if imageData else None, p.overlay,
               p.overlayHideBelow, p.overlayOpacity)
        if key != self._overlayKey:
            self._overlayKey = key
            if overlayNode is not None:
                self.logic.showOverlay(overlayNode, p.overlay, p.overlayHideBelow, p.overlayOpacity, p.inputVolume)
                self._overlayShown = True
            elif self._overlayShown:  # only ever clear a foreground layer this module set
                adapter.hide_overlay()
                self._overlayShown = False

    def _updatePlots(self, show: bool = False) -> None:
        p = self._parameterNode
        if not isSet(p.evaluationResultsPath):
            return
        path = Path(p.evaluationResultsPath)
        key = (str(path), path.stat().st_mtime if path.exists() else None)
        try:
            if self._results is None or self._results[0] != key:
                self._results = (key, None)  # a file that fails is reported once, not at every refresh
                self._results = (key, evaluation_plots.load_results(path))
            if self._results[1] is None:
                return
            plotsKey = (key, p.epsilon, p.alpha)
            if plotsKey != self._plotsKey or show:
                self._plotsKey = plotsKey
                charts = self.logic.updateEvaluationPlots(self._results[1], p.epsilon, p.alpha)
                if show:
                    adapter.show_chart(charts[0])
        except (ConformalSegError, OSError, KeyError, ValueError) as exc:
            self.ui.calibrationLogTextEdit.appendPlainText(_("Cannot plot the evaluation: {error}").format(error=exc))

    # ------------------------------------------------------------------ inference

    def onDeviceChanged(self, index=None) -> None:
        # the combo box, not the parameter node: this slot may run before the node is updated
        self.ui.deviceLabel.text = self.logic.describeDevice(self.ui.deviceComboBox.currentText or "auto")

    def onApplyButton(self) -> None:
        if self._inference is not None and self._inference.running:
            self._inference.cancel()
            return
        p = self._parameterNode
        if not isSet(p.modelPath):
            self._stateKey = None  # recompute from the probability map now
            self.refresh()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the model."), waitCursor=True):
            if not self.logic.ensureInferenceDependencies():
                return
            choice = self.logic.deviceChoice(p.device)
            self.ui.deviceLabel.text = choice.message
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self._inference = self.logic.startInference(
                p.inputVolume, p.modelPath, choice.device, p.mcDropoutSamples,
                onOutput=self.ui.logTextEdit.appendPlainText, onProgress=self._onInferenceProgress,
                onFinished=self._onInferenceFinished)
        self._updateButtons()

    def _onInferenceProgress(self, fraction: float, label: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{label} %p%" if label else "%p%"

    def _onInferenceFinished(self, returncode: int, cancelled: bool, outDir: str) -> None:
        p = self._parameterNode
        log = self.ui.logTextEdit.appendPlainText
        if cancelled:
            log(_("Cancelled: the model process and its children were stopped."))
        elif returncode != 0:
            log(_("The model failed (exit status {status}); see the messages above.").format(status=returncode))
            slicer.util.errorDisplay(_("The model failed. See the log in the Model inference section."))
        else:
            with slicer.util.tryWithErrorDisplay(_("Failed to load the model's output."), waitCursor=True):
                probability, uncertainty = self.logic.loadInferenceResults(outDir, p.inputVolume)
                p.probabilityVolume = probability
                if uncertainty is not None:
                    p.uncertaintyVolume = uncertainty
                self.ui.progressBar.value = 100
                log(_("Loaded {name}.").format(name=probability.GetName()))
        adapter.remove_work_folder(outDir)
        self._updateButtons()

    # ------------------------------------------------------------------ calibration (researchers)

    _backgroundCommand = None

    def _startBackground(self, command: str) -> None:
        if self._background is not None and self._background.running:
            self._background.cancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start {command}.").format(command=command), waitCursor=True):
            if not self.logic.ensurePythonRequirements():
                return
            self.ui.calibrationLogTextEdit.clear()
            self.ui.calibrationProgressBar.value = 0
            callbacks = dict(onOutput=self.ui.calibrationLogTextEdit.appendPlainText,
                             onProgress=self._onBackgroundProgress, onFinished=self._onBackgroundFinished)
            if command == "calibrate":
                self._background = self.logic.startCalibration(p.datasetPath, p.calibrationMethod, p.lesionLabel,
                                                               p.calibrationOutputPath, sliderSettings(p), **callbacks)
            else:
                self._background = self.logic.startEvaluation(p.datasetPath, p.lesionLabel, p.evaluationSplits,
                                                              p.calibrationOutputPath, sliderSettings(p), **callbacks)
            self._backgroundCommand = command
        self._updateButtons()

    def _onBackgroundProgress(self, fraction: float, label: str) -> None:
        self.ui.calibrationProgressBar.value = int(round(100 * fraction))

    def onCalibrateButton(self) -> None:
        self._startBackground("calibrate")

    def onEvaluateButton(self) -> None:
        self._startBackground("evaluate")

    def _onBackgroundFinished(self, returncode: int, cancelled: bool, output: str) -> None:
        p = self._parameterNode
        log = self.ui.calibrationLogTextEdit.appendPlainText
        if cancelled:
            log(_("Cancelled."))
        elif returncode != 0:
            log(_("Failed (exit status {status}); see the messages above.").format(status=returncode))
        elif self._backgroundCommand == "calibrate":
            if p.calibrationMethod == "sets":
                p.secondProfilePath = Path(output)
            else:
                p.profilePath = Path(output)
            log(_("Profile loaded: {path}").format(path=output))
        else:
            p.evaluationResultsPath = Path(output)
            self._updatePlots(show=True)
        self.ui.calibrationProgressBar.value = 100 if returncode == 0 else self.ui.calibrationProgressBar.value
        self._updateButtons()

    def onShowPlotsButton(self) -> None:
        self._updatePlots(show=True)

    # ------------------------------------------------------------------ organ-dependent intervals (sem-CRC)

    def onApplyIntervalsButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to apply the interval profile."), waitCursor=True):
            try:
                applied = self.logic.applyIntervalProfile(p.intervalProfilePath, p.lowerVolume, p.upperVolume,
                                                          p.organSegmentation, p.truthVolume, p.intervalLengthVolume)
            except (ConformalSegError, ValueError, OSError) as exc:
                self._setStatus(self.ui.intervalsStatusLabel, str(exc), warning=True)
                return
            outcome = applied.outcome
            self._setStatus(self.ui.intervalsStatusLabel, outcome.text, warning=outcome.has_warning)
            self._fillIntervalsTable(outcome.rows, withRisk=p.truthVolume is not None)
            p.intervalLengthVolume = applied.lengthNode
            p.overlay = "interval"


#
# ConformalSegLogic
#


class ConformalSegLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from scripts without the GUI.

    ``runnerFactory`` makes the out-of-process runner (default
    :class:`ConformalSegSlicer.process.ProcessRunner`): it is called as
    ``runnerFactory(argv, env=..., on_output=..., on_progress=..., on_finished=..., stages=...)``.
    """

    def __init__(self, runnerFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runnerFactory or ProcessRunner

    def getParameterNode(self):
        return ConformalSegParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ segments (in process)

    def loadSliderState(self, probabilityVolume, profilePaths) -> SliderState:
        """Profiles + the probability map of a volume node (copied) on its own grid."""
        return SliderState.from_files(profilePaths, adapter.volume_array(probabilityVolume),
                                      adapter.volume_geometry(probabilityVolume))

    def updateSegmentation(self, state: SliderState, settings: SliderSettings, segmentationNode, referenceVolume,
                           maskVolume=None, writeAll: bool = True):
        """Recalibrate for ``settings`` and write the changed segments (all with ``writeAll``) into
        ``segmentationNode`` (created when None, with ``referenceVolume``'s geometry); the masks are on
        the grid of ``maskVolume`` (the probability map; default ``referenceVolume``). Returns
        ``(segmentationNode, SliderResult)``."""
        if referenceVolume is None:
            raise ValueError("a reference volume is needed for the segmentation geometry")
        result = state.update(settings)
        segmentationNode = adapter.ensure_segmentation(segmentationNode, referenceVolume)
        names = list(result.segments) if writeAll else result.changed
        adapter.update_segments(segmentationNode, {n: result.segments[n].mask for n in names},
                                maskVolume or referenceVolume)
        adapter.remove_segments(segmentationNode, keep=result.segments)
        return segmentationNode, result

    def process(self, probabilityVolume, profilePaths, settings: SliderSettings | None = None,
                segmentationNode=None, referenceVolume=None):
        """One call: profiles + probability volume -> segmentation node (and the SliderResult)."""
        state = self.loadSliderState(probabilityVolume, profilePaths)
        return self.updateSegmentation(state, settings or state.initial_settings(), segmentationNode,
                                       referenceVolume or probabilityVolume, probabilityVolume)

    def showSegments(self, segmentationNode, visible, show3D: bool) -> None:
        adapter.set_segment_visibility(segmentationNode, visible)
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None and bool(displayNode.GetVisibility3D()) != bool(show3D):
            adapter.show_segmentation_3d(segmentationNode, show3D)

    def showOverlay(self, volumeNode, kind: str, hideBelow: float, opacity: float, backgroundVolume=None) -> None:
        """``volumeNode`` as the slice views' foreground ("probability", "uncertainty" or "interval"
        display: see :mod:`ConformalSegSlicer.display`)."""
        low, high = (0.0, 1.0) if kind == "probability" else adapter.data_range(volumeNode)
        adapter.show_overlay(volumeNode, display.overlay_display(kind, low, high, hideBelow), opacity,
                             backgroundVolume)

    # ------------------------------------------------------------------ organ-dependent intervals (sem-CRC)

    def applyIntervalProfile(self, profilePath, lowerNode, upperNode, segmentationNode=None, truthNode=None,
                             lengthNode=None) -> intervals.AppliedIntervals:
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
        intervals.check_grids(adapter.volume_geometry(lowerNode), {
            "upper quantile volume": adapter.volume_geometry(upperNode),
            "ground truth": adapter.volume_geometry(truthNode) if truthNode is not None else None})
        profile = intervals.load_profile(profilePath)
        match = masks = None
        if segmentationNode is not None:
            match = intervals.match_segments(adapter.segment_names(segmentationNode), intervals.profile_organs(profile))
            masks = adapter.segment_arrays(segmentationNode, match.segment_ids, lowerNode)
        outcome = intervals.apply_profile(
            profile, adapter.volume_array(lowerNode, copy=False), adapter.volume_array(upperNode, copy=False), match,
            masks, adapter.volume_array(truthNode, copy=False) if truthNode is not None else None)
        base, result = lowerNode.GetName(), outcome.application
        lower = adapter.output_volume("intervalLower", f"{base} conformal lower", result.lower, lowerNode)
        upper = adapter.output_volume("intervalUpper", f"{base} conformal upper", result.upper, lowerNode)
        length = (adapter.write_volume(lengthNode, result.length, lowerNode) if lengthNode is not None else
                  adapter.output_volume("intervalLength", f"{base} interval length", result.length, lowerNode))
        return intervals.AppliedIntervals(outcome, lower, upper, length)

    # ------------------------------------------------------------------ out of process

    def _start(self, argv, stages, onOutput, onProgress, onFinished):
        runner = self.runnerFactory(argv, env=adapter.environment_for_child(), on_output=onOutput,
                                    on_progress=onProgress, on_finished=onFinished, stages=stages)
        logging.info("ConformalSeg: running %s", " ".join(str(a) for a in argv))
        return adapter.ProcessPump(runner).start()

    def startInference(self, inputVolume, modelPath, device="auto", mcDropout=0, onOutput=None, onProgress=None,
                       onFinished=None):
        """Export ``inputVolume`` and run ``conformalseg infer`` on it in PythonSlicer; returns the
        pump. ``onFinished(returncode, cancelled, outDir)``."""
        if inputVolume is None:
            raise ValueError("choose the input volume the model runs on")
        work = adapter.temporary_folder()
        image = os.path.join(work, "images", commands.INPUT_CASE_ID + ".nii.gz")
        os.makedirs(os.path.dirname(image))
        adapter.export_volume(inputVolume, image)
        outDir = os.path.join(work, "out")
        argv = commands.infer_command(adapter.python_slicer(), model=modelPath, images=image, out_dir=outDir,
                                      mc_dropout=mcDropout, device=device)
        return self._start(argv, commands.progress_stages("infer"), onOutput, onProgress,
                           lambda code, cancelled: onFinished and onFinished(code, cancelled, outDir))

    def loadInferenceResults(self, outDir, referenceVolume=None):
        """Probability (and MC-dropout variance) volumes written by ``conformalseg infer``."""
        found = commands.find_inference_outputs(outDir)
        if found.probability is None:
            raise ConformalSegError("the model wrote no probability map", path=outDir, fix="see the log for its error")
        base = referenceVolume.GetName() if referenceVolume is not None else "ConformalSeg"
        probability = adapter.load_volume(found.probability, f"{base} lesion probability")
        uncertainty = adapter.load_volume(found.variance, f"{base} MC-dropout variance") if found.variance else None
        return probability, uncertainty

    def runInference(self, inputVolume, modelPath, device="cpu", mcDropout=0, timeout=None):
        """Blocking inference (scripts, tests): returns ``(probabilityVolume, uncertaintyVolume)``."""
        finished = {}
        pump = self.startInference(inputVolume, modelPath, device, mcDropout,
                                   onFinished=lambda code, cancelled, out: finished.update(code=code, out=out))
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

    def startCalibration(self, dataDir, method, lesionLabel, outDir, settings: SliderSettings, onOutput=None,
                         onProgress=None, onFinished=None):
        """``conformalseg calibrate`` in the background; ``onFinished(returncode, cancelled, profilePath)``."""
        os.makedirs(outDir, exist_ok=True)
        profile = os.path.join(str(outDir), f"{method}.json")
        s = settings.snapped()
        argv = commands.calibrate_command(adapter.python_slicer(), data_dir=dataDir, method=method, out_profile=profile,
                                          lesion_labels=lesionLabel, epsilon=s.epsilon, alpha=s.alpha,
                                          alpha_inner=s.alpha_inner, alpha_outer=s.alpha_outer, force=True)
        return self._start(argv, commands.progress_stages("calibrate"), onOutput, onProgress,
                           lambda code, cancelled: onFinished and onFinished(code, cancelled, profile))

    def startEvaluation(self, dataDir, lesionLabel, splits, outDir, settings: SliderSettings, onOutput=None,
                        onProgress=None, onFinished=None):
        """``conformalseg evaluate`` in the background; ``onFinished(returncode, cancelled, resultsJson)``."""
        out = os.path.join(str(outDir), "evaluation")
        s = settings.snapped()
        argv = commands.evaluate_command(adapter.python_slicer(), data_dir=dataDir, out_dir=out,
                                         lesion_labels=lesionLabel, splits=splits, epsilon=s.epsilon, alpha=s.alpha)
        return self._start(argv, commands.progress_stages("evaluate"), onOutput, onProgress,
                           lambda code, cancelled: onFinished and onFinished(code, cancelled,
                                                                             os.path.join(out, "results.json")))

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

    def requirements(self, inference: bool = False) -> list:
        """``Resources/requirements.txt`` (without the inference packages unless ``inference``)."""
        wanted = environment.read_requirements(os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt"))
        if inference:
            return wanted
        return [r for r in wanted if environment.canonical(environment.requirement_name(r))
                not in environment.INFERENCE_PACKAGES]

    def ensurePythonRequirements(self, inference: bool = False) -> bool:
        """Install the missing requirements after a confirmation (never Slicer's numpy, SimpleITK...)."""
        return adapter.ensure_requirements(self.requirements(inference), requester="ConformalSeg")

    def ensureInferenceDependencies(self) -> bool:
        """PyTorch (through the PyTorch extension) and MONAI; False when the user declined."""
        if adapter.torch_module(install=True) is None:
            return False
        return self.ensurePythonRequirements(inference=True)


#
# ConformalSegTest
#


class ConformalSegTest(ScriptedLoadableModuleTest):
    """Self-tests: run from the Reload & Test button, ``slicer.selfTests["ConformalSeg"]()``, or ctest."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentsMatchLibraryForTwoSliderSettings()
        self.setUp()
        self.test_CancelKillsProcessTree()
        self.setUp()
        self.test_IntervalOverlayMatchesLibrary()
        self.setUp()
        self.test_TinyModelEndToEnd()

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
        from ConformalSegSlicer import fixtures

        self.delayDisplay("Synthetic scan, probability map and profiles")
        with tempfile.TemporaryDirectory() as folder:
            fixture = fixtures.make_slider_fixture(folder)
            image, probability = self._addCase(fixture.case)
            self.assertIsNone(fixture.case.geometry.mismatch(adapter.volume_geometry(probability)))
            logic = ConformalSegLogic()
            state = logic.loadSliderState(probability, fixture.profile_paths)
            segmentation = None
            for settings in fixtures.SLIDER_CHECKS:
                segmentation, result = self._assertSegmentsMatch(logic, state, settings, segmentation, image)
            self.assertIn("too few", result.text)  # alpha = 0.04 needs 24 scans, the profile has 19
            self.assertTrue(result.has_warning)
        self.delayDisplay("Segments equal the library's masks")

    def test_CancelKillsProcessTree(self):
        from ConformalSegSlicer.process import pid_alive

        code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(300)']); print('CHILD', child.pid, flush=True); time.sleep(300)")
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
        from ConformalSegSlicer import fixtures

        reason = fixtures.tiny_model_unavailable_reason()
        if reason:
            logging.warning("ConformalSeg tiny-model end-to-end test SKIPPED: %s", reason)
            self.delayDisplay(f"Skipped the tiny-model end-to-end test: {reason}")
            return
        with tempfile.TemporaryDirectory() as folder:
            fixture = fixtures.make_slider_fixture(folder, methods=("cls",))
            model = fixtures.make_tiny_model(os.path.join(folder, "model"))
            image, _probability = self._addCase(fixture.case)
            logic = ConformalSegLogic()
            probability, uncertainty = logic.runInference(image, model, device="cpu", mcDropout=2, timeout=600)
            self.assertIsNotNone(uncertainty)
            self.assertIsNone(adapter.volume_geometry(image).mismatch(adapter.volume_geometry(probability)))
            values = adapter.volume_array(probability, copy=False)
            self.assertTrue(0.0 <= float(values.min()) and float(values.max()) <= 1.0)
            state = logic.loadSliderState(probability, fixture.profile_paths)
            self._assertSegmentsMatch(logic, state, fixtures.SLIDER_CHECKS[0], None, image)
        self.delayDisplay("Tiny model ran end to end on the CPU")

    def test_IntervalOverlayMatchesLibrary(self):
        from ConformalSegLib.common.geometry import Geometry
        from ConformalSegSlicer import fixtures

        reason = fixtures.interval_fixture_unavailable_reason()
        if reason:
            logging.warning("ConformalSeg sem-CRC self-test SKIPPED: %s", reason)
            self.delayDisplay(f"Skipped the sem-CRC self-test: {reason}")
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
            logic = ConformalSegLogic()
            applied = logic.applyIntervalProfile(fixture.profile_path, lower, upper, organs, truth)
            expected = fixture.expected(with_truth=True)
            volumes = len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
            again = logic.applyIntervalProfile(fixture.profile_path, lower, upper, organs, None, applied.lengthNode)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")), volumes)  # outputs reused
        self.assertEqual(again.lengthNode.GetID(), applied.lengthNode.GetID())
        self.assertEqual(again.outcome.rows[0][-1], "")  # no ground truth: no risk
        overlay = adapter.volume_array(applied.lengthNode)
        self.assertTrue(np.array_equal(overlay, expected.length))
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
        foreground = [n.GetForegroundVolumeID() for n in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")]
        self.assertIn(applied.lengthNode.GetID(), foreground)
        self.delayDisplay("The interval-length overlay equals the library's length map")
