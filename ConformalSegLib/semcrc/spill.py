"""Interval scans kept on disk instead of in RAM (what the interval ``evaluate`` uses).

:func:`spill_scan` writes a scan's per-voxel arrays (``index``, ``need``, ``width``, ``group``) as ``.npy``
files into a folder and returns a :class:`SpilledScan`, an :class:`~.intervals.IntervalScan` whose arrays are
read-only memory maps opened on each access: a run over many scans holds in RAM only the pages of the arrays
in use, and the kernel drops them once the maps are released. Values are the stored arrays bit for bit, so
every procedure and metric computes exactly what it computes on the in-memory scan.

An access costs one ``open`` and one ``mmap`` (about 30 us): each array's dtype, shape and data offset are read
from its ``.npy`` header once, when it is written, and kept in the scan, so an access parses no header (through
``np.load(mmap_mode="r")`` it cost about 0.3 ms, and the per-organ loops of the procedures open every scan's
arrays once per organ: the memory-mapped evaluation was 2.7x slower than the in-memory one).

A spilled scan pickles as its folder name, shape and size (a few hundred bytes): an executor's workers open
the same files, so the folder must be one they can read (on another machine: a shared filesystem); a worker
that cannot see it gets one :class:`~.errors.IntervalInputError` naming the file and that fix.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from .errors import IntervalInputError
from .intervals import IntervalScan

_ARRAYS = ("index", "need", "width", "group")
#: An array's ``(dtype string, shape, byte offset of its data)`` in its ``.npy`` file.
_Layout = tuple[str, tuple[int, ...], int]


class SpilledScan(IntervalScan):
    """An :class:`~.intervals.IntervalScan` whose arrays live in ``folder`` (module docstring)."""

    def __init__(  # noqa: D107
        self, folder: Path, shape: tuple[int, ...], d: int, case_id: str, layout: dict[str, _Layout]
    ) -> None:
        object.__setattr__(self, "folder", folder)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "case_id", case_id)
        object.__setattr__(self, "_d", d)
        object.__setattr__(self, "_layout", layout)

    def _array(self, name: str) -> np.ndarray:
        path = self.folder / f"{name}.npy"  # type: ignore[attr-defined]
        dtype, shape, offset = self._layout[name]  # type: ignore[attr-defined]
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # keeps its own descriptor
        except FileNotFoundError:
            raise IntervalInputError(
                f"scan {self.case_id!r}: its spilled arrays are not on this machine",
                path=path,
                fix="on a cluster whose workers run on other machines, pass --spill-dir DIR on a filesystem that "
                "this machine and every worker can read and write",
            ) from None
        count = math.prod(shape)
        if len(mapped) != offset + count * np.dtype(dtype).itemsize:
            raise IntervalInputError(
                f"scan {self.case_id!r}: its spilled array changed size after it was written",
                path=path,
                fix="do not let another process write into the spill folder (--spill-dir) during the evaluation",
            )
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)

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
    layout = {}
    for name in _ARRAYS:
        path = folder / f"{name}.npy"
        np.save(path, np.ascontiguousarray(getattr(scan, name)), allow_pickle=False)
        layout[name] = _read_layout(path)
    return SpilledScan(folder, tuple(scan.shape), scan.d, scan.case_id, layout)


def _read_layout(path: Path) -> _Layout:
    """``(dtype, shape, data offset)`` of the ``.npy`` file ``path`` (C order, as :func:`numpy.save` wrote it)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = header(f)
        assert not fortran_order  # written from a C-contiguous array
        return dtype.str, tuple(shape), f.tell()
