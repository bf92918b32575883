"""Label-free per-scan features: what a domain classifier may see of a scan to tell two sites apart.

Weighted conformal calibration (:mod:`ConformalSegLib.conformal.weighted`) re-weights the calibration
scans by how much more likely the target site is to produce a scan *with these features*. Every feature
is computed from the probability map, its grid and (optionally) the image -- never from a label -- so
it is available for unlabelled target scans and for a new scan at apply time, computed the same way.

Probability-map and grid features (always):

* ``log_predicted_volume_ml``: ``log(1 + V)``, ``V`` the predicted lesion volume in mL (voxels with
  probability ``>= 0.5``, the rule of :mod:`.mondrian`);
* ``log_uncertain_volume_ml``: ``log(1 + U)``, ``U`` the volume (mL) of voxels with ``0.1 <= p < 0.9``;
* ``mean_probability``: the mean probability over the whole map;
* ``mean_probability_in_prediction``: the mean over voxels with ``p >= 0.5`` (0 when there are none);
* ``max_probability``;
* ``spacing_x_mm``, ``spacing_y_mm``, ``spacing_z_mm`` (ITK order) and ``log_field_of_view_ml``
  (``log(1 + all voxels x voxel volume / 1000)``).

Intensity features (only when the image is given, for every calibration and target scan alike): the
fraction of the image's voxels in each of the fixed CT bins :data:`INTENSITY_EDGES_HU` (a coarse
intensity histogram: air, lung, fat, water/fluid, soft tissue, enhanced tissue, bone). For another
modality, normalise intensities the same way at both sites first, or leave the images out.

Logarithms tame the heavy tails of volumes, so that a linear classifier on standardised features is a
sensible model of the log density ratio.
"""

from __future__ import annotations

import math

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry

PROBABILITY_FEATURES: tuple[str, ...] = (
    "log_predicted_volume_ml",
    "log_uncertain_volume_ml",
    "mean_probability",
    "mean_probability_in_prediction",
    "max_probability",
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
    "log_field_of_view_ml",
)
#: Edges (HU) of the intensity histogram; the first bin is ``< -500``, the last ``>= 300``.
INTENSITY_EDGES_HU: tuple[float, ...] = (-500.0, -100.0, -20.0, 20.0, 60.0, 100.0, 300.0)


def intensity_feature_names() -> tuple[str, ...]:
    bounds = ["-inf", *(f"{e:g}" for e in INTENSITY_EDGES_HU), "inf"]
    return tuple(f"hu_fraction_{a}_{b}" for a, b in zip(bounds, bounds[1:]))


def feature_names(with_intensity: bool) -> tuple[str, ...]:
    """The feature names, in order, with or without the intensity histogram."""
    return PROBABILITY_FEATURES + (intensity_feature_names() if with_intensity else ())


def scan_features(probability: np.ndarray, geometry: Geometry, image: np.ndarray | None = None) -> np.ndarray:
    """The features of one scan (float64, in the order of :func:`feature_names`)."""
    probability = np.asarray(probability)
    if probability.shape != geometry.shape:
        raise ValueError("probability shape does not match its geometry")
    ml = geometry.voxel_volume_mm3 / 1000.0
    predicted = probability >= 0.5
    n_predicted = int(np.count_nonzero(predicted))
    uncertain = int(np.count_nonzero((probability >= 0.1) & (probability < 0.9)))
    values = [
        math.log1p(n_predicted * ml),
        math.log1p(uncertain * ml),
        float(probability.mean(dtype=np.float64)),
        float(probability[predicted].mean(dtype=np.float64)) if n_predicted else 0.0,
        float(probability.max()),
        *geometry.spacing,
        math.log1p(probability.size * ml),
    ]
    if image is not None:
        image = np.asarray(image)
        if image.shape != probability.shape:
            raise ConformalSegError(
                f"the image has shape {image.shape}, its probability map {probability.shape}",
                fix="give the image the probability map was predicted from (same grid)",
            )
        bins = np.searchsorted(np.asarray(INTENSITY_EDGES_HU), image.ravel(), side="right")
        values += list(np.bincount(bins, minlength=len(INTENSITY_EDGES_HU) + 1) / image.size)
    features = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(features)):
        raise ConformalSegError("a scan feature is not finite (NaN or infinite values in the map or the image)")
    return features
