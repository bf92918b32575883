"""Evaluation of the lesion-mask guarantees over repeated random calibration/test splits.

* :mod:`.protocol`: :func:`~.protocol.evaluate_dataset`, the split protocol of the papers, exact and
  streaming, one function per step (pass 1, split thresholds, test FNRs, pass 2, assembly);
* :mod:`.risk_control`: RCPS (both bounds), CRC and Learn-Then-Test over random splits, from summaries only;
* :mod:`.lesion_protocol`: its lesion-level steps (lesion-level control, slider-safe bands, lesion-wise
  metrics of every method);
* :mod:`.case_statistics`: its pass 1 on one case (the map step) and the merge in case order;
* :mod:`.case_tasks`: its per-case work as tasks, serially, on a process pool or on Dask (bit-identical);
* :mod:`.config`: its parameters, checked before any case is read;
* :mod:`.cases`: the cases it reads, from a dataset or any list of case-like objects;
* :mod:`.results`: what it returns, summary rows and PASS/CHECK verdicts;
* :mod:`.progress`: the progress callback and its tqdm drawing;
* :mod:`.metrics`: FNR, Dice, prediction compactness, HD95, exact voxel counts;
* :mod:`.lesion_metrics`: lesion-wise detection (sensitivity by lesion size, false-positive components);
* :mod:`.report`: ``results.json``, the Markdown report and its plots; :mod:`.report_lesion` its
  lesion-level sections; :mod:`.markdown` the table and number formatting they share;
* :mod:`.figures`: slice overlays of masks on an image;
* :mod:`.monitor_figure`: the drift-monitoring plot (martingale and running ECR).
"""
