"""The score a threshold method thresholds: the probability, or a fixed transform of it into [0, 1].

The threshold methods (CLS, expected-FNR control, RCPS, Learn-Then-Test, lesion-level control) calibrate one
cutoff ``u`` and output ``{v : score(v) >= u}``. By default the score is the network's probability. With
``calibrate --score NAME`` it is a transform of the probability map (:mod:`.score_transforms`):

* ``identity`` (default): the probability itself;
* ``margin[:c]``: ``g(D)``, ``D`` the signed distance in mm to the boundary of the mask ``p >= c`` (default
  0.5), ``g(D) = 1 / (1 + exp(-D / 10 mm))``. The cutoff ``u`` is the mask ``D >= 10 mm * ln(u / (1 - u))``:
  the network's own mask grown by a calibrated number of millimetres (:func:`describe_cutoff`). On targets whose
  outer layers the network ranks with the background (a planning margin the CT does not show), this keeps the
  per-scan guarantee's mask small where the probability cannot (OpenKBP PTV70: CLS mask 2.1 % of the scan
  instead of 40 % at eps = alpha = 0.1, ``benchmarks/RESULTS.md``). Where whole lesions are missed far from
  any predicted blob the margin must grow far, and the probability is the better score: which suits a dataset
  is an empirical question, answered on scans kept apart from calibration (``evaluate --score``).
* ``gaussian:SIGMA``: the probability smoothed with a Gaussian of SIGMA mm (clipped to [0, 1] against float
  rounding).

``distance`` is refused here: its scores are millimetres, not in [0, 1] (use ``margin``, the same order).

Guarantee
---------
Every threshold method's guarantee holds for the score exactly as for the probability, with the same sentence:
each scan's score map is a fixed function of that scan's network output, computed the same way for the
calibration scans and the new scan, so the scans stay exchangeable (the methods' proofs, e.g. in
:mod:`.cls`, use nothing of the score but values in [0, 1] and the ``>=`` convention). The profile records the
score (format version 2, which older readers refuse rather than threshold the probability with a margin
cutoff), and :meth:`~.profile.CalibrationProfile.masks` computes it before thresholding.
"""

from __future__ import annotations

import math

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from .score_transforms import IDENTITY, ScoreTransform, margin_mm, parse_transform

DEFAULT_SCORE = IDENTITY.name  # "identity": the probability


def parse_threshold_score(text: str) -> ScoreTransform:
    """The score ``text`` names (``identity``, ``margin[:LEVEL]``, ``gaussian:SIGMA_MM``); ``distance`` refused."""
    score = parse_transform(text)
    if not score.in_unit_interval:
        raise ConformalSegError(
            f"--score {text}: signed distances are millimetres, and threshold methods need scores in [0, 1]",
            fix=f"use --score margin:{score.parameter:g} (the same distance mapped into (0, 1), the same order)",
        )
    return score


def threshold_scores(probability: np.ndarray, geometry: Geometry | None, score: str | ScoreTransform) -> np.ndarray:
    """The score map of ``score`` for one probability map (the map itself, not a copy, for ``identity``).

    ``geometry`` may be None only for ``identity`` (the other scores work in mm)."""
    transform = score if isinstance(score, ScoreTransform) else parse_threshold_score(score)
    if transform.kind == "identity":
        return probability
    if geometry is None:
        raise ConformalSegError(
            f"the score {transform.name} works in mm, and this probability map has no voxel spacing",
            fix="give probability maps with their geometry (NIfTI/NRRD), or leave out --score",
        )
    values = np.asarray(transform(probability, geometry), dtype=np.float32)
    if transform.kind == "gaussian":  # a convex combination, but float rounding may step past 0 or 1
        np.clip(values, 0.0, 1.0, out=values)
    return values


#: Prefix of a score-map name that stands for a threshold score (``"score:margin:0.5"``), as opposed to a confidence
#: set's transform (``"distance:0.5"``): the Slicer panel caches and computes both kinds by name.
SCORE_MAP_PREFIX = "score:"


def score_map_by_name(name: str, probability: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The map ``name`` stands for: ``score:SCORE`` a threshold score (:func:`threshold_scores`), anything else a
    confidence set's transform (:func:`~.score_transforms.parse_transform`)."""
    if name.startswith(SCORE_MAP_PREFIX):
        return threshold_scores(probability, geometry, name[len(SCORE_MAP_PREFIX) :])
    return np.asarray(parse_transform(name)(probability, geometry))


def describe_cutoff(score: str, cutoff: float) -> str:
    """The mask ``score >= cutoff`` in words, e.g. ``"the network's 0.5 mask grown by 21.7 mm"``."""
    transform = parse_threshold_score(score)
    if transform.kind == "margin":
        level = f"{transform.parameter:g}"
        d = margin_mm(cutoff)
        if d == -math.inf:
            return "every voxel (margin score >= 0)"
        if d == math.inf:
            return "no voxel"
        change = f"grown by {-d:.1f} mm" if d <= 0 else f"shrunk by {d:.1f} mm"
        return f"the network's {level} mask {change} (margin score >= {cutoff:.6g})"
    if transform.kind == "gaussian":
        return f"probability smoothed with a {transform.parameter:g} mm Gaussian >= {cutoff:.6g}"
    return f"probability >= {cutoff:.6g}"


def score_sentence(score: str, cutoff: float) -> str:
    """What a threshold profile's guarantee sentence adds for a score other than the probability ("" for it)."""
    if parse_threshold_score(score).kind == "identity":
        return ""
    return f" The mask thresholds the {score} score, not the probability: {describe_cutoff(score, cutoff)}."
