"""Conformal risk control for voxel-wise intervals: CRC, K-CRC, sem-CRC and per-organ sem-CRC.

Implements Teneggi, Stayman & Sulam, *Conformal Risk Control for Semantic Uncertainty
Quantification in CT*: nested intervals ``[q_lo - lambda, q_hi + lambda]`` with one lambda per
group (the whole image, K fixed loss-quantile groups, or the organs of each scan's segmentation),
an anchor from a convex surrogate problem (cvxpy) on an optimisation split, and an exact CRC
backtracking step on the calibration split. Modules, one concept each:

* :mod:`.intervals`: the interval family, coverage convention and 0-1 loss;
* :mod:`.memberships`: organ memberships from label maps, K-CRC partition;
* :mod:`.anchor`: surrogate loss, stratified voxel subsampling, the anchor problem;
* :mod:`.exact_omega`: exact omega_hat (and the bisection baseline);
* :mod:`.procedures`: the four methods and their result;
* :mod:`.mc_dropout`: intervals from MC-dropout samples;
* :mod:`.synthetic`: seeded synthetic interval data;
* :mod:`.evaluation`: Table-1 / per-organ evaluation over repeated calibrations;
* :mod:`.profile` and :mod:`.workflow`: interval profiles on disk, calibrate/apply from folders;
* :mod:`.streaming`: calibration from folders one scan at a time (bit-identical to the in-memory path).
"""

from __future__ import annotations

from .anchor import AnchorResult, AnchorSample, solve_anchor, stratified_sample, surrogate_loss, surrogate_risk
from .errors import (
    AnchorWarning,
    IntervalCalibrationError,
    IntervalInputError,
    IntervalProfileError,
    UncontrollableRiskWarning,
)
from .evaluation import evaluate_interval_methods, evaluation_markdown, write_interval_evaluation
from .exact_omega import OmegaCurve, bisect_omega, exact_omega, lambdas_at, omega_thresholds
from .intervals import EXCLUDED, IntervalData, IntervalScan, make_interval_scan, mean_length, need_values, scan_loss
from .mc_dropout import mc_dropout_intervals
from .memberships import BODY, OrganMap, loss_quantile_partition, organ_memberships
from .procedures import (
    METHODS,
    IntervalCalibration,
    calibrate_crc_interval,
    calibrate_interval_method,
    calibrate_kcrc,
    calibrate_semcrc,
    calibrate_semcrc_organ,
)
from .profile import IntervalProfile, is_interval_profile, load_interval_profile
from .synthetic import SyntheticIntervals, synthetic_intervals
from .workflow import IntervalApplication, apply_interval, calibrate_interval, write_interval_table

__all__ = [
    "BODY",
    "EXCLUDED",
    "METHODS",
    "AnchorResult",
    "AnchorSample",
    "AnchorWarning",
    "IntervalApplication",
    "IntervalCalibration",
    "IntervalCalibrationError",
    "IntervalProfile",
    "IntervalData",
    "IntervalInputError",
    "IntervalProfileError",
    "IntervalScan",
    "OmegaCurve",
    "OrganMap",
    "SyntheticIntervals",
    "UncontrollableRiskWarning",
    "bisect_omega",
    "calibrate_crc_interval",
    "calibrate_interval_method",
    "calibrate_kcrc",
    "calibrate_semcrc",
    "calibrate_semcrc_organ",
    "exact_omega",
    "lambdas_at",
    "loss_quantile_partition",
    "make_interval_scan",
    "mc_dropout_intervals",
    "mean_length",
    "need_values",
    "omega_thresholds",
    "organ_memberships",
    "scan_loss",
    "solve_anchor",
    "stratified_sample",
    "surrogate_loss",
    "surrogate_risk",
    "synthetic_intervals",
    "apply_interval",
    "calibrate_interval",
    "evaluate_interval_methods",
    "evaluation_markdown",
    "is_interval_profile",
    "load_interval_profile",
    "write_interval_evaluation",
    "write_interval_table",
]
