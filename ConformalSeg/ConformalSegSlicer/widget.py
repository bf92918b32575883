"""The ConformalSeg panel (the module's widget): the .ui, the parameter node and the logic, kept in sync.

``ConformalSeg.py`` subclasses :class:`Widget` as ``ConformalSegWidget`` (the name Slicer looks up) with
the module's logic. Everything the panel computes is done by :mod:`ConformalSegSlicer.logic` and the
Slicer-free helpers; this module only reads and writes widgets and the parameter node.

This file is long because the panel is one widget whose sections (segments, model, calibration,
reviewed cases, intervals) share the parameter node and its refresh; each handler is short.
"""

import logging
import os
from pathlib import Path

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from ConformalSegLib.common.errors import ConformalSegError

from . import (
    commands,
    display,
    environment,
    evaluation_plots,
    inference_check,
    intervals,
    profile_apply,
    segments,
    spatial,
)
from . import slicer_adapter as adapter
from .drift import drift_badge
from .logic import Logic
from .slider import SliderSettings, relevant_sliders


def isSet(path) -> bool:
    """A path parameter that was given (an unset pathlib parameter reads as ``.``)."""
    return path is not None and str(path) not in ("", ".")


def sliderSettings(p) -> SliderSettings:
    return SliderSettings(p.epsilon, p.alpha, p.alphaInner, p.alphaOuter, p.showThresholdSegment, p.sliderSafe)


class Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: glue between the .ui, the parameter node and the logic (:attr:`logicClass`).

    One class, in sections (segments, model inference, calibration, sem-CRC intervals): it loads the
    .ui itself, so every ``self.ui.<name>`` here is checked statically against the .ui by the Slicer
    API checker (names, and C++ methods PythonQt does not expose).
    """

    #: The logic the panel drives; ``ConformalSeg.py`` sets the module's own (with its parameter node).
    logicClass = Logic

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
        self._segExports = []  # (profile, SEG file) still to export, the running one first
        self._background = None  # ProcessPump of calibrate / evaluate
        self._scoreMaps = None  # ProcessPump of the confidence-set score maps
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
        self.logic = self.logicClass()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.calibrateButton.connect("clicked(bool)", self.onCalibrateButton)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.showPlotsButton.connect("clicked(bool)", self.onShowPlotsButton)
        self.ui.applyIntervalsButton.connect("clicked(bool)", self.onApplyIntervalsButton)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCaseButton)
        self.ui.exportSegButton.connect("clicked(bool)", self.onExportSegButton)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._refreshTimer.stop()
        for pump in (self._inference, self._background, self._scoreMaps):
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
        for pump in (self._inference, self._background, self._scoreMaps):  # results of the closing scene
            if pump is not None and pump.running:
                pump.stop()
        self._inference = self._background = self._scoreMaps = None
        self._segExports = []
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
            self._labelChoices()
            self._blankUnsetPaths()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self._refreshTimer.start()

    _PATH_LINE_EDITS = (
        "modelPathLineEdit",
        "profilePathLineEdit",
        "secondProfilePathLineEdit",
        "datasetPathLineEdit",
        "calibrationOutputPathLineEdit",
        "evaluationResultsPathLineEdit",
        "intervalProfilePathLineEdit",
        "foldsPathLineEdit",
        "dicomSegPathLineEdit",
        "dicomReferencePathLineEdit",
    )

    def _labelChoices(self) -> None:
        """Readable combo-box items: parameterNodeWrapper fills them with the choice identifiers and reads
        the choice by index, so the item texts can be replaced by labels (``cls`` -> "CLS: ...")."""
        for combo, labels in (
            (self.ui.overlayComboBox, display.OVERLAY_LABELS),
            (self.ui.calibrationMethodComboBox, commands.METHOD_LABELS),
            (self.ui.calibrationScoreComboBox, commands.SCORE_LABELS),
        ):
            for index in range(combo.count):
                label = labels.get(combo.itemText(index))
                if label is not None:
                    combo.setItemText(index, label)

    def _blankUnsetPaths(self) -> None:
        """Show unset path parameters as empty fields. parameterNodeWrapper writes ``str(Path())`` = "." into
        every path line edit on each parameter-node change, so this runs at every refresh, not once."""
        for name in self._PATH_LINE_EDITS:
            lineEdit = getattr(self.ui, name)
            if lineEdit.currentPath in (".", "./"):
                lineEdit.currentPath = ""

    # ------------------------------------------------------------------ refresh

    def refresh(self) -> None:
        """Bring the segments, overlays, plots and buttons in line with the parameter node."""
        p = self._parameterNode
        if p is None:
            return
        self._blankUnsetPaths()
        self._updateButtons()
        self._updateSegments()
        self._updateDisplay()
        self._updatePlots()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self._inference is not None and self._inference.running
        canApply = (
            bool(p.inputVolume and isSet(p.modelPath))
            or bool(p.probabilityVolume and isSet(p.profilePath))
            or bool(isSet(p.profilePath) and isSet(p.foldsPath))  # a fold profile on the case's fold outputs
        )
        self.ui.applyButton.enabled = running or canApply
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = (
            _("Stop the model (kills the process and all its children)")
            if running
            else _("Run the model on the input volume (out of process), then compute the segments")
            if isSet(p.modelPath)
            else _("Compute the segments from the probability map")
        )
        busy = self._background is not None and self._background.running
        hasData = isSet(p.datasetPath) and isSet(p.calibrationOutputPath)
        self.ui.calibrateButton.enabled = hasData and (not busy or self._backgroundCommand == "calibrate")
        self.ui.evaluateButton.enabled = hasData and (not busy or self._backgroundCommand == "evaluate")
        self.ui.calibrateButton.text = (
            _("Cancel") if busy and self._backgroundCommand == "calibrate" else _("Calibrate")
        )
        self.ui.evaluateButton.text = _("Cancel") if busy and self._backgroundCommand == "evaluate" else _("Evaluate")
        self.ui.showPlotsButton.enabled = isSet(p.evaluationResultsPath)
        self.ui.applyIntervalsButton.enabled = bool(isSet(p.intervalProfilePath) and p.lowerVolume and p.upperVolume)
        self.ui.addCaseButton.enabled = bool(
            self._profilePaths() and p.probabilityVolume and p.reviewedSegmentation and not busy
        )
        self.ui.exportSegButton.enabled = bool(
            isSet(p.profilePath) and p.probabilityVolume and isSet(p.dicomSegPath) and not running
        )

    def _profilePaths(self) -> list:
        p = self._parameterNode
        return [path for path in (p.profilePath, p.secondProfilePath) if isSet(path)]

    def _updateSegments(self) -> None:
        p = self._parameterNode
        self._guaranteeBlocker = None
        paths = self._profilePaths()
        if not paths or not p.probabilityVolume:
            self._state = None
            self._setGuarantee(_("Choose a calibration profile and a probability map (or a model to produce one)."))
            return
        try:
            profilesKey = tuple((str(path), os.path.getmtime(path) if os.path.exists(path) else None) for path in paths)
            if self._maskProfile(profilesKey):  # margins around a label map: Apply runs `apply --mask`
                self._state = None
                self._setGuarantee(
                    self._maskResultText
                    or _(
                        "This profile was calibrated on predicted masks (a mask-only tool such as TotalSegmentator): "
                        "choose the tool's label map as the probability map and press Apply."
                    )
                )
                return
            imageData = p.probabilityVolume.GetImageData()
            stateKey = (profilesKey, p.probabilityVolume.GetID(), imageData.GetMTime() if imageData else None)
            if stateKey != self._stateKey:
                self._state = None
                self._stateKey = stateKey
                self._state = self.logic.loadSliderState(p.probabilityVolume, paths, inlineScores=False)
                self._startScoreMaps(self._state)
                if profilesKey != self._profilesKey:  # a new profile: start from its calibrated parameters
                    self._profilesKey = profilesKey
                    self._applySettings(self._state.initial_settings())
            if self._state is None:
                return
            gridWarning = None
            if p.inputVolume is not None and p.inputVolume.GetID() != p.probabilityVolume.GetID():
                gridWarning, gridError = spatial.grid_check(
                    adapter.volume_geometry(p.inputVolume), self._state.geometry
                )
                if gridError:
                    raise ConformalSegError(gridError)
            enabled = relevant_sliders(self._state.profiles)
            for name in ("epsilon", "alpha", "alphaInner", "alphaOuter"):
                getattr(self.ui, name + "SliderWidget").enabled = name in enabled
            reference = p.inputVolume or p.probabilityVolume
            writeAll = self._written != (
                p.outputSegmentation.GetID() if p.outputSegmentation else None,
                id(self._state),
            )
            segmentation, result = self.logic.updateSegmentation(
                self._state, sliderSettings(p), p.outputSegmentation, reference, p.probabilityVolume, writeAll=writeAll
            )
            self._written = (segmentation.GetID(), id(self._state))
            if p.outputSegmentation is None or p.outputSegmentation.GetID() != segmentation.GetID():
                p.outputSegmentation = segmentation
            badge, drifting = drift_badge(paths)  # the reviewed-case logs of `conformalseg monitor`
            blocker, note = inference_check.guarantee_blocker(
                [
                    (str(path), profile.provenance.get("inference"))
                    for path, profile in zip(paths, self._state.profiles)
                ],
                inference_check.from_node_value(p.probabilityVolume.GetAttribute(inference_check.NODE_ATTRIBUTE)),
            )
            self._guaranteeBlocker = blocker
            text = blocker or "\n".join(filter(None, (result.text, note, gridWarning, badge)))
            self._setGuarantee(text, warning=bool(blocker or note or gridWarning) or result.has_warning or drifting)
            self._fillResultsTable(result)
        except (ConformalSegError, ValueError, OSError) as exc:
            self._state = None
            self._setGuarantee(str(exc), warning=True)
        except Exception as exc:  # keep the panel usable; the traceback goes to the log
            logging.exception("ConformalSeg: updating the segments failed")
            self._state = None
            self._setGuarantee(_("Updating the segments failed: {error}").format(error=exc), warning=True)

    _maskProfileKey = None  # (profiles key, whether one of them is a mask-only margin profile)
    _maskResultText = None  # the guarantee sentences of the last `apply --mask` run for those profiles

    def _maskProfile(self, profilesKey) -> bool:
        if self._maskProfileKey is None or self._maskProfileKey[0] != profilesKey:
            isMask = any(
                self.logic.profileInput(path) == profile_apply.MASK for path, mtime in profilesKey if mtime is not None
            )
            self._maskProfileKey = (profilesKey, isMask)
            self._maskResultText = None
        return self._maskProfileKey[1]

    def _startMaskApply(self, folds: bool = False) -> None:
        """``conformalseg apply --mask`` on the label map chosen as the probability map (mask-only profile),
        or ``--folds`` on the fold folder (fold profile); with a DICOM SEG output path, ``--dicom-seg``
        against the input CT's series too."""
        p = self._parameterNode
        what = _("the fold profile") if folds else _("the mask-only profile")
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to apply {what}.").format(what=what), waitCursor=True):
                self.ui.logTextEdit.clear()
                source = (
                    {"foldsDir": str(p.foldsPath), "case": p.foldsCase.strip() or None}
                    if folds
                    else {"maskVolume": p.probabilityVolume}
                )
                self._inference = self.logic.startProfileApply(
                    p.profilePath,
                    referenceVolume=p.inputVolume,
                    dicomSeg=isSet(p.dicomSegPath),
                    dicomReferenceFolder=str(p.dicomReferencePath) if isSet(p.dicomReferencePath) else None,
                    onOutput=self.ui.logTextEdit.appendPlainText,
                    onFinished=self._onMaskApplyFinished,
                    **source,
                )
        except Exception:  # shown by tryWithErrorDisplay (which re-raises)
            logging.exception("ConformalSeg: starting conformalseg apply failed")
        finally:
            self._updateButtons()

    def _onMaskApplyFinished(self, returncode: int, cancelled: bool, outDir: str) -> None:
        self._onApplyChildFinished(
            returncode, cancelled, outDir, _("Applying the profile failed. See the log."),
            _("Failed to load the margin sets."), self._loadMaskApplyResult,
        )  # fmt: skip

    def _loadMaskApplyResult(self, outDir: str, log) -> None:
        p = self._parameterNode
        dicomSegPath = str(p.dicomSegPath) if isSet(p.dicomSegPath) else None
        segmentation, volumes, result = self.logic.loadProfileApplyResult(outDir, p.inputVolume, dicomSegPath)
        if dicomSegPath and result.dicom_seg is not None:
            log(_("Wrote the DICOM SEG {path}.").format(path=dicomSegPath))
        self._maskResultText = "\n".join([*result.guarantees, *([result.note] if result.note else [])])
        self._setGuarantee(self._maskResultText)
        log(_("Loaded {name}.").format(name=segmentation.GetName()))

    def _onApplyChildFinished(self, returncode: int, cancelled: bool, outDir: str, failure: str, step: str, handle):
        """The end of a ``conformalseg apply`` child: log a cancel, or a failure (and show ``failure``), else run
        ``handle(outDir, log)`` under ``step``'s error display; the work folder is removed in every case."""
        log = self.ui.logTextEdit.appendPlainText
        try:
            if cancelled:
                log(_("Cancelled."))
            elif returncode != 0:
                log(_("conformalseg apply failed (exit status {status}).").format(status=returncode))
                slicer.util.errorDisplay(failure)
            else:
                with slicer.util.tryWithErrorDisplay(step, waitCursor=True):
                    handle(outDir, log)
        except Exception:  # shown by tryWithErrorDisplay, which re-raises; clean up below all the same
            logging.exception("ConformalSeg: %s", step)
        finally:
            adapter.remove_work_folder(outDir)
            self._updateButtons()

    def onExportSegButton(self) -> None:
        """*Export DICOM SEG*: the masks the sliders show, at the sliders' levels, one SEG per loaded probability
        profile (:func:`~ConformalSegSlicer.profile_apply.seg_export_targets`: the first at the chosen path, a
        second beside it), each written by ``conformalseg apply --prob --dicom-seg`` in the background, one after
        the other."""
        p = self._parameterNode
        if self._profileInputNow() != profile_apply.PROBABILITY:
            slicer.util.errorDisplay(_("Export DICOM SEG is for probability profiles (the sliders' masks); for a "
                                       "mask-only or fold profile, Apply writes the DICOM SEG."))  # fmt: skip
            return
        self.ui.logTextEdit.clear()
        targets = profile_apply.seg_export_targets(str(p.dicomSegPath), [str(path) for path in self._profilePaths()])
        queue = [targets[0]]
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to read the second profile."), waitCursor=True):
                for profile, target in targets[1:]:
                    if self.logic.profileInput(profile) == profile_apply.PROBABILITY:
                        queue.append((profile, target))
                    else:
                        self.ui.logTextEdit.appendPlainText(
                            _("Not exported: {profile} is not a probability profile (Apply writes its DICOM "
                              "SEG).").format(profile=profile)
                        )  # fmt: skip
        except Exception:  # shown by tryWithErrorDisplay (which re-raises): export nothing
            logging.exception("ConformalSeg: reading the second profile failed")
            return
        self._segExports = queue
        self._startNextSegExport()

    def _startNextSegExport(self) -> None:
        """Start the first export of the queue ``self._segExports`` (``(profile, SEG file)`` pairs)."""
        p = self._parameterNode
        profile, target = self._segExports[0]
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to export the DICOM SEG."), waitCursor=True):
                self._inference = self.logic.startSegExport(
                    profile,
                    p.probabilityVolume,
                    sliderSettings(p),
                    referenceVolume=p.inputVolume or p.probabilityVolume,
                    dicomReferenceFolder=str(p.dicomReferencePath) if isSet(p.dicomReferencePath) else None,
                    onOutput=self.ui.logTextEdit.appendPlainText,
                    onFinished=self._onSegExportFinished,
                )
        except Exception:  # shown by tryWithErrorDisplay (which re-raises)
            logging.exception("ConformalSeg: starting the DICOM SEG export failed")
            self._segExports = []
        finally:
            self._updateButtons()

    def _onSegExportFinished(self, returncode: int, cancelled: bool, outDir: str) -> None:
        """Copy the finished export's SEG into place, then start the next profile's; a cancel or a failure
        empties the queue (nothing more is exported)."""
        if not self._segExports:  # the scene was closed meanwhile: nothing to copy
            adapter.remove_work_folder(outDir)
            return
        current, self._segExports = self._segExports[0], self._segExports[1:]
        copied = []

        def copy(out: str, log) -> None:
            copied.append(self._copyExportedSeg(current, out, log))

        self._onApplyChildFinished(
            returncode, cancelled, outDir, _("The DICOM SEG export failed. See the log."),
            _("Failed to write the DICOM SEG."), copy,
        )  # fmt: skip
        if not copied:
            self._segExports = []
        if self._segExports:
            self._startNextSegExport()

    def _copyExportedSeg(self, current, outDir: str, log) -> bool:
        profile, target = current
        replaced = os.path.exists(target)
        result = self.logic.finishSegExport(outDir, target)
        message = _("Replaced the DICOM SEG {path}.") if replaced else _("Wrote the DICOM SEG {path}.")
        log(message.format(path=target))
        for sentence in result.guarantees:
            log(sentence)
        return True

    def _startScoreMaps(self, state) -> None:
        """Confidence-set score maps in a background process; the segments are refreshed when they arrive
        (unless the state was replaced meanwhile)."""
        if self._scoreMaps is not None and self._scoreMaps.running:
            self._scoreMaps.stop()

        def arrived(ok: bool) -> None:
            if state is self._state:
                self._written = None  # write every segment of the completed state
                if ok:
                    self.refresh()
                else:
                    self._setGuarantee(_("Computing the score maps failed."), warning=True)

        self._scoreMaps = self.logic.startScoreMaps(state, onFinished=arrived)

    def _applySettings(self, settings: SliderSettings) -> None:
        p = self._parameterNode
        p.epsilon, p.alpha, p.alphaInner, p.alphaOuter = (
            settings.epsilon,
            settings.alpha,
            settings.alpha_inner,
            settings.alpha_outer,
        )

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
        overlayNode = {
            "probability": p.probabilityVolume,
            "uncertainty": p.uncertaintyVolume,
            "interval": p.intervalLengthVolume,
        }.get(p.overlay)
        imageData = overlayNode.GetImageData() if overlayNode else None
        key = (
            overlayNode.GetID() if overlayNode else None,
            imageData.GetMTime() if imageData else None,
            p.overlay,
            p.overlayHideBelow,
            p.overlayOpacity,
        )
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
            profileInput = self._profileInputNow()
            if p.probabilityVolume and profileInput == profile_apply.MASK:
                self._startMaskApply()
                return
            if profileInput == profile_apply.FOLDS:
                if not isSet(p.foldsPath):
                    slicer.util.errorDisplay(_("A fold profile is applied to the case's fold outputs: choose the "
                                               "nnU-Net folds folder first."))  # fmt: skip
                    return
                self._startMaskApply(folds=True)
                return
            self._stateKey = None  # recompute from the probability map now
            self.refresh()
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to start the model."), waitCursor=True):
                if not self.logic.ensureInferenceDependencies():
                    return
                # TorchScript / MONAI bundle models run code from their folder: ask (once per model per session)
                trusted = self.logic.confirmModelTrust(p.modelPath)
                if trusted is None:
                    self.ui.logTextEdit.appendPlainText(_("Not run: the model's code was not trusted."))
                    return
                # the loaded profile's recorded pipeline drives the run (MC passes, flips, seed; model checked)
                driving = self.logic.inferenceProfile(self._profilePaths())
                # the child resolves the device (no torch import or CUDA start-up in Slicer's process)
                self.ui.deviceLabel.text = environment.describe_unprobed(p.device)
                self.ui.logTextEdit.clear()
                self.ui.progressBar.value = 0
                if driving is not None:
                    self.ui.logTextEdit.appendPlainText(
                        _("Using the pipeline recorded in {profile} (its MC passes, flips and seed).").format(
                            profile=Path(driving).name
                        )
                    )
                self._inference = self.logic.startInference(
                    p.inputVolume,
                    p.modelPath,
                    p.device,
                    p.mcDropoutSamples,
                    onOutput=self.ui.logTextEdit.appendPlainText,
                    onProgress=self._onInferenceProgress,
                    onFinished=self._onInferenceFinished,
                    profilePath=driving,
                    trustModelCode=trusted,
                )
        except Exception:  # shown by tryWithErrorDisplay (which re-raises); keep the panel consistent
            logging.exception("ConformalSeg: starting the model failed")
        finally:
            self._updateButtons()

    def _profileInputNow(self):
        """What the loaded profile is applied to (``profile_apply.MASK``, ``FOLDS``, ``PROBABILITY``), or None."""
        p = self._parameterNode
        if not isSet(p.profilePath):
            return None
        try:
            return self.logic.profileInput(p.profilePath)
        except (ConformalSegError, OSError, ValueError):
            return None  # the refresh shows the profile's error

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
            try:
                with slicer.util.tryWithErrorDisplay(_("Failed to load the model's output."), waitCursor=True):
                    probability, uncertainty = self.logic.loadInferenceResults(outDir, p.inputVolume)
                    p.probabilityVolume = probability
                    if uncertainty is not None:
                        p.uncertaintyVolume = uncertainty
                    self.ui.progressBar.value = 100
                    log(_("Loaded {name}.").format(name=probability.GetName()))
                    device = inference_check.read_run_device(outDir)
                    if device:
                        self.ui.deviceLabel.text = _("The model ran on {device}.").format(device=device)
            except Exception:  # shown by tryWithErrorDisplay, which re-raises; clean up below all the same
                logging.exception("ConformalSeg: loading the model's output failed")
            finally:
                adapter.remove_work_folder(outDir)
                self._updateButtons()
            return
        adapter.remove_work_folder(outDir)
        self._updateButtons()

    # ------------------------------------------------------------------ calibration (researchers)

    _backgroundCommand = None
    _backgroundMethod = None
    _guaranteeBlocker = None

    def _startBackground(self, command: str) -> None:
        if self._background is not None and self._background.running:
            self._background.cancel()
            return
        p = self._parameterNode
        if command == "calibrate":
            target = Path(p.calibrationOutputPath) / f"{p.calibrationMethod}.json"
            if target.exists() and not slicer.util.confirmOkCancelDisplay(
                _("{path} exists. Replace it with the new calibration?").format(path=target)
            ):
                return
        try:
            with slicer.util.tryWithErrorDisplay(
                _("Failed to start {command}.").format(command=command), waitCursor=True
            ):
                if not self.logic.ensurePythonRequirements(("evaluation",) if command == "evaluate" else ()):
                    return
                self.ui.calibrationLogTextEdit.clear()
                self.ui.calibrationProgressBar.value = 0
                callbacks = dict(
                    onOutput=self.ui.calibrationLogTextEdit.appendPlainText,
                    onProgress=self._onBackgroundProgress,
                    onFinished=self._onBackgroundFinished,
                )
                if command == "calibrate":
                    self._background = self.logic.startCalibration(
                        p.datasetPath,
                        p.calibrationMethod,
                        p.lesionLabel,
                        p.calibrationOutputPath,
                        sliderSettings(p),
                        score=p.calibrationScore,
                        **callbacks,
                    )
                else:
                    self._background = self.logic.startEvaluation(
                        p.datasetPath,
                        p.lesionLabel,
                        p.evaluationSplits,
                        p.calibrationOutputPath,
                        sliderSettings(p),
                        **callbacks,
                    )
                self._backgroundCommand = command
                self._backgroundMethod = p.calibrationMethod  # the method started, not the combo's later value
        except Exception:  # shown by tryWithErrorDisplay (which re-raises)
            logging.exception("ConformalSeg: starting %s failed", command)
        finally:
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
            if self._backgroundMethod == "sets":
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

    # ------------------------------------------------------------------ reviewed cases

    def onAddCaseButton(self) -> None:
        """Grow every loaded profile by this scan (one background run per profile, one after the other);
        the sliders then use the new profiles. Refused when the map's pipeline is not the profiles'."""
        p = self._parameterNode
        if self._background is not None and self._background.running:
            return
        blocker = self._guaranteeBlocker  # the map's pipeline is not the profiles' (inference_check)
        if blocker:
            slicer.util.errorDisplay(_("This map cannot join the calibration set:\n") + blocker)
            return
        pending = [("profilePath", path) for path in [p.profilePath] if isSet(path)]
        pending += [("secondProfilePath", path) for path in [p.secondProfilePath] if isSet(path)]
        caseId = commands.case_id_from_name((p.inputVolume or p.probabilityVolume).GetName())
        self.ui.calibrationLogTextEdit.clear()
        self._addNextCase(pending, caseId)

    def _addNextCase(self, pending, caseId) -> None:
        p = self._parameterNode
        if not pending:
            self._updateButtons()
            return
        (parameter, path), rest = pending[0], pending[1:]

        def finished(code, cancelled, newPath):
            log = self.ui.calibrationLogTextEdit.appendPlainText
            if code == 0 and not cancelled:
                setattr(self._parameterNode, parameter, Path(newPath))  # the sliders use the grown set
                log(_("Case {case} added: {path}").format(case=caseId, path=newPath))
                self._addNextCase(rest, caseId)
            else:
                log(_("Adding the case failed (exit status {status}); see above.").format(status=code))
                self._updateButtons()

        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to add the case."), waitCursor=True):
                self._background = self.logic.startAddCase(
                    p.probabilityVolume,
                    p.reviewedSegmentation,
                    path,
                    caseId,
                    onOutput=self.ui.calibrationLogTextEdit.appendPlainText,
                    onFinished=finished,
                )
                self._backgroundCommand = "add-case"
        except Exception:  # shown by tryWithErrorDisplay (which re-raises)
            logging.exception("ConformalSeg: adding the case failed")
        finally:
            self._updateButtons()

    # ------------------------------------------------------------------ organ-dependent intervals (sem-CRC)

    def onApplyIntervalsButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to apply the interval profile."), waitCursor=True):
            try:
                applied = self.logic.applyIntervalProfile(
                    p.intervalProfilePath,
                    p.lowerVolume,
                    p.upperVolume,
                    p.organSegmentation,
                    p.truthVolume,
                    p.intervalLengthVolume,
                )
            except (ConformalSegError, ValueError, OSError) as exc:
                self._setStatus(self.ui.intervalsStatusLabel, str(exc), warning=True)
                return
            outcome = applied.outcome
            self._setStatus(self.ui.intervalsStatusLabel, outcome.text, warning=outcome.has_warning)
            self._fillIntervalsTable(outcome.rows, withRisk=p.truthVolume is not None)
            p.intervalLengthVolume = applied.lengthNode
            p.overlay = "interval"
