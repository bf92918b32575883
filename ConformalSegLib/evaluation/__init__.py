"""Evaluation of the lesion-mask guarantees over repeated random calibration/test splits.

* :mod:`.protocol`: the split protocol of the papers, exact and streaming;
* :mod:`.metrics`: FNR, Dice, prediction compactness, HD95, exact voxel counts;
* :mod:`.report`: ``results.json``, the Markdown report and its plots;
* :mod:`.figures`: slice overlays of masks on an image.
"""
