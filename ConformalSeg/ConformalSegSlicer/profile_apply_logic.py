"""The logic of mask-only margin profiles and nnU-Net fold profiles (issue 18): a mixin of
:class:`ConformalSegSlicer.logic.Logic`, run through ``conformalseg apply --mask`` / ``--folds`` in a
child (:mod:`ConformalSegSlicer.profile_apply` holds the Slicer-free parts)."""

import os

from ConformalSegLib.common.errors import ConformalSegError

from . import profile_apply
from . import slicer_adapter as adapter


class ProfileApplyLogic:
    """``Logic`` methods for profiles the slider cannot drive (uses its ``_start``)."""

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
        onOutput=None,
        onFinished=None,
    ):
        """Run ``conformalseg apply --mask`` (``maskVolume``: the tool's label map, exported) or ``--folds``
        in PythonSlicer; with ``dicomSeg`` and a ``referenceVolume`` loaded from DICOM, also
        ``--dicom-seg`` against copies of its series. ``onFinished(returncode, cancelled, outDir)``;
        then :meth:`loadProfileApplyResult`."""
        work = adapter.temporary_folder()
        mask = None
        if maskVolume is not None:
            mask = os.path.join(work, "mask.nrrd")
            adapter.export_volume(maskVolume, mask)
        reference = None
        if dicomSeg:
            reference = adapter.dicom_series_folder(referenceVolume, os.path.join(work, "reference"))
            if reference is None:
                raise ConformalSegError(
                    "DICOM SEG export needs the CT loaded from DICOM (through the DICOM module)",
                    fix="load the CT from the DICOM database, or save the segments and use Slicer's DICOM export",
                )
        outDir = os.path.join(work, "out")
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
        return self._start(
            argv, (), onOutput, None, lambda code, cancelled: onFinished and onFinished(code, cancelled, outDir)
        )

    def runProfileApply(self, profilePath, timeout=None, dicomSegPath=None, **kwargs):
        """Blocking :meth:`startProfileApply` + :meth:`loadProfileApplyResult` (scripts, the Python console):
        returns ``(segmentationNode, volumes, result)``; ``result.guarantees`` are the sentences."""
        finished = {}
        pump = self.startProfileApply(
            profilePath, onFinished=lambda code, cancelled, out: finished.update(code=code, out=out), **kwargs
        )
        pump.timer.stop()
        if pump.runner.wait(timeout) is None:
            pump.cancel()
            pump.runner.wait(30)
            raise RuntimeError("conformalseg apply did not finish in time")
        try:
            if finished.get("code") != 0:
                raise RuntimeError("conformalseg apply failed:\n" + "\n".join(pump.runner.output[-20:]))
            return self.loadProfileApplyResult(finished["out"], kwargs.get("referenceVolume"), dicomSegPath)
        finally:
            if "out" in finished:
                adapter.remove_work_folder(finished["out"])

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
