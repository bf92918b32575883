"""The lesion-mask guarantees: thresholds of a probability map with a conformal statement attached.

* :mod:`.exact`: exact arithmetic (epsilon and alpha as the decimals typed, conformal and PAC ranks);
* :mod:`.summaries`: per-scan sorted lesion probabilities, the input of every calibration;
* :mod:`.cls`: conformal lesion segmentation (Tan et al.), P(FNR <= epsilon) >= 1 - alpha;
* :mod:`.crc`: expected-FNR control (conformal risk control), E[FNR] <= epsilon;
* :mod:`.rcps`: risk-controlling prediction sets, with confidence 1 - delta E[FNR] <= epsilon (HB, WSR bounds);
* :mod:`.ltt`: Learn-Then-Test, several expected risks (FNR, missed lesions, FP mL, FP components) with confidence;
* :mod:`.fp_summaries`: per-scan false-positive summaries for Learn-Then-Test (top background values, components);
* :mod:`.lesion_level`: lesion-level control, P(missed lesions <= epsilon L) >= 1 - alpha, alone or jointly
  with the voxel FNR;
* :mod:`.simultaneous`: slider-safe bands, one event for every epsilon of a grid at once;
* :mod:`.confidence_sets`: inner/outer confidence sets (Davenport), marginal and joint;
* :mod:`.score_transforms`: the score transforms (identity, signed distance, Gaussian smoothing, margin);
* :mod:`.threshold_scores`: the score a threshold method thresholds (the probability, or a margin / smoothing);
* :mod:`.score_selection`: ``--score auto``, the score with the smallest masks on separate learning scans;
* :mod:`.mask_sets`: confidence sets from predicted masks alone (mask-only tools), one per structure;
* :mod:`.guarantee_sentences`: the one-sentence statement of each calibrated guarantee;
* :mod:`.profile`: calibration profiles on disk (JSON + summaries), recalibration, masks;
* :mod:`.profile_fields`: the fields of a profile document (float convention, the stored calibration read back);
* :mod:`.case_summaries`: one scan's compact summary (a worker's task) and the exact merge of many;
* :mod:`.bracketed_quantile`: the CLS / CRC cutoffs of partitioned summaries, exactly, in bounded driver memory;
* :mod:`.calibration`: one call from cases to a profile, shared by the CLI, the demo and Slicer;
* :mod:`.reviewed_cases`: a profile grown by one reviewed scan (bit for bit a calibration on the grown set);
* :mod:`.scan_scores`: the per-scan nonconformity scores of a calibration (the input of the three below);
* :mod:`.mondrian`: group-conditional (Mondrian) calibration, one threshold and guarantee per group;
* :mod:`.scan_features`: label-free per-scan features for the domain classifier;
* :mod:`.weighted`: weighted conformal calibration under covariate shift (Tibshirani et al. 2019);
* :mod:`.deployment`: the groups and weighting of a profile on disk;
* :mod:`.monitoring`: conformal test martingales over reviewed cases, the drift log and badge.

Imports only :mod:`ConformalSegLib.common` and :mod:`ConformalSegLib.io`.
"""
