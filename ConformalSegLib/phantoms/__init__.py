"""Test data generators: synthetic CT phantoms and simulated probability maps, deterministic per seed.

CT phantoms (:func:`~.generator.make_phantom`), in the order their random draws happen:

* :mod:`.generator`: :class:`~.generator.Phantom`, :func:`~.generator.make_phantom`,
  :func:`~.generator.make_phantoms` and the per-phantom seed streams;
* :mod:`.labels`: the label values of the label map;
* :mod:`.anatomy`: tissue intensities, body, spine, thorax, abdomen and organs;
* :mod:`.lesions`: lesions in their host organs;
* :mod:`.imaging`: image formation (blur, CT-like noise, clipping);
* :mod:`.shapes`: the millimetre geometry they share (random fields, boxes, ellipsoids);
* :mod:`.dataset`: phantoms on disk as an nnU-Net raw dataset.

Simulated network outputs (no network needed):

* :mod:`.simulated_maps`: cases whose probability maps imitate an imperfect lesion network;
* :mod:`.simulated_dataset`: those cases written as a calibration dataset.
"""
