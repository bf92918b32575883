"""One measurement per fresh Python process: wall time and peak resident memory.

:func:`measure` starts ``python -c CHILD``, which imports ``module`` (a script of this folder), runs
``function(*args)`` and reports ``time.perf_counter`` around the call and the process's peak RSS at the end
(imports included: ``imports_only`` measures that floor): ``VmHWM`` from ``/proc/self/status`` where it exists,
else ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. On Linux ``ru_maxrss`` survives ``exec``: a child forked by a
large parent reports at least the parent's peak, which hid the streaming gains in a first run.
A fresh process per measurement, so one measurement's memory never weighs on the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

CHILD = r"""
import importlib, json, resource, sys, time
spec = json.loads(sys.argv[1])
sys.path[:0] = spec["path"]
module = importlib.import_module(spec["module"])
function = getattr(module, spec["function"])
start = time.perf_counter()
result = function(*spec["args"])
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):  # this process's own peak (ru_maxrss keeps the forking parent's across exec)
        peak_kib = int(line.split()[1])
with open(spec["out"], "w") as f:
    json.dump({"seconds": seconds, "peak_mib": peak_kib / 1024, "result": result}, f)
"""


def measure(module: str, function: str, *args: Any) -> dict[str, Any]:
    """``{"seconds", "peak_mib", "result"}`` of ``module.function(*args)`` run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {
            "path": [str(HERE), str(HERE.parent)],
            "module": module,
            "function": function,
            "args": list(args),
            "out": str(out),
        }
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(spec)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{module}.{function}{tuple(args)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


@contextmanager
def measured_on_saved_map(
    module: str,
    volume: Any,
    runs: Sequence[tuple[str, tuple[Any, ...]]],
    *,
    log: Callable[[str], None] | None = None,
) -> Iterator[tuple[Path, dict[str, dict[str, Any]]]]:
    """Measure ``module.run(MAP, *args, OUT)`` in a fresh process for every ``(name, args)`` of ``runs``.

    ``volume`` (a numpy array) is saved once to ``MAP`` in a temporary folder; each run may save its output to
    ``OUT`` = ``folder/NAME.npy``. Yields ``(folder, {name: measure(...)})`` so the caller can compare the
    outputs; the folder and every output are removed when the block ends. ``log`` is told each run's name.
    """
    import numpy as np

    with tempfile.TemporaryDirectory(prefix=f"{module}_") as tmp_name:
        folder = Path(tmp_name)
        np.save(folder / "map.npy", volume)
        results = {}
        for name, args in runs:
            if log is not None:
                log(f"{module}: {name}")
            results[name] = measure(module, "run", str(folder / "map.npy"), *args, str(folder / f"{name}.npy"))
        yield folder, results
