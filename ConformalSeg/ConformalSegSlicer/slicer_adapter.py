"""MRML nodes <-> numpy arrays and library geometry: how the panel, logic and self-tests touch the scene.

* Volumes: ``slicer.util.arrayFromVolume`` gives the numpy ``(z, y, x)`` array the library uses;
  the node's IJK-to-RAS matrix becomes an LPS :class:`~ConformalSegLib.common.geometry.Geometry`
  (:mod:`ConformalSegSlicer.spatial`).
* Segments: all the segments of one slider update are written inside one ``NodeModify`` block (one
  batch of display updates), each with ``slicer.util.updateSegmentBinaryLabelmapFromArray`` on the
  reference volume's grid; unchanged segments are not touched. Names, colours and terminology come
  from :mod:`ConformalSegSlicer.segments`; segment ids are stable, so the user's own segments in the
  same segmentation are left alone.
* sem-CRC: segment names and per-segment masks (``arrayFromSegmentBinaryLabelmap`` on the lower
  quantile volume's grid) and the output volumes (found again by a role attribute, so a second
  Apply overwrites them instead of adding nodes).
* Model results: loaded as scene volumes that Save writes, reused per input, next to the input in the
  subject hierarchy and under its parent transform.
* Overlays, plots, exports and the pump that delivers a :class:`~ConformalSegSlicer.process.ProcessRunner`'s
  callbacks on the GUI thread.

This file is long because it is the one module that reads and writes the scene (the others stay
Slicer-free and tested by pytest); its sections are short and independent.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np
import qt
import slicer
import vtk
import vtk.util.numpy_support
from slicer.i18n import tr as _

from ConformalSegLib.common.geometry import Geometry

from . import commands, environment, profile_apply, segments, spatial
from .display import OverlayDisplay, finite_range
from .evaluation_plots import AlphaCurves, marker_columns, table_columns

ROLE_ATTRIBUTE = "ConformalSeg.Role"
#: Attribute: the ID of the volume a result node was made for (so each input keeps its own results).
REFERENCE_ATTRIBUTE = "ConformalSeg.Reference"


# ----------------------------------------------------------------------------- volumes


def ijk_to_ras_array(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_geometry(volumeNode) -> Geometry:
    """The library geometry (LPS) of a scalar volume node."""
    shape = slicer.util.arrayFromVolume(volumeNode).shape
    if len(shape) != 3:
        raise ValueError(f"{volumeNode.GetName()} is not a scalar 3D volume (array shape {shape})")
    return spatial.geometry_from_ijk_to_ras(ijk_to_ras_array(volumeNode), shape)


def volume_array(volumeNode, *, copy: bool = True) -> np.ndarray:
    """The voxels of a volume node, numpy ``(z, y, x)``; a copy unless ``copy=False`` (then a view
    that changes with the node)."""
    array = slicer.util.arrayFromVolume(volumeNode)
    return np.array(array, copy=True) if copy else array


def add_volume(array: np.ndarray, geometry: Geometry, name: str):
    """A new scalar volume node holding ``array`` on ``geometry`` (deep copy)."""
    return slicer.util.addVolumeFromArray(array, ijkToRAS=spatial.ijk_to_ras_from_geometry(geometry), name=name)


def output_volume(role: str, name: str, array: np.ndarray, referenceVolumeNode):
    """The scene's scalar volume tagged ``role`` (created once, reused by later calls) holding
    ``array`` (deep copy) on ``referenceVolumeNode``'s grid, renamed ``name``."""
    volumeNode = node_with_role("vtkMRMLScalarVolumeNode", role, name)
    volumeNode.SetName(name)
    return write_volume(volumeNode, array, referenceVolumeNode)


def write_volume(volumeNode, array: np.ndarray, referenceVolumeNode):
    """Replace ``volumeNode``'s voxels with ``array`` (deep copy) on ``referenceVolumeNode``'s grid."""
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(array))
    matrix = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(matrix)
    volumeNode.SetIJKToRASMatrix(matrix)
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def export_volume(volumeNode, path: str) -> None:
    """Write a volume (``.nrrd``: exact geometry, uncompressed, fast) without changing where the scene
    would save it. The properties dict is explicit: ``exportNode``'s default ``{}`` is shared and the
    first call would pin its file format for every later default-argument call in the session."""
    if not slicer.util.exportNode(volumeNode, str(path), {"useCompression": 0}):
        raise RuntimeError(f"could not write {volumeNode.GetName()} to {path}")


def load_volume(path: str, name: str):
    return slicer.util.loadVolume(str(path), {"name": name, "show": False})


def load_result_volume(path: str, role: str, name: str, referenceVolumeNode=None):
    """Load a result of the model (from a temporary folder) as a scene volume that Save writes.

    The node of ``role`` made for the same reference volume is reused (its voxels replaced), so repeated
    runs do not fill the scene; the loaded file's storage node is dropped and the node marked modified
    (the temporary folder is deleted next); the node follows the reference volume's parent transform and
    sits in its subject-hierarchy folder."""
    loaded = load_volume(path, name)
    referenceId = referenceVolumeNode.GetID() if referenceVolumeNode is not None else ""
    node = loaded
    for candidate in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
        if (
            candidate is not loaded
            and candidate.GetAttribute(ROLE_ATTRIBUTE) == role
            and candidate.GetAttribute(REFERENCE_ATTRIBUTE) == referenceId
        ):
            node = candidate
            matrix = vtk.vtkMatrix4x4()
            loaded.GetIJKToRASMatrix(matrix)
            node.SetIJKToRASMatrix(matrix)
            node.SetAndObserveImageData(loaded.GetImageData())
            node.SetName(name)
            slicer.mrmlScene.RemoveNode(loaded)
            break
    storage = node.GetStorageNode()
    if storage is not None:
        node.SetAndObserveStorageNodeID(None)
        slicer.mrmlScene.RemoveNode(storage)
    node.StorableModified()
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute(REFERENCE_ATTRIBUTE, referenceId)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    if referenceVolumeNode is not None:
        node.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
        place_next_to(node, referenceVolumeNode)
    return node


def load_result_segmentation(path: str, name: str, referenceVolumeNode=None):
    """Load a ``.seg.nrrd`` written by ``conformalseg apply`` (in a temporary folder) as a segmentation that
    Save writes (storage dropped, marked modified), under the reference volume's transform and in its folder."""
    node = slicer.util.loadSegmentation(str(path), {"name": name})
    storage = node.GetStorageNode()
    if storage is not None:
        node.SetAndObserveStorageNodeID(None)
        slicer.mrmlScene.RemoveNode(storage)
    node.StorableModified()
    if referenceVolumeNode is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        node.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
        place_next_to(node, referenceVolumeNode)
    return node


def dicom_series_folder(volumeNode, folder: str) -> str | None:
    """Copies of the DICOM files ``volumeNode`` was loaded from (through Slicer's DICOM database) in
    ``folder``; None when it did not come from DICOM or its files are gone."""
    database = getattr(slicer, "dicomDatabase", None)
    if volumeNode is None or database is None:
        return None
    files = profile_apply.dicom_reference_files(volumeNode.GetAttribute("DICOM.instanceUIDs"), database.fileForInstance)
    if not files:
        return None
    os.makedirs(folder, exist_ok=True)
    for i, file in enumerate(files):
        shutil.copyfile(file, os.path.join(folder, f"{i:05d}.dcm"))
    return folder


def place_next_to(node, referenceNode) -> None:
    """Put ``node`` in ``referenceNode``'s subject-hierarchy folder (its study), as the Data module shows it."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    if shNode is None:
        return
    referenceItem = shNode.GetItemByDataNode(referenceNode)
    item = shNode.GetItemByDataNode(node)
    if referenceItem and item:
        shNode.SetItemParent(item, shNode.GetItemParent(referenceItem))


def temporary_folder(prefix: str = "ConformalSeg-") -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=slicer.app.temporaryPath)


def remove_work_folder(outDir: str) -> None:
    """Delete the temporary folder of one inference run (``<work>/out`` and ``<work>/images``)."""
    work = os.path.dirname(os.path.abspath(outDir))
    if os.path.basename(work).startswith("ConformalSeg-"):
        shutil.rmtree(work, ignore_errors=True)


def python_slicer() -> str:
    """Slicer's Python launcher, for running the ``conformalseg`` CLI out of process."""
    return commands.find_python_slicer(slicer_home=slicer.app.slicerHome)


# ----------------------------------------------------------------------------- segmentation


def ensure_segmentation(segmentationNode, referenceVolumeNode, name: str = "ConformalSeg"):
    """``segmentationNode`` (created when None, and then marked as the module's) with ``referenceVolumeNode``'s
    reference geometry. A segmentation the user picked that already has a reference geometry keeps it (its
    own segments are not resampled); only the module's own segments are written into it."""
    if segmentationNode is None:
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetAttribute(ROLE_ATTRIBUTE, "output")
        if referenceVolumeNode is not None:
            place_next_to(segmentationNode, referenceVolumeNode)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    current = segmentationNode.GetNodeReference(role)
    owned = segmentationNode.GetAttribute(ROLE_ATTRIBUTE) == "output"
    if current is None or (owned and current.GetID() != referenceVolumeNode.GetID()):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    return segmentationNode


def ensure_segment(segmentationNode, name: str) -> str:
    """The id of the standard segment ``name``, created (named, coloured, with terminology) if absent."""
    segmentation = segmentationNode.GetSegmentation()
    segmentId = segments.segment_id(name)
    if segmentation.GetSegment(segmentId) is None:
        segmentation.AddEmptySegment(segmentId, name)
        segment = segmentation.GetSegment(segmentId)
        segment.SetColor(*segments.segment_color(name))
        terminology = segments.terminology_string(name)
        if terminology:
            segment.SetTerminology(terminology)
    return segmentId


_LABELMAP_BUFFER: dict[str, object] = {}


def labelmap_image(mask: np.ndarray, ijkToRAS: vtk.vtkMatrix4x4):
    """A ``vtkOrientedImageData`` (uint8 0/1) holding ``mask`` (``(z, y, x)``) on the grid ``ijkToRAS``:
    one copy of the mask, nothing in the scene. One image is reused from call to call while the shape
    stays (``SetBinaryLabelmapToSegment`` copies it into the segment in replace mode:
    ``vtkOrientedImageDataResample::CopyImage``), which saves allocating a volume-sized buffer per segment."""
    depth, rows, columns = mask.shape
    image = _LABELMAP_BUFFER.get("image")
    if image is None or _LABELMAP_BUFFER.get("shape") != mask.shape:
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(columns, rows, depth)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        _LABELMAP_BUFFER.update(image=image, shape=mask.shape)
    voxels = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels.reshape(mask.shape)[...] = mask
    image.GetPointData().GetScalars().Modified()
    image.SetImageToWorldMatrix(ijkToRAS)
    image.Modified()
    return image


def update_segments(segmentationNode, masks: Mapping[str, np.ndarray], referenceVolumeNode) -> list[str]:
    """Write the bool masks ``{segment name: (z, y, x) array on the reference grid}`` in one batch.

    Each mask goes straight into its segment as a ``vtkOrientedImageData`` with the reference volume's
    IJK-to-RAS (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``, replace mode):
    ``updateSegmentBinaryLabelmapFromArray`` would deep-copy the whole (float) reference volume and add
    and remove a temporary labelmap node per segment. The reference's parent transform is applied as
    by putting the segmentation under it when it has none; when the two have different parent transforms,
    Slicer's ``updateSegmentBinaryLabelmapFromArray`` (slow, but it maps between the transforms) is used."""
    written = []
    matrix = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(matrix)
    transformId = referenceVolumeNode.GetTransformNodeID()
    if transformId and not segmentationNode.GetTransformNodeID():
        segmentationNode.SetAndObserveTransformNodeID(transformId)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    direct = (transformId or "") == (segmentationNode.GetTransformNodeID() or "")
    with slicer.util.NodeModify(segmentationNode):
        for name in segments.sort_names(masks):
            segmentId = ensure_segment(segmentationNode, name)
            mask = np.ascontiguousarray(masks[name]).view(np.uint8)  # bool -> 0/1 without a copy
            if not direct:
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, segmentId, referenceVolumeNode)
            elif not logic.SetBinaryLabelmapToSegment(
                labelmap_image(mask, matrix), segmentationNode, segmentId, logic.MODE_REPLACE
            ):
                raise RuntimeError(f"could not write the segment {name!r}")
            written.append(segmentId)
    return written


def remove_segments(segmentationNode, keep: Iterable[str]) -> None:
    """Remove the standard ConformalSeg segments not in ``keep`` (other segments are untouched)."""
    keep = set(keep)
    segmentation = segmentationNode.GetSegmentation()
    for name in segments.SEGMENT_ORDER:
        segmentId = segments.segment_id(name)
        if name not in keep and segmentation.GetSegment(segmentId) is not None:
            segmentation.RemoveSegment(segmentId)


def segment_mask(segmentationNode, name: str, referenceVolumeNode) -> np.ndarray:
    """A segment as a bool ``(z, y, x)`` array on the reference volume's grid."""
    segmentId = segments.segment_id(name)
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode) > 0


def segment_names(segmentationNode) -> dict[str, str]:
    """``{segment id: segment name}`` of every segment of a segmentation node, in its order."""
    segmentation = segmentationNode.GetSegmentation()
    return {segmentId: segmentation.GetSegment(segmentId).GetName() for segmentId in segmentation.GetSegmentIDs()}


def segment_arrays(segmentationNode, segmentIds: Iterable[str], referenceVolumeNode) -> dict[str, np.ndarray]:
    """The segments ``segmentIds`` as uint8 ``(z, y, x)`` arrays on the reference volume's grid
    (each resampled to that grid by Slicer; an empty segment is all zeros)."""
    shape = slicer.util.arrayFromVolume(referenceVolumeNode).shape
    masks = {}
    for segmentId in segmentIds:
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode)
        masks[segmentId] = np.zeros(shape, dtype=np.uint8) if array is None else array
    return masks


def add_named_segments(segmentationNode, masks: Mapping[str, np.ndarray], referenceVolumeNode) -> list[str]:
    """Add one segment per ``{name: mask}`` (Slicer picks the ids and colours); returns the ids."""
    segmentation = segmentationNode.GetSegmentation()
    ids = []
    with slicer.util.NodeModify(segmentationNode):
        for name, mask in masks.items():
            segmentId = segmentation.AddEmptySegment("", name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                np.ascontiguousarray(mask).astype(np.uint8), segmentationNode, segmentId, referenceVolumeNode
            )
            ids.append(segmentId)
    return ids


def set_segment_visibility(segmentationNode, visible: Mapping[str, bool]) -> None:
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is None:
        return
    segmentation = segmentationNode.GetSegmentation()
    for name, show in visible.items():
        segmentId = segments.segment_id(name)
        if segmentation.GetSegment(segmentId) is not None:
            displayNode.SetSegmentVisibility(segmentId, bool(show))


def show_segmentation_3d(segmentationNode, show: bool) -> None:
    """Closed surfaces in the 3D view (removed when hidden: slider updates stay fast)."""
    if show:
        segmentationNode.CreateClosedSurfaceRepresentation()
    elif segmentationNode.GetAttribute(ROLE_ATTRIBUTE) == "output":  # never a user's segmentation's surfaces
        segmentationNode.RemoveClosedSurfaceRepresentation()
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is not None:
        displayNode.SetVisibility3D(bool(show))


# ----------------------------------------------------------------------------- overlays


def show_overlay(volumeNode, display: OverlayDisplay, opacity: float = 0.5, backgroundVolumeNode=None) -> None:
    """Show a float volume as the foreground layer with the given colour table, window and threshold
    (over ``backgroundVolumeNode`` when given)."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    displayNode = volumeNode.GetDisplayNode()
    with slicer.util.NodeModify(displayNode):
        displayNode.SetAndObserveColorNodeID(display.color_node_id)
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(display.window_min, display.window_max)
        displayNode.AutoThresholdOff()
        displayNode.SetLowerThreshold(display.lower_threshold)
        displayNode.SetUpperThreshold(display.upper_threshold)
        displayNode.ApplyThresholdOn()
    slicer.util.setSliceViewerLayers(
        background=backgroundVolumeNode or "keep-current", foreground=volumeNode, foregroundOpacity=opacity
    )


def hide_overlay() -> None:
    slicer.util.setSliceViewerLayers(foreground=None)


def data_range(volumeNode) -> tuple[float, float]:
    """Smallest and largest finite voxel values (infinite sem-CRC interval lengths are left out)."""
    return finite_range(slicer.util.arrayFromVolume(volumeNode))


# ----------------------------------------------------------------------------- plots


def node_with_role(className: str, role: str, name: str):
    """The scene's node of ``className`` tagged with ``role``, created (and tagged) when absent."""
    for node in slicer.util.getNodesByClass(className):
        if node.GetAttribute(ROLE_ATTRIBUTE) == role:
            return node
    node = slicer.mrmlScene.AddNewNodeByClass(className, name)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def _fill_table(tableNode, columns: Mapping[str, np.ndarray]) -> None:
    slicer.util.updateTableFromArray(
        tableNode, [np.asarray(v, dtype=float) for v in columns.values()], columnNames=list(columns)
    )


def _series(role: str, name: str, tableNode, x: str, y: str, color, *, line: bool, marker: bool):
    series = node_with_role("vtkMRMLPlotSeriesNode", role, name)
    series.SetAndObserveTableNodeID(tableNode.GetID())
    series.SetXColumnName(x)
    series.SetYColumnName(y)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetLineStyle(
        slicer.vtkMRMLPlotSeriesNode.LineStyleSolid if line else slicer.vtkMRMLPlotSeriesNode.LineStyleNone
    )
    series.SetMarkerStyle(
        slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if marker else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone
    )
    series.SetColor(*color)
    return series


def _chart(role: str, title: str, yTitle: str, seriesNodes, yRange=None):
    chart = node_with_role("vtkMRMLPlotChartNode", role, title)
    chart.RemoveAllPlotSeriesNodeIDs()
    for series in seriesNodes:
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(title)
    chart.SetXAxisTitle("alpha")
    chart.SetYAxisTitle(yTitle)
    chart.SetLegendVisibility(True)
    if yRange is not None:
        chart.SetYAxisRangeAuto(False)
        chart.SetYAxisRange(*yRange)
    return chart


def update_evaluation_plots(curves: AlphaCurves, alpha: float):
    """ECR-vs-alpha and PC-vs-alpha plot charts (created once, updated in place); returns both."""
    table = node_with_role("vtkMRMLTableNode", "evaluationTable", "ConformalSeg evaluation")
    _fill_table(table, table_columns(curves))
    marker = node_with_role("vtkMRMLTableNode", "evaluationMarker", "ConformalSeg current alpha")
    _fill_table(marker, marker_columns(curves, alpha))
    eps = f"epsilon = {curves.epsilon:g}"
    ecrSeries = [
        _series("ecr", f"CLS ECR ({eps})", table, "alpha", "ECR", (0.85, 0.1, 0.1), line=True, marker=True),
        _series(
            "ecrTarget", "target 1 - alpha", table, "alpha", "target 1-alpha", (0.2, 0.2, 0.2), line=True, marker=False
        ),
        _series(
            "ecrBaseline",
            "threshold 0.5",
            table,
            "alpha",
            "ECR threshold 0.5",
            (0.1, 0.6, 0.2),
            line=True,
            marker=False,
        ),
        _series("ecrMarker", "current alpha", marker, "alpha", "ECR", (0.1, 0.3, 0.9), line=False, marker=True),
    ]
    pcSeries = [
        _series("pc", f"CLS PC ({eps})", table, "alpha", "PC", (0.85, 0.1, 0.1), line=True, marker=True),
        _series(
            "pcCrc",
            "expected-FNR control",
            table,
            "alpha",
            "PC expected-FNR",
            (0.95, 0.55, 0.1),
            line=True,
            marker=False,
        ),
        _series(
            "pcBaseline", "threshold 0.5", table, "alpha", "PC threshold 0.5", (0.1, 0.6, 0.2), line=True, marker=False
        ),
        _series("pcMarker", "current alpha", marker, "alpha", "PC", (0.1, 0.3, 0.9), line=False, marker=True),
    ]
    title = f"{curves.n_cases} scans, {curves.splits} splits"
    ecrChart = _chart("ecrChart", f"ECR vs alpha ({eps}; {title})", "ECR = P(FNR <= epsilon)", ecrSeries, (0.0, 1.05))
    pcChart = _chart("pcChart", f"PC vs alpha ({eps}; {title})", "PC = predicted / total voxels", pcSeries)
    return ecrChart, pcChart


def show_chart(chartNode) -> None:
    slicer.modules.plots.logic().ShowChartInLayout(chartNode)


# ----------------------------------------------------------------------------- processes


class ProcessPump:
    """Delivers a :class:`~ConformalSegSlicer.process.ProcessRunner`'s callbacks on the GUI thread
    (a ``qt.QTimer`` calls ``runner.poll()`` until it reports the end)."""

    def __init__(self, runner, intervalMsec: int = 100):
        self.runner = runner
        self.timer = qt.QTimer()
        self.timer.setInterval(intervalMsec)
        self.timer.timeout.connect(self._tick)

    def start(self) -> ProcessPump:
        if not self.runner.started:
            self.runner.start()
        self.timer.start()
        return self

    def _tick(self) -> None:
        if not self.runner.poll():
            self.timer.stop()

    def cancel(self) -> None:
        self.runner.cancel()

    def stop(self) -> None:
        """Stop delivering callbacks and kill the process if it still runs (module cleanup)."""
        self.timer.stop()
        self.runner.cancel()

    @property
    def running(self) -> bool:
        return self.runner.running


def environment_for_child() -> dict:
    """The child's environment: Slicer's own (so PythonSlicer finds its libraries) + the library path."""
    return commands.child_environment(os.environ)


# ----------------------------------------------------------------------------- dependencies


def torch_module(install: bool):
    """``torch``, or None. With ``install``, a missing PyTorch is installed through the PyTorch
    extension's PyTorchUtils (it asks first and picks the CUDA/CPU build); None when declined."""
    try:
        import PyTorchUtils

        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    except ImportError:
        torchLogic = None
    if torchLogic is not None:
        if torchLogic.torchInstalled():
            import torch

            return torch
        if not install:
            return None
        return torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=environment.TORCH_REQUIREMENT)
    try:
        import torch

        return torch
    except ImportError:
        if install:
            from ConformalSegLib.common.errors import ConformalSegError

            raise ConformalSegError(
                "PyTorch is not installed",
                fix="install the PyTorch extension from the Extensions Manager, restart Slicer, and try again",
            ) from None
        return None


def ensure_torch() -> bool:
    """PyTorch is installed in Slicer's Python (installed through the PyTorch extension after asking when
    not); found without importing it, so Apply does not load torch or start CUDA in Slicer's process
    (the model runs in a child). False when the user declined."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return True
    return torch_module(install=True) is not None


def device_choice(requested: str) -> environment.DeviceChoice:
    torch = torch_module(install=False)
    if torch is None:
        return environment.resolve_device(requested, torch_version=None, cuda_available=False)
    available = bool(torch.cuda.is_available())
    return environment.resolve_device(
        requested,
        torch_version=torch.__version__,
        cuda_available=available,
        cuda_version=torch.version.cuda,
        gpu_name=torch.cuda.get_device_name(0) if available else None,
    )


def ensure_requirements(requirements: list, requester: str) -> bool:
    """Install the missing ``requirements`` into Slicer's Python after a confirmation dialog; never
    install or replace :data:`environment.PROTECTED_PACKAGES` (numpy, SimpleITK... stay Slicer's).
    Returns True when everything is there afterwards, False when the user declined."""
    missing = environment.missing_requirements(requirements)
    if not missing:
        return True
    try:
        from slicer import packaging
    except ImportError:  # Slicer before 5.11
        packaging = None
    if packaging is not None:
        try:
            packaging.pip_ensure(missing, skip_packages=list(environment.PROTECTED_PACKAGES), requester=requester)
        except RuntimeError as exc:
            if "declined" in str(exc).lower():  # pip_ensure's "User declined package installation"
                return False
            raise
    else:
        if not slicer.util.confirmOkCancelDisplay(
            _("{requester} needs these Python packages:\n{packages}\n\nInstall them now?").format(
                requester=requester, packages="\n".join(missing)
            )
        ):
            return False
        # Slicer before 5.12: pin Slicer's and the PyTorch extension's packages so that no dependency
        # upgrades or replaces them
        folder = tempfile.mkdtemp(prefix="ConformalSeg-pip-", dir=slicer.app.temporaryPath)
        pins = os.path.join(folder, "constraints.txt")
        with open(pins, "w", encoding="utf-8") as f:
            f.write(environment.constraints())
        try:
            slicer.util.pip_install([*missing, "-c", pins])  # a list: each item one argument
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    still = environment.missing_requirements(requirements)
    if still:
        logging.warning("%s: still missing after installation: %s", requester, ", ".join(still))
    return not still
