"""Lesion-wise detection metrics: which true lesions a mask finds, and how many false-positive blobs it adds.

Definitions (used by the trainer's held-out report, the model benchmarks and the evaluation)
----------------------------------------------------------------------------------------------
* **Lesions** are the 26-connected components of the true lesion mask (``scipy.ndimage.label`` with
  the full 3x3x3 structure), so two lesions touching at a corner are one lesion.
* A true lesion is **detected** by a predicted mask when at least ``ceil(tau * size)`` of its voxels are
  in the mask (``tau`` = ``detect_fraction`` in ``(0, 1]``, read as the decimal typed, the ceiling exact:
  :func:`ConformalSegLib.conformal.exact.detection_count`, the rule of the lesion-level guarantee of
  :mod:`ConformalSegLib.conformal.lesion_level`); a very small ``tau`` makes one voxel enough.
* A predicted component (26-connected) is a **false-positive component** when it shares no voxel with
  any true lesion. ``false_positive_ml`` is its volume in mL.
* A lesion's **size class** is given by its *equivalent radius* ``r = (3 V / (4 pi))^(1/3)`` in mm, with
  ``V`` its volume in mm^3 (voxel count times the voxel volume): the classes :data:`SIZE_CLASSES`
  (half-open intervals ``[lo, hi)``; the first starts at 0 so clipped lesions below 3 mm count as small,
  the last ends at infinity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.exact import detection_counts
from ..conformal.lesion_level import lesion_labels

#: ``(name, lo_mm, hi_mm)``: equivalent-radius classes ``[lo, hi)`` (see the module docstring).
SIZE_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("3-5 mm", 0.0, 5.0),
    ("5-10 mm", 5.0, 10.0),
    ("10-20 mm", 10.0, math.inf),
)


def equivalent_radius_mm(voxels: int | np.ndarray, voxel_mm3: float) -> np.ndarray:
    """Radius (mm) of the ball with the volume of ``voxels`` voxels of ``voxel_mm3`` each."""
    return np.cbrt(3.0 * np.asarray(voxels, dtype=np.float64) * float(voxel_mm3) / (4.0 * math.pi))


def size_class(radius_mm: float) -> str:
    """The name of the :data:`SIZE_CLASSES` entry holding ``radius_mm``."""
    for name, lo, hi in SIZE_CLASSES:
        if lo <= radius_mm < hi:
            return name
    raise ValueError(f"no size class for radius {radius_mm}")


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise result of one predicted mask against one truth (see the module docstring)."""

    lesion_voxels: tuple[int, ...]  #: size of each true lesion, in component order
    lesion_radius_mm: tuple[float, ...]  #: equivalent radius of each true lesion
    detected: tuple[bool, ...]  #: whether each true lesion is detected
    false_positive_components: int
    false_positive_ml: float
    predicted_components: int
    detect_fraction: float = 0.5

    @property
    def n_lesions(self) -> int:
        return len(self.lesion_voxels)

    @property
    def n_missed(self) -> int:
        return self.n_lesions - int(sum(self.detected))

    @property
    def missed_fraction(self) -> float:
        """Missed lesions / lesions (NaN without a true lesion)."""
        return self.n_missed / self.n_lesions if self.n_lesions else float("nan")


def lesion_detection(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    detect_fraction: float = 0.5,
) -> LesionDetection:
    """Match a predicted mask to the true lesions of one case (see the module docstring)."""
    prediction, truth = _masks(prediction, truth)
    voxel_mm3 = float(np.prod(np.asarray(spacing_zyx, dtype=np.float64)))
    true_labels, n_true = lesion_labels(truth)
    if n_true:
        sizes = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:]
        hits = np.bincount(true_labels[prediction], minlength=n_true + 1)[1:]
        detected = hits >= detection_counts(sizes, detect_fraction)
    else:
        sizes = hits = np.zeros(0, dtype=np.int64)
        detected = np.zeros(0, dtype=bool)
    fp_components, fp_voxels, n_pred = _false_positive_counts(prediction, truth)
    radii = equivalent_radius_mm(sizes, voxel_mm3)
    return LesionDetection(
        tuple(int(s) for s in sizes),
        tuple(float(r) for r in radii),
        tuple(bool(d) for d in detected),
        fp_components,
        fp_voxels * voxel_mm3 / 1000.0,
        int(n_pred),
        float(detect_fraction),
    )


def false_positives(
    prediction: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[int, float]:
    """``(false-positive components, their mL)`` of a predicted mask: the same numbers as
    :func:`lesion_detection`'s, with one connected-component labelling (of the prediction) instead of two."""
    prediction, truth = _masks(prediction, truth)
    components, voxels, _ = _false_positive_counts(prediction, truth)
    return components, voxels * float(np.prod(np.asarray(spacing_zyx, dtype=np.float64))) / 1000.0


def _masks(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays on the same grid (a clear error otherwise)."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ConformalSegError(
            f"prediction shape {prediction.shape} != truth shape {truth.shape}",
            fix="compare masks on the same voxel grid",
        )
    return prediction, truth


def _false_positive_counts(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """``(components touching no true voxel, their voxels, all predicted components)``."""
    pred_labels, n_pred = lesion_labels(prediction)
    if not n_pred:
        return 0, 0, 0
    touching = np.zeros(n_pred + 1, dtype=bool)
    touching[np.unique(pred_labels[truth & prediction])] = True
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    fp = ~touching
    fp[0] = False
    return int(np.count_nonzero(fp)), int(pred_sizes[fp].sum()), int(n_pred)


@dataclass
class DetectionTally:
    """Lesion-wise detection pooled over cases: sensitivity per size class, false positives per scan."""

    detected: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _, _ in SIZE_CLASSES})
    lesions: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _, _ in SIZE_CLASSES})
    scans: int = 0
    false_positive_components: int = 0
    false_positive_ml: float = 0.0

    def add(self, result: LesionDetection) -> None:
        self.scans += 1
        self.false_positive_components += result.false_positive_components
        self.false_positive_ml += result.false_positive_ml
        for radius, hit in zip(result.lesion_radius_mm, result.detected):
            name = size_class(radius)
            self.lesions[name] += 1
            self.detected[name] += int(hit)

    def as_dict(self) -> dict[str, object]:
        """Sensitivity per size class (and overall), mean FP components and FP mL per scan."""
        total = sum(self.lesions.values())
        return {
            "sensitivity_by_size": {
                name: (self.detected[name] / self.lesions[name] if self.lesions[name] else None)
                for name in self.lesions
            },
            "lesions_by_size": dict(self.lesions),
            "sensitivity": sum(self.detected.values()) / total if total else None,
            "lesions": total,
            "scans": self.scans,
            "false_positive_components_per_scan": self.false_positive_components / self.scans if self.scans else None,
            "false_positive_ml_per_scan": self.false_positive_ml / self.scans if self.scans else None,
        }
