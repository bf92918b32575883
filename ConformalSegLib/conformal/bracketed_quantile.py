"""Exact order statistics and CLS / CRC cutoffs of summaries spread over partitions, in bounded driver memory.

When the merged summaries of an archive (tens of thousands of scans, ~4 bytes per lesion voxel) do not fit
the driver, they stay where they were made: in ``P`` partitions (a worker's share of the scans, a file),
each a :class:`~.summaries.LesionSummaries`. The driver then computes the *same* thresholds as the one-pass
path on the merged summaries, bit for bit, by asking the partitions small questions.

Order keys
----------
``order_keys`` maps float64 to int64 monotonically (the IEEE bits, the negative half reversed): ``x <= y``
iff ``key(x) <= key(y)`` for all non-NaN floats (``-0.0`` is read as ``0.0``; NaN refused). Every integer
between ``key(-inf)`` and ``key(+inf)`` is the key of a float, so a bracket of keys is a bracket of floats,
and halving a bracket never needs floating-point arithmetic.

The ``k``-th largest value (:func:`kth_largest`)
-----------------------------------------------
Invariant: the driver holds a key bracket ``[lo, hi)`` and ``above`` = the number of values with key
``>= hi``, with ``above < k <= above + count[lo, hi)``; so the ``k``-th largest value lies in the bracket
and is the ``(k - above)``-th largest there. Initially ``[key(-inf), key(+inf) + 1)``, ``above = 0``.

1. **Count** (one round): the bracket is cut into ``bins`` sub-brackets by integer edges; each partition
   returns its number of values per sub-bracket (a ``searchsorted`` of the edges into its sorted keys);
   the driver adds the counts (exact integers) and keeps the sub-bracket where the running count from the
   top reaches ``k - above``, adding the counts above it to ``above``. The invariant holds again and the
   key width shrinks by the factor ``bins``. Rounds repeat while the bracket holds more than ``max_fetch``
   values and more than one key (at most ``ceil(64 / log2(bins))`` rounds; two or three in practice).
2. **Fetch**: each partition returns its values inside the bracket; the driver selects the
   ``(k - above)``-th largest of them with ``np.partition``: the same element the one-pass
   ``np.partition`` of all values selects (equal values are the same float).

Driver memory: ``P x (bins + 1)`` counts per round plus at most ``max_fetch`` values (or one key), whatever
the number of values. Nothing is estimated: every step is integer counting, so there is no approximation
to control and no bisection on a continuous function.

CLS (:func:`cls_cutoff_partitioned`): each partition computes its scans' critical cutoffs ``c_i``
(:func:`~.cls.critical_cutoffs`, an order statistic within each scan) and keeps them as sorted keys; the
conformal cutoff is the ``k``-th largest of all ``c_i`` with the rank of :func:`~.exact.calibration_rank`.
Equal to :func:`~.cls.calibrate_cls` on the merged summaries.

CRC (:func:`crc_cutoff_partitioned`): ``c_hat`` is the largest lesion value ``v`` with
``S(v) = sum_i FNR_i(v) <= budget`` (:mod:`.crc`). ``S`` is non-decreasing and, between two consecutive data
values, constant on ``(v_next, v]``; so for *any* float ``x``, ``S(x) <= budget`` iff ``x <= c_hat``. A round
evaluates that test exactly at every edge of the bracket (each partition returns its scans' counts
``#{values >= edge}``, the driver tests ``sum misses_i / m_i <= budget`` with
:func:`~.crc.fnr_sum_within`: a correctly rounded sum and fractions inside its rounding band) and keeps the
sub-bracket ``[last edge that passes, first edge that fails)``. Once the bracket holds at most ``max_fetch``
values, they are fetched and their distinct values become the next edges, so the final bracket is one data
value: ``c_hat``. Driver memory: ``n x (bins + 1)`` counts per round (``n`` scans) plus ``max_fetch`` values.
Equal to :func:`~.crc.crc_cutoff` on the merged summaries.

Where it is used: :func:`~.crc.calibrate_crc` takes this path by itself above
:data:`~.crc.TWO_PASS_VOXELS` lesion voxels (the merged summaries viewed as 64 runs of consecutive scans:
no sort of every voxel); summaries that stay on Dask workers are reached through :class:`DaskPartitions`.

Partitions are reached through :class:`LocalPartitions` (in this process) or :class:`DaskPartitions`
(futures on a Dask cluster: the summaries never leave their workers; only counts and the bracket's values
do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ..common.errors import ConformalSegError
from .cls import critical_cutoffs, used_cases
from .crc import crc_budget, fnr_sum_within
from .exact import calibration_rank
from .summaries import LesionSummaries

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_MAX_FETCH",
    "DaskPartitions",
    "LocalPartitions",
    "Partitions",
    "cls_cutoff_partitioned",
    "case_ranges",
    "crc_cutoff_partitioned",
    "from_key",
    "kth_largest",
    "order_keys",
]

DEFAULT_BINS = 1024
DEFAULT_MAX_FETCH = 1 << 16
_LOW = (1 << 63) - 1  # the 63 bits below the sign
KEY_MIN = -(0x7FF0000000000000) - 1  # key(-inf)
KEY_END = 0x7FF0000000000000 + 1  # key(+inf) + 1


def order_keys(values: Any) -> np.ndarray:
    """Monotone int64 keys of float values (``-0.0`` as ``0.0``; NaN refused)."""
    v = np.asarray(values, dtype=np.float64) + 0.0  # -0.0 + 0.0 == +0.0
    if np.isnan(v).any():
        raise ConformalSegError("NaN among the values of an order statistic", fix="remove NaN values")
    bits = v.view(np.int64)
    keys: np.ndarray = bits ^ ((bits >> 63) & _LOW)
    return keys


def from_key(key: int) -> float:
    """The float whose key is ``key`` (the inverse of :func:`order_keys`)."""
    k = np.array([key], dtype=np.int64)
    return float((k ^ ((k >> 63) & _LOW)).view(np.float64)[0])


class Partitions(Protocol):
    """Partitioned data: ``map`` makes new partitions (where the old ones live), ``ask`` gathers one small
    answer per partition; ``function(partition, *args)`` is module level."""

    def map(self, function: Callable[..., Any], *args: Any) -> Partitions: ...

    def ask(self, function: Callable[..., Any], *args: Any) -> list[Any]: ...


class LocalPartitions:
    """Partitions held in this process (tests, benchmarks, a driver that reads partition files one by one)."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)

    def map(self, function: Callable[..., Any], *args: Any) -> LocalPartitions:
        return LocalPartitions([function(p, *args) for p in self.parts])

    def ask(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        return [function(p, *args) for p in self.parts]


class DaskPartitions:
    """Partitions as futures on a Dask cluster (``client.scatter`` or the results of tasks)."""

    def __init__(self, client: Any, futures: Sequence[Any]):
        self.client, self.futures = client, list(futures)

    def map(self, function: Callable[..., Any], *args: Any) -> DaskPartitions:
        return DaskPartitions(self.client, [self.client.submit(function, f, *args, pure=False) for f in self.futures])

    def ask(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        return list(self.client.gather([self.client.submit(function, f, *args, pure=False) for f in self.futures]))


# ----------------------------------------------------------------------------- the k-th largest value


def sorted_keys(values: Any) -> np.ndarray:
    """A partition's values as sorted order keys (built once, where the partition lives)."""
    return np.sort(order_keys(values))


def _count_in(keys: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.diff(np.searchsorted(keys, edges, side="left"))


def _keys_in(keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return keys[np.searchsorted(keys, lo, side="left") : np.searchsorted(keys, hi, side="left")]


def _size(keys: np.ndarray) -> int:
    return int(keys.size)


def _edges(lo: int, hi: int, bins: int) -> np.ndarray:
    """Integer edges ``lo = e_0 < ... < e_B = hi`` cutting ``[lo, hi)`` into at most ``bins`` parts (exact)."""
    width = hi - lo
    return np.array(sorted({lo + width * j // bins for j in range(bins + 1)}), dtype=np.int64)


def kth_largest(keys: Partitions, k: int, *, bins: int = DEFAULT_BINS, max_fetch: int = DEFAULT_MAX_FETCH) -> float:
    """The ``k``-th largest value (``1 <= k <= N``) of partitions of sorted keys (:func:`sorted_keys`)."""
    total = sum(keys.ask(_size))
    if not 1 <= k <= total:
        raise ConformalSegError(f"rank {k} is outside 1..{total}")
    if bins < 2 or max_fetch < 1:
        raise ConformalSegError(f"bins must be >= 2 and max_fetch >= 1, got {bins} and {max_fetch}")
    lo, hi, above, inside = KEY_MIN, KEY_END, 0, total
    while inside > max_fetch and hi - lo > 1:
        edges = _edges(lo, hi, bins)
        counts = np.sum(keys.ask(_count_in, edges), axis=0)
        for j in range(counts.size - 1, -1, -1):  # from the top sub-bracket down
            if above + int(counts[j]) >= k:
                lo, hi, inside = int(edges[j]), int(edges[j + 1]), int(counts[j])
                break
            above += int(counts[j])
    if hi - lo == 1:
        return from_key(lo)
    fetched = np.concatenate(keys.ask(_keys_in, lo, hi))
    r = k - above  # the r-th largest inside the bracket
    return from_key(int(np.partition(fetched, fetched.size - r)[fetched.size - r]))


# ----------------------------------------------------------------------------- CLS


def _critical_keys(part: LesionSummaries, epsilon: float, empty: str) -> np.ndarray:
    return sorted_keys(critical_cutoffs(part, epsilon)[used_cases(part, empty)])


def cls_cutoff_partitioned(
    parts: Partitions,
    epsilon: float,
    alpha: float,
    *,
    empty: str = "exclude",
    pac_delta: float | None = None,
    bins: int = DEFAULT_BINS,
    max_fetch: int = DEFAULT_MAX_FETCH,
) -> float:
    """The CLS cutoff of partitioned summaries: ``calibrate_cls(merged, ...).probability_threshold``, exactly."""
    keys = parts.map(_critical_keys, epsilon, empty)
    n = sum(keys.ask(_size))
    k = calibration_rank(n, alpha, pac_delta)
    if k > n:
        return float("-inf")
    return kth_largest(keys, k, bins=bins, max_fetch=max_fetch)


# ----------------------------------------------------------------------------- CRC


def _lesion_sizes(part: LesionSummaries) -> np.ndarray:
    return part.lesion_sizes


def _counts_at(part: LesionSummaries, edges: np.ndarray) -> np.ndarray:
    """``(scans, edges)``: per scan, the number of its lesion values ``>=`` each edge's float."""
    cutoffs = np.array([from_key(int(e)) for e in edges], dtype=np.float64)
    shape = (part.n, cutoffs.size)
    lo = np.broadcast_to(part.offsets[:-1, None], shape).copy()  # invariant: run[start:lo] >= cutoff
    hi = np.broadcast_to(part.offsets[1:, None], shape).copy()  # invariant: run[hi:end] < cutoff
    cut = np.broadcast_to(cutoffs[None, :], shape)
    active = lo < hi
    while active.any():  # one binary search per (scan, edge), all at once (as LesionSummaries.count_at_least)
        rows, cols = np.nonzero(active)
        mid = (lo[rows, cols] + hi[rows, cols]) // 2
        ge = part.decode(part.values[mid]) >= cut[rows, cols]
        lo[rows[ge], cols[ge]] = mid[ge] + 1
        hi[rows[~ge], cols[~ge]] = mid[~ge]
        active[rows, cols] = lo[rows, cols] < hi[rows, cols]
    counts: np.ndarray = lo - part.offsets[:-1, None]
    return counts


def _values_between(part: LesionSummaries, lo: int, hi: int) -> np.ndarray:
    keys = order_keys(part.probabilities())  # not the cached view: a transient copy, one partition at a time
    return np.unique(keys[(keys >= lo) & (keys < hi)])


def case_ranges(summaries: LesionSummaries, parts: int) -> list[LesionSummaries]:
    """``summaries`` cut into at most ``parts`` runs of consecutive scans of about equal voxel counts, as
    views (no copy of the values): partitions for the in-memory two-pass path."""
    offsets = summaries.offsets
    cuts = np.searchsorted(offsets, np.linspace(0, offsets[-1], parts + 1)[1:-1], side="left")
    bounds = np.unique(np.concatenate([[0], cuts, [summaries.n]]))
    return [
        LesionSummaries(
            summaries.values[offsets[a] : offsets[b]],
            offsets[a : b + 1] - offsets[a],
            summaries.case_ids[a:b],
            summaries.precision,
        )
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


def crc_cutoff_partitioned(
    parts: Partitions,
    epsilon: float,
    *,
    n: int | None = None,
    bins: int = 64,
    max_fetch: int = DEFAULT_MAX_FETCH,
) -> float:
    """The CRC cutoff of partitioned summaries: ``crc_cutoff(merged, epsilon, n=n)``, exactly.

    ``n``: the number of calibration scans (default: all scans of all partitions), as in
    :func:`~.crc.crc_cutoff`.
    """
    sizes = np.concatenate(parts.ask(_lesion_sizes))
    n = sizes.size if n is None else int(n)
    budget = crc_budget(n, epsilon)
    lesion = sizes > 0
    n_lesion = int(np.count_nonzero(lesion))
    if budget < 0:
        return float("-inf")
    if n_lesion <= budget:
        return float("inf")

    def passes(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per edge key: ``S(edge) <= budget``, exactly, and the per-scan counts ``(n, edges)`` it came from."""
        counts = np.concatenate(parts.ask(_counts_at, edges), axis=0)
        misses = sizes[lesion, None] - counts[lesion]
        ok = [fnr_sum_within(misses[:, j], sizes[lesion], budget, sizes.size) for j in range(edges.size)]
        return np.array(ok, dtype=bool), counts

    # S(-inf) = 0 passes; above every value S = n_lesion > budget fails
    lo, hi = KEY_MIN, KEY_END
    at_lo, at_hi = sizes, np.zeros_like(sizes)  # per scan: values >= lo, values >= hi
    while hi - lo > 1 and int(np.sum(at_lo - at_hi)) > max_fetch:
        edges = _edges(lo, hi, bins)
        inner_ok, inner_counts = passes(edges[1:-1])
        ok = np.concatenate([[True], inner_ok, [False]])
        counts = np.column_stack([at_lo, inner_counts, at_hi])
        j = int(np.flatnonzero(ok)[-1])  # S is monotone: edges up to j pass, from j + 1 fail
        lo, hi, at_lo, at_hi = int(edges[j]), int(edges[j + 1]), counts[:, j], counts[:, j + 1]
    if hi - lo == 1:
        return from_key(lo)
    # c_hat is a data value in [lo, hi): search the bracket's distinct values, bins at a time
    candidates = np.unique(np.concatenate(parts.ask(_values_between, lo, hi)))
    first, last = 0, candidates.size  # candidates[first] passes (it is <= c_hat); candidates[last] would fail
    while last - first > 1:
        idx = np.unique(np.linspace(first + 1, last - 1, min(bins, last - first - 1)).round().astype(np.int64))
        ok = passes(candidates[idx])[0]
        passing = idx[ok]
        first = int(passing[-1]) if passing.size else first
        failing = idx[~ok]
        last = int(failing[0]) if failing.size else last
    return from_key(int(candidates[first]))
