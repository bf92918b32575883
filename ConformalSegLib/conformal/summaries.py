"""Compact per-case summaries from which CLS and expected-FNR control recalibrate without volumes.

For case ``i`` with ``m_i`` true lesion voxels, the FNR of the mask ``prob >= c`` depends on the
volume only through the multiset of lesion-voxel probabilities:
``FNR_i(c) = #{lesion voxels with prob < c} / m_i``. Storing each case's lesion probabilities sorted
in descending order therefore lets any ``(epsilon, alpha)`` be recalibrated exactly by indexing
(see :mod:`ConformalSegLib.conformal.cls` and :mod:`ConformalSegLib.conformal.crc`).

Storage is CSR-like: one flat array of values (case after case, each descending) and ``offsets``
(``values[offsets[i]:offsets[i+1]]`` is case ``i``). Cases with an empty lesion have zero values.

Precision (always *conservative*: a stored value is never above the true probability, so every
cutoff derived from it is at most the exact one and masks can only grow):

* ``"float32"`` (default): float32 maps are stored exactly; float64 maps are rounded towards
  ``-inf`` to float32.
* ``"uint16"``: ``floor(p * 65535)`` (checked so that ``q / 65535 <= p`` holds in float64), half
  the size, cutoffs at most 1/65535 below the exact ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..common.errors import ConformalSegError

PRECISIONS = ("float32", "uint16")
_UINT16_SCALE = 65535.0


def round_down_float32(values: np.ndarray) -> np.ndarray:
    """Convert to float32 rounding towards -inf, so that the result never exceeds the input."""
    as32 = values.astype(np.float32)
    if values.dtype == np.float32:
        return as32
    too_big = as32.astype(np.float64) > values
    as32[too_big] = np.nextafter(as32[too_big], np.float32(-np.inf))
    return as32


def _quantize_uint16(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    q = np.floor(v * _UINT16_SCALE)
    q -= (q / _UINT16_SCALE) > v  # guard against the product rounding up to the next integer
    return np.clip(q, 0, 65535).astype(np.uint16)


def check_probabilities(values: np.ndarray, case_id: str) -> None:
    """Refuse NaN, infinite or out-of-[0, 1] probabilities with the file readers' message (the Python API
    and the Slicer module reach the summaries without a reader; NaN would rank as "always passing")."""
    values = np.asarray(values)
    if values.size == 0 or values.dtype.kind not in "fc":
        return
    n_bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if n_bad:
        raise ConformalSegError(
            f"case {case_id!r}: the probability map contains {n_bad} NaN or infinite voxel(s)",
            fix="re-run the prediction; every voxel needs a probability in [0,1]",
        )
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise ConformalSegError(
            f"case {case_id!r}: probability values range from {low:.6g} to {high:.6g}",
            fix="probabilities must be in [0,1]: apply softmax/sigmoid to logits first",
        )


def lesion_values(probability: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Probabilities of the true lesion voxels, sorted in descending order (input dtype kept)."""
    if probability.shape != lesion.shape:
        raise ValueError(f"probability shape {probability.shape} != lesion shape {lesion.shape}")
    values = probability[np.asarray(lesion, dtype=bool)]
    values.sort()
    descending: np.ndarray = values[::-1]
    return descending


@dataclass(frozen=True)
class LesionSummaries:
    """Sorted lesion-voxel probabilities of ``n`` calibration cases (see module docstring)."""

    values: np.ndarray  # flat; float32, or uint16 codes when precision == "uint16"
    offsets: np.ndarray  # int64, length n + 1
    case_ids: tuple[str, ...]
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if (
            len(self.offsets) != len(self.case_ids) + 1
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.values)
            or np.any(np.diff(self.offsets) < 0)
        ):
            raise ValueError("inconsistent summary offsets")

    @property
    def n(self) -> int:
        return len(self.case_ids)

    @property
    def lesion_sizes(self) -> np.ndarray:
        """``m_i``, the number of true lesion voxels of each case (int64)."""
        return np.diff(self.offsets)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored values (or a gather of them) as float64 probabilities."""
        stored = np.asarray(stored)
        if self.precision == "uint16":
            return stored.astype(np.float64) / _UINT16_SCALE
        return stored.astype(np.float64)

    def probabilities(self) -> np.ndarray:
        """All flat values decoded to float64 probabilities."""
        return self.decode(self.values)

    def probabilities_view(self) -> np.ndarray:
        """Decoded flat values, computed once and cached (read-only)."""
        return self._decoded

    @cached_property
    def _decoded(self) -> np.ndarray:
        decoded = self.decode(self.values)
        decoded.flags.writeable = False
        return decoded

    @cached_property
    def _weighted_distinct(self) -> tuple[np.ndarray, np.ndarray]:
        sizes = self.lesion_sizes
        values = self._decoded
        weights = np.repeat(1.0 / np.maximum(sizes, 1), sizes)
        order = np.argsort(-values, kind="stable")
        values, cumulative = values[order], np.cumsum(weights[order])
        last_of_run = np.r_[values[1:] != values[:-1], True] if values.size else np.zeros(0, bool)
        return values[last_of_run], cumulative[last_of_run]

    def weighted_distinct_descending(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct lesion probabilities (descending) and, for each, the float sum of the weights
        ``1/m_i`` of all lesion voxels at or above it (cached; used by expected-FNR control)."""
        return self._weighted_distinct

    def count_at_least(self, cutoff: float) -> np.ndarray:
        """Per case, the exact number of lesion values ``>= cutoff`` (int64).

        A binary search run on all cases at once (each case's run is descending): O(n log max m)
        with no copy of the values.
        """
        lo = self.offsets[:-1].copy()  # invariant: values[start:lo] >= cutoff
        hi = self.offsets[1:].copy()  # invariant: values[hi:end] < cutoff
        active = lo < hi
        while active.any():
            idx = np.flatnonzero(active)
            mid = (lo[idx] + hi[idx]) // 2
            ge = self.decode(self.values[mid]) >= cutoff
            lo[idx[ge]] = mid[ge] + 1
            hi[idx[~ge]] = mid[~ge]
            active[idx] = lo[idx] < hi[idx]
        counts: np.ndarray = lo - self.offsets[:-1]
        return counts

    def case(self, i: int) -> np.ndarray:
        """Decoded lesion probabilities of case ``i``, descending."""
        return self.decode(self.values[self.offsets[i] : self.offsets[i + 1]])

    def subset(self, indices: Sequence[int] | np.ndarray) -> LesionSummaries:
        """Summaries of the given cases (in the given order)."""
        idx = np.asarray(indices, dtype=np.int64)
        sizes = self.lesion_sizes[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        parts = [self.values[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        values = np.concatenate(parts) if parts else self.values[:0]
        return LesionSummaries(values, offsets, tuple(self.case_ids[i] for i in idx), self.precision)

    @classmethod
    def from_sorted(cls, per_case: Iterable[tuple[str, np.ndarray]], precision: str = "float32") -> LesionSummaries:
        """Build from ``(case_id, lesion probabilities sorted descending)`` pairs."""
        builder = SummaryBuilder(precision)
        for case_id, values in per_case:
            builder.add_sorted(case_id, values)
        return builder.build()

    @classmethod
    def from_volumes(
        cls, cases: Iterable[tuple[str, np.ndarray, np.ndarray]], precision: str = "float32"
    ) -> LesionSummaries:
        """Build from ``(case_id, probability, lesion_mask)`` triples, one case in memory at a time."""
        builder = SummaryBuilder(precision)
        for case_id, probability, lesion in cases:
            builder.add_case(case_id, probability, lesion)
        return builder.build()

    def to_arrays(self, prefix: str = "lesion_") -> dict[str, np.ndarray]:
        """Arrays for an ``.npz`` file (see :meth:`from_arrays`)."""
        return {f"{prefix}values": self.values, f"{prefix}offsets": self.offsets}

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], case_ids: Sequence[str], precision: str, prefix: str = "lesion_"
    ) -> LesionSummaries:
        values = np.asarray(arrays[f"{prefix}values"])
        expected = np.uint16 if precision == "uint16" else np.float32
        if values.dtype != expected:
            raise ValueError(f"summary values have dtype {values.dtype}, expected {np.dtype(expected)}")
        return cls(values, np.asarray(arrays[f"{prefix}offsets"], dtype=np.int64), tuple(case_ids), precision)


class SummaryBuilder:
    """Accumulates per-case summaries while cases are streamed from disk."""

    def __init__(self, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self._parts: list[np.ndarray] = []
        self._ids: list[str] = []

    def add_case(self, case_id: str, probability: np.ndarray, lesion: np.ndarray) -> None:
        """Add one case from its probability map and lesion mask (refused: NaN, infinities, values outside [0, 1])."""
        self.add_sorted(case_id, lesion_values(probability, lesion))

    def add_sorted(self, case_id: str, values: np.ndarray) -> None:
        """Add one case from its lesion probabilities sorted descending (checked as in :meth:`add_case`)."""
        values = np.asarray(values)
        check_probabilities(values, str(case_id))
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        encoded = _quantize_uint16(values) if self.precision == "uint16" else round_down_float32(values)
        self._parts.append(encoded)
        self._ids.append(str(case_id))

    def build(self) -> LesionSummaries:
        dtype = np.uint16 if self.precision == "uint16" else np.float32
        offsets = np.zeros(len(self._parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self._parts], out=offsets[1:])
        values = np.concatenate(self._parts).astype(dtype, copy=False) if self._parts else np.zeros(0, dtype)
        return LesionSummaries(values, offsets, tuple(self._ids), self.precision)
