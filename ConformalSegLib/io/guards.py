"""Guards applied before a file is read or written: path encoding, memory, ``.npy``/``.npz`` headers.

* **Paths** must be valid UTF-8 (:func:`require_utf8_path`): SimpleITK aborts the whole process
  (``basic_string::_S_construct null``) on a path that is not, so such a path is refused with a message
  naming its bytes instead.
* **Memory**: a volume whose header implies more bytes than :func:`memory_limit_bytes` is refused before
  anything is allocated (:func:`check_allocation`). The limit is the environment variable
  ``CONFORMALSEG_MAX_VOLUME_BYTES`` (bytes) when set, otherwise :data:`DEFAULT_MEMORY_FRACTION` of the
  physical memory (a crafted 4 KB header claiming 10^15 voxels fails here, not in the allocator).
* **numpy files**: :func:`load_npy` reads the ``.npy`` header first and checks the size it implies;
  :class:`LazyNpz` opens an ``.npz`` without decompressing anything and reads a member only when asked
  for it, after checking the size its header implies, so unknown (possibly huge) members are never read.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError

#: Share of the physical memory one volume may take when ``CONFORMALSEG_MAX_VOLUME_BYTES`` is not set.
DEFAULT_MEMORY_FRACTION = 0.5
MEMORY_ENV = "CONFORMALSEG_MAX_VOLUME_BYTES"
#: Zip member names in an ``.npz`` end with this suffix.
NPY_SUFFIX = ".npy"


def require_utf8_path(path: str | PathLike[str], what: str) -> Path:
    """``path`` as a Path, or :class:`ConformalSegError` when its name is not valid UTF-8."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConformalSegError(
            f"the {what} path is not valid UTF-8 ({os.fsencode(path)!r}); the image library cannot open it",
            fix="rename the file or folder with UTF-8 (e.g. ASCII) characters",
        ) from exc
    return path


def physical_memory_bytes() -> int | None:
    """Total physical memory, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_limit_bytes() -> int:
    """The largest array (bytes) a reader may allocate (module docstring)."""
    configured = os.environ.get(MEMORY_ENV)
    if configured:
        try:
            value = int(configured)
        except ValueError as exc:
            raise ConformalSegError(
                f"{MEMORY_ENV}={configured!r} is not a whole number of bytes", fix=f"e.g. {MEMORY_ENV}=8000000000"
            ) from exc
        if value > 0:
            return value
    total = physical_memory_bytes()
    return int(total * DEFAULT_MEMORY_FRACTION) if total else 1 << 62


def check_allocation(shape: tuple[int, ...], itemsize: int, path: str | PathLike[str] | None, what: str) -> None:
    """Refuse an array of ``shape`` x ``itemsize`` bytes larger than :func:`memory_limit_bytes`."""
    if any(int(n) < 0 for n in shape):
        raise ConformalSegError(f"{what} header has a negative size {shape}", path=path, fix="re-export the file")
    nbytes = int(np.prod([int(n) for n in shape], dtype=object)) * int(itemsize)
    limit = memory_limit_bytes()
    if nbytes > limit:
        raise ConformalSegError(
            f"{what} header asks for {nbytes / 2**30:.3g} GiB ({tuple(int(n) for n in shape)} voxels), "
            f"more than the limit of {limit / 2**30:.3g} GiB",
            path=path,
            fix=f"check the file (a damaged header?), crop it, or raise the limit with {MEMORY_ENV}=BYTES",
        )


def _npy_header(handle: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an open ``.npy`` stream (positioned at its start); the stream is left after it."""
    version = np.lib.format.read_magic(handle)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _fortran, dtype = read[version](handle)
    return tuple(shape), dtype


def load_npy(path: Path, what: str) -> np.ndarray:
    """A single ``.npy`` array (no pickles), its size checked against the memory limit before reading."""
    try:
        with open(path, "rb") as handle:
            shape, dtype = _npy_header(handle)
    except (OSError, ValueError, EOFError) as exc:
        raise ConformalSegError(
            f"cannot read the {what}: not a valid .npy file ({exc})", path=path, fix="re-export or re-copy the file"
        ) from exc
    check_allocation(shape, dtype.itemsize, path, what)
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError, EOFError) as exc:
        raise ConformalSegError(
            f"cannot read the {what}: the .npy file is corrupt or truncated ({exc})",
            path=path,
            fix="re-export or re-copy the file",
        ) from exc


class LazyNpz(Mapping[str, np.ndarray]):
    """The arrays of an ``.npz``, each read (without pickles) only when looked up.

    Before a member is decompressed, its ``.npy`` header is read and the size it implies is checked
    against ``max_bytes`` (default :func:`memory_limit_bytes`), and the member's uncompressed size in the
    zip directory must match it: a member that is never looked up is never decompressed.
    """

    def __init__(self, path: str | PathLike[str], what: str, *, max_bytes: int | None = None):
        self.path = Path(path)
        self.what = what
        self.max_bytes = memory_limit_bytes() if max_bytes is None else max_bytes
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            raise self._corrupt(exc) from exc
        infos = [info for info in self._zip.infolist() if info.filename.endswith(NPY_SUFFIX)]
        self._members = {info.filename[: -len(NPY_SUFFIX)]: info for info in infos}
        if len(self._members) != len(infos):
            self._zip.close()
            raise self._corrupt(ValueError("two members have the same name"))

    def _corrupt(self, exc: BaseException) -> ConformalSegError:
        return ConformalSegError(
            f"cannot read the {self.what}: not a valid .npz archive ({exc})",
            path=self.path,
            fix="re-export or re-copy the file",
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __contains__(self, key: object) -> bool:  # without reading the member (Mapping's would decompress it)
        return key in self._members

    def __len__(self) -> int:
        return len(self._members)

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
        """Shape and dtype of member ``key`` (only its header is decompressed)."""
        try:
            with self._zip.open(self._members[key]) as handle:
                return _npy_header(handle)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise self._corrupt(exc) from exc

    def __getitem__(self, key: str) -> np.ndarray:
        info = self._members[key]  # KeyError for a missing member, as a dict would
        shape, dtype = self.header(key)
        if dtype.hasobject:
            raise ConformalSegError(
                f"{self.what} member {key!r} holds Python objects (refused: loading them could run code)",
                path=self.path,
                fix="re-create the file",
            )
        nbytes = int(np.prod([int(n) for n in shape], dtype=object)) * dtype.itemsize
        if nbytes > self.max_bytes:
            raise ConformalSegError(
                f"{self.what} member {key!r} would take {nbytes / 2**20:.4g} MiB, more than the "
                f"{self.max_bytes / 2**20:.4g} MiB allowed",
                path=self.path,
                fix=f"check the file, or raise the limit with {MEMORY_ENV}=BYTES",
            )
        if info.file_size > nbytes + 65536:  # the header is small: a member larger than its header says
            raise self._corrupt(ValueError(f"member {key!r} is larger than its header says"))
        try:
            with self._zip.open(info) as handle:
                return np.asarray(np.lib.format.read_array(handle, allow_pickle=False))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise self._corrupt(exc) from exc

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> LazyNpz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
