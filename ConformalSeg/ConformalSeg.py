"""3D Slicer module glue: the module's description, its parameter node, and the classes Slicer looks up by
name (``ConformalSegWidget``, ``ConformalSegLogic``, ``ConformalSegTest``), whose code is in
``ConformalSegSlicer/`` (``widget.py``, ``logic.py``, ``self_test.py``; the computations in its Slicer-free
helpers and in ``ConformalSegLib``).

Supported: Slicer 5.10 and later (Python 3.12). This file keeps to Python 3.9 grammar and imports nothing
of ConformalSeg before the version check, so that on an older Slicer (5.8 runs Python 3.9) the module
loads and shows one readable message instead of failing to import (``Testing/test_slicer_logic.py``
parses it with ``ast.parse(..., feature_version=(3, 9))``).
"""

import os
import sys
from pathlib import Path
from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget

#: Slicer 5.10 is the first release with Python 3.12 (and ``vtkSegment.SetTerminology``).
MINIMUM_PYTHON = (3, 12)
MINIMUM_SLICER = "5.10"


def unsupportedMessage(versionInfo=None) -> str:
    """The one message shown on a Slicer older than :data:`MINIMUM_SLICER` ("" when supported)."""
    found = tuple(versionInfo or sys.version_info)[:2]
    if found >= MINIMUM_PYTHON:
        return ""
    return (
        "ConformalSeg needs 3D Slicer {slicer} or later (Python {python}); this Slicer runs Python {found}. "
        "Install a current release from https://download.slicer.org and install ConformalSeg there."
    ).format(slicer=MINIMUM_SLICER, python=".".join(map(str, MINIMUM_PYTHON)), found=".".join(map(str, found)))


def _addSourceCheckoutToPath() -> None:
    """Run from a source checkout (module path ``<repo>/ConformalSeg``), the library is
    ``<repo>/ConformalSegLib``: put ``<repo>`` on sys.path (Slicer adds only module folders). In an
    installed extension ConformalSegLib sits next to this file and this does nothing."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(repository, "ConformalSegLib", "__init__.py")) and repository not in sys.path:
        sys.path.append(repository)


UNSUPPORTED = unsupportedMessage()
if not UNSUPPORTED:  # everything below needs Python 3.12 (the helpers and the library)
    _addSourceCheckoutToPath()
    # self_test as a module, not SelfTest: unittest's loader (ctest py_ConformalSeg) would run a TestCase
    # class found in this namespace a second time, with the bare Logic
    from ConformalSegSlicer import display, self_test
    from ConformalSegSlicer.logic import Logic, registerSampleData
    from ConformalSegSlicer.widget import Widget

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
        self.parent.contributors = ["ConformalSeg maintainers (ConformalSeg project)"]
        self.parent.helpText = UNSUPPORTED or _("""
Turns a lesion probability map (from your network, run here out of process, or loaded) into
segments with a statistical guarantee, calibrated on scans with ground truth
(a profile made with <code>conformalseg calibrate</code>). All guarantees assume the calibration
scans and the new scan are exchangeable (same population, same network and preprocessing).
<ul>
<li><b>Lesion (FNR-controlled)</b>, CLS: with probability at least 1 - alpha, the mask misses at most
a fraction epsilon of the new scan's lesion voxels.</li>
<li><b>Lesion (expected-FNR-controlled)</b>, conformal risk control: averaged over new scans, the mask
misses at most a fraction epsilon of the lesion voxels.</li>
<li><b>Lesion (lesion-level)</b>: with probability at least 1 - alpha, the mask misses at most a fraction
epsilon of the new scan's lesions (joint profiles: and at most the calibrated fraction of its lesion
voxels).</li>
<li><b>Inner / outer set</b>, conformal confidence sets: with probability at least 1 - alpha-inner the
inner set lies inside the true lesion; with probability at least 1 - alpha-outer the outer set
contains all of it (joint profiles: both at once with probability at least 1 - alpha).</li>
<li><b>Organ-dependent uncertainty (sem-CRC)</b>: an interval profile (<code>conformalseg calibrate
--method sem-crc-organ</code>) widens a model's lower/upper quantile maps by one lambda per organ; the
organs come from a segmentation whose segment names match the profile's organ names. Per-organ
sem-CRC: for each organ, averaged over new scans, at most a fraction epsilon of its voxels lie outside
their interval (the exact guarantee of the profile is shown under the Apply button).</li>
</ul>
<b>Slider-safe</b> (the default while browsing): the CLS and lesion-level masks come from one band that
is valid for every epsilon on the slider at once, so epsilon may be chosen after looking at the scan;
unchecked, the smaller per-(epsilon, alpha) mask holds only if epsilon and alpha were fixed before
viewing the scan.
Moving the sliders recalibrates from the profile's stored summaries without re-running the model;
the label under them states the current guarantee and warns when the calibration set is too small
for the chosen alpha (the mask is then the whole image). See
<a href="https://github.com/ConformalSeg/ConformalSeg#readme">the documentation</a>.
""")
        if not UNSUPPORTED:  # the sample in Sample Data (registered once Slicer has started)
            import slicer

            slicer.app.connect("startupCompleted()", registerSampleData)
        self.parent.acknowledgementText = _("""
Methods: Tan et al., Conformal Lesion Segmentation for 3D Medical Images (CLS); Angelopoulos et al.,
Conformal Risk Control; Davenport, Conformal confidence sets for biomedical image segmentation.
Module layout follows the 3D Slicer scripted module template (Jean-Christophe Fillion-Robin, Kitware
Inc., Andras Lasso, PerkLab, and Steve Pieper, Isomics, Inc.).
""")


if not UNSUPPORTED:
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
        reviewedSegmentation: vtkMRMLSegmentationNode
        modelPath: Path
        profilePath: Path
        secondProfilePath: Path
        foldsPath: Path  # nnU-Net fold profiles: the folder of this case's per-fold outputs
        foldsCase: str = ""  # its case id when the fold folders hold several
        dicomSegPath: Path  # write a DICOM SEG here (mask-only / fold profiles: on Apply; else Export DICOM SEG)
        dicomReferencePath: Path  # the CT's DICOM series folder when the CT was not loaded from DICOM
        device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
        mcDropoutSamples: Annotated[int, WithinRange(0, 64)] = 0
        epsilon: Annotated[float, WithinRange(0.0, 1.0), Decimals(3), SingleStep(0.01)] = 0.1
        alpha: Level = 0.1
        alphaInner: Level = 0.1
        alphaOuter: Level = 0.1
        sliderSafe: bool = True  # CLS / lesion-level: the slider-safe band while browsing
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
        calibrationScore: Annotated[str, Choice(["identity", "margin:0.5", "gaussian:2.0"])] = "identity"
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

    #
    # The classes Slicer looks up by name: the widget, logic and self-tests of ConformalSegSlicer/, bound to
    # this module (their class names give Slicer the module name; the logic gets the parameter node).
    #

    class ConformalSegLogic(Logic):
        """:class:`ConformalSegSlicer.logic.Logic` with this module's parameter node."""

        def getParameterNode(self):
            return ConformalSegParameterNode(super().getParameterNode())

    class ConformalSegWidget(Widget):
        """The panel (:mod:`ConformalSegSlicer.widget`) driving :class:`ConformalSegLogic`."""

        logicClass = ConformalSegLogic

    class ConformalSegTest(self_test.SelfTest):
        """Self-tests (:mod:`ConformalSegSlicer.self_test`): Reload & Test, ``slicer.selfTests["ConformalSeg"]()``,
        ctest."""

        logicClass = ConformalSegLogic


else:

    class ConformalSegWidget(ScriptedLoadableModuleWidget):
        """On an unsupported Slicer: the panel is the version message alone."""

        def setup(self) -> None:
            import qt

            ScriptedLoadableModuleWidget.setup(self)
            label = qt.QLabel(UNSUPPORTED)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
