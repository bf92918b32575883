"""The splits of the evaluation protocol (:mod:`.protocol`) as tasks over the pass-1 summaries (no volume).

Each split calibrates CLS (per epsilon and alpha), CRC (per epsilon) and every confidence set (per transform,
mode and alpha) on its calibration side and measures the sets' coverage on its test side. The splits are
drawn here, on the driver, in order (split ``s`` is the ``s``-th ``rng.permutation(n)`` of
``numpy.random.default_rng(seed)``, exactly as the serial loop drew them); chunks of :data:`SPLITS_PER_TASK`
splits then run as tasks of :func:`~ConformalSegLib.common.executors.map_ordered` on the evaluation's
executor. The summaries are the tasks' shared input, sent to each worker once (scattered with
``broadcast=True`` on Dask, once per worker on a process pool); each task gets its splits' permutations and
returns their cutoffs and coverages, which come back in split order. Every number is computed by the same
function on the same arrays as serially, so the result is bit-identical whatever the executor.

CRC's cutoff (a sort of the calibration side's pooled lesion probabilities, per epsilon) is the costly part:
this is what the workers share out. The lesion-level split thresholds (:mod:`.lesion_protocol`, a few
partitions of ``(n, E)`` matrices per split) stay on the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common.executors import ExecutorSpec, map_ordered
from ..conformal.cls import conformal_lower_cutoff
from ..conformal.confidence_sets import SetStatistics, calibrate_sets
from ..conformal.crc import crc_cutoff
from .config import EvaluationConfig

#: Splits per task: enough work per task to amortize an executor's per-task cost, enough tasks to share out.
SPLITS_PER_TASK = 10
#: ``[transform][mode][key]`` -> ``(A,)`` thresholds and coverages of one split.
SplitSets = dict[str, dict[str, dict[str, np.ndarray]]]


@dataclass
class SplitCalibration:
    """One split: its test cases, CLS cutoffs ``(E, A)``, CRC cutoffs ``(E,)``, CLS calibration size, sets."""

    test: np.ndarray
    cls_cut: np.ndarray
    crc_cut: np.ndarray
    cls_ncal: int
    sets: SplitSets


def draw_splits(seed: int, splits: int, n: int) -> list[np.ndarray]:
    """The protocol's permutations: split ``s`` is the ``s``-th ``rng.permutation(n)`` of ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(splits)]


def calibrate_splits(
    shared: tuple[Any, ...],
    perms: list[np.ndarray],
    spec: ExecutorSpec,
    progress: Callable[[int, int], None] | None = None,
) -> list[SplitCalibration]:
    """:func:`calibrate_split_chunk` over every split, in chunks of :data:`SPLITS_PER_TASK` on ``spec``, in split
    order. ``shared`` is ``(summaries, critical (E, n), population (n,), set_stats, config, n_cal)``;
    ``progress(done_splits, total_splits)`` as chunks complete."""
    chunks = [perms[i : i + SPLITS_PER_TASK] for i in range(0, len(perms), SPLITS_PER_TASK)]
    labels = [f"splits {i + 1}-{min(i + SPLITS_PER_TASK, len(perms))}" for i in range(0, len(perms), SPLITS_PER_TASK)]
    report = None
    if progress is not None:

        def report(done: int, total: int, label: str) -> None:
            progress(min(done * SPLITS_PER_TASK, len(perms)), len(perms))

    results = map_ordered(calibrate_split_chunk, shared, chunks, spec, labels=labels, progress=report)
    return [split for chunk in results for split in chunk]


def calibrate_split_chunk(shared: tuple[Any, ...], perms: list[np.ndarray]) -> list[SplitCalibration]:
    """Calibrate every method on each split of ``perms`` (module docstring). Module level: the task of
    :func:`calibrate_splits` on any executor."""
    summaries, critical, population, set_stats, config, n_cal = shared
    out = []
    for perm in perms:
        cal = np.sort(perm[:n_cal])
        test = perm[n_cal:]
        cal_pop = cal[population[cal]]
        E, A = len(config.epsilons), len(config.alphas)
        cls_cut = np.empty((E, A))
        for e in range(E):
            crit_cal = critical[e, cal_pop]
            for a, alpha in enumerate(config.alphas):
                cls_cut[e, a] = conformal_lower_cutoff(crit_cal, alpha)
        cal_summaries = summaries.subset(cal_pop)
        crc_cut = np.array([crc_cutoff(cal_summaries, eps) for eps in config.epsilons], dtype=np.float64)
        del cal_summaries
        sets = {name: _calibrate_sets(st, cal, test, config) for name, st in set_stats.items()}
        out.append(SplitCalibration(test, cls_cut, crc_cut, int(cal_pop.size), sets))
    return out


def _calibrate_sets(
    st: SetStatistics, cal: np.ndarray, test: np.ndarray, config: EvaluationConfig
) -> dict[str, dict[str, np.ndarray]]:
    """Confidence-set thresholds of one split for every mode and alpha, and their test coverages, ``(A,)``."""
    cal_stats = st.subset(cal)
    tau_test, gamma_test = st.tau[test], st.gamma[test]
    A = len(config.alphas)
    by_mode: dict[str, dict[str, np.ndarray]] = {}
    for mode in config.set_modes:
        arrays = {k: np.empty(A) for k in ("inner_threshold", "outer_threshold")}
        arrays.update({k: np.full(A, np.nan) for k in ("inner_coverage", "outer_coverage", "joint_coverage")})
        for a, alpha in enumerate(config.alphas):
            calibration = calibrate_sets(cal_stats, alpha=alpha, mode=mode, warn=False)
            arrays["inner_threshold"][a] = calibration.inner_threshold
            arrays["outer_threshold"][a] = calibration.outer_threshold
            inner_ok = tau_test <= calibration.inner_threshold
            outer_ok = gamma_test <= -calibration.outer_threshold
            arrays["inner_coverage"][a] = inner_ok.mean()
            arrays["outer_coverage"][a] = outer_ok.mean()
            arrays["joint_coverage"][a] = (inner_ok & outer_ok).mean()
        by_mode[mode] = arrays
    return by_mode
