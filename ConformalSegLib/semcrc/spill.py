"""Interval scans kept on disk instead of in RAM (what the interval ``evaluate`` uses).

:func:`spill_scan` writes a scan's per-voxel arrays (``index``, ``need``, ``width``, ``group``) as ``.npy``
files into a folder and returns a :class:`SpilledScan`, an :class:`~.intervals.IntervalScan` whose arrays are
read-only memory maps opened on each access: a run over many scans holds in RAM only the pages of the arrays
in use, and the kernel drops them once the maps are released. Values are the stored arrays bit for bit, so
every procedure and metric computes exactly what it computes on the in-memory scan.

A spilled scan pickles as its folder name, shape and size (a few hundred bytes): an executor's workers open
the same files, so the folder must be one they can read (on another machine: a shared filesystem); a worker
that cannot see it gets one :class:`~.errors.IntervalInputError` naming the file and that fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import IntervalInputError
from .intervals import IntervalScan

_ARRAYS = ("index", "need", "width", "group")


class SpilledScan(IntervalScan):
    """An :class:`~.intervals.IntervalScan` whose arrays live in ``folder`` (module docstring)."""

    def __init__(self, folder: Path, shape: tuple[int, ...], d: int, case_id: str) -> None:  # noqa: D107
        object.__setattr__(self, "folder", folder)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "case_id", case_id)
        object.__setattr__(self, "_d", d)

    def _array(self, name: str) -> np.ndarray:
        path = self.folder / f"{name}.npy"  # type: ignore[attr-defined]
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise IntervalInputError(
                f"scan {self.case_id!r}: its spilled arrays are not on this machine",
                path=path,
                fix="on a cluster whose workers run on other machines, pass --spill-dir DIR on a filesystem that "
                "this machine and every worker can read and write",
            ) from None

    @property
    def index(self) -> np.ndarray:
        return self._array("index")

    @property
    def need(self) -> np.ndarray:
        return self._array("need")

    @property
    def width(self) -> np.ndarray:
        return self._array("width")

    @property
    def group(self) -> np.ndarray:
        return self._array("group")

    @property
    def d(self) -> int:
        return int(self._d)  # type: ignore[attr-defined]


def spill_scan(scan: IntervalScan, folder: Path) -> SpilledScan:
    """Write ``scan``'s arrays into the folder ``folder`` (created; its parent must exist) and return the scan
    reading them from there."""
    # no parents: a task still running after its evaluation stopped cannot recreate a removed spill folder;
    # exist_ok: a task the executor retried writes its scan again
    folder.mkdir(exist_ok=True)
    for name in _ARRAYS:
        np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(scan, name)), allow_pickle=False)
    return SpilledScan(folder, tuple(scan.shape), scan.d, scan.case_id)
