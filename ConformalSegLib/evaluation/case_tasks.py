"""The evaluation's per-case work as tasks: serially, on a process pool or on Dask, merged in case order.

Both passes of :mod:`.protocol` are a *map* over the cases (read one case, compute something small from
it) followed by an exact *reduce* on the driver. :func:`map_cases` runs the map:

* over a dataset (``case_ids`` and ``load(case_id)``: every
  :class:`~ConformalSegLib.io.dataset.CalibrationDataset`), one task per case on any executor of
  :mod:`ConformalSegLib.common.executors`: the case is read and checked **on the worker** and only the
  function's small result travels back; the dataset goes to each worker once;
* over any other re-iterable of case-like objects (a list of
  :class:`~ConformalSegLib.phantoms.simulated_maps.SyntheticCase`), serially, streaming.

The results come back **in case order** whatever the executor, and the driver reduces them in that order,
so every number is bit-identical to a serial run: each case's result is computed by the same code from the
same volumes, and the reduction performs the same floating-point operations in the same order.

Pass 2 adds each test case's mask sizes into per-split sums. Its task records the additions in an
:class:`Updates` (``target[index] += values``) instead of performing them, and the driver replays them in
case order (:meth:`Updates.apply`): the same operations on the same operands as the in-place serial loop.
The driver holds every case's updates until the map ends: about ``S/2 x |epsilons| x |alphas|`` float64
values per key and case (with the defaults, about 100 kB per case).

``keep_going`` (datasets only): a case whose reading or checking fails is left out, and
:func:`map_cases` returns its id and error so that the caller names every left-out case in one warning.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..common.errors import ConformalSegError
from ..common.executors import ExecutorSpec, MapReport, map_ordered
from .cases import CaseSource, EvalCase, as_eval_case
from .progress import ProgressCallback

__all__ = ["CaseFunction", "Updates", "is_dataset", "map_cases"]

T = TypeVar("T")
#: ``function(shared, index, case)``: ``index`` is the case's position among the cases mapped.
CaseFunction = Callable[[Any, int, EvalCase], T]


def is_dataset(data: Any) -> bool:
    """Whether ``data`` can be read case by case on a worker (``case_ids`` and ``load``)."""
    return hasattr(data, "case_ids") and callable(getattr(data, "load", None))


@dataclass
class Mapped:
    """What :func:`map_cases` returns: the results in case order, their case ids, and the cases left out."""

    results: list[Any]
    case_ids: list[str]
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (case id, error), with keep_going
    executor: str = "serial"
    workers: int = 1


def map_cases(
    function: CaseFunction[Any],
    shared: Any,
    source: CaseSource,
    spec: ExecutorSpec | None = None,
    *,
    case_ids: Sequence[str] | None = None,
    keep_going: bool = False,
    progress: ProgressCallback | None = None,
    stage: str = "statistics",
) -> Mapped:
    """``[function(shared, i, case_i)]`` over the cases of ``source`` (``case_ids``: only those, in that order).

    ``function`` must be module level (picklable by reference) for ``processes`` and ``dask``. Non-serial
    executors and ``keep_going`` need a dataset (:func:`is_dataset`); ``progress(done, total, stage)`` is
    called as cases complete.
    """
    spec = spec or ExecutorSpec()
    data: Any = source.data
    if not is_dataset(data):
        if spec.name != "serial" or keep_going:
            raise ConformalSegError(
                f"--executor {spec.name} and --keep-going need a dataset (case_ids and load), "
                f"not {type(data).__name__}",
                fix="pass a CalibrationDataset, or run serially",
            )
        return _stream(function, shared, source, progress, stage)
    ids = list(data.case_ids if case_ids is None else case_ids)
    shipped = copy.copy(data)
    shipped.progress = None  # a terminal callback stays on the driver
    report = MapReport(spec.name, 1, [])
    outputs = map_ordered(
        _load_and_run,
        (function, shared, shipped, source.score),
        list(enumerate(ids)),
        spec,
        labels=ids,
        progress=None if progress is None else (lambda done, total, _label: progress(done, total, stage)),
        keep_going=keep_going,
        skip_failed=keep_going,
        report=report,
    )
    failed = {name for name, _ in report.failures}
    kept = [cid for cid in ids if cid not in failed]
    if hasattr(data, "labels_seen"):  # recorded on the workers' copies: bring it back to the driver
        data.labels_seen.update({cid: seen for cid, (_, seen) in zip(kept, outputs) if seen is not None})
    return Mapped([result for result, _ in outputs], kept, report.failures, report.executor, report.workers)


def _stream(
    function: CaseFunction[Any], shared: Any, source: CaseSource, progress: ProgressCallback | None, stage: str
) -> Mapped:
    results: list[Any] = []
    ids: list[str] = []
    total = source.known_length
    for i, case in enumerate(source):
        results.append(function(shared, i, case))
        ids.append(case.case_id)
        del case
        if progress is not None:
            progress(i + 1, total, stage)
    return Mapped(results, ids)


def _load_and_run(shared: tuple[CaseFunction[Any], Any, Any, str], item: tuple[int, str]) -> tuple[Any, Any]:
    """The task: read case ``item`` of the dataset (its readers' checks; the source's score), run the function.

    Returns the function's result and the label values of the case's label file (or None).
    """
    function, inner, dataset, score = shared
    index, case_id = item
    case = as_eval_case(dataset.load(case_id), score)
    seen = getattr(dataset, "labels_seen", {}).get(case_id)
    return function(inner, index, case), seen


@dataclass
class Updates:
    """In-place array updates recorded on a worker and replayed on the driver, in order.

    ``add(path, index, values)`` stands for ``target.<path>[index] += values`` and ``assign`` for
    ``target.<path>[index] = values``; ``path`` is an attribute name followed by dictionary keys.
    """

    ops: list[tuple[tuple[str, ...], Any, Any, bool]] = field(default_factory=list)

    def add(self, path: tuple[str, ...], index: Any, values: Any) -> None:
        self.ops.append((path, index, values, True))

    def assign(self, path: tuple[str, ...], index: Any, values: Any) -> None:
        self.ops.append((path, index, values, False))

    def apply(self, target: Any) -> None:
        """Perform the recorded updates on ``target`` (the same operations, in the same order)."""
        for path, index, values, add in self.ops:
            array = getattr(target, path[0])
            for key in path[1:]:
                array = array[key]
            if add:
                array[index] += values
            else:
                array[index] = values
