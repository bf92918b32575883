"""The 3D Slicer side of ConformalSeg, kept out of ``ConformalSeg.py`` so that it stays thin glue.

The Slicer-facing modules (checked statically against Slicer's API, run inside Slicer):

* :mod:`~ConformalSegSlicer.widget`: the panel (``ConformalSegWidget``);
* :mod:`~ConformalSegSlicer.logic`: everything the panel does, usable from scripts (``ConformalSegLogic``);
* :mod:`~ConformalSegSlicer.self_test`: the self-tests (``ConformalSegTest``);
* :mod:`~ConformalSegSlicer.slicer_adapter`: MRML nodes <-> numpy arrays, the one module the others
  go through to read and write the scene.

Every other module is free of Slicer, VTK and Qt and is tested with pytest outside Slicer
(``Testing/test_slicer_logic.py``):

* :mod:`~ConformalSegSlicer.process`: the out-of-process runner (progress parsed from the output,
  cancellation kills the whole process tree);
* :mod:`~ConformalSegSlicer.commands`: command lines of the ``conformalseg`` CLI run with PythonSlicer;
* :mod:`~ConformalSegSlicer.slider`: slider values -> recalibrated masks and the guarantee text;
* :mod:`~ConformalSegSlicer.spatial`: Slicer's IJK-to-RAS matrices <-> the library's LPS geometry;
* :mod:`~ConformalSegSlicer.segments`: names, colours and terminology of the result segments;
* :mod:`~ConformalSegSlicer.display`: overlay windows and thresholds;
* :mod:`~ConformalSegSlicer.intervals`: sem-CRC interval profiles: segments -> organ label map ->
  the library's ``apply_interval``, the per-organ table and status text;
* :mod:`~ConformalSegSlicer.evaluation_plots`: ECR and PC versus alpha from ``conformalseg evaluate``;
* :mod:`~ConformalSegSlicer.trust`: the confirmation before running a model whose loading runs code
  (TorchScript, MONAI bundles), remembered per model fingerprint for the session;
* :mod:`~ConformalSegSlicer.profile_apply`: mask-only margin profiles and nnU-Net fold profiles through
  ``conformalseg apply --mask`` / ``--folds`` (and its DICOM SEG), the result's guarantee sentences;
* :mod:`~ConformalSegSlicer.drift`: the drift badge from the reviewed-case logs of ``conformalseg monitor``;
* :mod:`~ConformalSegSlicer.environment`: Python requirements, PyTorch device choice, module reload;
* :mod:`~ConformalSegSlicer.fixtures`: synthetic data, profiles and a tiny model for the self-tests.
"""
