"""Run one function over many items (one scan each): in this process, in a process pool, or on Dask.

``map_ordered(function, shared, items, executor)`` returns ``[function(shared, item) for item in items]``
whatever the executor: the results come back **in item order**, so the caller merges them exactly as a
serial loop would (the calibration thresholds computed from them are bit-identical to ``serial``).

* ``serial`` (default): a plain loop in this process.
* ``processes``: a :class:`concurrent.futures.ProcessPoolExecutor` of spawned processes (not forked: a fork
  copies the parent's torch / BLAS thread pools in a locked state); ``shared`` is pickled once per worker
  (the pool's initializer), each task carries only its item.
* ``dask``: a ``dask.distributed`` client on ``scheduler`` (``tcp://host:8786``), or a ``LocalCluster``
  sized to the machine when no scheduler is given; ``shared`` is scattered to every worker once
  (``broadcast=True``) and each task refers to it by its future.

Work happens on the workers; only each task's return value (a compact per-scan summary) travels back.

Errors: a task that raises :class:`ConformalSegError` makes ``map_ordered`` raise the same error (its
message, file and fix, without the remote traceback) and cancel the tasks not yet run; with
``keep_going`` every failing item is collected and one error lists them all (or, with ``skip_failed``, the
failing items are left out of the results and ``report.failures`` lists them). Ctrl-C (KeyboardInterrupt
while waiting) cancels the outstanding tasks and is re-raised, so nothing after the map (a profile) is
written. ``progress(done, total, label)`` is called as tasks complete (in completion order).

Needs ``dask[distributed]`` only for the ``dask`` executor (the ``dask`` extra of pyproject.toml).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConformalSegError

EXECUTORS = ("serial", "processes", "dask")
MAX_REPORTED = 20
T = TypeVar("T")
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ExecutorSpec:
    """Which executor, where (a Dask scheduler address) and how many workers (None: the machine's cores)."""

    name: str = "serial"
    scheduler: str | None = None
    workers: int | None = None
    pool: Any = field(default=None, compare=False, repr=False)  # a process pool kept by executor_session

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ConformalSegError(f"unknown executor {self.name!r}", fix=f"use one of {', '.join(EXECUTORS)}")
        if self.scheduler is not None and self.name != "dask":
            raise ConformalSegError("--scheduler needs --executor dask", fix="add --executor dask")
        if self.workers is not None and self.workers < 1:
            raise ConformalSegError(f"--workers must be at least 1, got {self.workers}")


@dataclass
class MapReport:
    """What ran: the executor, the number of workers, and the items that failed (with ``keep_going``)."""

    executor: str
    workers: int
    failures: list[tuple[str, str]]

    def provenance(self) -> dict[str, Any]:
        return {"executor": self.executor, "workers": self.workers}


def map_ordered(
    function: Callable[[Any, Any], T],
    shared: Any,
    items: Sequence[Any],
    spec: ExecutorSpec | None = None,
    *,
    labels: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    keep_going: bool = False,
    skip_failed: bool = False,
    report: MapReport | None = None,
) -> list[T]:
    """``[function(shared, item) for item in items]`` on the chosen executor, in item order (see module doc).

    ``function`` must be a module-level function (picklable by reference) for ``processes`` and ``dask``.
    ``labels`` name the items in errors and progress (default: ``str(item)``). With ``keep_going`` and
    ``skip_failed`` the failing items are left out of the returned list instead of raising (``report.failures``
    names them with their errors).
    """
    spec = spec or ExecutorSpec()
    names = [str(x) for x in (labels if labels is not None else items)]
    results: dict[int, T] = {}
    failures: list[tuple[int, ConformalSegError]] = []
    with _running(spec, function, shared, items) as (outcomes, workers):
        for done, (index, outcome) in enumerate(outcomes, start=1):
            if isinstance(outcome, ConformalSegError):
                if not keep_going:
                    raise _plain(outcome)
                failures.append((index, outcome))
            else:
                results[index] = outcome
            if progress is not None:
                progress(done, len(items), names[index])
    if report is not None:
        report.executor, report.workers = spec.name, workers
        report.failures = [(names[i], str(e)) for i, e in sorted(failures, key=lambda f: f[0])]
    if failures and not (keep_going and skip_failed):
        raise _combined(sorted(failures, key=lambda f: f[0]), names, len(items))
    return [results[i] for i in range(len(items)) if i in results]


def _plain(error: ConformalSegError) -> ConformalSegError:
    """The task's error as raised serially: same message, file and fix, no remote traceback."""
    clean = ConformalSegError(error.message, path=error.path, fix=error.fix)
    return clean


def _combined(failures: list[tuple[int, ConformalSegError]], names: list[str], total: int) -> ConformalSegError:
    shown = [f"  {names[i]}: {e}" for i, e in failures[:MAX_REPORTED]]
    if len(failures) > MAX_REPORTED:
        shown.append(f"  ... ({len(failures) - MAX_REPORTED} more)")
    return ConformalSegError(
        f"{len(failures)} of {total} case(s) failed:\n" + "\n".join(shown) + "\n",
        fix="fix or remove the cases listed; nothing was written",
    )


Outcomes = Iterator[tuple[int, Any]]


@contextmanager
def _running(spec: ExecutorSpec, function: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> Any:
    """Yield ``(outcomes, workers)``: ``(index, result or ConformalSegError)`` in completion order."""
    if spec.name == "serial" or not items:
        yield _serial(function, shared, items), 1
    elif spec.name == "processes" and spec.pool is not None:
        with _session_pool_map(spec.pool, function, shared, items) as outcomes:
            yield outcomes, spec.workers or os.cpu_count() or 1
    elif spec.name == "processes":
        workers = spec.workers or os.cpu_count() or 1
        payload = pickle.dumps(shared)
        context = multiprocessing.get_context("spawn")  # fork would copy torch's / BLAS's threads: deadlocks
        with ProcessPoolExecutor(workers, context, initializer=_set_shared, initargs=(payload,)) as pool:
            futures = {pool.submit(_call_shared, function, item): i for i, item in enumerate(items)}
            try:
                yield _completed(futures), workers
            finally:  # an error or Ctrl-C: drop what has not started
                pool.shutdown(wait=True, cancel_futures=True)
    else:
        with _dask_client(spec) as client:
            workers = len(client.nthreads()) or 1
            handle = client.scatter(shared, broadcast=True)
            futures = {client.submit(_call_task, function, handle, item, pure=False): i for i, item in enumerate(items)}
            try:
                yield _dask_completed(futures), workers
            finally:
                client.cancel(list(futures))


def _serial(function: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> Outcomes:
    for i, item in enumerate(items):
        yield i, _call_task(function, shared, item)


def _call_task(function: Callable[[Any, Any], Any], shared: Any, item: Any) -> Any:
    """Run one task; a user error is returned (not raised) so that the driver decides what to do."""
    try:
        return function(shared, item)
    except ConformalSegError as exc:
        return ConformalSegError(exc.message, path=exc.path, fix=exc.fix)


_SHARED: dict[str, Any] = {}


def _set_shared(payload: bytes) -> None:
    _SHARED["value"] = pickle.loads(payload)


def _call_shared(function: Callable[[Any, Any], Any], item: Any) -> Any:
    return _call_task(function, _SHARED["value"], item)


@contextmanager
def _session_pool_map(
    pool: ProcessPoolExecutor, function: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]
) -> Iterator[Outcomes]:
    """One map on a pool that outlives it: ``shared`` goes through a file, read once per worker and map."""
    with tempfile.TemporaryDirectory(prefix="conformalseg-shared-") as tmp:
        path = Path(tmp) / "shared.pickle"
        path.write_bytes(pickle.dumps(shared))
        token = uuid.uuid4().hex
        futures = {pool.submit(_call_from_file, function, token, str(path), item): i for i, item in enumerate(items)}
        try:
            yield _completed(futures)
        finally:  # an error or Ctrl-C: drop what has not started, let the running tasks end before the file goes
            for future in futures:
                future.cancel()
            wait(list(futures))


def _call_from_file(function: Callable[[Any, Any], Any], token: str, path: str, item: Any) -> Any:
    if _SHARED.get("token") != token:
        _SHARED["value"] = pickle.loads(Path(path).read_bytes())
        _SHARED["token"] = token
    return _call_task(function, _SHARED["value"], item)


def _completed(futures: dict[Future[Any], int]) -> Outcomes:
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in sorted(finished, key=futures.__getitem__):
            yield futures[future], future.result()


def _dask_completed(futures: dict[Any, int]) -> Outcomes:
    for future in _distributed().as_completed(list(futures)):
        yield futures[future], future.result()


def _distributed() -> Any:
    """The ``distributed`` module (untyped: imported as a value)."""
    try:
        return importlib.import_module("distributed")
    except ImportError as exc:
        raise ConformalSegError(
            "--executor dask needs dask[distributed]", fix="pip install 'conformalseg[dask]'"
        ) from exc


@contextmanager
def executor_session(spec: ExecutorSpec) -> Iterator[ExecutorSpec]:
    """Keep one executor up across several :func:`map_ordered` calls (e.g. the two passes of ``evaluate``).

    For ``dask`` without a scheduler, one ``LocalCluster`` is started here and the yielded spec points at it
    (instead of a cluster per map); for ``processes``, one pool of spawned processes serves every map (each
    map's ``shared`` is written to a temporary file once and read once per worker); other specs are yielded
    unchanged.
    """
    if spec.name == "processes" and spec.pool is None:
        workers = spec.workers or os.cpu_count() or 1
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
            yield replace(spec, pool=pool)
        return
    if spec.name != "dask" or spec.scheduler is not None:
        yield spec
        return
    local_cluster = _distributed().LocalCluster
    workers = spec.workers or os.cpu_count() or 1
    with local_cluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield ExecutorSpec("dask", scheduler=cluster.scheduler_address, workers=spec.workers)


@contextmanager
def _dask_client(spec: ExecutorSpec) -> Any:
    distributed = _distributed()
    Client, LocalCluster = distributed.Client, distributed.LocalCluster
    if spec.scheduler is not None:
        try:
            client = Client(spec.scheduler, timeout="30s")
        except (OSError, ValueError) as exc:  # refused / timed out; an address that does not parse
            raise ConformalSegError(
                f"cannot reach the Dask scheduler at {spec.scheduler} ({exc})",
                fix="check the address (tcp://HOST:8786) and that the scheduler is running",
            ) from exc
        with client:
            yield client
        return
    workers = spec.workers or os.cpu_count() or 1
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        yield client
