"""Per-scan false-positive summaries for Learn-Then-Test (:mod:`ConformalSegLib.conformal.ltt`), kept without volumes.

False-positive volume
---------------------
The false-positive volume of scan ``i`` at threshold ``t`` is ``FP_i(t) = v_i * #{background voxels with
prob >= t}`` mL (``v_i`` the voxel volume in mL; background = every voxel outside the true lesion). LTT
uses the bounded loss ``min(FP_i(t), B) / B`` for a cap ``B`` mL fixed before calibration. That loss only
depends on the ``K_i = ceil(B / v_i)`` largest background probabilities: if at least ``K_i`` voxels are
at or above ``t`` the loss is 1 either way, otherwise every voxel at or above ``t`` is among the ``K_i``
largest. So each scan stores its ``K_i`` largest background probabilities (descending), and the loss is
exact at every threshold -- no floor, no histogram. Values are stored as float32 rounded towards
``+inf`` (never below the true probability: stored counts can only be larger, so the FP risk is
over-estimated, the conservative side).

False-positive components
-------------------------
A false-positive component at ``t`` is a 26-connected component of the mask ``prob >= t`` that contains
no true lesion voxel. Its count changes with ``t`` in ways no compact summary captures exactly, so it is
counted at the fixed thresholds :data:`COMPONENT_THRESHOLDS` (0.05, 0.10, ..., 0.95), chosen before any
calibration data is seen; Learn-Then-Test is valid over any such pre-specified set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..common.errors import ConformalSegError
from .summaries import check_probabilities, round_down_float32

#: The thresholds at which false-positive components are counted (fixed before seeing any data).
COMPONENT_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
DEFAULT_FP_ML_CAP = 100.0
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def components_at(components: np.ndarray, has_lesion: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """False-positive component counts (scans as rows, ``thresholds`` as columns) from the stored counts.

    ``components`` holds the counts at :data:`COMPONENT_THRESHOLDS` (one column each); ``has_lesion`` says
    which scans have a true lesion voxel. Three kinds of threshold are exact, every other one is refused
    (its count was never stored):

    * a value of :data:`COMPONENT_THRESHOLDS` (compared exactly): its stored column;
    * ``t <= 0``, e.g. ``-inf`` (the trivial whole-image result): every voxel has ``prob >= t``, so the mask
      is the whole grid, one component, a false positive exactly when the scan has no lesion (1, else 0);
    * ``t > 1``, e.g. ``+inf``: no voxel has ``prob >= t``, the empty mask, 0 components.
    """
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    lookup = {value: j for j, value in enumerate(COMPONENT_THRESHOLDS)}
    out = np.zeros((components.shape[0], t.size), dtype=np.int64)
    for k, x in enumerate(t.tolist()):
        if x in lookup:
            out[:, k] = components[:, lookup[x]]
        elif x <= 0:
            out[:, k] = np.where(np.asarray(has_lesion, dtype=bool), 0, 1)
        elif not x > 1:
            raise ConformalSegError(
                f"false-positive components are counted at the thresholds 0.05, 0.10, ..., 0.95 only, not at {x!r}",
                fix="use one of those thresholds (Learn-Then-Test with fp-components tests only them)",
            )
    return out


def round_up_float32(values: np.ndarray) -> np.ndarray:
    """float32 rounded towards +inf (never below the input)."""
    out: np.ndarray = -round_down_float32(-np.asarray(values))
    return out


def fp_components(probability: np.ndarray, lesion: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Number of 26-connected components of ``prob >= t`` with no lesion voxel, for each ``t``."""
    lesion = np.asarray(lesion, dtype=bool)
    counts = []
    for t in thresholds:
        labels, n = ndimage.label(probability >= t, structure=_STRUCTURE)
        touching = np.unique(labels[lesion])
        counts.append(n - int(np.count_nonzero(touching)))
    return np.asarray(counts, dtype=np.int64)


@dataclass(frozen=True)
class FalsePositiveSummaries:
    """Per scan: the ``K_i`` largest background probabilities (CSR, descending, float32 rounded up), the voxel
    volume in mL, and the false-positive component counts at :data:`COMPONENT_THRESHOLDS`."""

    values: np.ndarray
    offsets: np.ndarray
    voxel_ml: np.ndarray
    components: np.ndarray  # (n, len(COMPONENT_THRESHOLDS)) int64
    case_ids: tuple[str, ...]
    cap_ml: float = DEFAULT_FP_ML_CAP

    def __post_init__(self) -> None:
        n = len(self.case_ids)
        if len(self.offsets) != n + 1 or self.offsets[-1] != len(self.values) or len(self.voxel_ml) != n:
            raise ValueError("inconsistent false-positive summary offsets")
        if self.components.shape != (n, len(COMPONENT_THRESHOLDS)):
            raise ValueError("false-positive component counts have the wrong shape")

    @property
    def n(self) -> int:
        return len(self.case_ids)

    def case(self, i: int) -> np.ndarray:
        """The stored background probabilities of scan ``i``, descending (float64)."""
        return self.values[self.offsets[i] : self.offsets[i + 1]].astype(np.float64)

    def counts(self, thresholds: np.ndarray) -> np.ndarray:
        """``min(#{background voxels with prob >= t}, K_i)``, scans as rows and thresholds as columns (int64)."""
        t = np.asarray(thresholds, dtype=np.float64)
        rows = [np.searchsorted(-self.case(i), -t, side="right") for i in range(self.n)]
        return np.asarray(rows, dtype=np.int64).reshape(self.n, t.size)

    def fp_ml(self, thresholds: np.ndarray) -> np.ndarray:
        """``min(FP_i(t), cap)`` in mL, scans as rows and thresholds as columns (exact, see module docstring)."""
        out: np.ndarray = np.minimum(self.counts(thresholds) * self.voxel_ml[:, None], self.cap_ml)
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> FalsePositiveSummaries:
        """Summaries of the given scans (in the given order)."""
        idx = np.asarray(indices, dtype=np.int64)
        parts = [self.values[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum([p.size for p in parts], out=offsets[1:])
        values = np.concatenate(parts) if parts else self.values[:0]
        ids = tuple(self.case_ids[i] for i in idx)
        return FalsePositiveSummaries(values, offsets, self.voxel_ml[idx], self.components[idx], ids, self.cap_ml)

    def to_arrays(self, prefix: str = "fp_") -> dict[str, np.ndarray]:
        return {
            f"{prefix}values": self.values,
            f"{prefix}offsets": self.offsets,
            f"{prefix}voxel_ml": self.voxel_ml,
            f"{prefix}components": self.components,
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], case_ids: Sequence[str], cap_ml: float, prefix: str = "fp_"
    ) -> FalsePositiveSummaries:
        return cls(
            np.asarray(arrays[f"{prefix}values"], dtype=np.float32),
            np.asarray(arrays[f"{prefix}offsets"], dtype=np.int64),
            np.asarray(arrays[f"{prefix}voxel_ml"], dtype=np.float64),
            np.asarray(arrays[f"{prefix}components"], dtype=np.int64),
            tuple(case_ids),
            float(cap_ml),
        )


class FalsePositiveBuilder:
    """Accumulates :class:`FalsePositiveSummaries` while scans are streamed (one volume in memory at a time)."""

    def __init__(self, cap_ml: float = DEFAULT_FP_ML_CAP, components: bool = True):
        if not cap_ml > 0 or not np.isfinite(cap_ml):
            raise ConformalSegError(f"the false-positive volume cap must be > 0 mL, got {cap_ml}", fix="e.g. 100")
        self.cap_ml, self.with_components = float(cap_ml), components
        self._values: list[np.ndarray] = []
        self._voxel_ml: list[float] = []
        self._components: list[np.ndarray] = []
        self._ids: list[str] = []

    def add_case(self, case_id: str, probability: np.ndarray, lesion: np.ndarray, voxel_mm3: float = 1.0) -> None:
        probability = np.asarray(probability)
        check_probabilities(probability, str(case_id))
        background = probability[~np.asarray(lesion, dtype=bool)].astype(np.float64)
        voxel_ml = float(voxel_mm3) / 1000.0
        k = min(background.size, int(np.ceil(self.cap_ml / voxel_ml)))
        top = np.partition(background, background.size - k)[background.size - k :] if k else background[:0]
        self._values.append(round_up_float32(np.sort(top)[::-1]))
        self._voxel_ml.append(voxel_ml)
        self._components.append(
            fp_components(probability, lesion, COMPONENT_THRESHOLDS)
            if self.with_components
            else np.full(len(COMPONENT_THRESHOLDS), -1, dtype=np.int64)
        )
        self._ids.append(str(case_id))

    def build(self) -> FalsePositiveSummaries:
        offsets = np.zeros(len(self._values) + 1, dtype=np.int64)
        np.cumsum([v.size for v in self._values], out=offsets[1:])
        values = np.concatenate(self._values).astype(np.float32) if self._values else np.zeros(0, np.float32)
        components = np.asarray(self._components, dtype=np.int64).reshape(len(self._ids), len(COMPONENT_THRESHOLDS))
        return FalsePositiveSummaries(
            values, offsets, np.asarray(self._voxel_ml), components, tuple(self._ids), self.cap_ml
        )
