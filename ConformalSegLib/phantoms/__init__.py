"""Test data generators: synthetic CT phantoms and simulated probability maps, deterministic per seed.

* :mod:`.generator`: CT phantoms (anatomy, lesions, image formation) and their nnU-Net dataset;
* :mod:`.simulated_maps`: cases whose probability maps imitate an imperfect lesion network;
* :mod:`.simulated_dataset`: those cases written as a calibration dataset.
"""
