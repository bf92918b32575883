"""The logic of mask-only margin profiles and nnU-Net fold profiles (issue 18): a mixin of
:class:`ConformalSegSlicer.logic.Logic`, run through ``conformalseg apply --mask`` / ``--folds`` in a
child (:mod:`ConformalSegSlicer.profile_apply` holds the Slicer-free parts)."""

import os

from ConformalSegLib.common.errors import ConformalSegError

from . import profile_apply
from . import slicer_adapter as adapter


class ProfileApplyLogic:
    """``Logic`` methods for profiles the slider cannot drive (uses its ``_startFor``)."""

    def profileInput(self, profilePath) -> str:
        """``profile_apply.MASK`` (a mask-only margin profile or ``--structures`` index: applied to a
        predicted label map), ``FOLDS`` (an nnU-Net fold profile: applied to the fold outputs on disk) or
        ``PROBABILITY`` (the slider path)."""
        return profile_apply.profile_input(profilePath)

    def startProfileApply(
        self,
        profilePath,
        maskVolume=None,
        foldsDir=None,
        case=None,
        channel=None,
        referenceVolume=None,
        alpha=None,
        alphaInner=None,
        alphaOuter=None,
        dicomSeg=False,
        dicomReferenceFolder=None,
        onOutput=None,
        onFinished=None,
    ):
        """Run ``conformalseg apply --mask`` (``maskVolume``: the tool's label map, exported) or ``--folds``
        in PythonSlicer; with ``dicomSeg``, also ``--dicom-seg`` against the CT's DICOM series
        (:meth:`referenceSeries`). ``onFinished(returncode, cancelled, outDir)``; then
        :meth:`loadProfileApplyResult`."""
        work = adapter.temporary_folder()
        outDir = os.path.join(work, "out")
        mask = None
        try:
            if maskVolume is not None:
                mask = os.path.join(work, "mask.nrrd")
                adapter.export_volume(maskVolume, mask)
            reference = self.referenceSeries(referenceVolume, dicomReferenceFolder, work) if dicomSeg else None
        except BaseException:
            adapter.remove_work_folder(outDir)  # nothing started: leave no folder behind
            raise
        argv = profile_apply.apply_command(
            adapter.python_slicer(),
            profile=profilePath,
            out_dir=outDir,
            mask=mask,
            folds=foldsDir,
            case=case,
            channel=channel,
            alpha=alpha,
            alpha_inner=alphaInner,
            alpha_outer=alphaOuter,
            reference_dicom=reference,
        )
        return self._startFor(outDir, argv, (), onOutput, None, onFinished)

    def referenceSeries(self, referenceVolume, dicomReferenceFolder, work):
        """The DICOM series folder a SEG refers to: copies of the files ``referenceVolume`` was loaded from
        (Slicer's DICOM database), else ``dicomReferenceFolder`` (the user's choice, for a CT loaded from NIfTI
        or NRRD: the CLI checks that its grid is the map's)."""
        reference = adapter.dicom_series_folder(referenceVolume, os.path.join(work, "reference"))
        if reference is None and dicomReferenceFolder:
            reference = str(dicomReferenceFolder)
        if reference is None:
            raise ConformalSegError(
                "DICOM SEG export needs the CT's DICOM series: the CT was not loaded from the DICOM database",
                fix="choose the CT's DICOM series folder as 'Reference DICOM series', or load the CT through the "
                "DICOM module",
            )
        return reference

    def startSegExport(
        self,
        profilePath,
        probabilityVolume,
        settings,
        referenceVolume=None,
        dicomReferenceFolder=None,
        onOutput=None,
        onFinished=None,
    ):
        """*Export DICOM SEG* of what the sliders show for ``profilePath`` (a probability profile) at ``settings``
        (:class:`~ConformalSegSlicer.slider.SliderSettings`): the probability map is exported and ``conformalseg
        apply --prob ... --dicom-seg`` runs in PythonSlicer (:func:`~ConformalSegSlicer.profile_apply.
        seg_export_argv`: the same library functions as the sliders). ``onFinished(returncode, cancelled,
        outDir)``; then :meth:`finishSegExport`."""
        work = adapter.temporary_folder()
        outDir = os.path.join(work, "out")
        try:
            reference = self.referenceSeries(referenceVolume, dicomReferenceFolder, work)
            prob = os.path.join(work, "probability.nrrd")
            adapter.export_volume(probabilityVolume, prob)
            argv = profile_apply.seg_export_argv(
                adapter.python_slicer(),
                profile=profilePath,
                prob=prob,
                out_dir=outDir,
                reference_dicom=reference,
                settings=settings,
            )
        except BaseException:
            adapter.remove_work_folder(outDir)  # nothing started: leave no folder behind
            raise
        return self._startFor(outDir, argv, (), onOutput, None, onFinished)

    def finishSegExport(self, outDir, dicomSegPath):
        """Copy the exported SEG to ``dicomSegPath`` (atomically); returns the run's
        :class:`~ConformalSegSlicer.profile_apply.ApplyResult` (its guarantee sentences are the SEG's)."""
        result = profile_apply.read_apply_result(outDir)
        if result.dicom_seg is None:
            raise ConformalSegError("conformalseg apply wrote no DICOM SEG", path=outDir, fix="see the log")
        profile_apply.copy_atomically(result.dicom_seg, dicomSegPath)
        return result

    def runProfileApply(self, profilePath, timeout=None, dicomSegPath=None, **kwargs):
        """Blocking :meth:`startProfileApply` + :meth:`loadProfileApplyResult` (scripts, the Python console):
        returns ``(segmentationNode, volumes, result)``; ``result.guarantees`` are the sentences."""
        finished = {}
        pump = self.startProfileApply(
            profilePath, onFinished=lambda code, cancelled, out: finished.update(code=code, out=out), **kwargs
        )
        return _finish_blocking(
            pump, finished, timeout,
            lambda out: self.loadProfileApplyResult(out, kwargs.get("referenceVolume"), dicomSegPath),
        )  # fmt: skip

    def runSegExport(self, profilePath, probabilityVolume, settings, dicomSegPath, timeout=None, **kwargs):
        """Blocking :meth:`startSegExport` + :meth:`finishSegExport` (scripts, the self-test): writes
        ``dicomSegPath`` and returns the run's :class:`~ConformalSegSlicer.profile_apply.ApplyResult`."""
        finished = {}
        pump = self.startSegExport(
            profilePath, probabilityVolume, settings,
            onFinished=lambda code, cancelled, out: finished.update(code=code, out=out), **kwargs,
        )  # fmt: skip
        return _finish_blocking(pump, finished, timeout, lambda out: self.finishSegExport(out, dicomSegPath))

    def loadProfileApplyResult(self, outDir, referenceVolume=None, dicomSegPath=None):
        """The segmentation node (the library's segment names), the fold volumes (``{"probability": node,
        ...}``) and the :class:`~ConformalSegSlicer.profile_apply.ApplyResult` (guarantee sentences);
        with ``dicomSegPath`` the DICOM SEG is copied there (the work folder is deleted next)."""
        result = profile_apply.read_apply_result(outDir)
        base = referenceVolume.GetName() if referenceVolume is not None else "ConformalSeg"
        segmentation = adapter.load_result_segmentation(
            str(result.segmentation), f"{base} margin sets", referenceVolume
        )
        segmentation.SetAttribute("ConformalSeg.Guarantee", " ".join(result.guarantees))
        volumes = {
            key: adapter.load_result_volume(
                str(path), f"folds-{key}", f"{base} {key.replace('_', ' ')}", referenceVolume
            )
            for key, path in result.volumes.items()
        }
        if dicomSegPath and result.dicom_seg is not None:
            profile_apply.copy_atomically(result.dicom_seg, dicomSegPath)
        return segmentation, volumes, result


def _fold_volume_name(base: str, key: str) -> str:
    """``CT probability``, ``CT fold variance``, ``CT fold mutual information``."""
    return f"{base} {key.replace('_', ' ')}"


def _finish_blocking(pump, finished: dict, timeout, collect):
    """Wait for an ``apply`` child started with ``onFinished`` filling ``finished``; then ``collect(outDir)``
    (or RuntimeError with the end of its output); the work folder is removed in every case."""
    pump.timer.stop()
    if pump.runner.wait(timeout) is None:
        pump.cancel()
        pump.runner.wait(30)
        raise RuntimeError("conformalseg apply did not finish in time")
    try:
        if finished.get("code") != 0:
            raise RuntimeError("conformalseg apply failed:\n" + "\n".join(pump.runner.output[-20:]))
        return collect(finished["out"])
    finally:
        if "out" in finished:
            adapter.remove_work_folder(finished["out"])
