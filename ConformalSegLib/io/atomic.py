"""Atomic file output: a file appears complete at its final path, or not at all.

Writers produce a temporary file in the destination folder (a hidden name such as
``.lesion.tmp-k3j9.nii.gz`` for ``lesion.nii.gz``, keeping the format suffix so SimpleITK and pynrrd
pick the format from the extension) and move it onto the final path with :func:`os.replace` only
after writing succeeded. On failure the temporary file is deleted. An
existing output is never overwritten unless ``force=True``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import IO

import numpy as np

from ..common.errors import ConformalSegError

#: Multi-part extensions that must stay together on a temporary file name.
COMPOUND_SUFFIXES: tuple[str, ...] = (".nii.gz", ".seg.nrrd", ".tar.gz")

OVERWRITE_FIX = "pass --force to overwrite or choose another output"


def format_suffix(path: str | PathLike[str]) -> str:
    """The format extension of ``path``: a known compound one (``.nii.gz``) or the last suffix."""
    name = Path(path).name.lower()
    for suffix in COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return Path(path).name[-len(suffix) :]
    return Path(path).suffix


def check_can_write(path: str | PathLike[str], *, force: bool = False) -> Path:
    """Raise :class:`ConformalSegError` if ``path`` may not be (over)written; return it as a Path."""
    target = Path(path)
    if target.is_dir():
        raise ConformalSegError("output path is an existing folder", path=target, fix="give a file name, not a folder")
    if target.exists() and not force:
        raise ConformalSegError("output file already exists", path=target, fix=OVERWRITE_FIX)
    return target


def _temporary_beside(target: Path) -> tuple[int, Path]:
    """An open, empty hidden temporary file in ``target``'s folder (created), with ``target``'s format
    suffix so that writers that pick the format by name write the right one; errors name ``target``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = format_suffix(target)
        stem = target.name[: len(target.name) - len(suffix)]
        fd, name = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise ConformalSegError(
            f"cannot create the output file ({exc.strerror or exc})",
            path=target,
            fix="choose a writable output location",
        ) from exc
    return fd, Path(name)


def _default_file_mode() -> int:
    """Permissions a normally created file would get (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_output(path: str | PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file already exists (empty) when yielded; writers may overwrite it. Parent
    folders are created. Raises :class:`ConformalSegError` when ``path`` exists and not ``force``.
    """
    target = check_can_write(path, force=force)
    fd, tmp = _temporary_beside(target)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())
        check_can_write(target, force=force)  # it may have appeared while we were writing
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(target, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | PathLike[str], data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename); return the path."""
    with atomic_output(path, force=force) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | PathLike[str], text: str, *, force: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode(encoding), force=force)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_old(target: Path) -> Path | None:
    """A hard link (or copy) of an existing ``target`` under a hidden name: the previous version, kept
    until the new set of files is complete."""
    if not target.exists():
        return None
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.old-", dir=target.parent)
    os.close(fd)
    os.unlink(name)
    try:
        os.link(target, name)
    except OSError:  # no hard links on this file system
        shutil.copy2(target, name)
    return Path(name)


#: Writes a file's contents into an open binary handle (readable too: it may read back what it wrote).
FileWriter = Callable[[IO[bytes]], object]


class NpzWriter:
    """A :data:`FileWriter` of ``arrays`` as a compressed ``.npz``, straight into the temporary file (no copy of
    the archive in memory), which keeps the SHA-256 of what it wrote in :attr:`sha256` (for the JSON after it)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.sha256: str | None = None

    def __call__(self, handle: IO[bytes]) -> None:
        np.savez_compressed(handle, **self.arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
        handle.flush()
        handle.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        self.sha256 = digest.hexdigest()


def atomic_write_files(
    files: Sequence[tuple[str | PathLike[str], bytes | FileWriter]], *, force: bool = False
) -> list[Path]:
    """Write several files as one unit: all new versions appear, or the previous ones stay.

    Each file's contents are ``bytes`` or a :data:`FileWriter`, called in the order given (so a JSON writer can
    use the checksum an :class:`NpzWriter` before it computed).

    Every file is first written in full to a temporary name beside its target and flushed to disk
    (a full disk fails here, before any target is touched); then the temporaries are renamed onto the
    targets in the order given (a profile: the ``.npz`` first, the JSON that names it last). The
    previous versions are kept as hidden hard links until every rename succeeded, and put back if one
    fails or the process is interrupted in between.
    """
    targets = [check_can_write(path, force=force) for path, _ in files]
    temporaries: list[Path] = []
    kept: list[tuple[Path, Path | None]] = []
    done: list[Path] = []
    try:
        for target, (_, data) in zip(targets, files):
            temporaries.append(_write_temporary(target, data))
        for target in targets:
            kept.append((target, _keep_old(target)))
        for target, tmp in zip(targets, temporaries):
            check_can_write(target, force=force)
            os.replace(tmp, target)
            done.append(target)
        for folder in {t.parent for t in targets}:
            _fsync_folder(folder)
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        for target, old in kept:  # put the previous versions back (or remove the new files)
            if old is not None and target.exists() and os.path.samefile(old, target):
                old.unlink()  # not replaced yet (and rename() between two links of one file does nothing)
            elif old is not None:
                os.replace(old, target)
            elif target in done:
                target.unlink(missing_ok=True)
        raise
    for _, old in kept:
        if old is not None:
            old.unlink(missing_ok=True)
    return targets


def _write_temporary(target: Path, data: bytes | FileWriter) -> Path:
    """``data`` (or what the writer ``data`` writes) in a flushed temporary file beside ``target`` (errors name
    ``target``)."""
    fd, tmp = _temporary_beside(target)
    try:
        with os.fdopen(fd, "w+b") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_file_mode())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(target, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_error(target: str | PathLike[str], exc: OSError) -> ConformalSegError:
    """The message for a write that failed (disk full, quota, permission): nothing was written."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ConformalSegError(
        f"cannot write the output ({reason}); nothing was written",
        path=target,
        fix="free disk space or choose a writable output location with enough space",
    )


@contextmanager
def staged_folder(out: str | PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden staging folder for the files of ``out``; publish them only when the block succeeds.

    A new ``out`` is the staging folder renamed (one atomic step). Into an existing ``out`` the staged
    files are moved after checking, before the first move, that none exists (unless ``force``). On an
    error or Ctrl-C the staging folder is removed: no partial result set is left behind.
    """
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ConformalSegError("--out names an existing file, not a folder", path=target, fix="give a folder name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise ConformalSegError(
            f"cannot create the output folder ({exc.strerror or exc})", path=target, fix="choose a writable location"
        ) from exc
    try:
        yield stage
        _publish(stage, target, force=force)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, target: Path, *, force: bool) -> None:
    """Move the staged files into ``target`` (see :func:`staged_folder`)."""
    try:
        if not target.exists():
            os.chmod(stage, 0o777 & ~_umask())
            os.rename(stage, target)
            return
        files = sorted(p for p in stage.iterdir())
        for staged in files:
            check_can_write(target / staged.name, force=force)
        for staged in files:
            os.replace(staged, target / staged.name)
    except OSError as exc:
        raise write_error(target, exc) from exc


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
