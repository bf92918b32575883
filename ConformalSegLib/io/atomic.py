"""Atomic file output: a file appears complete at its final path, or not at all.

Writers produce a temporary file in the destination folder (a hidden name such as
``.lesion.tmp-k3j9.nii.gz`` for ``lesion.nii.gz``, keeping the format suffix so SimpleITK and pynrrd
pick the format from the extension) and move it onto the final path with :func:`os.replace` only
after writing succeeded. On failure the temporary file is deleted. An
existing output is never overwritten unless ``force=True``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = format_suffix(target)
        stem = target.name[: len(target.name) - len(suffix)]
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise ConformalSegError(
            f"cannot create the output file ({exc.strerror or exc})",
            path=target,
            fix="choose a writable output location",
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())
        check_can_write(target, force=force)  # it may have appeared while we were writing
        os.replace(tmp, target)
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
